"""The inbox scan places every file in its series, or names what is wrong with it.

Most files are read by a quick reader of raw elements; anything unusual goes to pydicom. Both must place
every file the same way, so the quick reader is checked against pydicom on every sample file there is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from anondrop.ingest import scan
from tests.conftest import sample, sample_files

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the odd sample files
ROUTE_TAGS = (0x00080060, 0x00080070, 0x00081010)  # Modality, Manufacturer, StationName


def test_the_quick_reader_places_every_sample_file_as_pydicom_does(monkeypatch: pytest.MonkeyPatch) -> None:
    files = sample_files()
    quick = [scan.read_info(f, f.name, None, ROUTE_TAGS) for f in files]
    monkeypatch.setattr(scan, "_quick_values", lambda *a, **k: None)
    slow = [scan.read_info(f, f.name, None, ROUTE_TAGS) for f in files]
    assert len(files) > 150
    # SC_rgb_jpeg.dcm, among them, claims explicit VR in its meta but is implicit VR: pydicom copes, and so
    # must the scan.
    assert [q for q, s in zip(quick, slow, strict=True) if q != s] == []


@pytest.mark.parametrize("cut", [200, 600])
def test_a_header_cut_short_is_not_placed_in_a_series(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "cut.dcm"
    path.write_bytes(sample("CT_small.dcm").read_bytes()[:cut])
    info = scan.read_info(path, "cut.dcm")
    assert isinstance(info, scan.BadFile)
    assert info.code in ("truncated", "missing-uid")
