"""The engine's output under dicom3tools: de-identifying an instance must not make it less conformant to its
IOD (dciodvfy), must keep one patient, study and series consistent across a set of files (dcentvfy), and must
keep every reference between instances of a set pointing at an instance of the de-identified set.

The samples are not all conformant to begin with, so each check runs the tool on the input as well and fails
only on errors the engine introduced. Both entry points are checked: the dataset path, and the bytes path that
production uses.
"""

from __future__ import annotations

import copy
import re
import subprocess
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import deid_data
import pytest
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

from anondrop.deid.engine import deidentify, deidentify_bytes
from anondrop.deid.policy import Policy, build_policy
from anondrop.deid.pseudonyms import Keys
from tests.conftest import require_tool, sample

pytestmark = pytest.mark.real

KEYS = Keys(secret=b"k" * 32)
WELL_KNOWN_ROOT = "1.2.840.10008."

# pydicom's bundled samples, a few from pydicom-data, and one from deid-data's humans/.
SAMPLES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "rtstruct.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "examples_overlay.dcm",
    "liver_1frame.dcm",
    "reportsi.dcm",
    "liver.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "US1_UNCR.dcm",
    "eCT_Supplemental.dcm",
    "humans/ctbrain1.dcm",
)
OPTION_SAMPLES = ("CT_small.dcm", "rtplan.dcm", "test-SR.dcm")
OPTIONS = ("retain_longitudinal_modified_dates", "retain_uids", "retain_safe_private", "clean_descriptors")


@dataclass(frozen=True)
class MandatedError:
    """A dciodvfy error that Table E.1-1 itself causes, so no conforming engine can avoid it."""

    error: str  # as normalised by `normalise`
    attribute: str
    action: str  # the Table E.1-1 action, with the option that selects it if any
    why: str


# Kept as small as possible: an error that appears here is one the profile forces, never an engine shortcut.
PROFILE_MANDATED: tuple[MandatedError, ...] = ()


# -- running the tools ---------------------------------------------------------------------------------------

_ELEMENT_VALUE = re.compile(r"= <[^>]*>")  # "[1] = <Smith^John>", "attribute <X> = <SRT>"
_UID_OR_DECIMAL = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)+(?![\w.])")
_VECTOR = re.compile(r"values are \S+")
_REFERENCED_UID = re.compile(r"(ReferencedSOPInstanceUID) \S+")
_LENGTH = re.compile(r"(Length invalid for this VR) = \d+")
_FILE_PAIR = re.compile(r" for file <[^>]*> versus <[^>]*>.*$")


def normalise(line: str) -> str:
    """A tool error without the instance's values, so one fault in input and output compares equal."""
    line = _ELEMENT_VALUE.sub("= <…>", line)
    line = _FILE_PAIR.sub("", line)
    line = _REFERENCED_UID.sub(r"\1 …", line)
    line = _VECTOR.sub("values are …", line)
    line = _LENGTH.sub(r"\1 = …", line)
    line = _UID_OR_DECIMAL.sub("…", line)
    return " ".join(line.split())


def tool_errors(output: str) -> dict[str, str]:
    """The `Error` lines of a dicom3tools report: normalised form -> first raw line."""
    errors: dict[str, str] = {}
    for raw in output.splitlines():
        # Errors come either bare ("Error - ...") or after the element they concern ("(0x0011,0x0010) LO ... -
        # Error - ..."); the element is part of what makes two errors the same.
        at = raw.find("Error - ")
        if at == 0 or (at > 0 and raw.startswith("(0x") and raw[at - 3 : at] == " - "):
            errors.setdefault(normalise(raw), raw)
    return errors


def run_tool(tool: str, *files: Path) -> str:
    proc = subprocess.run(
        [require_tool(tool), *map(str, files)], capture_output=True, timeout=120, check=False
    )
    # A tool killed by a signal (32-bit pixel data aborts dicom3tools: see dose_in_16_bits) checked nothing.
    assert proc.returncode >= 0, f"{tool} crashed on {files}: {proc.stderr.decode(errors='replace')[-500:]}"
    return (proc.stdout + proc.stderr).decode("utf-8", errors="replace")


@cache
def _iod_report(path: Path, stamp: float) -> str:
    return run_tool("dciodvfy", path)


def iod_errors(path: Path) -> dict[str, str]:
    return tool_errors(_iod_report(path, path.stat().st_mtime))


def new_iod_errors(source: Path, output: Path) -> list[str]:
    """dciodvfy errors of the output that the input did not have and the profile does not mandate."""
    before = iod_errors(source)
    after = iod_errors(output)
    mandated = {m.error for m in PROFILE_MANDATED}
    return sorted(raw for key, raw in after.items() if key not in before and key not in mandated)


# -- inputs ------------------------------------------------------------------------------------------------


def save(ds: Dataset, path: Path) -> Path:
    """Write `ds` as a Part 10 file whose meta names the instance it holds."""
    meta = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def dose_in_16_bits(ds: Dataset) -> Dataset:
    """dicom3tools (Debian's 1.0) aborts on an assertion reading pixel data with 32 bits allocated, as in
    rtdose.dcm, before validating anything. The dose grid is requantised to 16 bits, with Dose Grid Scaling
    scaled to match, so the tools can read it and it still means the same dose."""
    doses = array("I", ds.PixelData)  # little-endian uint32 on the machines this runs on
    step = max(1, -(-max(doses) // 0xFFFF))
    ds.PixelData = array("H", (dose // step for dose in doses)).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.DoseGridScaling = f"{float(ds.DoseGridScaling) * step:.8g}"
    return ds


def prepared(name: str, folder: Path) -> Path:
    """The input file for sample `name`, made into a readable Part 10 file where the original is not one."""
    if name == "rtstruct.dcm":
        # pydicom's rtstruct.dcm is a bare dataset (no preamble, no file meta); the daemon reads Part 10.
        return save(dcmread(sample(name), force=True), folder / "input" / name)
    if name == "rtdose.dcm":
        return save(dose_in_16_bits(dcmread(sample(name))), folder / "input" / name)
    if name.startswith("humans/"):
        # deid-data's humans/ files carry deliberately garbled private blocks (creators with binary values,
        # an illegal odd group 0007) on which dciodvfy stops reading before it checks the IOD at all. Without
        # them the rest of the instance validates, so the comparison means something.
        found = next(Path(deid_data.__file__).parent.glob(f"**/{name}"))
        ds = dcmread(found)
        ds.remove_private_tags()
        return save(ds, folder / "input" / Path(name).name)
    return sample(name)


Route = Callable[[Path, Path, Policy], Path]


def policy(*options: str) -> Policy:
    # Secondary capture and ultrasound samples would be held back as burned-in suspects; conformance of what
    # the engine writes is the question here, so they are let through.
    return build_policy(options=options, burned_in_suspect="deliver")


def through_dataset(source: Path, dest: Path, chosen: Policy) -> Path:
    out, _report = deidentify(dcmread(source), chosen, KEYS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(dest, out, enforce_file_format=True)
    return dest


def through_bytes(source: Path, dest: Path, chosen: Policy) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(deidentify_bytes(source.read_bytes(), chosen, KEYS).data)
    return dest


ROUTES = (pytest.param(through_dataset, id="dataset"), pytest.param(through_bytes, id="bytes"))


def assert_no_new_iod_errors(source: Path, output: Path) -> None:
    new = new_iod_errors(source, output)
    assert not new, f"de-identifying {source.name} introduced dciodvfy errors:\n" + "\n".join(new)


# -- 1. each instance stays as conformant as it was ---------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", SAMPLES)
def test_basic_profile_introduces_no_iod_errors(name: str, route: Route, tmp_path: Path) -> None:
    source = prepared(name, tmp_path)
    output = route(source, tmp_path / "output" / Path(name).name, policy())
    assert_no_new_iod_errors(source, output)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("name", OPTION_SAMPLES)
def test_profile_options_introduce_no_iod_errors(
    name: str, option: str, route: Route, tmp_path: Path
) -> None:
    source = prepared(name, tmp_path)
    output = route(source, tmp_path / "output" / name, policy(option))
    assert_no_new_iod_errors(source, output)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", SAMPLES)
def test_file_meta_names_the_deidentified_instance(name: str, route: Route, tmp_path: Path) -> None:
    # rtplan.dcm's own meta names a different instance than its dataset; the output file must not.
    source = prepared(name, tmp_path)
    out = dcmread(route(source, tmp_path / "output" / Path(name).name, policy()))
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID


# -- a closed RT set: CT images, structure set, two plans, dose, and an SR that cites the images -------------

PATIENT = {"PatientName": "Phantom^Closed", "PatientID": "PHANTOM-1", "PatientBirthDate": "19700101"}
STUDY = {
    "StudyDate": "20091223",
    "StudyTime": "120000",
    "StudyID": "sep30",
    "AccessionNumber": "A1",
    "ReferringPhysicianName": "Referrer^Rita",
    "StudyDescription": "Pelvis planning",
}
CT_SLICES = 3
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _same_patient_and_study(ds: Dataset, study_uid: str) -> None:
    for keyword, value in {**PATIENT, **STUDY}.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid


def _ct_slice(n: int, study_uid: str, series_uid: str, for_uid: str) -> Dataset:
    ds = dcmread(sample("CT_small.dcm"))
    _same_patient_and_study(ds, study_uid)
    ds.SOPInstanceUID = f"{series_uid}.{n}"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.InstanceNumber = n
    ds.InstanceCreationTime = f"07273{n}"
    ds.ContentTime = f"11300{n}"
    x, y, z = ds.ImagePositionPatient
    ds.ImagePositionPatient = [x, y, z - 5 * (n - 1)]
    ds.SliceLocation = z - 5 * (n - 1)
    if n > 1:
        # Later slices cite the first, as images cite their localizer.
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = f"{series_uid}.1"
        ds.ReferencedImageSequence = [ref]
    return ds


def _structure_set(study_uid: str, cts: list[Dataset]) -> Dataset:
    ds = dcmread(sample("rtstruct.dcm"), force=True)
    ref_for = ds.ReferencedFrameOfReferenceSequence[0]
    ref_study = ref_for.RTReferencedStudySequence[0]
    _same_patient_and_study(ds, study_uid)
    ref_study.ReferencedSOPInstanceUID = study_uid
    ds.FrameOfReferenceUID = ref_for.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    images = []
    for ct in cts:
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = ct.SOPClassUID, ct.SOPInstanceUID
        images.append(image)
    ref_study.RTReferencedSeriesSequence[0].ContourImageSequence = images
    for roi in ds.ROIContourSequence:
        for i, contour in enumerate(roi.ContourSequence):
            contour.ContourImageSequence = [copy.deepcopy(images[i % len(images)])]
    return ds


def _plan(study_uid: str, for_uid: str, struct: Dataset, prior_uid: str | None) -> Dataset:
    ds = dcmread(sample("rtplan.dcm"))
    _same_patient_and_study(ds, study_uid)
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = struct.SOPInstanceUID
    if prior_uid is None:
        # The predecessor plan: same template, the UID the later plan already cites, no predecessor itself.
        ds.SOPInstanceUID = ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
        ds.InstanceNumber = 2
        del ds.ReferencedRTPlanSequence
    else:
        ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = prior_uid
        ds.InstanceNumber = 1
    return ds


def _dose(study_uid: str, for_uid: str, plan: Dataset) -> Dataset:
    ds = dose_in_16_bits(dcmread(sample("rtdose.dcm")))
    _same_patient_and_study(ds, study_uid)
    ds.FrameOfReferenceUID = for_uid
    ds.InstanceNumber = 1
    ds.OperatorsName = "Operator^Olga"  # Type 2 in RT Series; the sample lacks it
    ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = plan.SOPInstanceUID
    return ds


def _report(study_uid: str, cts: list[Dataset]) -> Dataset:
    """A Comprehensive SR whose IMAGE items cite the CT slices, listed as its evidence as PS3.3 requires."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2010020400001.7.1"
    ds.InstanceCreationDate, ds.InstanceCreationTime = "20091224", "090000"
    _same_patient_and_study(ds, study_uid)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2010020400001.7"
    ds.SeriesNumber = 7
    ds.InstanceNumber = 1
    ds.Manufacturer = "Reporting Co"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.ContentDate, ds.ContentTime = "20091224", "090000"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []
    series = Dataset()
    series.SeriesInstanceUID = cts[0].SeriesInstanceUID
    series.ReferencedSOPSequence = []
    for ct in cts:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ct.SOPClassUID, ct.SOPInstanceUID
        series.ReferencedSOPSequence.append(ref)
    evidence = Dataset()
    evidence.StudyInstanceUID = study_uid
    evidence.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = _code("126000", "DCM", "Imaging Measurement Report")
    title.CodingSchemeUID = "1.2.840.10008.2.16.4"  # DICOM's own code system: a standard UID to keep
    ds.ConceptNameCodeSequence = [title]
    ds.ContentSequence = []
    for ref in series.ReferencedSOPSequence:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
        item.ReferencedSOPSequence = [copy.deepcopy(ref)]
        ds.ContentSequence.append(item)
    return ds


def closed_rt_set(folder: Path) -> list[Path]:
    """CT slices, the structure set drawn on them, a plan and its predecessor, the dose, and an SR: every
    reference in any of them names another member, and all belong to one patient and one study."""
    template = dcmread(sample("rtstruct.dcm"), force=True).ReferencedFrameOfReferenceSequence[0]
    for_uid = template.FrameOfReferenceUID
    study_uid = template.RTReferencedStudySequence[0].ReferencedSOPInstanceUID
    series_uid = template.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
    cts = [_ct_slice(n, study_uid, series_uid, for_uid) for n in range(1, CT_SLICES + 1)]
    struct = _structure_set(study_uid, cts)
    prior = _plan(study_uid, for_uid, struct, prior_uid=None)
    plan = _plan(study_uid, for_uid, struct, prior_uid=prior.SOPInstanceUID)
    members = {f"ct{n}": ct for n, ct in enumerate(cts, 1)}
    members |= {"struct": struct, "plan0": prior, "plan1": plan, "dose": _dose(study_uid, for_uid, plan)}
    members["sr"] = _report(study_uid, cts)
    return [save(ds, folder / f"{name}.dcm") for name, ds in members.items()]


def deidentify_all(sources: list[Path], folder: Path, route: Route, options: list[str]) -> list[Path]:
    chosen = policy(*options)
    return [route(source, folder / source.name, chosen) for source in sources]


# -- 2. the set stays consistent per patient, study and series ----------------------------------------------


def entity_errors(paths: list[Path]) -> dict[str, str]:
    return tool_errors(run_tool("dcentvfy", *paths))


ENTITY_OPTIONS = (
    pytest.param([], id="basic"),
    pytest.param(["retain_longitudinal_modified_dates"], id="modified-dates"),
    pytest.param(["clean_descriptors"], id="clean-descriptors"),
    pytest.param(["retain_uids"], id="retain-uids"),
)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("options", ENTITY_OPTIONS)
def test_set_stays_consistent_per_entity(options: list[str], route: Route, tmp_path: Path) -> None:
    sources = closed_rt_set(tmp_path / "input")
    outputs = deidentify_all(sources, tmp_path / "output", route, options)
    before = entity_errors(sources)
    after = entity_errors(outputs)
    new = sorted(raw for key, raw in after.items() if key not in before)
    assert not new, "de-identifying the set made its entities inconsistent:\n" + "\n".join(new)
    # Still one patient, one study: a consistent set can also be one split into many.
    studies = {dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in outputs}
    patients = {dcmread(p, stop_before_pixels=True).PatientID for p in outputs}
    assert len(studies) == 1 and len(patients) == 1, (studies, patients)


@pytest.mark.parametrize("route", ROUTES)
def test_set_members_introduce_no_iod_errors(route: Route, tmp_path: Path) -> None:
    sources = closed_rt_set(tmp_path / "input")
    outputs = deidentify_all(sources, tmp_path / "output", route, [])
    new = {o.name: errs for s, o in zip(sources, outputs, strict=True) if (errs := new_iod_errors(s, o))}
    assert not new, f"de-identifying the RT set introduced dciodvfy errors: {new}"


# -- 3. references still land -------------------------------------------------------------------------------

ElementPath = tuple[int, ...]  # alternating tag, item index, tag, ... from the top-level dataset


def walk(ds: Dataset, prefix: ElementPath = ()) -> Iterator[tuple[ElementPath, DataElement]]:
    for elem in ds:
        path = (*prefix, int(elem.tag))
        yield path, elem
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from walk(item, (*path, i))


def path_text(path: ElementPath) -> str:
    """`ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID` for a path of tags and item indexes."""
    text = ""
    for i, step in enumerate(path):
        if i % 2:
            text += f"[{step}]"
        else:
            text += ("." if i else "") + (keyword_for_tag(step) or f"({step >> 16:04X},{step & 0xFFFF:04X})")
    return text


def at(ds: Dataset, path: ElementPath) -> DataElement | None:
    node: Any = ds
    for step, key in enumerate(path):
        if step % 2:
            node = node.value[key] if key < len(node.value) else None
        else:
            node = node.get(key) if node is not None else None
        if node is None:
            return None
    return node  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Reference:
    path: ElementPath
    uid: str
    kind: str  # which UID of the target it names: "SOPInstanceUID", "StudyInstanceUID", ...


TARGET_OF = {
    0x00081155: "SOPInstanceUID",  # Referenced SOP Instance UID
    0x30060024: "FrameOfReferenceUID",  # Referenced Frame of Reference UID
    0x0020000D: "StudyInstanceUID",  # inside evidence and referenced-study items
    0x0020000E: "SeriesInstanceUID",  # inside referenced-series items
    0x00200052: "FrameOfReferenceUID",  # inside Referenced Frame of Reference Sequence items
}


def container(ds: Dataset, path: ElementPath) -> Dataset:
    """The dataset or sequence item that holds the element at `path`."""
    node = ds
    for tag, index in zip(path[:-1:2], path[1:-1:2], strict=True):
        node = node[tag].value[index]
    return node


def references(ds: Dataset) -> list[Reference]:
    """Every UID in `ds` that names another instance, study, series or frame of reference."""
    found = []
    for path, elem in walk(ds):
        kind = TARGET_OF.get(int(elem.tag))
        if kind is None or len(path) == 1:
            continue  # a top-level Study/Series/Frame of Reference UID is the instance's own, not a reference
        holder = container(ds, path)
        if kind == "SOPInstanceUID" and holder.get("ReferencedSOPClassUID") == DETACHED_STUDY_MANAGEMENT:
            kind = "StudyInstanceUID"  # RT Referenced Study Sequence cites its study as an "instance"
        found.append(Reference(path, str(elem.value), kind))
    return found


def read_all(paths: list[Path]) -> list[Dataset]:
    return [dcmread(p) for p in paths]


@pytest.mark.parametrize("route", ROUTES)
def test_references_follow_their_targets(route: Route, tmp_path: Path) -> None:
    sources = closed_rt_set(tmp_path / "input")
    ins = read_all(sources)
    outs = read_all(deidentify_all(sources, tmp_path / "output", route, []))
    refs_checked = 0
    for source, src, out in zip(sources, ins, outs, strict=True):
        for ref in references(src):
            target = next(i for i, ds in enumerate(ins) if ds.get(ref.kind) == ref.uid)
            landed = at(out, ref.path)
            assert landed is not None, f"{source.name}: {path_text(ref.path)} was removed"
            assert landed.value == outs[target][ref.kind].value, (
                f"{source.name}: {landed.name} no longer names {sources[target].name}'s {ref.kind}"
            )
            refs_checked += 1
    # 2 localizer, 3 + 5 contour-image, 2 structure-set, 1 predecessor, 1 dose->plan, 3 + 3 SR SOP references,
    # 1 + 3 frame of reference, 1 + 1 study and 1 + 1 series references: none may be skipped unnoticed.
    assert refs_checked == 28


@pytest.mark.parametrize("route", ROUTES)
def test_no_reference_dangles_in_the_output(route: Route, tmp_path: Path) -> None:
    outs = read_all(deidentify_all(closed_rt_set(tmp_path / "input"), tmp_path / "output", route, []))
    own = {kind: {str(ds[kind].value) for ds in outs if kind in ds} for kind in set(TARGET_OF.values())}
    dangling = [
        f"{ds.Modality} {path_text(ref.path)}: no {ref.kind} {ref.uid}"
        for ds in outs
        for ref in references(ds)
        if ref.uid not in own[ref.kind]
    ]
    assert not dangling, "references to nothing in the output:\n" + "\n".join(dangling)


@pytest.mark.parametrize("route", ROUTES)
def test_file_meta_matches_each_instance(route: Route, tmp_path: Path) -> None:
    for out in read_all(deidentify_all(closed_rt_set(tmp_path / "input"), tmp_path / "output", route, [])):
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID


# UIDs that name software or a code system, not a patient's data: kept by design.
NOT_IDENTIFYING_UIDS = {0x00020012, 0x0008010C}  # Implementation Class UID, Coding Scheme UID


def identifying_uids(ds: Dataset) -> set[str]:
    return {
        str(value)
        for top in (ds.file_meta, ds)
        for _path, elem in walk(top)
        if elem.VR == "UI" and int(elem.tag) not in NOT_IDENTIFYING_UIDS
        for value in (elem.value if elem.VM > 1 else [elem.value])
        if value and not str(value).startswith(WELL_KNOWN_ROOT)
    }


@pytest.mark.parametrize("route", ROUTES)
def test_no_original_uid_survives_anywhere(route: Route, tmp_path: Path) -> None:
    sources = closed_rt_set(tmp_path / "input")
    originals = set().union(*(identifying_uids(ds) for ds in read_all(sources)))
    pattern = re.compile(
        rb"(?<![0-9.])(" + b"|".join(re.escape(u.encode()) for u in sorted(originals)) + rb")(?![0-9.])"
    )
    for output in deidentify_all(sources, tmp_path / "output", route, []):
        leaked = {m.group(1).decode() for m in pattern.finditer(output.read_bytes())}
        assert not leaked, f"{output.name} still holds original UIDs {sorted(leaked)}"


def well_known_uids(ds: Dataset) -> dict[ElementPath, str]:
    return {
        path: str(elem.value)
        for top in (ds.file_meta, ds)
        for path, elem in walk(top)
        if elem.VR == "UI" and str(elem.value).startswith(WELL_KNOWN_ROOT)
    }


@pytest.mark.parametrize("route", ROUTES)
def test_well_known_uids_are_untouched(route: Route, tmp_path: Path) -> None:
    sources = [*closed_rt_set(tmp_path / "input"), prepared("test-SR.dcm", tmp_path)]
    outputs = deidentify_all(sources, tmp_path / "output", route, [])
    for source, src, out in zip(sources, read_all(sources), read_all(outputs), strict=True):
        assert out.SOPClassUID == src.SOPClassUID
        assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        for path, uid in well_known_uids(src).items():
            # Wherever the output still holds the element that held a standard UID, it holds the same UID.
            kept = at(out, path)
            assert kept is None or kept.value == uid, f"{source.name} {path_text(path)}: {uid} changed"
