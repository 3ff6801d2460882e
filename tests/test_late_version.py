"""A late file for a delivered series yields a new, complete version, even after its sources were deleted."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import CliResult, Site, sample, write_instances


def _series(folder: Path, count: int, start: int = 1, series_uid: str | None = None) -> str:
    template = dcmread(sample("CT_small.dcm"))
    template.PatientName = "Latecomer^Lucy"
    template.PatientID = "LATE-5512"
    uid = series_uid or generate_uid()
    template.SeriesInstanceUID = uid
    write_instances(folder, template, count, first=start, name="slice{:03d}.dcm")
    return uid


def _instances(zip_path: Path) -> list[int]:
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".dcm"))
        numbers = []
        for name in names:
            with zf.open(name) as fh:
                numbers.append(int(dcmread(fh, stop_before_pixels=True).InstanceNumber))
        manifest = json.loads(zf.read("manifest.json"))
        assert manifest["instances"] == len(names) == len(manifest["entries"])
    return numbers


def test_late_file_after_delete_gives_complete_v2(site: Site, cli: Callable[..., CliResult]) -> None:
    site.write_config(extra='[input]\non_success = "delete"\n')
    uid = _series(site.inbox / "ct", 3)
    first = cli("once", "--config", site.config)
    assert first.returncode == 0, first.stderr
    [v1] = site.outputs()
    v1_bytes = v1.read_bytes()
    assert not list(site.inbox.rglob("*.dcm"))  # sources gone after delivery
    _series(site.inbox / "ct-late", 1, start=4, series_uid=uid)
    second = cli("once", "--config", site.config)
    assert second.returncode == 0, second.stderr
    outputs = site.outputs()
    assert len(outputs) == 2
    v2 = next(p for p in outputs if p != v1)
    assert v2.name.endswith("_v2.zip")
    assert v1.read_bytes() == v1_bytes  # the first version is never touched
    assert _instances(v2) == [1, 2, 3, 4]  # complete: the earlier entries were carried over, in order
    assert _instances(v1) == [1, 2, 3]


def test_late_file_with_keep_gives_complete_v2_without_duplicates(site: Site, cli: Callable[..., CliResult]) -> None:
    uid = _series(site.inbox / "ct", 3)
    assert cli("once", "--config", site.config).returncode == 0
    _series(site.inbox / "ct", 1, start=4, series_uid=uid)
    assert cli("once", "--config", site.config).returncode == 0
    v2 = next(p for p in site.outputs() if p.name.endswith("_v2.zip"))
    assert _instances(v2) == [1, 2, 3, 4]
    third = cli("once", "--config", site.config)
    assert third.returncode == 0 and len(site.outputs()) == 2  # nothing new: nothing produced


def test_output_written_but_not_journaled_is_adopted_not_repeated(site: Site, cli: Callable[..., CliResult]) -> None:
    """A crash after the ZIP's rename but before the journal write: the next run must not make a _v2."""
    _series(site.inbox / "ct", 3)
    assert cli("once", "--config", site.config).returncode == 0
    [v1] = site.outputs()
    before = v1.read_bytes()
    (site.state / "journal.sqlite").unlink()  # as if the journal never heard of the delivery
    for extra in ("journal.sqlite-wal", "journal.sqlite-shm"):
        (site.state / extra).unlink(missing_ok=True)
    again = cli("once", "--config", site.config)
    assert again.returncode == 0, again.stderr
    assert site.outputs() == [v1] and v1.read_bytes() == before
    assert cli("once", "--config", site.config).returncode == 0 and site.outputs() == [v1]
