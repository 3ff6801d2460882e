"""The raw walker gives exactly what the pydicom walker gives, or leaves the file to it.

`deidentify_bytes` first tries the raw walker (rawwalk), which reads element headers itself and copies
unchanged bytes; whatever it cannot promise to write exactly as pydicom would, it declines. Every field of
the result (output bytes, the header the gate searched, gate hits, report, identifiers, crosswalk source) is
compared with the pydicom walker's on every sample file under several policies, and on generated datasets
with identifiers planted at random depths, in both VR encodings and three character sets.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from anondrop.deid import engine, rawwalk
from anondrop.deid.policy import Policy, build_policy
from anondrop.deid.pseudonyms import Keys
from tests.conftest import sample, sample_files
from tests.test_leak_properties import PHASES, _build, scenarios

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the odd sample files
KEYS = Keys(secret=b"r" * 32)
REPORTED = ("StudyDate", "SeriesDescription", "PatientID", "SeriesNumber", "AccessionNumber")
POLICIES = {
    "basic": build_policy(report_keywords=REPORTED),
    "safe private": build_policy(options=["retain_safe_private"], report_keywords=REPORTED),
    "clean, shifted dates": build_policy(
        options=["clean_descriptors", "clean_structured_content", "retain_safe_private",
                 "retain_longitudinal_modified_dates"],
        report_keywords=REPORTED,
    ),
    "retain most": build_policy(
        options=["retain_uids", "retain_longitudinal_full_dates", "retain_device_identity",
                 "retain_institution_identity", "retain_patient_characteristics", "clean_graphics",
                 "retain_safe_private"],
        report_keywords=REPORTED,
    ),
    "site rules": build_policy(
        rules={"SeriesDescription": "K", "StudyDescription": "C", "PatientName": "D", "StationName": "Z"},
        report_keywords=REPORTED,
    ),
}


def _fields(res: engine.Result) -> dict[str, Any]:
    return {
        "data": bytes(res.data),
        "header": bytes(res.header),
        "hits": res.hits,
        "report": res.report,
        "pixel_bytes": res.pixel_bytes,
        "identifiers": res.identifiers,
        "identifier kinds": res.identifiers.word_kinds,
        "source": res.source,
    }


def _both(data: bytes, policy: Policy, **kw: Any) -> tuple[object, object]:
    """(pydicom walker's result or exception, raw walker's result or exception, or None if it declined)."""
    ids, overrides = kw.get("identifiers"), kw.get("overrides")
    try:
        ref: object = _fields(engine._deidentify_pydicom(data, policy, KEYS, ids, overrides))
    except Exception as exc:
        ref = type(exc)
    try:
        got: object = _fields(engine._deidentify_raw(data, policy, KEYS, ids, overrides))
    except rawwalk.Decline:
        got = None
    except Exception as exc:
        got = type(exc)
    return ref, got


def _differences(ref: object, got: object) -> list[str]:
    if isinstance(ref, dict) and isinstance(got, dict):
        return [k for k in ref if ref[k] != got[k]]
    return [] if ref == got else [f"{ref} != {got}"]


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_every_sample_file_comes_out_as_the_pydicom_walker_writes_it(policy_name: str) -> None:
    policy = POLICIES[policy_name]
    handled, wrong = 0, []
    for path in sample_files():
        ref, got = _both(path.read_bytes(), policy)
        if got is None:
            continue
        handled += 1
        diff = _differences(ref, got)
        if diff:
            wrong.append(f"{path.name}: {diff}")
    assert wrong == []
    # The raw walker must carry the ordinary files, not decline its way through the test: of the 166 sample
    # files about 110 are Part 10 little endian files with their UIDs (the rest are big endian, deflated,
    # headerless, truncated or otherwise odd on purpose, and go to pydicom).
    assert handled >= 100, handled


def test_the_bench_and_acceptance_kinds_of_file_take_the_raw_walker() -> None:
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm"):
        data = sample(name).read_bytes()
        rawwalk.parse(data)  # does not decline
        ref, got = _both(data, POLICIES["basic"])
        assert got is not None and _differences(ref, got) == [], name


def test_what_the_raw_walker_declines_still_comes_out_de_identified() -> None:
    """Big endian and deflated files go to pydicom, with the same de-identification."""
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm"):
        data = sample(name).read_bytes()
        with pytest.raises(rawwalk.Decline):
            rawwalk.parse(data)
        res = engine.deidentify_bytes(data, POLICIES["basic"], KEYS)
        out = dcmread(io.BytesIO(res.data))
        assert out.PatientIdentityRemoved == "YES"
        assert out.SOPInstanceUID.startswith("2.25.")


def test_series_identifiers_and_overrides_are_applied_alike() -> None:
    data = sample("CT_small.dcm").read_bytes()
    other = sample("MR_small.dcm").read_bytes()
    series_ids = engine.deidentify_bytes(other, POLICIES["basic"], KEYS).identifiers
    overrides = {0x00100010: ("PN", "STUDY^SUBJECT 7"), 0x00081030: ("LO", "Trial arm B"),
                 0x00200010: ("SH", "S7")}
    for kw in ({"identifiers": series_ids}, {"overrides": overrides}, {"identifiers": series_ids,
                                                                       "overrides": overrides}):
        ref, got = _both(data, POLICIES["clean, shifted dates"], **kw)
        assert got is not None and _differences(ref, got) == [], kw


def test_an_odd_character_set_goes_to_pydicom() -> None:
    ds = dcmread(sample("CT_small.dcm"))
    ds.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(rawwalk.Decline):
        rawwalk.parse(buf.getvalue())


CHARSETS = ("ISO_IR 192", "ISO_IR 100", None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=PHASES)
@given(scenarios(), st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]), st.sampled_from(CHARSETS))
def test_planted_identifiers_come_out_as_the_pydicom_walker_writes_them(
    scenario: tuple[Any, Any, tuple[str, ...]], ts: str, charset: str | None
) -> None:
    who, where, options = scenario
    ds = _build(who, where)
    if charset is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = charset
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except (UnicodeError, ValueError):
        return  # a planted value this character set cannot hold: not a file anyone could send
    policy = build_policy(options=options, report_keywords=REPORTED)
    ref, got = _both(buf.getvalue(), policy)
    if got is not None:
        assert _differences(ref, got) == []


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm"])
def test_a_policy_used_then_sent_to_a_worker_still_works(name: str) -> None:
    """The engine caches encoded marks on the policy; a policy pickled after use (as a worker pool gets it)
    must carry a cache that still fits, for the raw walker and for pydicom."""
    import pickle

    policy = build_policy(report_keywords=REPORTED)
    data = sample(name).read_bytes()
    before = engine.deidentify_bytes(data, policy, KEYS).data
    copied = pickle.loads(pickle.dumps(policy))
    assert engine.deidentify_bytes(data, copied, KEYS).data == before
