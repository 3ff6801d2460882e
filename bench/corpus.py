"""Benchmark corpora: synthetic DICOM series with the PHI a real hospital export carries.

Each corpus is built from a fixed seed, so two machines measure the same bytes. It lives in
``bench/corpus/<name>/`` with a marker ``bench/corpus/<name>.json`` next to it (not inside, or every tool
would see the marker as an input file). The marker records the parameters, the file count and the total
size; a corpus whose marker matches is reused, and one whose files no longer add up is reported as damaged.

    python bench/corpus.py [--only ct600|small5000] [--force]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

BENCH = Path(__file__).resolve().parent
CORPUS_ROOT = BENCH / "corpus"
# Bump when the bytes a spec produces change, so corpora built by an older generator are rebuilt.
GENERATOR = 2
# Retired Detached Study Management SOP Class: what old RIS exports put in ReferencedStudySequence.
DETACHED_STUDY = "1.2.840.10008.3.1.2.3.1"
# Pixel values in 0..4095 (12 bits stored in 16 allocated, as CT scanners write them): clear each high nibble.
_LOW12 = bytes(b & 0x0F for b in range(256))

FAMILY = ["MUELLER", "OKAFOR", "NAKAMURA", "DUBOIS", "KOWALSKI", "SILVA", "JOHANSSON", "HASSAN", "ROSSI"]
GIVEN = ["ANNA", "JAMES", "FATIMA", "WEI", "LUCIA", "PIOTR", "GRACE", "OMAR", "INGRID", "MATEO"]
INSTITUTIONS = [
    ("SAINT BARNABAS GENERAL HOSPITAL", "12 Harbour Road^^Westfield^NJ^07090^USA"),
    ("KLINIKUM NORDSTADT", "Lindenallee 4^^Hannover^^30167^DE"),
]


@dataclass(frozen=True)
class CorpusSpec:
    """What a corpus contains; every field goes into the marker, so changing one forces a rebuild."""

    name: str
    modality: Literal["CT", "MR"]
    studies: int
    series_per_study: int
    images_per_series: int
    rows: int
    columns: int
    seed: int

    @property
    def files(self) -> int:
        return self.studies * self.series_per_study * self.images_per_series

    def params(self) -> dict[str, object]:
        return {**asdict(self), "generator": GENERATOR}


SPECS: dict[str, CorpusSpec] = {
    "ct600": CorpusSpec("ct600", "CT", studies=1, series_per_study=1, images_per_series=600,
                        rows=512, columns=512, seed=600),
    "small5000": CorpusSpec("small5000", "MR", studies=10, series_per_study=5, images_per_series=100,
                            rows=64, columns=64, seed=5000),
}


@dataclass(frozen=True)
class Corpus:
    """A built corpus on disk."""

    name: str
    path: Path
    files: int
    bytes: int

    @property
    def megabytes(self) -> float:
        return self.bytes / 1e6


class CorpusError(Exception):
    """A corpus on disk that does not match its marker; the message says how to rebuild it."""


@dataclass(frozen=True)
class Patient:
    name: str
    id: str
    birth: date
    sex: str

    @property
    def spoken_name(self) -> str:
        family, given = self.name.split("^")[:2]
        return f"{given.title()} {family.title()}"


def marker_path(name: str) -> Path:
    return CORPUS_ROOT / f"{name}.json"


def corpus_files(path: Path) -> Iterator[Path]:
    """Every file of a corpus, in a stable order."""
    return iter(sorted(p for p in path.rglob("*") if p.is_file()))


def _uid(rng: random.Random) -> UID:
    # generate_uid hashes its entropy sources, so a seeded source gives the same UID on every build.
    return generate_uid(entropy_srcs=[str(rng.getrandbits(128))])


def _dicom_date(d: date) -> str:
    return d.strftime("%Y%m%d")


def _dicom_time(rng: random.Random, hour_lo: int = 7, hour_hi: int = 18) -> str:
    return f"{rng.randint(hour_lo, hour_hi):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}"


def _patient(rng: random.Random) -> Patient:
    name = f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}^{rng.choice('ABCDEFGHJKLM')}"
    birth = date(1935, 1, 1) + timedelta(days=rng.randint(0, 365 * 70))
    return Patient(name=name, id=f"MRN{rng.randint(10_000_000, 99_999_999)}", birth=birth,
                   sex=rng.choice("FM"))


def _patient_module(ds: Dataset, patient: Patient, study_date: date, rng: random.Random) -> None:
    ds.PatientName = patient.name
    ds.PatientID = patient.id
    ds.IssuerOfPatientID = "SBGH EMPI"
    ds.PatientBirthDate = _dicom_date(patient.birth)
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{(study_date - patient.birth).days // 365:03d}Y"
    ds.PatientSize = f"{rng.uniform(1.5, 1.95):.2f}"
    ds.PatientWeight = str(rng.randint(48, 120))
    ds.PatientAddress = f"{rng.randint(1, 200)} Elm Street^^Westfield^NJ^07090"
    ds.PatientTelephoneNumbers = f"+1-908-555-{rng.randint(1000, 9999)}"
    other = Dataset()
    other.PatientID = f"OLD{rng.randint(100_000, 999_999)}"
    other.IssuerOfPatientID = "LEGACY RIS"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])


def _study_module(ds: Dataset, patient: Patient, study_date: date, rng: random.Random, body: str) -> None:
    institution, address = rng.choice(INSTITUTIONS)
    accession = f"A{rng.randint(10_000_000, 99_999_999)}"
    ds.StudyInstanceUID = _uid(rng)
    ds.StudyDate = _dicom_date(study_date)
    ds.StudyTime = _dicom_time(rng)
    ds.StudyID = str(rng.randint(1000, 9999))
    ds.AccessionNumber = accession
    # Free text naming the patient is what Annex E's "clean descriptors" exists for.
    ds.StudyDescription = f"{body} {patient.spoken_name} ({patient.id})"
    ds.ReferringPhysicianName = f"{_person(rng)}^^DR"
    ds.InstitutionName = institution
    ds.InstitutionAddress = address
    ds.InstitutionalDepartmentName = "RADIOLOGY"
    ds.PhysiciansOfRecord = _person(rng)
    ds.RequestingPhysician = _person(rng)
    ref = Dataset()
    ref.ReferencedSOPClassUID = DETACHED_STUDY
    ref.ReferencedSOPInstanceUID = _uid(rng)
    ds.ReferencedStudySequence = Sequence([ref])
    code = Dataset()
    code.CodeValue = f"RPID{rng.randint(100, 999)}"
    code.CodingSchemeDesignator = "99SBGH"
    code.CodeMeaning = body
    ds.ProcedureCodeSequence = Sequence([code])
    request = Dataset()
    request.RequestedProcedureID = f"RP{accession}"
    request.ScheduledProcedureStepID = f"SPS{accession}"
    request.RequestedProcedureDescription = f"{body} for {patient.spoken_name}"
    request.AccessionNumber = accession
    inner = Dataset()
    inner.ReferencedSOPClassUID = DETACHED_STUDY
    inner.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
    request.ReferencedStudySequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([request])


def _private_blocks(ds: Dataset, patient: Patient, study_date: date, rng: random.Random) -> None:
    # What RIS/PACS vendors stash in private groups: copies of the name, the MRN, the operator.
    ris = ds.private_block(0x0009, "SBGH RIS 2.1", create=True)
    ris.add_new(0x10, "LO", patient.spoken_name)
    ris.add_new(0x11, "LO", patient.id)
    ris.add_new(0x12, "DA", _dicom_date(study_date))
    ris.add_new(0x13, "SH", "tech " + rng.choice(GIVEN).title())
    recon = ds.private_block(0x0019, "ACME RECON PARAMS", create=True)
    recon.add_new(0x01, "DS", f"{rng.uniform(0.5, 2.0):.3f}")
    recon.add_new(0x02, "OB", rng.randbytes(64))


def _equipment(ds: Dataset, spec: CorpusSpec, rng: random.Random) -> None:
    ds.Manufacturer = "ACME Medical"
    ds.ManufacturerModelName = "Tomograph 9000" if spec.modality == "CT" else "Magnetom 3T"
    ds.StationName = f"RAD{rng.randint(1, 9)}-{spec.modality}"
    ds.DeviceSerialNumber = str(rng.randint(100_000, 999_999))
    ds.SoftwareVersions = "VB42"
    ds.OperatorsName = [_person(rng), _person(rng)]
    ds.PerformingPhysicianName = _person(rng)


def _image_pixel(ds: Dataset, spec: CorpusSpec) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = ["0.703125", "0.703125"] if spec.modality == "CT" else ["3.75", "3.75"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]


def _modality_fields(ds: Dataset, spec: CorpusSpec, rng: random.Random) -> None:
    if spec.modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.SliceThickness = "1.0"
        ds.ConvolutionKernel = "B30f"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.BodyPartExamined = "CHEST"
        return
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = str(rng.choice([500, 2000, 4000]))
    ds.EchoTime = str(rng.choice([12, 90]))
    ds.EchoTrainLength = "1"
    ds.MagneticFieldStrength = "3"
    ds.SliceThickness = "5.0"
    ds.BodyPartExamined = "BRAIN"


def _series_dataset(spec: CorpusSpec, rng: random.Random, study: Dataset, number: int) -> Dataset:
    """One series' shared header: the study's elements plus the series' own; instances fill in the rest."""
    ds = Dataset()
    ds.update(study)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage if spec.modality == "CT" else MRImageStorage
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.Modality = spec.modality
    ds.SeriesInstanceUID = _uid(rng)
    ds.SeriesNumber = number
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.SeriesDescription = f"{ds.ProcedureCodeSequence[0].CodeMeaning} series {number}"
    ds.ProtocolName = f"{spec.modality} ROUTINE {number}"
    ds.FrameOfReferenceUID = _uid(rng)
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    _equipment(ds, spec, rng)
    _modality_fields(ds, spec, rng)
    _image_pixel(ds, spec)
    return ds


def _write_instance(ds: Dataset, spec: CorpusSpec, rng: random.Random, index: int, path: Path) -> int:
    """Fill the per-instance elements of the shared series header and write it; return the file's size."""
    uid = _uid(rng)
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPInstanceUID = uid
    ds.InstanceNumber = index + 1
    z = -300.0 + index * float(ds.SliceThickness)
    ds.ImagePositionPatient = ["-180.0", "-180.0", f"{z:.1f}"]
    ds.SliceLocation = f"{z:.1f}"
    moment = _dicom_time(rng, int(ds.StudyTime[:2]), int(ds.StudyTime[:2]))
    for prefix in ("Acquisition", "Content", "InstanceCreation"):
        setattr(ds, f"{prefix}Date", ds.StudyDate)
        setattr(ds, f"{prefix}Time", moment)
    ds.AcquisitionDateTime = ds.StudyDate + moment
    pixels = bytearray(rng.randbytes(spec.rows * spec.columns * 2))
    pixels[1::2] = pixels[1::2].translate(_LOW12)
    ds.PixelData = bytes(pixels)
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def _generate(spec: CorpusSpec, dest: Path) -> tuple[int, int]:
    # A value too long for its VR would make the corpus invalid DICOM: fail the build instead of warning.
    config.settings.writing_validation_mode = config.RAISE
    rng = random.Random(spec.seed)
    patients = [_patient(rng) for _ in range(max(1, spec.studies // 2))]
    files = size = 0
    for s in range(spec.studies):
        patient = patients[s % len(patients)]
        study_date = date(2024, 1, 1) + timedelta(days=rng.randint(0, 700))
        study = Dataset()
        body = "CT CHEST W/O" if spec.modality == "CT" else "MR BRAIN W/WO"
        _patient_module(study, patient, study_date, rng)
        _study_module(study, patient, study_date, rng, body)
        _private_blocks(study, patient, study_date, rng)
        # Folders named after the patient, as PACS exports often are: the path itself carries PHI.
        study_dir = dest / patient.id / f"{study.StudyDate}_{study.AccessionNumber}"
        for n in range(1, spec.series_per_study + 1):
            series = _series_dataset(spec, rng, study, n)
            series_dir = study_dir / f"S{n:03d}"
            series_dir.mkdir(parents=True)
            for i in range(spec.images_per_series):
                size += _write_instance(series, spec, rng, i, series_dir / f"IM{i + 1:05d}.dcm")
                files += 1
            _progress(spec.name, files, spec.files)
    return files, size


def _progress(name: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\r  {name}: {done}/{total} files", end=end, file=sys.stderr, flush=True)


def load(name: str) -> Corpus | None:
    """The corpus on disk if its marker matches the current spec, else None."""
    spec = SPECS[name]
    path = CORPUS_ROOT / name
    try:
        marker = json.loads(marker_path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if marker.get("params") != spec.params() or not path.is_dir():
        return None
    return Corpus(name=name, path=path, files=int(marker["files"]), bytes=int(marker["bytes"]))


def verify(corpus: Corpus) -> None:
    """Check the files still add up to the marker: a tool that wrote into the corpus would skew every row."""
    files = size = 0
    for p in corpus_files(corpus.path):
        files += 1
        size += p.stat().st_size
    if (files, size) != (corpus.files, corpus.bytes):
        raise CorpusError(
            f"{corpus.path}: holds {files} files / {size} bytes but was built with {corpus.files} files / "
            f"{corpus.bytes} bytes; something changed it. Rebuild: python bench/corpus.py --only "
            f"{corpus.name} --force"
        )


def build(name: str, *, force: bool = False) -> Corpus:
    """Build a corpus (or reuse the one on disk when its marker matches) and return it."""
    spec = SPECS[name]
    existing = None if force else load(name)
    if existing is not None:
        return existing
    path = CORPUS_ROOT / name
    partial = CORPUS_ROOT / f".{name}.partial"
    for stale in (partial, path):
        if stale.exists():
            shutil.rmtree(stale)
    marker_path(name).unlink(missing_ok=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    files, size = _generate(spec, partial)
    # Rename last, so an interrupted build never leaves a half corpus that looks complete.
    partial.rename(path)
    marker = {"params": spec.params(), "files": files, "bytes": size,
              "build_seconds": round(time.perf_counter() - start, 1)}
    marker_path(name).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return Corpus(name=name, path=path, files=files, bytes=size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the benchmark corpora under bench/corpus/.")
    parser.add_argument("--only", choices=sorted(SPECS), help="build just this corpus")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching corpus exists")
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else list(SPECS):
        reused = not args.force and load(name) is not None
        start = time.perf_counter()
        corpus = build(name, force=args.force)
        how = "reused" if reused else f"built in {time.perf_counter() - start:.1f} s"
        print(f"{name}: {corpus.files} files, {corpus.megabytes:.1f} MB in {corpus.path} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
