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


def test_a_zip_in_the_inbox_is_told_by_its_first_bytes_and_a_dual_personality_file_stays_dicom(
    tmp_path: Path,
) -> None:
    import zipfile

    archive = tmp_path / "export.dat"  # no .zip suffix: the bytes decide
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.dcm", sample("CT_small.dcm").read_bytes())
    info = scan.read_info(archive, "export.dat")
    assert isinstance(info, scan.BadFile) and info.code == scan.CONTAINER
    # The daemon tells containers apart before it reads a file: a ZIP reaching its read is not DICOM.
    late = scan.read_info(archive, "export.dat", sniff_zip=False)
    assert isinstance(late, scan.BadFile) and late.code == "not-dicom"
    # Inside a container, a nested archive is the unpacker's business, not a second container.
    inner = scan.read_info(archive, "x.zip!export.dat", container=tmp_path / "x.zip")
    assert isinstance(inner, scan.BadFile) and inner.code != scan.CONTAINER
    # DICOM whose free-form preamble starts like a ZIP is DICOM: taken as a container it would be lost.
    dual = tmp_path / "dual.dcm"
    dual.write_bytes(b"PK\x03\x04" + sample("CT_small.dcm").read_bytes()[4:])
    assert isinstance(scan.read_info(dual, "dual.dcm"), scan.FileInfo)


def test_the_walk_lists_regular_files_in_a_stable_order_and_skips_links_hidden_and_junk(tmp_path: Path) -> None:
    root = tmp_path / "inbox"
    for rel in ("b/2.dcm", "b/1.dcm", "a.dcm", "b/c/3.dcm", ".hidden/x.dcm", "__MACOSX/y.dcm", "b/.DS_Store",
                "b/Thumbs.db", "z.part"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "link.dcm").symlink_to(root / "a.dcm")
    (root / "linked").symlink_to(root / "b", target_is_directory=True)
    found = list(scan.walk(root, ["*.part"]))
    assert [rel for _p, rel in found] == ["a.dcm", "b/1.dcm", "b/2.dcm", "b/c/3.dcm"]
    assert all(p == root / rel for p, rel in found)
