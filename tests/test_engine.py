"""The pure engine on real sample files: every action, every option, the marks, pixel data, errors."""

from __future__ import annotations

import datetime as dt
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from anondrop.deid import engine
from anondrop.deid.actions import DUMMY_DATE
from anondrop.deid.policy import build_policy
from anondrop.deid.pseudonyms import Keys
from tests.conftest import sample

KEYS = Keys(secret=b"s" * 32)


def ct() -> Dataset:
    """CT_small with identifiers planted where archives keep them."""
    ds = dcmread(sample("CT_small.dcm"))
    ds.PatientName = "Doe^Johnathan"
    ds.PatientID = "MRN778899"
    ds.PatientBirthDate = "19610412"
    ds.AccessionNumber = "ACC445566"
    ds.StudyDate = "20240301"
    ds.AcquisitionDate = "20240305"
    ds.ContentDate = "20240301"
    ds.StudyDescription = "CT chest for Johnathan Doe"
    ds.InstitutionName = "Saint Elsewhere Hospital"
    ds.OtherPatientIDs = "OLD-12345"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.ImageComments = "compare with MRN778899 from 20230101"  # unlisted-in-table free text? listed: X
    ds.DerivationDescription = "derived for Doe"  # listed in Table E.1-1 as X
    req = Dataset()
    req.RequestedProcedureID = "RP-99812"
    inner = Dataset()
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    inner.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    deeper = Dataset()
    deeper.PersonName = "Doe^Johnathan"  # PN at depth 3
    inner.PersonIdentificationCodeSequence = Sequence([deeper])
    req.ReferencedStudySequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([req])
    ds.add_new(0x00091010, "LO", "PRIVATE CREATOR X")
    ds.add_new(0x00091001, "LO", "PrivateBlock")  # invalid element number in a private group
    ds.add_new(0x00091100, "LO", "Johnathan Doe private")
    return ds


def run(ds: Dataset, options: list[str] | None = None, **kw: object) -> tuple[Dataset, engine.Report]:
    policy = build_policy(options or [], **kw)  # type: ignore[arg-type]
    return engine.deidentify(ds, policy, KEYS)


def run_bytes(ds: Dataset, options: list[str] | None = None) -> tuple[Dataset, engine.Result]:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    res = engine.deidentify_bytes(buf.getvalue(), build_policy(options or []), KEYS)
    return dcmread(BytesIO(res.data)), res


def all_values(ds: Dataset) -> str:
    parts = [str(e.value) for e in ds.iterall() if e.VR not in ("OB", "OW", "SQ")]
    parts += [str(e.value) for e in ds.file_meta] if hasattr(ds, "file_meta") else []
    return "\n".join(parts).upper()


def test_basic_actions_on_ct() -> None:
    src = ct()
    out, report = run(src)
    # X: removed
    for kw in ("OtherPatientIDs", "StudyDescription", "InstitutionName", "DerivationDescription"):
        assert kw not in out, kw
    # Z: present, zero length
    assert out.AccessionNumber == "" and out.StudyDate == "" and out.PatientBirthDate == ""
    assert out.ReferringPhysicianName == ""
    # D via Z/D for a Type 1 somewhere attribute: a dummy date, valid for DA
    assert out.ContentDate == DUMMY_DATE
    # X/Z resolved to Z (Acquisition Date is Type 2 in some IODs)
    assert out.AcquisitionDate == ""
    # K: what the profile keeps
    assert out.Modality == src.Modality and out.Rows == src.Rows
    # U: UIDs under 2.25, different from the input, consistent and valid
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        new = str(out[kw].value)
        assert new.startswith("2.25.") and len(new) <= 64 and new != str(src[kw].value)
        assert new == KEYS.uid(str(src[kw].value))
    # well-known UIDs untouched
    assert out.SOPClassUID == src.SOPClassUID
    # P: keyed pseudonyms
    assert out.PatientID == KEYS.patient_id("MRN778899")
    assert str(out.PatientName) == KEYS.patient_name("MRN778899")
    assert report.patient_id == out.PatientID
    # private attributes all gone
    assert not [e for e in out if e.tag.is_private]
    text = all_values(out)
    for planted in (
        "DOE",
        "JOHNATHAN",
        "MRN778899",
        "ACC445566",
        "19610412",
        "20240301",
        "ELSEWHERE",
        "RP-99812",
    ):
        assert planted not in text, planted


def test_nested_sequences_are_processed_at_every_depth() -> None:
    out, _ = run(ct(), ["clean_descriptors"])  # keeps Request Attributes Sequence (C), cleaning inside
    req = out.RequestAttributesSequence[0]
    assert "RequestedProcedureID" not in req or req.RequestedProcedureID != "RP-99812"
    ref = req.ReferencedStudySequence[0] if "ReferencedStudySequence" in req else None
    if ref is not None:
        assert ref.ReferencedSOPInstanceUID == KEYS.uid("1.2.3.4.5.6.7.8.9")
        assert str(ref.PersonIdentificationCodeSequence[0].PersonName) != "Doe^Johnathan"
    assert "JOHNATHAN" not in all_values(out)


def _unlisted(vr: str) -> int:
    """A public tag of this VR that Table E.1-1 does not list (the safety net's territory)."""
    from pydicom.datadict import DicomDictionary

    from anondrop.deid import _ps315

    for tag, entry in sorted(DicomDictionary.items()):
        if (
            entry[0] == vr
            and entry[3] == ""
            and tag not in _ps315.ATTRIBUTES
            and tag >> 16 not in (2, 0x7FE0)
        ):
            return tag
    raise AssertionError(f"no unlisted {vr} tag")


def test_unlisted_free_text_is_scrubbed_of_series_identifiers() -> None:
    src = ct()
    src.AcquisitionProtocolName = "Johnathan Doe MRN778899 2024-03-01"  # LO, not in the table
    src.Manufacturer = "ACME"
    out, _ = run(src)
    text = str(out.AcquisitionProtocolName)
    assert "Johnathan" not in text and "MRN778899" not in text and "2024-03-01" not in text
    assert text.count("[REMOVED]") == 4
    assert out.Manufacturer == "ACME"  # free text without identifiers is kept as it was


def test_unlisted_person_names_uids_and_dates_are_handled_by_vr() -> None:
    src = ct()
    pn, ui, da = _unlisted("PN"), _unlisted("UI"), _unlisted("DA")
    src.add_new(pn, "PN", "Nurse^Ratched")
    src.add_new(ui, "UI", "1.2.826.0.1.3680043.2.1125.1.99")
    src.add_new(da, "DA", "20240302")
    out, _ = run(src)
    assert "RATCHED" not in str(out[pn].value).upper()
    assert str(out[ui].value) == KEYS.uid("1.2.826.0.1.3680043.2.1125.1.99")
    assert out[da].value == ""
    shifted, _ = run(src, ["retain_longitudinal_modified_dates"])
    assert shifted[da].value not in ("", "20240302")
    kept, _ = run(src, ["retain_longitudinal_full_dates", "retain_uids"])
    assert kept[da].value == "20240302" and str(kept[ui].value) == "1.2.826.0.1.3680043.2.1125.1.99"


def test_retain_uids_keeps_uids() -> None:
    src = ct()
    out, _ = run(src, ["retain_uids"])
    assert out.SOPInstanceUID == src.SOPInstanceUID and out.StudyInstanceUID == src.StudyInstanceUID


def test_modified_dates_shift_by_one_offset_per_patient() -> None:
    src = ct()
    out, _report = run(src, ["retain_longitudinal_modified_dates"])
    offset = KEYS.date_offset_days("MRN778899")
    assert offset != 0

    def d(text: str) -> dt.date:
        return dt.datetime.strptime(text, "%Y%m%d").date()

    assert d(out.StudyDate) - d("20240301") == dt.timedelta(days=offset)
    # intervals kept
    assert d(out.AcquisitionDate) - d(out.StudyDate) == dt.timedelta(days=4)
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    # another patient gets another offset
    other = ct()
    other.PatientID = "MRN000111"
    out2, _ = run(other, ["retain_longitudinal_modified_dates"])
    assert out2.StudyDate != out.StudyDate or KEYS.date_offset_days("MRN000111") == offset


def test_full_dates_are_kept_and_options_conflict() -> None:
    src = ct()
    out, _ = run(src, ["retain_longitudinal_full_dates"])
    assert out.StudyDate == "20240301" and out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert out.PatientBirthDate == ""  # no option keeps the birth date
    with pytest.raises(ValueError, match="contradict"):
        build_policy(["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"])


def test_institution_device_and_characteristics_options() -> None:
    src = ct()
    src.DeviceSerialNumber = "SN-4455"
    src.PatientSex = "F"
    src.PatientAge = "063Y"
    out, _ = run(src)
    assert "InstitutionName" not in out and out.DeviceSerialNumber != "SN-4455"
    assert "PatientAge" not in out and out.PatientSex == ""
    out, _ = run(
        src, ["retain_institution_identity", "retain_device_identity", "retain_patient_characteristics"]
    )
    assert out.InstitutionName == "Saint Elsewhere Hospital"
    assert out.DeviceSerialNumber == "SN-4455"
    assert out.PatientSex == "F" and out.PatientAge == "063Y"


def test_clean_descriptors_keeps_descriptions_without_identifiers() -> None:
    out, _ = run(ct(), ["clean_descriptors"])
    assert "StudyDescription" in out
    assert "CT chest for" in out.StudyDescription and "Doe" not in out.StudyDescription


def test_retain_safe_private_keeps_only_table_entries() -> None:
    src = ct()
    src.add_new(0x70530010, "LO", "Philips PET Private Group")
    src.add_new(0x70531000, "DS", "1.5")  # (7053,xx00) SUV factor: safe
    src.add_new(0x70531050, "LO", "Johnathan")  # not in Table E.3.10-1
    out, _ = run(src)
    assert not [e for e in out if e.tag.is_private]
    out, _ = run(src, ["retain_safe_private"])
    assert out[0x70531000].value == 1.5
    assert 0x70530010 in out
    assert 0x70531050 not in out and 0x00091100 not in out and 0x00091010 not in out


def test_site_rules_override_the_profile() -> None:
    src = ct()
    out, _ = run(src, rules={"StudyDescription": "K", "Modality": "X", "(0008,0050)": "D"})
    assert out.StudyDescription == "CT chest for Johnathan Doe"  # explicitly kept: the site's choice
    assert "Modality" not in out
    assert out.AccessionNumber == "ANONYMIZED"


def test_marks_name_profile_options_and_codes() -> None:
    out, _ = run(ct(), ["retain_uids", "clean_descriptors"])
    assert out.PatientIdentityRemoved == "YES"
    assert "PS3.15 2026d Basic Profile" in list(out.DeidentificationMethod)
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113110", "113105"]
    assert all(item.CodingSchemeDesignator == "DCM" for item in out.DeidentificationMethodCodeSequence)
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_overlays_and_curves_are_removed_whole() -> None:
    src = dcmread(sample("examples_overlay.dcm"))
    assert any(e.tag.group == 0x6000 for e in src)
    out, _ = run(src)
    assert not any(0x5000 <= e.tag.group <= 0x60FF for e in out)


def test_bytes_path_matches_dataset_path_and_copies_pixels_verbatim() -> None:
    src = ct()
    by_ds, _ = run(src)
    by_bytes, res = run_bytes(ct())
    for kw in ("PatientID", "PatientName", "SOPInstanceUID", "StudyDate", "ContentDate", "AccessionNumber"):
        assert str(by_ds[kw].value) == str(by_bytes[kw].value), kw
    assert by_bytes.PixelData == src.PixelData
    assert src.PixelData in res.data  # the very bytes, not a re-encoding
    assert res.pixel_bytes >= len(src.PixelData)
    assert by_bytes.file_meta.MediaStorageSOPInstanceUID == by_bytes.SOPInstanceUID
    assert by_bytes.file_meta.ImplementationClassUID == engine.IMPLEMENTATION_CLASS_UID
    assert res.hits == []


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "JPEG2000.dcm",
        "rtdose.dcm",
        "waveform_ecg.dcm",
    ],
)
def test_transfer_syntaxes_keep_pixels_and_parse_back(name: str) -> None:
    data = sample(name).read_bytes()
    res = engine.deidentify_bytes(data, build_policy([]), KEYS)
    out = dcmread(BytesIO(res.data))
    src = dcmread(BytesIO(data))
    if "PixelData" in src:
        assert out.PixelData == src.PixelData
    assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert out.PatientIdentityRemoved == "YES"
    assert str(out.SOPInstanceUID).startswith("2.25.")


def test_bad_input_raises_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(engine.Truncated):
        engine.deidentify_bytes(sample("MR_truncated.dcm").read_bytes(), build_policy([]), KEYS)
    data = sample("CT_small.dcm").read_bytes()
    with pytest.raises(engine.Truncated):
        engine.deidentify_bytes(data[: len(data) // 2], build_policy([]), KEYS)
    with pytest.raises(engine.NotDicom):
        engine.deidentify_bytes(b"%PDF-1.4 not dicom at all" * 20, build_policy([]), KEYS)
    ds = dcmread(sample("CT_small.dcm"))
    del ds.SOPInstanceUID
    buf = BytesIO()
    ds.save_as(buf)
    with pytest.raises(engine.MissingUID):
        engine.deidentify_bytes(buf.getvalue(), build_policy([]), KEYS)


def test_burned_in_verdicts() -> None:
    ds = ct()
    ds.BurnedInAnnotation = "YES"
    assert "YES" in (run(ds)[1].burned_in or "")
    us = ct()
    us.Modality = "US"
    assert run(us)[1].burned_in is not None
    assert run(us, burned_in_suspect="deliver")[1].burned_in is None
    us.BurnedInAnnotation = "NO"
    assert run(us)[1].burned_in is None
    assert run(ct())[1].burned_in is None


def test_pseudonyms_are_keyed_and_stable() -> None:
    a = Keys(secret=b"a" * 32)
    b = Keys(secret=b"b" * 32)
    assert a.patient_id("X1") == Keys(secret=b"a" * 32).patient_id("X1")
    assert a.patient_id("X1") != b.patient_id("X1")
    assert a.patient_id("X1") != a.patient_id("X1", issuer="OTHER-HOSPITAL")
    assert a.uid("1.2.3") != a.uid("1.2.4") and a.uid("1.2.3") == a.uid("1.2.3\0")
    lo, hi = a.date_shift_days
    assert all(lo <= a.date_offset_days(f"P{i}") <= hi for i in range(200))


def test_input_dataset_is_not_modified() -> None:
    src = ct()
    before = src.PatientName
    run(src)
    assert src.PatientName == before and "StudyDescription" in src


def test_output_of_minimal_file_without_meta_gets_meta() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.PatientName = "Roe^Richard"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out, _ = run(ds)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "ROE" not in all_values(out)


def test_dashed_dates_shift_to_valid_dates_and_pydicom_never_quotes_values(capfd: pytest.CaptureFixture[str]) -> None:
    from pydicom import config as pconfig

    from anondrop.logs import quiet_pydicom

    saved = (pconfig.settings.reading_validation_mode, pconfig.settings.writing_validation_mode)
    try:
        quiet_pydicom()
        src = ct()
        src.AcquisitionDate = "1961-03-15"
        src.StudyDate = "19610315"
        _, res = run_bytes(src, ["retain_longitudinal_modified_dates"])
        out = dcmread(BytesIO(res.data))
        assert out.AcquisitionDate == out.StudyDate and len(out.AcquisitionDate) == 8
        assert "1961" not in capfd.readouterr().err
    finally:
        pconfig.settings.reading_validation_mode, pconfig.settings.writing_validation_mode = saved
