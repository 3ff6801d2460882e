"""The release gate: identifiers of the input, searched for in every output byte and name.

``collect_identifiers`` gathers what identifies the patient in a series' input, at every depth and in
private elements too: the words of every person name, patient and order IDs, accession and study IDs,
institution, station and device strings, dates and original UIDs — each only where the policy does not keep
that element on purpose (a kept Institution Name under retain_institution_identity is not a leak).

``Identifiers.find`` searches raw bytes: the whole output header (every element, every depth, private,
file meta), ZIP entry names, folder names and the manifest. A search over bytes cannot be fooled by a VR,
an odd character set or an element the engine did not know. Hits are reported with the attribute path and
the kind of identifier, never the value itself, so that the report is safe to log.

Limits (documented in the README): name words and IDs shorter than 3 characters are not searched (they
match everywhere); dates are searched as YYYYMMDD and with '-', '/' or '.' between year-month-day,
day-month-year and month-day-year.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from anondrop.deid.actions import FIXED_VALUES, NUMERIC_VRS, PIXEL_TAGS, is_well_known_uid, vr_of
from anondrop.deid.identifiers import GateHit, Identifiers, scan_names
from anondrop.deid.policy import KEEP, Policy

__all__ = ["GateHit", "Identifiers", "collect_identifiers", "scan_bytes", "scan_dataset", "scan_names"]

MIN_TOKEN = 3
# Words that appear in names but identify nobody, and our own fixed outputs.
STOP_WORDS = (
    frozenset(
        {
            "ANON",
            "ANONYMOUS",
            "ANONYMIZED",
            "UNKNOWN",
            "NONE",
            "NULL",
            "PATIENT",
            "TEST",
            "PHANTOM",
            "QA",
            "MRS",
            "MISS",
            "PHD",
            "DDS",
            "JUN",
            "SEN",
            "THE",
            "AND",
            "VON",
            "VAN",
            "DER",
            "DEN",
            # placeholders that templates put in name fields ("Last Name^First Name", "Enter text")
            "NAME",
            "FIRST",
            "LAST",
            "MIDDLE",
            "TEXT",
            "ENTER",
            "DOCTOR",
            "PHYSICIAN",
            "NURSE",
            "OPERATOR",
        }
    )
    | FIXED_VALUES
)

# Attributes whose whole value identifies a person, an order or a place (beyond PN, DA/DT and UI).
IDENTIFYING_KEYWORDS = (
    "PatientID",
    "OtherPatientIDs",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "MedicalRecordLocator",
    "AdmissionID",
    "ServiceEpisodeID",
    "RequestedProcedureID",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientTelecomInformation",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "DetectorID",
    "GantryID",
    "PlateID",
    "CassetteID",
    "SourceSerialNumber",
    "PersonAddress",
    "PersonTelephoneNumbers",
    "ResponsibleOrganization",
    "RegionOfResidence",
    "MilitaryRank",
    "BranchOfService",
    "PatientInsurancePlanCodeSequence",
    "CurrentPatientLocation",
    "PatientInstitutionResidence",
    "ConsultingPhysicianName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "DeviceUID",
    "TreatmentMachineName",
    "PerformedStationName",
    "PerformedLocation",
    "ScheduledStationName",
    "ScheduledProcedureStepLocation",
)
IDENTIFYING_TAGS = frozenset(int(t) for k in IDENTIFYING_KEYWORDS if (t := tag_for_keyword(k)) is not None)

_COLLECT_VRS = frozenset({"PN", "UI", "DA", "DT", "SQ"})
_SPLIT_NAME = re.compile(r"[\^=\s,./\\()\-]+")



class _Collector:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.words: dict[str, str] = {}
        self.phrases: set[tuple[str, str]] = set()
        self.dates: set[str] = set()
        self.uids: set[str] = set()

    def add_text(self, kind: str, text: str) -> None:
        text = text.strip().strip("\0").strip()
        upper = text.upper()
        if len(text) < MIN_TOKEN or upper in STOP_WORDS:
            return
        if text.isascii() and text.isalnum():
            self.words.setdefault(upper, kind)
        else:
            self.phrases.add((kind, text))

    def add_name(self, name: str) -> None:
        for part in _SPLIT_NAME.split(name):
            self.add_text("name", part)
        whole = " ".join(p for p in _SPLIT_NAME.split(name) if p)
        if " " in whole:
            self.add_text("name", whole)

    def add_date(self, text: str) -> None:
        digits = text.strip()[:8]
        if len(digits) == 8 and digits.isdigit() and digits not in FIXED_VALUES:
            self.dates.add(digits)

    def values(self, vr: str, tag: int, action: str | None, values: list[str]) -> None:
        if action == KEEP:
            return
        if vr == "PN":
            for v in values:
                self.add_name(v)
        elif vr == "UI":
            for v in values:
                v = v.strip("\0 ")
                if v and not is_well_known_uid(v):
                    self.uids.add(v)
        elif vr == "DA" or vr == "DT":
            if self.policy.date_mode == "keep" and action is None:
                return
            for v in values:
                for part in v.split("-"):
                    self.add_date(part)
        elif tag in IDENTIFYING_TAGS and vr not in NUMERIC_VRS:
            for v in values:
                self.add_text("id", v)

    def element(self, elem: DataElement, action: str | None) -> None:
        if elem.VR == "SQ" or isinstance(elem.value, bytes):
            return
        self.values(elem.VR, int(elem.tag), action, [str(v) for v in _values(elem.value)])

    def dataset(self, ds: Dataset, inherited: bool = True) -> None:
        # Work on raw elements: only values that can identify are decoded, straight from their bytes when
        # the character set allows (pydicom's conversion is the slow part); pixel data and other bulk
        # binary values are never touched.
        fast = _fast_charset(ds, inherited)
        for tag, item in list(ds._dict.items()):
            tag_int = int(tag)
            if tag_int in PIXEL_TAGS:
                continue
            vr = vr_of(item, tag_int)
            if vr not in _COLLECT_VRS and tag_int not in IDENTIFYING_TAGS:
                continue
            action = None if (tag_int >> 16) & 1 else self.policy.action(tag_int)
            if vr == "SQ":
                for child in ds[tag].value or []:
                    self.dataset(child, fast)
                continue
            if fast and isinstance(item, RawDataElement) and item.value is not None and vr not in NUMERIC_VRS:
                text = _decode(item.value)
                self.values(vr, tag_int, action, text.split("\\") if text else [])
                continue
            self.element(ds[tag], action)

    def result(self) -> Identifiers:
        return Identifiers(
            words=frozenset(self.words),
            phrases=frozenset(self.phrases),
            dates=frozenset(self.dates),
            uids=frozenset(self.uids),
            word_kinds=tuple(sorted(self.words.items())),
        )


_FAST_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6", "ISO 2022 IR 100"})


def _fast_charset(ds: Dataset, inherited: bool) -> bool:
    """True when values can be decoded without pydicom (ASCII, Latin-1 or UTF-8, no code extensions)."""
    raw = ds._dict.get(BaseTag(0x00080005))
    if raw is None:
        return inherited  # sequence items use their parent's character set
    value = raw.value
    if isinstance(value, bytes):
        terms = value.decode("ascii", "replace").split("\\")
    elif isinstance(value, (list, tuple, MultiValue)):
        terms = [str(v) for v in value]
    else:
        terms = [str(value or "")]
    return all(term.strip() in _FAST_CHARSETS for term in terms)


def _decode(value: bytes) -> str:
    try:
        return value.decode("utf-8").strip(" \0")
    except UnicodeDecodeError:
        return value.decode("latin-1").strip(" \0")


def _values(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, (list, MultiValue, tuple)):
        return list(value)
    if isinstance(value, str) and "\\" in value:
        return list(value.split("\\"))
    return [value]


def collect_identifiers(ds: Dataset, policy: Policy) -> Identifiers:
    """Identifying values of one input dataset (file meta included) at every depth."""
    col = _Collector(policy)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        col.dataset(meta)
    col.dataset(ds)
    return col.result()


def _walk(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, DataElement]]:
    for elem in ds:
        name = keyword_for_tag(elem.tag) or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        path = f"{prefix}{name}"
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                yield from _walk(item, f"{path}[{i}].")
        else:
            yield path, elem


def _element_bytes(elem: DataElement) -> bytes:
    value = elem.value
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (list, MultiValue, tuple, Sequence)):
        return "\\".join(str(v) for v in value).encode("utf-8", "replace")
    if isinstance(value, PersonName):
        return str(value).encode("utf-8", "replace")
    return str(value).encode("utf-8", "replace")


def scan_dataset(ds: Dataset, ids: Identifiers, label: str = "") -> list[GateHit]:
    """Every element at every depth (file meta and private included), checked value by value."""
    hits: list[GateHit] = []
    sources: list[Dataset] = []
    meta = getattr(ds, "file_meta", None)
    if isinstance(meta, FileMetaDataset):
        sources.append(meta)
    sources.append(ds)
    for src in sources:
        for path, elem in _walk(src):
            if elem.VR in NUMERIC_VRS or int(elem.tag) == 0x7FE00010:
                continue  # numbers cannot spell a name; pixel data is checked for burned-in text elsewhere
            for kind in ids.find(_element_bytes(elem)):
                if kind == "name" and elem.VR == "CS":
                    # CS holds defined terms (PERFUSION, ORIGINAL): a patient called "Perfusion" is no leak
                    # there; IDs, dates and UIDs are still searched in CS.
                    continue
                hits.append(GateHit(f"{label}{path}", kind))
                break
    return hits


def scan_bytes(header: bytes, ids: Identifiers, label: str = "") -> list[GateHit]:
    """Search the encoded output header; on a candidate hit, parse it and check element by element.

    The byte search is the fast path (one pass, no parsing). A candidate is confirmed on the parsed elements,
    which names the attribute path and drops coincidences inside numeric binary values (FL, US, ...); a
    header that cannot be parsed back fails closed.
    """
    if not ids.contains(header):
        return []
    try:
        ds = dcmread(BytesIO(header), force=True, stop_before_pixels=True)
        return scan_dataset(ds, ids, label)
    except Exception:  # the header we wrote cannot be re-read: fail closed
        return [GateHit(f"{label}(unparseable header)", "text")]
