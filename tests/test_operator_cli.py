"""What an operator runs after the fact: `anondrop status` and `anondrop quarantine list | retry | purge`.

Each test first lets `anondrop once` do real work on a small drop (a good series, something that belongs in
quarantine), then runs the operator's commands as separate processes and checks what they print and what they
do to the folders.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import CliResult, Site, run_cli, sample

EXIT_OK, EXIT_CONFIG, EXIT_QUARANTINED = 0, 2, 3
PATIENT_NAME = "Quixworth^Zebedee"
PATIENT_ID = "QX-99117-Z"
ENTRY_ID = re.compile(r"\d{8}T\d{6}Z-[a-z0-9-]+-[0-9a-f]{6}")


def write_series(folder: Path, n: int, modality: str = "CT") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(sample("CT_small.dcm"))
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = modality
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    files = []
    for number in range(1, n + 1):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        path = folder / f"IM{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def cli(site: Site, *args: str) -> CliResult:
    return run_cli(*args, "--config", site.config)


def status_json(site: Site) -> dict[str, object]:
    result = cli(site, "status", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    assert isinstance(doc, dict)
    return doc


def entry_ids(site: Site) -> dict[str, str]:
    """`quarantine list`, as reason code -> entry id."""
    result = cli(site, "quarantine", "list")
    assert result.returncode == EXIT_OK, result.stderr
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        match = ENTRY_ID.search(line)
        if match:
            code = match.group(0).split("-", 1)[1].rsplit("-", 1)[0]
            found[code] = match.group(0)
    return found


def instances_in(zip_path: Path) -> int:
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dcm")]
        for name in names:
            dcmread(io.BytesIO(zf.read(name)))
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["instances"] == len(names)
    return len(names)


def test_status_after_a_once_run_shows_deliveries_events_and_quarantine(site: Site) -> None:
    write_series(site.inbox / "ct", 3)
    (site.inbox / "letter.dcm").write_text("Dear colleague, ...\n")
    once = cli(site, "once")
    assert once.returncode == EXIT_QUARANTINED, once.stdout + once.stderr
    [zip_path] = site.outputs()
    rel = zip_path.relative_to(site.outbox).as_posix()

    doc = status_json(site)
    assert doc["series_by_state"] == {"delivered": 1}
    events = doc["recent_events"]
    assert isinstance(events, list)
    by_name = {e["event"]: e for e in events}
    assert {"series_delivered", "file_quarantined"} <= set(by_name)
    assert by_name["series_delivered"]["detail"] == f"3 files -> {rel}"
    assert by_name["series_delivered"]["series"] == zip_path.stem.rsplit("_", 1)[1]
    assert by_name["file_quarantined"]["detail"] == "not-dicom: 1 file(s)"
    assert doc["quarantine"] == {"entries": 1, "files": 1, "by_reason": {"not-dicom": 1}}

    text = cli(site, "status")
    assert text.returncode == EXIT_OK, text.stderr
    assert re.search(r"delivered\W+1\b", text.stdout), text.stdout
    assert "series_delivered" in text.stdout and "file_quarantined" in text.stdout
    assert "quarantine: 1 entries, 1 files (not-dicom: 1)" in text.stdout
    for out in (text.stdout, json.dumps(doc)):
        assert "Quixworth" not in out and PATIENT_ID not in out


def test_status_on_a_fresh_installation_reports_nothing_yet(site: Site) -> None:
    doc = status_json(site)
    assert doc["series_by_state"] == {}
    assert doc["recent_events"] == []
    assert doc["quarantine"] == {"entries": 0, "files": 0, "by_reason": {}}


def test_quarantine_list_retry_and_purge_end_to_end(site: Site) -> None:
    # Ultrasound often has burned-in text, so by default it is held back for a person to look at.
    us_files = write_series(site.inbox / "us", 2, modality="US")
    originals = {p.relative_to(site.inbox): p.read_bytes() for p in us_files}
    (site.inbox / "notes.dcm").write_text("not an image\n")
    once = cli(site, "once")
    assert once.returncode == EXIT_QUARANTINED, once.stdout + once.stderr
    assert site.outputs() == []
    assert not any(p.exists() for p in us_files)

    ids = entry_ids(site)
    assert set(ids) == {"burned-in", "not-dicom"}, ids
    listing = cli(site, "quarantine", "list").stdout
    assert re.search(rf"{ids['burned-in']}\W+burned-in\W+2\b", listing), listing

    # The operator checks the images, decides to release ultrasound from this source, and retries.
    site.write_config(profile_extra='burned_in_suspect = "deliver"\n')
    retry = cli(site, "quarantine", "retry", ids["burned-in"])
    assert retry.returncode == EXIT_OK, retry.stderr
    assert "2 file(s) moved back to the inbox" in retry.stdout
    assert {p.relative_to(site.inbox): p.read_bytes() for p in site.inbox.rglob("*.dcm") if p.parent.name == "us"} \
        == originals, "retry did not put the files back where they were, as they were"
    assert set(entry_ids(site)) == {"not-dicom"}

    again = cli(site, "once")
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    [zip_path] = site.outputs()
    assert instances_in(zip_path) == 2
    assert zip_path.name.startswith("US_")

    unknown = cli(site, "quarantine", "retry", "20000101T000000Z-not-dicom-abcdef")
    assert unknown.returncode == EXIT_CONFIG
    assert "no such quarantine entry" in unknown.stderr

    keep = cli(site, "quarantine", "purge", "--older-than", "30d")
    assert keep.returncode == EXIT_OK, keep.stderr
    assert set(entry_ids(site)) == {"not-dicom"}, "a fresh entry was purged as if it were 30 days old"
    purge = cli(site, "quarantine", "purge", "--older-than", "0s")
    assert purge.returncode == EXIT_OK, purge.stderr
    assert purge.stdout.strip().startswith("1 ")
    assert entry_ids(site) == {}
    assert not any(site.quarantine.iterdir())
    assert status_json(site)["quarantine"] == {"entries": 0, "files": 0, "by_reason": {}}


def test_purge_with_a_bad_age_says_how_to_write_it(site: Site) -> None:
    result = cli(site, "quarantine", "purge", "--older-than", "soon")
    assert result.returncode == EXIT_CONFIG
    assert "30d" in result.stderr
