"""Acceptance: `anondrop once` on a realistic hospital drop lets no planted identifier out, anywhere.

The drop (``phi_drop.build_drop``) hides names, IDs, dates, places and UIDs in folder and file names, a ZIP
container, a DICOMDIR, OS junk, nested and private elements, free text and the file meta. Every byte that
comes out (ZIP names and paths, entry names, manifest, every element of every DICOM entry, and the raw bytes
of everything) is searched for every planted string; the fate of every input file is accounted for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tests.conftest import Site, run_cli
from tests.phi_drop import (
    CT_VISIT,
    MR_VISIT,
    RT_VISIT,
    PlantedPHI,
    build_drop,
    element_bytes,
    walk,
)

EXIT_OK, EXIT_QUARANTINED = 0, 3
WELL_KNOWN = "1.2.840.10008."
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
IMPLEMENTATION_CLASS_UID = 0x00020012  # the writer's own UID, not the patient's
JUNK_NAMES = {".ds_store", "thumbs.db", "dicomdir"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Running the product and collecting everything it produced
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    zip_path: Path
    name: str
    data: bytes

    @property
    def where(self) -> str:
        return f"{self.zip_path.name}:{self.name}"


@dataclass(frozen=True)
class OutInstance:
    entry: Entry
    ds: Dataset

    @property
    def key(self) -> tuple[str, int]:
        return str(self.ds.get("Modality", "")), int(self.ds.get("InstanceNumber", -1))


@dataclass(frozen=True)
class Quarantined:
    path: Path
    entry: Path
    reason: dict[str, Any]


@dataclass
class Run:
    site: Site
    planted: PlantedPHI
    returncode: int
    output: str
    before: dict[str, bytes]
    zips: list[Path] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    instances: list[OutInstance] = field(default_factory=list)
    manifests: list[Entry] = field(default_factory=list)
    others: list[Entry] = field(default_factory=list)  # entries that are neither DICOM nor the manifest
    quarantine: dict[str, list[Quarantined]] = field(default_factory=dict)  # by sha256 of the file

    def by_key(self) -> dict[tuple[str, int], OutInstance]:
        out: dict[tuple[str, int], OutInstance] = {}
        for inst in self.instances:
            assert inst.key not in out, f"two outputs claim {inst.key}: {out[inst.key].entry.where}, {inst.entry.where}"
            out[inst.key] = inst
        return out

    def quarantine_summary(self) -> str:
        reasons = {json.dumps(q.reason, sort_keys=True)[:300] for qs in self.quarantine.values() for q in qs}
        return "quarantine reasons:\n  " + "\n  ".join(sorted(reasons)) + f"\nCLI output:\n{self.output[-3000:]}"


def make_site(root: Path, drop: Path, extra: str, options: list[str] | None = None) -> Site:
    site = Site(root=root, config=root / "anondrop.toml", inbox=root / "inbox", outbox=root / "outbox",
                quarantine=root / "quarantine", state=root / "state", done=root / "done")
    shutil.copytree(drop, site.inbox)
    site.write_config(extra=extra, options=options)
    return site


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def run_once(site: Site, planted: PlantedPHI) -> Run:
    before = snapshot(site.inbox)
    result = run_cli("once", "--config", site.config)
    run = Run(site, planted, result.returncode, result.stdout + result.stderr, before)
    run.zips = site.outputs()
    for zpath in run.zips:
        with zipfile.ZipFile(zpath) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    run.entries.append(Entry(zpath, info.filename, zf.read(info)))
    for entry in run.entries:
        if Path(entry.name).name == "manifest.json":
            run.manifests.append(entry)
            continue
        try:
            run.instances.append(OutInstance(entry, dcmread(io.BytesIO(entry.data))))
        except Exception:  # anything pydicom cannot read as a Part 10 file is "not DICOM" here
            run.others.append(entry)
    run.quarantine = read_quarantine(site.quarantine)
    return run


def read_quarantine(folder: Path) -> dict[str, list[Quarantined]]:
    found: dict[str, list[Quarantined]] = {}
    for reason_file in folder.rglob("reason.json") if folder.exists() else []:
        entry = reason_file.parent
        reason = json.loads(reason_file.read_text(encoding="utf-8"))
        for path in (entry / "files").rglob("*"):
            if path.is_file():
                found.setdefault(_sha(path.read_bytes()), []).append(Quarantined(path, entry, reason))
    return found


@pytest.fixture(scope="module")
def drop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PlantedPHI]:
    inbox = tmp_path_factory.mktemp("pristine") / "inbox"
    return inbox, build_drop(inbox, seed=7)


@pytest.fixture(scope="module")
def deleted(tmp_path_factory: pytest.TempPathFactory, drop: tuple[Path, PlantedPHI]) -> Run:
    """One pass with on_success = "delete": the mode where a wrong move loses data."""
    inbox, planted = drop
    site = make_site(tmp_path_factory.mktemp("delete") / "site", inbox, '[input]\non_success = "delete"\n')
    return run_once(site, planted)


OPTIONS = ["retain_longitudinal_modified_dates", "clean_descriptors", "clean_structured_content",
           "retain_safe_private"]
OPTION_CODES = {"113100", "113104", "113105", "113107", "113111"}  # CID 7050: basic and the four above


@pytest.fixture(scope="module")
def optioned(tmp_path_factory: pytest.TempPathFactory, drop: tuple[Path, PlantedPHI]) -> Run:
    """Options that keep more (shifted dates, cleaned descriptions and reports, safe private tags)."""
    inbox, planted = drop
    site = make_site(tmp_path_factory.mktemp("options") / "site", inbox, "", OPTIONS)
    # Times of day are kept with modified dates (PS3.15 keeps intervals); they are not searched here.
    return run_once(site, replace(planted, times=[]))


@pytest.fixture(params=["deleted", "optioned"])
def leak_run(request: pytest.FixtureRequest) -> Run:
    run: Run = request.getfixturevalue(request.param)
    return run


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory, drop: tuple[Path, PlantedPHI]) -> Run:
    inbox, planted = drop
    site = make_site(tmp_path_factory.mktemp("keep") / "site", inbox, '[input]\non_success = "keep"\n')
    return run_once(site, planted)


def outputs(run: Run) -> list[OutInstance]:
    """The delivered DICOM instances; an empty delivery fails instead of passing every check vacuously."""
    assert run.instances, "nothing was delivered, so nothing could be checked\n" + run.quarantine_summary()
    return run.instances


def hits_in(run: Run, data: bytes) -> list[str]:
    return [str(h) for h in run.planted.find(data)]


# ---------------------------------------------------------------------------------------------------------
# The drop itself carries what we look for (otherwise a clean output would prove nothing)
# ---------------------------------------------------------------------------------------------------------


def test_every_source_file_carries_planted_identifiers(drop: tuple[Path, PlantedPHI]) -> None:
    inbox, planted = drop
    assert set(snapshot(inbox)) == {s.rel for s in planted.files}, "the drop holds files the plan does not list"
    for src in planted.files:
        if src.role == "instance":
            found = {h.needle for h in planted.find((inbox / src.rel).read_bytes())}
            assert len(found) >= 25 and "ravensworth" in found, (src.rel, sorted(found))
            assert any("holloway" in n or "ller" in n for n in found), (src.rel, sorted(found))
        assert planted.find(src.rel.encode("utf-8")) or src.rel == ".DS_Store", f"no identifier in {src.rel}"


# ---------------------------------------------------------------------------------------------------------
# What came out, and how the run ended
# ---------------------------------------------------------------------------------------------------------


def test_exit_code_says_something_was_quarantined(deleted: Run) -> None:
    assert deleted.returncode == EXIT_QUARANTINED, deleted.output[-3000:]


def test_one_zip_per_delivered_series(deleted: Run) -> None:
    expected = sorted(s.modality for s in deleted.planted.delivered())
    per_zip: dict[Path, set[str]] = {}
    series_per_zip: dict[Path, set[str]] = {}
    for inst in deleted.instances:
        per_zip.setdefault(inst.entry.zip_path, set()).add(str(inst.ds.get("Modality", "")))
        series_per_zip.setdefault(inst.entry.zip_path, set()).add(str(inst.ds.get("SeriesInstanceUID", "")))
    got = sorted(m for mods in per_zip.values() for m in mods)
    assert len(deleted.zips) == len(expected) and got == expected, (
        f"expected one ZIP for each of {expected}, got {len(deleted.zips)} ZIPs holding {got}\n"
        + deleted.quarantine_summary()
    )
    for zpath, uids in series_per_zip.items():
        assert len(uids) == 1, f"{zpath.name} mixes series {uids}"
    assert len({next(iter(u)) for u in series_per_zip.values()}) == len(expected), "two ZIPs share a series"


def test_each_zip_holds_only_dicom_files_and_one_manifest(deleted: Run) -> None:
    outputs(deleted)
    assert not deleted.others, f"entries that are not DICOM: {[e.where for e in deleted.others]}"
    for zpath in deleted.zips:
        manifests = [m for m in deleted.manifests if m.zip_path == zpath]
        assert len(manifests) == 1, f"{zpath.name}: {len(manifests)} manifest.json entries"
        json.loads(manifests[0].data)


def test_the_expected_instances_come_out_and_no_others(deleted: Run) -> None:
    expected = sorted((s.modality, i.number) for s in deleted.planted.delivered() for i in s.instances)
    got = sorted(inst.key for inst in deleted.instances)
    assert got == expected, f"\nexpected {expected}\ngot      {got}\n" + deleted.quarantine_summary()


def test_no_dicomdir_or_os_junk_is_delivered(deleted: Run) -> None:
    outputs(deleted)
    for entry in deleted.entries:
        base = Path(entry.name).name.lower()
        assert base not in JUNK_NAMES and not base.startswith("."), f"junk delivered: {entry.where}"
        assert not entry.name.startswith("__MACOSX"), f"junk delivered: {entry.where}"
    for inst in outputs(deleted):
        sop_class = str(inst.ds.file_meta.get("MediaStorageSOPClassUID", ""))
        assert sop_class != DICOMDIR_SOP_CLASS, f"a DICOMDIR was delivered as {inst.entry.where}"
        assert "DirectoryRecordSequence" not in inst.ds, f"a DICOMDIR was delivered as {inst.entry.where}"


# ---------------------------------------------------------------------------------------------------------
# No identifier anywhere: names, bytes, manifest, every element
# ---------------------------------------------------------------------------------------------------------


def test_no_identifier_in_any_output_file_or_folder_name(leak_run: Run) -> None:
    leaks: list[str] = []
    for path in leak_run.site.outbox.rglob("*"):
        rel = path.relative_to(leak_run.site.outbox).as_posix()
        leaks += [f"outbox/{rel}: {h}" for h in hits_in(leak_run, rel.encode("utf-8"))]
    for entry in leak_run.entries:
        leaks += [f"entry name {entry.where}: {h}" for h in hits_in(leak_run, entry.name.encode("utf-8"))]
    assert leak_run.zips, "nothing was delivered, so nothing could be checked"
    assert not leaks, "\n".join(leaks)


def test_no_identifier_in_the_raw_bytes_of_any_zip_or_entry(leak_run: Run) -> None:
    leaks: list[str] = []
    for zpath in leak_run.zips:
        leaks += [f"{zpath.name} (whole file): {h}" for h in hits_in(leak_run, zpath.read_bytes())]
        with zipfile.ZipFile(zpath) as zf:
            leaks += [f"{zpath.name} (comment): {h}" for h in hits_in(leak_run, zf.comment)]
    for entry in leak_run.entries:
        leaks += [f"{entry.where}: {h}" for h in hits_in(leak_run, entry.data)]
    assert leak_run.entries, "nothing was delivered, so nothing could be checked"
    assert not leaks, "\n".join(leaks[:60])


def test_zip_timestamps_are_not_the_patients_dates(leak_run: Run) -> None:
    # ZIP stores entry times in DOS format, which a byte search cannot see: a study date used as the entry
    # time would leak unnoticed.
    planted = {d for d in leak_run.planted.dates if d.isdigit()}
    stamped = []
    for zpath in leak_run.zips:
        with zipfile.ZipFile(zpath) as zf:
            stamped += [(zpath.name, i.filename, dt.date(*i.date_time[:3]).strftime("%Y%m%d")) for i in zf.infolist()]
    assert stamped, "nothing was delivered, so nothing could be checked"
    leaked = [s for s in stamped if s[2] in planted]
    assert not leaked, f"ZIP entries dated with a planted date: {leaked}"


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif value is not None:
        yield str(value)


def test_manifest_carries_no_identifier(leak_run: Run) -> None:
    leaks: list[str] = []
    for entry in leak_run.manifests:
        for text in _strings(json.loads(entry.data)):
            leaks += [f"{entry.where}: {text!r}: {h}" for h in hits_in(leak_run, text.encode("utf-8"))]
    assert leak_run.manifests, "no manifest.json was delivered"
    assert not leaks, "\n".join(leaks)


def _element_leaks(run: Run, inst: OutInstance) -> Iterator[str]:
    """Every planted string in any element (file meta included), as 'entry path tag VR: hit'."""
    for part, ds in (("meta", inst.ds.file_meta), ("dataset", inst.ds)):
        for path, elem in walk(ds):
            if elem.VR == "SQ":
                continue
            for h in hits_in(run, element_bytes(elem.value)):
                yield f"{inst.entry.where} {part} {path} {elem.tag} {elem.VR}: {h}"


def test_no_identifier_in_any_element_at_any_depth(leak_run: Run) -> None:
    leaks = [leak for inst in outputs(leak_run) for leak in _element_leaks(leak_run, inst)]
    assert not leaks, "\n".join(leaks[:60])


def test_no_private_element_survives(deleted: Run) -> None:
    found = [f"{inst.entry.where} {path} {elem.tag}" for inst in outputs(deleted)
             for path, elem in walk(inst.ds) if elem.tag.is_private]
    assert not found, "\n".join(found[:40])


def test_every_uid_is_well_known_or_remapped_under_2_25(leak_run: Run) -> None:
    bad: list[str] = []
    for inst in outputs(leak_run):
        for part, ds in (("meta", inst.ds.file_meta), ("dataset", inst.ds)):
            for path, elem in walk(ds):
                if elem.VR != "UI" or elem.tag == IMPLEMENTATION_CLASS_UID:
                    continue
                for uid in _values(elem):
                    ok = uid.startswith(WELL_KNOWN) or (
                        uid.startswith("2.25.") and uid[5:].isdigit() and len(uid) <= 64
                    )
                    if not ok:
                        bad.append(f"{inst.entry.where} {part} {path} = {uid}")
        meta_uid = inst.ds.file_meta.get("MediaStorageSOPInstanceUID")
        assert meta_uid == inst.ds.get("SOPInstanceUID"), f"{inst.entry.where}: meta and dataset UIDs differ"
    assert not bad, "\n".join(bad[:40])


def test_patients_get_one_pseudonym_each(leak_run: Run) -> None:
    by_key = leak_run.by_key()
    ct, mr = by_key[("CT", 1)].ds, by_key[("MR", 1)].ds
    for inst in outputs(leak_run):
        assert str(inst.ds.get("PatientID", "")).strip(), f"{inst.entry.where} has no PatientID"
        assert str(inst.ds.get("PatientName", "")).strip(), f"{inst.entry.where} has no PatientName"
        same = ct if inst.key[0] in ("CT", "RTSTRUCT", "RTPLAN", "RTDOSE") else mr
        assert inst.ds.PatientID == same.PatientID, f"{inst.entry.where}: one patient, two pseudonyms"
        assert str(inst.ds.PatientName) == str(same.PatientName), f"{inst.entry.where}: one patient, two names"
    assert ct.PatientID != mr.PatientID, "two patients share one pseudonym"


def test_outputs_are_marked_deidentified(leak_run: Run) -> None:
    for inst in outputs(leak_run):
        ds = inst.ds
        assert ds.get("PatientIdentityRemoved") == "YES", inst.entry.where
        assert str(ds.get("DeidentificationMethod", "")).strip(), inst.entry.where
        codes = {(str(i.get("CodeValue")), str(i.get("CodingSchemeDesignator")))
                 for i in ds.get("DeidentificationMethodCodeSequence", [])}
        assert ("113100", "DCM") in codes, f"{inst.entry.where}: method codes {codes}"


def test_selected_options_are_recorded_as_method_codes(optioned: Run) -> None:
    for inst in outputs(optioned):
        codes = {str(i.get("CodeValue")) for i in inst.ds.get("DeidentificationMethodCodeSequence", [])}
        assert codes >= OPTION_CODES, f"{inst.entry.where}: method codes {sorted(codes)}, expected {OPTION_CODES}"
        assert inst.ds.get("LongitudinalTemporalInformationModified") == "MODIFIED", inst.entry.where


def _date(value: object) -> dt.date:
    return dt.datetime.strptime(str(value), "%Y%m%d").date()


def test_modified_dates_move_each_patient_by_one_offset(optioned: Run) -> None:
    """Shifted, not blanked; one offset per patient, so intervals between a patient's studies are kept."""
    by_key = optioned.by_key()
    ct, rt, mr = by_key[("CT", 1)].ds, by_key[("RTPLAN", 1)].ds, by_key[("MR", 1)].ds
    shift_a = _date(ct.StudyDate) - _date(CT_VISIT.date)
    assert -3650 <= shift_a.days <= -365, f"StudyDate shifted by {shift_a.days} days, outside the default range"
    assert _date(ct.ContentDate) - _date(CT_VISIT.date) == shift_a, "two dates of one image shifted differently"
    assert _date(rt.StudyDate) - _date(RT_VISIT.date) == shift_a, "RT and CT of one patient shifted differently"
    shift_b = _date(mr.StudyDate) - _date(MR_VISIT.date)
    assert -3650 <= shift_b.days <= -365, f"StudyDate shifted by {shift_b.days} days, outside the default range"
    assert not str(ct.get("PatientBirthDate", "")), "PS3.15 keeps no birth date under any date option"


# ---------------------------------------------------------------------------------------------------------
# What must survive: pixels and references
# ---------------------------------------------------------------------------------------------------------


def test_pixel_data_is_copied_byte_for_byte(deleted: Run) -> None:
    by_key = deleted.by_key()
    checked = 0
    for series in deleted.planted.delivered():
        for expected in series.instances:
            out = by_key.get((series.modality, expected.number))
            assert out is not None, f"{series.label} instance {expected.number} is missing from the output"
            if expected.pixel_sha256 is None:
                assert "PixelData" not in out.ds, out.entry.where
                continue
            assert _sha(out.ds.PixelData) == expected.pixel_sha256, f"pixels changed in {out.entry.where}"
            checked += 1
    assert checked >= 11


def _values(elem: DataElement) -> list[str]:
    values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
    return [str(v) for v in values if v]


def _uids_in(ds: Dataset) -> set[str]:
    return {uid for _, elem in walk(ds) if elem.VR == "UI" for uid in _values(elem)}


def test_references_between_files_still_resolve(deleted: Run) -> None:
    by_key = deleted.by_key()
    for ref in deleted.planted.references:
        source, target = by_key[ref.source].ds, by_key[ref.target].ds
        refs = _uids_in(source) - {str(source.SOPInstanceUID)}
        assert str(target.SOPInstanceUID) in refs, f"{ref.source} {ref.what} no longer points to {ref.target}"
    ct = by_key[("CT", 1)].ds
    for label in ("RTSTRUCT", "RTPLAN", "RTDOSE"):
        rt = by_key[(label, 1)].ds
        assert rt.StudyInstanceUID == ct.StudyInstanceUID, f"{label} left the CT's study"
    assert by_key[("RTDOSE", 1)].ds.FrameOfReferenceUID == ct.FrameOfReferenceUID
    frame_ref = by_key[("RTSTRUCT", 1)].ds.ReferencedFrameOfReferenceSequence[0]
    assert frame_ref.FrameOfReferenceUID == ct.FrameOfReferenceUID
    ref_series = frame_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == ct.SeriesInstanceUID
    assert by_key[("MR", 1)].ds.StudyInstanceUID != ct.StudyInstanceUID


# ---------------------------------------------------------------------------------------------------------
# Quarantine and the fate of every source
# ---------------------------------------------------------------------------------------------------------


def test_quarantine_holds_each_bad_file_with_its_reason(deleted: Run) -> None:
    for src in deleted.planted.files:
        if src.outcome != "quarantine":
            continue
        held = deleted.quarantine.get(src.sha256)
        assert held, f"{src.note} ({src.rel}) is not in quarantine\n" + deleted.quarantine_summary()
        reason = held[0].reason
        code, message = reason.get("code"), reason.get("message")
        assert isinstance(code, str) and code, f"{held[0].entry}/reason.json has no code: {reason}"
        assert isinstance(message, str) and message.strip(), f"{held[0].entry}/reason.json has no message"
        if src.reason is not None:
            assert code == src.reason, f"{src.note}: code {code!r}, expected {src.reason!r}"
        elif src.role == "bad":
            assert code not in ("burned-in", "gate-hit"), f"{src.note}: code {code!r} names the wrong cause"
        else:
            assert code != "gate-hit", f"{src.note}: code {code!r}; it should be stopped before the gate"


def test_no_series_is_stopped_by_the_gate(deleted: Run) -> None:
    # Everything planted is covered by the profile: the engine must remove it, not leave it to the gate.
    assert deleted.quarantine, "nothing was quarantined: the run did not get as far as the gate"
    hits = [q for qs in deleted.quarantine.values() for q in qs if q.reason.get("code") == "gate-hit"]
    assert not hits, deleted.quarantine_summary()


def test_junk_is_ignored_not_quarantined(deleted: Run, drop: tuple[Path, PlantedPHI]) -> None:
    inbox, planted = drop
    junk = {_sha((inbox / s.rel).read_bytes()): s.rel for s in planted.files if s.role in ("junk", "dicomdir")}
    container = next(s for s in planted.files if s.role == "container")
    with zipfile.ZipFile(inbox / container.rel) as zf:
        for name in zf.namelist():
            if name.startswith("__MACOSX/") or Path(name).name.startswith("."):
                junk[_sha(zf.read(name))] = f"{container.rel}:{name}"
    assert deleted.quarantine, "nothing was quarantined: the run did not get as far as sorting its input"
    held = [rel for sha, rel in junk.items() if sha in deleted.quarantine]
    assert not held, f"OS junk or DICOMDIR quarantined instead of ignored: {held}"


def test_nothing_vanishes(deleted: Run) -> None:
    """Delivered sources are deleted only because their output exists; the rest is in quarantine."""
    after = snapshot(deleted.site.inbox)
    delivered = {inst.key for inst in deleted.instances}
    accounted, problems = 0, []
    for src in deleted.planted.files:
        if src.outcome == "ignore":
            continue
        accounted += 1
        if src.outcome == "quarantine":
            if src.sha256 not in deleted.quarantine:
                problems.append(f"{src.note}: neither delivered nor in quarantine ({src.rel})")
            if src.rel in after:
                problems.append(f"{src.note}: quarantined but still in the inbox ({src.rel})")
            continue
        series = deleted.planted.series[src.series or ""]
        missing = [i.number for i in series.instances if (series.modality, i.number) not in delivered]
        if src.rel in after and not missing:
            problems.append(f"{src.note}: delivered, but on_success=delete left it in the inbox ({src.rel})")
        if src.rel not in after and missing:
            problems.append(f"{src.note}: deleted from the inbox, but instances {missing} never came out")
    assert set(deleted.before) == {s.rel for s in deleted.planted.files}, "an input file is not accounted for"
    assert accounted == len([s for s in deleted.planted.files if s.outcome != "ignore"])
    assert not problems, "\n".join(problems) + "\n" + deleted.quarantine_summary()


# ---------------------------------------------------------------------------------------------------------
# Runs after the first: idempotence with keep, pseudonyms stable under the same key
# ---------------------------------------------------------------------------------------------------------


def _zip_state(site: Site) -> dict[str, str]:
    return {p.relative_to(site.outbox).as_posix(): _sha(p.read_bytes()) for p in site.outputs()}


def test_a_second_pass_with_keep_produces_nothing_new(kept: Run) -> None:
    assert kept.returncode == EXIT_QUARANTINED, kept.output[-3000:]
    first = _zip_state(kept.site)
    assert len(first) == len(kept.planted.delivered()), kept.quarantine_summary()
    remaining = snapshot(kept.site.inbox)
    for src in kept.planted.files:
        if src.outcome == "deliver":
            assert src.rel in remaining, f"on_success=keep removed {src.rel}"
    second = run_cli("once", "--config", kept.site.config)
    assert second.returncode in (EXIT_OK, EXIT_QUARANTINED), second.stdout + second.stderr
    assert _zip_state(kept.site) == first, "the second pass wrote or rewrote ZIPs for sources already delivered"


def _identity(run: Run) -> dict[str, str]:
    by_key = run.by_key()
    ct, mr = by_key[("CT", 1)].ds, by_key[("MR", 1)].ds
    return {"CT PatientID": str(ct.PatientID), "CT PatientName": str(ct.PatientName),
            "MR PatientID": str(mr.PatientID), "CT StudyInstanceUID": str(ct.StudyInstanceUID),
            "CT SOPInstanceUID": str(ct.SOPInstanceUID)}


def test_same_site_key_gives_same_pseudonyms_and_another_key_does_not(
    kept: Run, drop: tuple[Path, PlantedPHI], tmp_path: Path
) -> None:
    inbox, planted = drop
    key = kept.site.state / "site.key"
    assert key.is_file(), f"no site key in {kept.site.state}: {sorted(map(str, kept.site.root.rglob('*key*')))}"
    again = make_site(tmp_path / "same-key", inbox, "")
    again.state.mkdir(parents=True)
    shutil.copy2(key, again.state / "site.key")
    other = make_site(tmp_path / "new-key", inbox, "")
    first, second, third = _identity(kept), _identity(run_once(again, planted)), _identity(run_once(other, planted))
    assert second == first, "the same site key gave different pseudonyms"
    assert third["CT PatientID"] != first["CT PatientID"], "pseudonyms do not depend on the site key"
    assert third["CT StudyInstanceUID"] != first["CT StudyInstanceUID"], "UIDs do not depend on the site key"
