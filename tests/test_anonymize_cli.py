"""`anondrop anonymize PATH --out DIR`: ad hoc de-identification that never touches its source."""

from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread

from tests.conftest import CliResult, Site, sample


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_anonymize_folder_leaves_source_and_inbox_untouched(
    site: Site, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    source = tmp_path / "Smith^Anna CT"
    source.mkdir()
    ds = dcmread(sample("CT_small.dcm"))
    ds.PatientName = "Smith^Anna"
    ds.PatientID = "SMITH-001"
    ds.save_as(source / "a.dcm", enforce_file_format=True)
    shutil.copy(sample("MR_small.dcm"), source / "b.dcm")
    (source / "notes.txt").write_text("not dicom")
    (site.inbox / "x.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    before_src, before_inbox = _digest(source), _digest(site.inbox)
    out = tmp_path / "out"
    res = cli("anonymize", source, "--out", out, "--config", site.config)
    assert res.returncode == 3, res.stdout + res.stderr  # notes.txt is reported as not DICOM
    assert "not-dicom" in res.stdout
    # Its summary, read from a pipe: plain lines, no table drawing (a log or a cron mail shows it as it is).
    lines = res.stdout.splitlines()
    assert lines[0] == "anondrop anonymize"
    assert re.fullmatch(r"  series delivered +2  2 files", lines[1]), lines
    assert not set("┃│━┏┡╇└") & set(res.stdout)
    assert _digest(source) == before_src and _digest(site.inbox) == before_inbox
    assert not list(site.quarantine.rglob("*")) and not list(site.outbox.rglob("*.zip"))
    zips = sorted(out.rglob("*.zip"))
    assert len(zips) == 2
    for z in zips:
        assert "SMITH" not in str(z.relative_to(out)).upper()
        with zipfile.ZipFile(z) as zf:
            for name in zf.namelist():
                assert b"SMITH" not in zf.read(name).upper()


def test_anonymize_single_file_and_missing_path(site: Site, cli: Callable[..., CliResult], tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = cli("anonymize", sample("CT_small.dcm"), "--out", out, "--config", site.config)
    assert res.returncode == 0, res.stderr
    assert len(list(out.rglob("*.zip"))) == 1
    res = cli("anonymize", tmp_path / "nope", "--out", out, "--config", site.config)
    assert res.returncode == 2 and "no such file" in res.stderr
