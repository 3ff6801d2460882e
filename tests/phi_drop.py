"""A realistic drop folder with identifiers planted wherever real archives hide them, and a way to find them.

``build_drop(inbox)`` writes what a hospital typically hands over: folders named after the patient, files
named by accession number, a ZIP made on a Mac, a CD export with a DICOMDIR, OS junk, a stray PDF, broken
copies; and inside every DICOM file the same identifiers at the top level, three and four sequences deep,
in private blocks (one of them a private sequence, one of them read back as UN), in free text and in the
file meta. The returned ``PlantedPHI`` lists every planted string and what should become of every file, so
tests can search the output for each one, independently of how the product works.

Every name component is at least five letters and every ID carries a letter or enough digits that a
byte search cannot meet it by chance in pixel data or in a ``2.25.`` UID; ``build_drop`` checks that the
unplanted base material (pydicom's sample files, generated pixels) contains none of them, so any hit in
an output came from the planting.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pydicom.valuerep import PersonName

WELL_KNOWN_UID_ROOT = "1.2.840.10008."
VENDOR_ROOT = "1.3.46.670589.11.71245."
IMPLEMENTATION_UID = "1.3.46.670589.11.71245.99.1"  # the modality's software, not a patient's
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
STUDY_ROOT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
PPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"

Outcome = Literal["deliver", "quarantine", "ignore"]
Role = Literal["instance", "container", "bad", "junk", "dicomdir"]


# ---------------------------------------------------------------------------------------------------------
# Who and where: the identifiers themselves
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    pn: str  # DICOM person name, family^given^middle
    natural: str  # as a clerk would type it in free text
    spellings: tuple[str, ...]  # transliterations a careless cleaner might produce (MÜLLER -> MUELLER)
    pid: str
    mrn: str  # a second ID from another issuer (OtherPatientIDsSequence)
    birth: str  # YYYYMMDD
    other_name: str
    birth_name: str
    mother: str
    address: str
    phone: str

    @property
    def folder(self) -> str:
        family, given = self.pn.split("^")[:2]
        return f"{family}^{given} {self.pid}"


@dataclass(frozen=True)
class Visit:
    """One study: its date/time in every format we plant, its accession and its IDs."""

    date: str  # YYYYMMDD
    time: str  # HHMMSS.ffffff
    accession: str
    study_id: str

    @property
    def iso(self) -> str:
        return f"{self.date[:4]}-{self.date[4:6]}-{self.date[6:]}"

    @property
    def european(self) -> str:
        return f"{self.date[6:]}/{self.date[4:6]}/{self.date[:4]}"

    @property
    def datetime(self) -> str:
        return f"{self.date}{self.time}+0100"


PATIENT_A = Patient(
    pn="HOLLOWAY^MARGARET^ELSPETH",
    natural="Margaret Holloway",
    spellings=(),
    pid="8840012977",
    mrn="HX4417023",
    birth="19610415",
    other_name="HOLLOWAY^PEGGY",
    birth_name="CARRICK^MARGARET",
    mother="FINNEGAN^ROSALIND",
    address="27 Larkspur Crescent, Ravensworth RV4 2LP",
    phone="+44 7700 900417",
)
PATIENT_B = Patient(
    pn="MÜLLER^JÜRGEN",
    natural="Jürgen Müller",
    spellings=("MULLER", "MUELLER", "JURGEN", "JUERGEN"),
    pid="PX5521098",
    mrn="HX9930411",
    birth="19780922",
    other_name="MÜLLER^JUPP",
    birth_name="BRANDAUER^JÜRGEN",
    mother="BRANDAUER^WALTRAUD",
    address="Kestrel Mews 9, Ravensworth RV2 8TT",
    phone="+44 7700 900882",
)

CT_VISIT = Visit("20240301", "083017.482913", "RGH24-88213", "CT88213")
US_VISIT = Visit("20240302", "101544.120077", "RGH24-88219", "US88219")
RT_VISIT = Visit("20240308", "143002.907311", "RGH24-88213", "CT88213")  # planning: same study as the CT
PRIOR_VISIT = Visit("20231114", "071203.554120", "RGH23-61022", "CT61022")
MR_VISIT = Visit("20240212", "091544.318862", "RGH24-70144", "MR70144")
CR_VISIT = Visit("20240213", "112908.640291", "RGH24-70151", "CR70151")

REFERRING = "OKONKWO^CHIDI^^DR"
PERFORMING = "PETTERSEN^INGRID"
OPERATOR = "WALLINGFORD^TOBIAS"
READING = "ABERNATHY^LUCINDA"
REQUESTING = "FAIRCLOUGH^DESMOND"
STAFF = (REFERRING, PERFORMING, OPERATOR, READING, REQUESTING)
STAFF_NATURAL = ("Chidi Okonkwo", "Ingrid Pettersen", "Tobias Wallingford", "Lucinda Abernathy")

INSTITUTION = "Ravensworth General Hospital"
INSTITUTION_ADDRESS = "1 Infirmary Road, Ravensworth RV1 7QX"
DEPARTMENT = "Ravensworth Imaging Dept"
RIS_NAMESPACE = "Ravensworth General Hospital RIS"  # issuers are often just the hospital's name
ISSUER = "RGH-MRN"
REFERRER_ADDRESS = "Okonkwo Surgery, 5 Tannery Lane, Ravensworth"
REFERRER_PHONE = "+44 1632 960455"
STATIONS = {"CT": "RGH-CT02-SOMATOM", "MR": "RGH-MR1-AVANTO", "RT": "RGH-TPS-ECLIPSE", "CR": "RGH-CR3-FUJI",
            "US": "RGH-US4-LOGIQ"}
SERIALS = {"CT": "SN77120934", "MR": "SN55092817", "RT": "SN31770452", "CR": "SN60228113", "US": "SN48810376"}
AE_TITLES = {"CT": "RGHCT02", "MR": "RGHMR01", "RT": "RGHTPS01", "CR": "RGHCR03", "US": "RGHUS04",
             "PACS": "RGHPACS01"}
PLACE_WORDS = ("Ravensworth", "Infirmary Road", "Larkspur Crescent", "Kestrel Mews", "Tannery Lane")


# ---------------------------------------------------------------------------------------------------------
# What the tests get back
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One instance that should come out: its series label, InstanceNumber, original UID, pixels."""

    series: str
    number: int
    sop_uid: str
    pixel_sha256: str | None


@dataclass(frozen=True)
class Series:
    label: str  # unique per drop; equals the modality for delivered series
    modality: str
    outcome: Outcome
    reason: str | None  # the quarantine code when the spec fixes it ("burned-in"), else None
    study_uid: str
    series_uid: str
    instances: tuple[Instance, ...]  # the instances expected in the output (delivered series only)


@dataclass(frozen=True)
class SourceFile:
    """One file put in the inbox, with what should become of it."""

    rel: str  # path under the inbox, with '/' separators
    sha256: str
    role: Role
    series: str | None
    outcome: Outcome
    reason: str | None
    note: str


@dataclass(frozen=True)
class Reference:
    """Somewhere in instance ``source`` (at any depth) the SOP Instance UID of ``target`` is referenced."""

    source: tuple[str, int]
    target: tuple[str, int]
    what: str


@dataclass(frozen=True)
class Hit:
    needle: str
    offset: int
    context: bytes

    def __str__(self) -> str:
        return f"{self.needle!r} at byte {self.offset}: ...{self.context!r}..."


@dataclass
class PlantedPHI:
    """Every identifier planted by ``build_drop``, and the fate expected for every file and series."""

    names: list[str] = field(default_factory=list)  # PN values and natural spellings
    name_parts: list[str] = field(default_factory=list)  # every component, >= 5 letters
    ids: list[str] = field(default_factory=list)
    dates: list[str] = field(default_factory=list)  # every format planted: 20240301, 2024-03-01, 01/03/2024
    times: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)  # institution, addresses, stations, serials, AE titles
    uids: list[str] = field(default_factory=list)  # original, non-well-known UIDs
    series: dict[str, Series] = field(default_factory=dict)
    files: list[SourceFile] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)

    def text_needles(self) -> list[str]:
        return sorted(set(self.names + self.name_parts + self.ids + self.dates + self.times + self.places))

    def all_needles(self) -> list[str]:
        return [*self.text_needles(), *sorted(set(self.uids))]

    @cached_property
    def _pattern(self) -> re.Pattern[bytes]:
        return needle_pattern(self.text_needles(), self.uids)

    def find(self, data: bytes) -> list[Hit]:
        """Every planted identifier in ``data``: names case-insensitively, in UTF-8 and Latin-1."""
        return find_needles(self._pattern, data)

    def delivered(self) -> list[Series]:
        return [s for s in self.series.values() if s.outcome == "deliver"]

    def quarantined(self) -> list[Series]:
        return [s for s in self.series.values() if s.outcome == "quarantine"]


# ---------------------------------------------------------------------------------------------------------
# Searching for planted strings
# ---------------------------------------------------------------------------------------------------------


def _case_variants(text: str) -> set[bytes]:
    out: set[bytes] = set()
    for variant in {text, text.upper(), text.lower(), text.title(), text.casefold()}:
        for encoding in ("utf-8", "latin-1"):
            try:
                out.add(variant.encode(encoding).lower())
            except UnicodeEncodeError:
                continue
    return out


def needle_pattern(texts: Iterable[str], uids: Iterable[str] = ()) -> re.Pattern[bytes]:
    """One regex for all needles; digit-only needles must not be preceded by a digit (so a date cannot be
    "found" in the middle of a long random number), UIDs must stand alone."""
    alternatives: list[bytes] = []
    for text in texts:
        guard = rb"(?<![0-9])" if text[:1].isdigit() else b""
        alternatives += [guard + re.escape(v) for v in sorted(_case_variants(text))]
    alternatives += [rb"(?<![0-9.])" + re.escape(u.encode("ascii")) + rb"(?![0-9])" for u in uids]
    if not alternatives:
        return re.compile(rb"(?!)")
    return re.compile(b"|".join(alternatives))


def find_needles(pattern: re.Pattern[bytes], data: bytes) -> list[Hit]:
    lowered = data.lower()  # ASCII only; non-ASCII case variants are in the pattern
    hits: list[Hit] = []
    for m in pattern.finditer(lowered):
        start, end = m.span()
        hits.append(Hit(m.group().decode("utf-8", "replace"), start, data[max(0, start - 24) : end + 24]))
    return hits


def element_bytes(value: object) -> bytes:
    """An element's value as bytes for searching (text as UTF-8, multi-values joined, binary as is)."""
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, MultiValue | list | tuple):
        return b"\\".join(element_bytes(v) for v in value)
    if isinstance(value, PersonName):
        return str(value).encode("utf-8")
    return str(value).encode("utf-8", "replace")


def walk(ds: Dataset, path: str = "") -> Iterator[tuple[str, DataElement]]:
    """Every element at every depth, with a readable path like ContentSequence[0].PersonName."""
    for elem in ds:
        name = elem.keyword or str(elem.tag)
        here = f"{path}.{name}" if path else name
        yield here, elem
        if elem.VR == "SQ" and elem.value is not None:
            for i, item in enumerate(elem.value):
                yield from walk(item, f"{here}[{i}]")


# ---------------------------------------------------------------------------------------------------------
# Building the drop
# ---------------------------------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(str(path))


@dataclass
class _Builder:
    inbox: Path
    seed: int
    rng: random.Random
    planted: PlantedPHI
    _uid_map: dict[str, str] = field(default_factory=dict)
    _base_bytes: list[bytes] = field(default_factory=list)

    # --- UIDs -------------------------------------------------------------------------------------------

    def uid(self, label: str, date: str | None = None) -> str:
        """A deterministic vendor-style UID; some carry a date, as Philips and GE UIDs do."""
        if date is not None:
            h = _sha(f"{self.seed}/{label}".encode())
            first, second = (int(h[i : i + 8], 16) % 900_000 + 100_000 for i in (0, 8))
            value = f"{VENDOR_ROOT}5.0.{date}{first}.{second}.{self.seed + 1}"
        else:
            value = str(generate_uid(prefix=VENDOR_ROOT, entropy_srcs=[str(self.seed), label]))
        self.planted.uids.append(value)
        return value

    def remap(self, old: str) -> str:
        if old not in self._uid_map:
            self._uid_map[old] = self.uid(f"base/{old}")
        return self._uid_map[old]

    # --- recording ----------------------------------------------------------------------------------------

    def add_person(self, pn: str, natural: str | None = None, spellings: Iterable[str] = ()) -> None:
        p = self.planted
        p.names.append(pn)
        if natural:
            p.names.append(natural)
        parts = [c for c in re.split(r"[\^ ,]", pn) if c]
        parts += [w for w in (natural or "").split() if w]
        p.name_parts += [c for c in [*parts, *spellings] if len(c) >= 5]

    def add_visit(self, v: Visit) -> None:
        self.planted.dates += [v.date, v.iso, v.european]
        self.planted.times.append(v.time)
        self.planted.ids += [v.accession, v.study_id]

    def add_patient(self, pt: Patient) -> None:
        self.add_person(pt.pn, pt.natural, pt.spellings)
        for pn in (pt.other_name, pt.birth_name, pt.mother):
            self.add_person(pn)
        self.planted.ids += [pt.pid, pt.mrn]
        self.planted.dates += [pt.birth, f"{pt.birth[:4]}-{pt.birth[4:6]}-{pt.birth[6:]}"]
        self.planted.places += [pt.address, pt.phone]

    def record(self, path: Path, role: Role, series: str | None, outcome: Outcome, reason: str | None,
               note: str) -> None:
        rel = path.relative_to(self.inbox).as_posix()
        self.planted.files.append(SourceFile(rel, _sha(path.read_bytes()), role, series, outcome, reason, note))

    def pixels(self, n: int) -> bytes:
        data = self.rng.randbytes(n)
        self._base_bytes.append(data)
        return data

    def base(self, name: str) -> Dataset:
        path = _sample(name)
        self._base_bytes.append(path.read_bytes())
        with warnings.catch_warnings():  # rtdose.dcm carries an invalid UID; it is replaced below
            warnings.simplefilter("ignore", UserWarning)
            ds = dcmread(path, force=True)
            for _ in ds.iterall():  # convert every raw element now, while warnings are off
                pass
        return ds

    # --- planting -----------------------------------------------------------------------------------------

    def overwrite_base(self, ds: Dataset, pt: Patient, visit: Visit, kind: str) -> None:
        """Replace the sample file's own names, dates and UIDs at every depth with planted ones."""
        by_keyword: dict[str, str] = {
            "PatientName": pt.pn,
            "PatientID": pt.pid,
            "AccessionNumber": visit.accession,
            "StudyID": visit.study_id,
            "InstitutionName": INSTITUTION,
            "InstitutionAddress": INSTITUTION_ADDRESS,
            "InstitutionalDepartmentName": DEPARTMENT,
            "StationName": STATIONS[kind],
            "DeviceSerialNumber": SERIALS[kind],
            "TreatmentMachineName": STATIONS[kind][:16],
        }
        staff = iter(STAFF * 50)
        for elem in ds.iterall():
            if elem.keyword in by_keyword:
                elem.value = by_keyword[elem.keyword]
            elif elem.VR == "DA":
                elem.value = pt.birth if elem.keyword == "PatientBirthDate" else visit.date
            elif elem.VR == "TM":
                elem.value = visit.time
            elif elem.VR == "DT":
                elem.value = visit.datetime
            elif elem.VR == "PN":
                elem.value = next(staff)
            elif (elem.VR == "UI" and isinstance(elem.value, str) and elem.value
                  and not elem.value.startswith(WELL_KNOWN_UID_ROOT)):
                elem.value = self.remap(elem.value)

    def plant(self, ds: Dataset, pt: Patient, visit: Visit, kind: str, study_uid: str,
              prior_image_uid: str, prior_study_uid: str) -> None:
        """The same identifiers in every place real archives carry them."""
        # Patient B's files are Latin-1, as many European archives still are: a byte search for the UTF-8
        # spelling alone would miss his name.
        ds.SpecificCharacterSet = "ISO_IR 100" if pt is PATIENT_B else "ISO_IR 192"
        # Some writers put their own header in the 128-byte preamble; a copied preamble is a leak.
        ds.preamble = f"{pt.pn} {pt.pid} {visit.accession}".encode("latin-1").ljust(128, b"\0")[:128]
        # Top level: the patient module and friends.
        ds.PatientName = pt.pn
        ds.PatientID = pt.pid
        ds.IssuerOfPatientID = ISSUER
        ds.PatientBirthDate = pt.birth
        ds.PatientBirthTime = visit.time
        ds.OtherPatientNames = pt.other_name
        ds.PatientBirthName = pt.birth_name
        ds.PatientMotherBirthName = pt.mother
        ds.PatientAddress = pt.address
        ds.PatientTelephoneNumbers = pt.phone
        ds.MedicalRecordLocator = f"{pt.mrn}/{visit.accession}"
        ds.PatientComments = f"{pt.natural} (MRN {pt.mrn}), DOB {pt.birth[6:]}/{pt.birth[4:6]}/{pt.birth[:4]}"
        ds.AdditionalPatientHistory = (
            f"Prior CT {PRIOR_VISIT.iso} at {INSTITUTION}; referred by Dr Okonkwo for {pt.natural}"
        )
        # Study and visit.
        for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
                   "PerformedProcedureStepStartDate"):
            setattr(ds, kw, visit.date)
        for kw in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationTime",
                   "PerformedProcedureStepStartTime"):
            setattr(ds, kw, visit.time)
        ds.AcquisitionDateTime = visit.datetime
        ds.AccessionNumber = visit.accession
        ds.StudyID = visit.study_id
        ds.StudyInstanceUID = study_uid
        ds.StudyDescription = f"{kind} for {pt.natural}"
        ds.SeriesDescription = f"{kind} {visit.iso} {pt.pn.split('^')[0]}"
        ds.ImageComments = f"MRN {pt.pid} scanned {visit.european} by Tobias"
        ds.ProtocolName = f"{kind} {pt.pn.split('^')[0]} protocol"
        ds.PerformedProcedureStepID = f"PPS-{visit.accession}"
        ds.PerformedProcedureStepDescription = f"{kind} {pt.natural} {visit.date}"
        ds.RequestedProcedureDescription = f"{kind} requested for {pt.natural}"
        self.planted.ids.append(f"PPS-{visit.accession}")
        # People and places.
        ds.InstitutionName = INSTITUTION
        ds.InstitutionAddress = INSTITUTION_ADDRESS
        ds.InstitutionalDepartmentName = DEPARTMENT
        ds.ReferringPhysicianName = REFERRING
        ds.ReferringPhysicianAddress = REFERRER_ADDRESS
        ds.ReferringPhysicianTelephoneNumbers = REFERRER_PHONE
        ds.PhysiciansOfRecord = REFERRING
        ds.PerformingPhysicianName = PERFORMING
        ds.NameOfPhysiciansReadingStudy = READING
        ds.OperatorsName = OPERATOR
        ds.RequestingPhysician = REQUESTING
        ds.StationName = STATIONS[kind]
        ds.DeviceSerialNumber = SERIALS[kind]
        # Three deep: OtherPatientIDsSequence > IssuerOfPatientIDQualifiers > AssigningFacility.
        facility = Dataset()
        facility.LocalNamespaceEntityID = INSTITUTION
        qualifiers = Dataset()
        qualifiers.AssigningFacilitySequence = Sequence([facility])
        other_id = Dataset()
        other_id.PatientID = pt.mrn
        other_id.IssuerOfPatientID = ISSUER
        other_id.TypeOfPatientID = "TEXT"
        other_id.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
        ds.OtherPatientIDsSequence = Sequence([other_id])
        # Request attributes with an issuer, a study reference and a private block inside the item.
        issuer = Dataset()
        issuer.LocalNamespaceEntityID = RIS_NAMESPACE
        ref_study = Dataset()
        ref_study.ReferencedSOPClassUID = STUDY_ROOT_SOP_CLASS
        ref_study.ReferencedSOPInstanceUID = study_uid
        request = Dataset()
        request.RequestedProcedureID = f"RP-{visit.accession}"
        request.ScheduledProcedureStepID = f"SPS-{visit.accession}"
        request.AccessionNumber = visit.accession
        request.StudyInstanceUID = study_uid
        request.RequestedProcedureDescription = f"{kind} for {pt.natural}"
        request.IssuerOfAccessionNumberSequence = Sequence([issuer])
        request.ReferencedStudySequence = Sequence([ref_study])
        ris = request.private_block(0x0033, "RGH RIS EXTENSIONS", create=True)
        ris.add_new(0x01, "LO", visit.accession)
        ris.add_new(0x02, "PN", REQUESTING)
        ris.add_new(0x03, "DA", visit.date)
        ds.RequestAttributesSequence = Sequence([request])
        self.planted.ids += [f"RP-{visit.accession}", f"SPS-{visit.accession}"]
        # A prior study, referenced but not in the drop.
        prior = Dataset()
        prior.ReferencedSOPClassUID = STUDY_ROOT_SOP_CLASS
        prior.ReferencedSOPInstanceUID = prior_study_uid
        ds.ReferencedStudySequence = Sequence([prior])
        pps = Dataset()
        pps.ReferencedSOPClassUID = PPS_SOP_CLASS
        pps.ReferencedSOPInstanceUID = self.uid(f"pps/{kind}/{visit.accession}")
        ds.ReferencedPerformedProcedureStepSequence = Sequence([pps])
        # A report fragment four deep: ContentSequence > ContentSequence > ContentSequence > ReferencedSOP.
        ref_sop = Dataset()
        ref_sop.ReferencedSOPClassUID = CT_IMAGE
        ref_sop.ReferencedSOPInstanceUID = prior_image_uid
        text = Dataset()
        text.RelationshipType = "CONTAINS"
        text.ValueType = "TEXT"
        text.TextValue = (
            f"Compared with {PRIOR_VISIT.european}. {pt.natural}, MRN {pt.mrn}, reported by Dr Abernathy "
            f"on {visit.iso}."
        )
        text.DateTime = visit.datetime
        text.ReferencedSOPSequence = Sequence([ref_sop])
        observer = Dataset()
        observer.RelationshipType = "HAS OBS CONTEXT"
        observer.ValueType = "PNAME"
        observer.PersonName = READING
        observer.ContentSequence = Sequence([text])
        container = Dataset()
        container.RelationshipType = "CONTAINS"
        container.ValueType = "CONTAINER"
        container.ContentSequence = Sequence([observer])
        ds.ContentSequence = Sequence([container])
        # Overlay comments in a repeating group.
        ds.add_new(0x60000022, "LO", f"{pt.natural} {visit.iso}")
        ds.add_new(0x60004000, "LT", f"Marked by Ingrid Pettersen for {pt.pn}")
        # A thumbnail whose "pixels" spell the name, and trailing padding nobody looks at.
        icon = Dataset()
        icon.Rows = icon.Columns = 8
        icon.SamplesPerPixel = 1
        icon.PhotometricInterpretation = "MONOCHROME2"
        icon.BitsAllocated = icon.BitsStored = 8
        icon.HighBit = 7
        icon.PixelRepresentation = 0
        icon.PixelData = f"{pt.pn} {pt.pid}".encode("latin-1").ljust(64, b" ")[:64]
        ds.IconImageSequence = Sequence([icon])
        ds.add_new(0xFFFCFFFC, "OB", f"{pt.natural};{pt.pid};{pt.birth}".encode("latin-1").ljust(48, b"\0"))
        self.plant_private(ds, pt, visit, study_uid)

    def plant_private(self, ds: Dataset, pt: Patient, visit: Visit, study_uid: str) -> None:
        hospital = ds.private_block(0x0071, f"{INSTITUTION.upper()} 1.0", create=True)
        hospital.add_new(0x01, "LO", pt.natural)
        hospital.add_new(0x02, "SH", pt.mrn)
        hospital.add_new(0x03, "DA", pt.birth)
        hospital.add_new(0x04, "LT", f"Referred by Dr Okonkwo for {pt.natural}, MRN {pt.mrn}, seen {visit.iso}")
        hospital.add_new(0x05, "UI", study_uid)
        hospital.add_new(0x06, "PN", pt.pn)
        hospital.add_new(0x07, "TM", visit.time)
        # A private sequence whose item holds public identifiers and another private sequence.
        inner = Dataset()
        inner_block = inner.private_block(0x0075, "ACME PACS 2.1", create=True)
        inner_block.add_new(0x01, "PN", pt.other_name)
        inner_block.add_new(0x02, "DA", pt.birth)
        deep = Dataset()
        deep.PatientID = pt.mrn
        deep.PatientName = pt.pn
        inner_block.add_new(0x03, "SQ", Sequence([deep]))
        item = Dataset()
        item.PatientName = pt.pn
        item.AccessionNumber = visit.accession
        item.StudyDate = visit.date
        item_block = item.private_block(0x0075, "ACME PACS 2.1", create=True)
        item_block.add_new(0x10, "SQ", Sequence([inner]))
        acme = ds.private_block(0x0073, "ACME PACS 2.1", create=True)
        acme.add_new(0x10, "SQ", Sequence([item]))
        # Vendor blobs: raw bytes with the name inside (read back as UN from implicit-VR files).
        raw = ds.private_block(0x0077, "ACME RAW HEADER", create=True)
        raw.add_new(0x10, "OB", f"PATNAME={pt.pn};PATID={pt.pid};DOB={pt.birth};".encode() + b"\x00")
        raw.add_new(0x11, "UN", f"{pt.natural}\\{visit.accession}".encode())

    def meta(self, ds: Dataset, kind: str, pt: Patient, syntax: str = ExplicitVRLittleEndian) -> None:
        """File meta with the sending and receiving AE titles and a private blob naming the patient."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = syntax
        meta.ImplementationClassUID = IMPLEMENTATION_UID
        meta.SourceApplicationEntityTitle = AE_TITLES[kind]
        meta.SendingApplicationEntityTitle = AE_TITLES[kind]
        meta.ReceivingApplicationEntityTitle = "RGHPACS01"
        meta.PrivateInformationCreatorUID = IMPLEMENTATION_UID
        meta.PrivateInformation = f"{pt.pn}|{pt.pid}|{pt.birth}".encode("latin-1").ljust(40, b"\0")
        ds.file_meta = meta

    # --- images -------------------------------------------------------------------------------------------

    def image(self, base: str, sop_class: str, modality: str, pt: Patient, visit: Visit, study_uid: str,
              series_uid: str, frame_uid: str, number: int, kind: str, bits: int = 16,
              keep_pixels: bool = False) -> Dataset:
        """An instance of ``base`` with new pixels (or, with keep_pixels, its own compressed ones)."""
        ds = self.base(base)
        syntax = str(ds.file_meta.TransferSyntaxUID) if keep_pixels else ExplicitVRLittleEndian
        self.overwrite_base(ds, pt, visit, kind)
        for kw in ("SmallestImagePixelValue", "LargestImagePixelValue", "WindowCenter", "WindowWidth",
                   "BurnedInAnnotation"):
            if kw in ds:
                delattr(ds, kw)
        ds.SOPClassUID = sop_class
        ds.Modality = modality
        ds.SOPInstanceUID = self.uid(f"sop/{series_uid}/{number}", visit.date if number == 1 else None)
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = number
        if not keep_pixels:
            ds.Rows = ds.Columns = 16
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = bits
            ds.HighBit = bits - 1
            ds.PixelRepresentation = 0
            ds.PixelData = self.pixels(16 * 16 * bits // 8)
        self.plant(ds, pt, visit, kind, study_uid, self.prior_image, self.prior_study)
        self.meta(ds, kind, pt, syntax)
        return ds

    @cached_property
    def prior_study(self) -> str:
        return self.uid("prior-study", PRIOR_VISIT.date)

    @cached_property
    def prior_image(self) -> str:
        return self.uid("prior-image")


def _refs(uids: Iterable[str], sop_class: str) -> Sequence:
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    return Sequence(items)


def _encode(ds: Dataset, *, enforce: bool = True) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=enforce)
    return buf.getvalue()


def _write(ds: Dataset, path: Path, data: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(ds) if data is None else data)


def _ct(b: _Builder) -> tuple[dict[int, Dataset], str, str, str]:
    """Nine CT instances of one series, split over two folders, three of them broken."""
    pt, visit = PATIENT_A, CT_VISIT
    study = b.uid("study/A", visit.date)
    series = b.uid("series/CT", visit.date)
    frame = b.uid("frame/A")
    cts = {
        n: b.image("CT_small.dcm", CT_IMAGE, "CT", pt, visit, study, series, frame, n, "CT") for n in range(1, 10)
    }
    # Each image references the one before it (the first one references the last good one, in the other
    # folder), plus an image of the prior study that is not in the drop.
    for n in range(1, 7):
        target = 6 if n == 1 else n - 1
        cts[n].ReferencedImageSequence = _refs([cts[target].SOPInstanceUID, b.prior_image], CT_IMAGE)
        b.planted.references.append(Reference(("CT", n), ("CT", target), "ReferencedImageSequence"))
    return cts, study, series, frame


def build_drop(inbox: Path, seed: int = 0) -> PlantedPHI:
    """Write a realistic drop under ``inbox`` and return everything that was planted in it."""
    inbox.mkdir(parents=True, exist_ok=True)
    b = _Builder(inbox=inbox, seed=seed, rng=random.Random(seed), planted=PlantedPHI())
    for pt in (PATIENT_A, PATIENT_B):
        b.add_patient(pt)
    for v in (CT_VISIT, US_VISIT, RT_VISIT, PRIOR_VISIT, MR_VISIT, CR_VISIT):
        b.add_visit(v)
    for pn in STAFF:
        b.add_person(pn)
    b.planted.names += list(STAFF_NATURAL)
    b.planted.places += [INSTITUTION, INSTITUTION_ADDRESS, DEPARTMENT, RIS_NAMESPACE, ISSUER, REFERRER_ADDRESS,
                         REFERRER_PHONE, *PLACE_WORDS, *STATIONS.values(), *SERIALS.values(), *AE_TITLES.values()]

    a_dir = inbox / PATIENT_A.folder
    b_dir = inbox / PATIENT_B.folder
    _build_ct_and_rt(b, a_dir)
    _build_us(b, a_dir)
    _build_mr_zip(b, inbox)
    _build_cr(b, b_dir)
    _build_junk(b, a_dir)
    _self_check(b)
    return b.planted


def _build_ct_and_rt(b: _Builder, a_dir: Path) -> None:
    cts, study, series, frame = _ct(b)
    folders = {n: a_dir / f"CT {CT_VISIT.iso}" / ("1" if n in (1, 2, 3, 7) else "2") for n in cts}
    good = (1, 2, 3, 4, 5, 6)
    for n in good:
        path = folders[n] / f"{CT_VISIT.accession}_{n:04d}.dcm"
        _write(cts[n], path)
        b.record(path, "instance", "CT", "deliver", None, f"CT instance {n}")
    # Instance 7: the copy was interrupted inside the pixel data (pydicom still reads its header).
    full = _encode(cts[7])
    path = folders[7] / f"{CT_VISIT.accession}_0007.dcm"
    _write(cts[7], path, full[: len(full) - 200])
    b.record(path, "bad", "CT", "quarantine", None, "CT instance 7, truncated inside its pixel data")
    # Instance 8: no SOP Instance UID, neither in the dataset nor in the file meta.
    del cts[8].SOPInstanceUID
    del cts[8].file_meta.MediaStorageSOPInstanceUID
    path = folders[8] / f"{CT_VISIT.accession}_0008.dcm"
    _write(cts[8], path, _encode(cts[8], enforce=False))
    b.record(path, "bad", "CT", "quarantine", None, "CT instance 8, without SOPInstanceUID")
    # Instance 9: the copy was interrupted inside the header.
    full = _encode(cts[9])
    pixel_at = full.rfind(b"\xe0\x7f\x10\x00")
    path = folders[9] / f"{CT_VISIT.accession}_0009.dcm"
    _write(cts[9], path, full[: pixel_at * 2 // 3])
    b.record(path, "bad", "CT", "quarantine", None, "CT instance 9, truncated inside its header")
    b.planted.series["CT"] = Series(
        "CT", "CT", "deliver", None, study, series,
        tuple(Instance("CT", n, cts[n].SOPInstanceUID, _sha(cts[n].PixelData)) for n in good),
    )
    _build_rt(b, a_dir, cts, study, frame)


def _build_rt(b: _Builder, a_dir: Path, cts: dict[int, Dataset], study: str, frame: str) -> None:
    """An RT structure set, plan and dose exported to CD (with a DICOMDIR), referencing each other."""
    pt, visit = PATIENT_A, RT_VISIT
    rt: dict[str, Dataset] = {}
    for label, name in (("RTSTRUCT", "rtstruct.dcm"), ("RTPLAN", "rtplan.dcm"), ("RTDOSE", "rtdose.dcm")):
        ds = b.base(name)
        b.overwrite_base(ds, pt, visit, "RT")
        ds.SeriesInstanceUID = b.uid(f"series/{label}", visit.date)
        ds.SOPInstanceUID = b.uid(f"sop/{label}", visit.date)
        ds.InstanceNumber = 1
        ds.FrameOfReferenceUID = frame
        b.plant(ds, pt, visit, "RT", study, b.prior_image, b.prior_study)
        syntax = ExplicitVRLittleEndian if label == "RTSTRUCT" else ImplicitVRLittleEndian
        b.meta(ds, "RT", pt, syntax)
        rt[label] = ds
    struct, plan, dose = rt["RTSTRUCT"], rt["RTPLAN"], rt["RTDOSE"]
    good_ct = [cts[n].SOPInstanceUID for n in range(1, 7)]
    ref_frame = struct.ReferencedFrameOfReferenceSequence[0]
    ref_frame.FrameOfReferenceUID = frame
    ref_study = ref_frame.RTReferencedStudySequence[0]
    ref_study.ReferencedSOPInstanceUID = study
    ref_series = ref_study.RTReferencedSeriesSequence[0]
    ref_series.SeriesInstanceUID = cts[1].SeriesInstanceUID
    ref_series.ContourImageSequence = _refs(good_ct, CT_IMAGE)
    for roi in struct.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = frame
    for i, contour in enumerate(struct.ROIContourSequence):
        for c in contour.get("ContourSequence", []):
            c.ContourImageSequence = _refs([good_ct[i % 6]], CT_IMAGE)
    plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = struct.SOPInstanceUID
    plan.ReferencedStructureSetSequence[0].ReferencedSOPClassUID = struct.SOPClassUID
    del plan.ReferencedRTPlanSequence  # the sample's plan references a plan that does not exist
    dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = plan.SOPInstanceUID
    b.planted.references += [
        Reference(("RTSTRUCT", 1), ("CT", 1), "ContourImageSequence"),
        Reference(("RTSTRUCT", 1), ("CT", 6), "ContourImageSequence"),
        Reference(("RTPLAN", 1), ("RTSTRUCT", 1), "ReferencedStructureSetSequence"),
        Reference(("RTDOSE", 1), ("RTPLAN", 1), "ReferencedRTPlanSequence"),
    ]
    cd = a_dir / f"CD {PATIENT_A.pn.split('^')[0]} {visit.iso}"
    fs = FileSet()
    fs.ID = "RGH88213"
    for ds in rt.values():
        fs.add(ds)
    fs.write(cd)
    b.record(cd / "DICOMDIR", "dicomdir", None, "ignore", None, "DICOMDIR of the CD export")
    for instance in fs:
        ds = instance.load()
        label = str(ds.Modality)
        b.record(Path(instance.path), "instance", label, "deliver", None, f"{label} on the CD")
        pixel = _sha(ds.PixelData) if "PixelData" in ds else None
        b.planted.series[label] = Series(
            label, label, "deliver", None, study, str(ds.SeriesInstanceUID),
            (Instance(label, 1, str(ds.SOPInstanceUID), pixel),),
        )
    b.planted.ids.append(fs.ID)


def _build_us(b: _Builder, a_dir: Path) -> None:
    """Ultrasound without a BurnedInAnnotation flag: suspect, quarantined by default."""
    study = b.uid("study/US", US_VISIT.date)
    series = b.uid("series/US", US_VISIT.date)
    ds = b.image("MR_small.dcm", US_IMAGE, "US", PATIENT_A, US_VISIT, study, series, b.uid("frame/US"), 1, "US",
                 bits=8)
    path = a_dir / f"US {US_VISIT.iso}" / f"{US_VISIT.accession}_0001.dcm"
    _write(ds, path)
    b.record(path, "instance", "US", "quarantine", None, "ultrasound, burned-in text suspected")
    b.planted.series["US"] = Series("US", "US", "quarantine", None, study, series, ())


def _build_mr_zip(b: _Builder, inbox: Path) -> None:
    """Four MR images in a ZIP made on a Mac (with __MACOSX and .DS_Store members)."""
    pt, visit = PATIENT_B, MR_VISIT
    study = b.uid("study/B", visit.date)
    series = b.uid("series/MR", visit.date)
    frame = b.uid("frame/B")
    folder = f"{pt.folder}/MR {visit.iso}"
    # Instances 3 and 4 keep the compressed pixel data of their sample files (JPEG-LS, RLE): pixel data must
    # come out byte for byte whatever the transfer syntax.
    bases = {1: "MR_small.dcm", 2: "MR_small.dcm", 3: "MR_small_jpeg_ls_lossless.dcm", 4: "MR_small_RLE.dcm"}
    mrs = [b.image(bases[n], MR_IMAGE, "MR", pt, visit, study, series, frame, n, "MR", keep_pixels=n > 2)
           for n in range(1, 5)]
    for ds in mrs[1:]:
        ds.SourceImageSequence = _refs([mrs[0].SOPInstanceUID], MR_IMAGE)
        b.planted.references.append(Reference(("MR", int(ds.InstanceNumber)), ("MR", 1), "SourceImageSequence"))
    path = inbox / f"{pt.pn.replace('^', ' ')} {pt.pid}.zip"
    stamp = (2024, 2, 12, 9, 15, 44)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for ds in mrs:
            zf.writestr(zipfile.ZipInfo(f"{folder}/{visit.accession}_{ds.InstanceNumber:04d}.dcm", stamp),
                        _encode(ds))
        zf.writestr(zipfile.ZipInfo(f"__MACOSX/{folder}/._{visit.accession}_0001.dcm", stamp),
                    b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 40)
        zf.writestr(zipfile.ZipInfo(f"{pt.folder}/.DS_Store", stamp), _ds_store(pt.folder))
    b.record(path, "container", "MR", "deliver", None, "ZIP container holding the MR series")
    b.planted.series["MR"] = Series(
        "MR", "MR", "deliver", None, study, series,
        tuple(Instance("MR", int(ds.InstanceNumber), ds.SOPInstanceUID, _sha(ds.PixelData)) for ds in mrs),
    )


def _build_cr(b: _Builder, b_dir: Path) -> None:
    """Two radiographs flagged BurnedInAnnotation YES: quarantined with code burned-in."""
    study = b.uid("study/CR", CR_VISIT.date)
    series = b.uid("series/CR", CR_VISIT.date)
    frame = b.uid("frame/CR")
    for n in (1, 2):
        ds = b.image("CT_small.dcm", CR_IMAGE, "CR", PATIENT_B, CR_VISIT, study, series, frame, n, "CR")
        ds.BurnedInAnnotation = "YES"
        path = b_dir / f"CR {CR_VISIT.iso}" / f"{CR_VISIT.accession}_{n:04d}.dcm"
        _write(ds, path)
        b.record(path, "instance", "CR", "quarantine", "burned-in", f"CR {n}, BurnedInAnnotation YES")
    b.planted.series["CR"] = Series("CR", "CR", "quarantine", "burned-in", study, series, ())


def _ds_store(name: str) -> bytes:
    # Finder keeps the names of the folder's entries in UTF-16; enough of the format to look real.
    return b"\x00\x00\x00\x01Bud1" + b"\x00" * 24 + name.encode("utf-16-be") + b"Iloc" + b"\x00" * 16


def _build_junk(b: _Builder, a_dir: Path) -> None:
    inbox = b.inbox
    junk = {
        inbox / ".DS_Store": _ds_store(PATIENT_A.folder),
        a_dir / ".DS_Store": _ds_store(f"CT {CT_VISIT.iso}"),
        a_dir / f"CT {CT_VISIT.iso}" / "1" / "Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504,
        a_dir / f"CT {CT_VISIT.iso}" / "1" / f"._{CT_VISIT.accession}_0001.dcm":
            b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 40,
    }
    for path, data in junk.items():
        path.write_bytes(data)
        b.record(path, "junk", None, "ignore", None, f"OS junk {path.name}")
    letter = a_dir / f"Referral {PATIENT_A.pn.split('^')[0]} {CT_VISIT.iso}.pdf"
    letter.write_bytes(
        b"%PDF-1.4\n1 0 obj << /Title (Referral for Margaret Holloway, MRN 8840012977) >> endobj\n"
        b"BT /F1 12 Tf (Dear Dr Okonkwo, re: HOLLOWAY^MARGARET DOB 15/04/1961) Tj ET\n%%EOF\n"
    )
    b.record(letter, "bad", None, "quarantine", None, "a referral letter (not DICOM)")


def _self_check(b: _Builder) -> None:
    """The unplanted material (sample files, pixels) must not contain a planted string by accident."""
    pattern = needle_pattern(b.planted.text_needles(), b.planted.uids)
    for data in b._base_bytes:
        hits = find_needles(pattern, data)
        assert not hits, f"build_drop: base material already contains {hits[0]}; change the planted value"
    names = {s.label for s in b.planted.series.values()}
    assert names == {"CT", "RTSTRUCT", "RTPLAN", "RTDOSE", "MR", "US", "CR"}, names
