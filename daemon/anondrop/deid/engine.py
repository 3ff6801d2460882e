"""Walk a dataset at every depth and apply the policy: (dataset, policy, keys) -> (dataset, report).

Pure: no files, no clock, no database. Two entry points share one walker:

* ``deidentify(ds, policy, keys)`` for a pydicom Dataset (tests, ad-hoc use, unusual transfer syntaxes);
* ``deidentify_bytes(data, policy, keys, identifiers)`` for a whole Part 10 file, the production path.
  pydicom parses the file lazily (values over ``DEFER_SIZE`` are not even read); every top-level element the
  policy leaves unchanged, pixel data above all, is copied to the output as the very byte span it had in the
  input, and only what changes is encoded again. The output header is then searched by the release gate.

What happens to elements Table E.1-1 does not list (the safety net by value representation):
  PN          replaced by a dummy name, unless a rule keeps it explicitly;
  UI          replaced by the keyed 2.25 UID unless well known (1.2.840.10008.*, pydicom's UID dictionary)
              or retain_uids is selected;
  DA, DT      removed to zero length (basic), shifted by the patient's offset (modified dates), kept (full dates);
  LO SH LT ST UT UC
              kept, with every identifier of the series found in them replaced by "[REMOVED]"; inside a
              sequence the profile replaces by a dummy (D, e.g. Content Sequence) they are dummied instead;
  other VRs   kept (codes, numbers, measurements).
Private elements are removed unless retain_safe_private keeps those of Table E.3.10-1. Overlay (60xx) and
curve (50xx) groups are removed whole: their bitmaps can carry burned-in text that no rule can check.
"""

from __future__ import annotations

import copy
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from io import BytesIO

from pydicom import Dataset, dcmread, dcmwrite
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID as UIDType
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import PersonName

from anondrop import __version__
from anondrop.deid import _ps315, rawwalk
from anondrop.deid.actions import (
    ASCII_ONLY_VRS,
    CODE_TAGS,
    DUMMY_TEXT,
    FREE_TEXT_DATES,
    LONG_HEADER_VRS,
    MAX_LENGTH,
    META_REMOVE,
    META_STANDARD,
    PIXEL_TAGS,
    TEXT_VRS,
    dummy,
    empty,
    raw_item,
    scrub_free_text_dates,
    shift_da,
    shift_dt,
    vr_of,
)
from anondrop.deid.gate import GateHit, Identifiers, _fast_charset, collect_identifiers, scan_bytes
from anondrop.deid.policy import (
    ACTION_NAMES,
    BURNED_IN_SUSPECT_MODALITIES,
    BURNED_IN_SUSPECT_SOP_PREFIXES,
    CLEAN,
    DUMMY,
    EMPTY,
    KEEP,
    PSEUDONYM,
    REMOVE,
    SCRUB,
    UID,
    Policy,
    is_safe_private,
    method_codes,
)
from anondrop.deid.pseudonyms import Keys
from anondrop.deid.report import Report as Report  # re-exported: the engine's result type

DEFER_SIZE = 2048
# PS3.5 B.2 UUID-derived UID naming this implementation (fixed, not per site).
IMPLEMENTATION_CLASS_UID = "2.25.186104856725366407405263573478591476530"
IMPLEMENTATION_VERSION = f"ANONDROP_{__version__}".replace(".", "")[:16]


def _kw_tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return BaseTag(tag)


_TAGS = {kw: _kw_tag(kw) for kw in (
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "SOPClassUID", "BurnedInAnnotation", "Modality", "InstanceNumber", "SeriesNumber",
    "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "AccessionNumber",
)}


_TAG_INTS = {kw: int(tag) for kw, tag in _TAGS.items()}


def plain(ds: Dataset, keyword: str) -> str:
    """A text value by keyword, read from its raw bytes when undecoded (pydicom's conversion is slow).

    For identity keys, UIDs and codes (ASCII in practice); a decoded element gives str() of its value.
    """
    return plain_tag(ds, _TAGS[keyword])


def plain_tag(ds: Dataset, tag: BaseTag) -> str:
    elem = ds._dict.get(tag)
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement):
        if elem.value is None:
            value = ds[tag].value
            return "" if value is None else str(value).strip(" \0")
        return elem.value.decode("latin-1").strip(" \0")
    return plain_value(elem.value)


def plain_value(value: object) -> str:
    """plain_tag of a decoded value: several values joined by backslashes, one value stripped."""
    if isinstance(value, (MultiValue, list)):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value).strip(" \0")


def _unsigned(ds: Dataset, keyword: str, default: int) -> int:
    """A US value (little endian, as every file the byte path handles), or default."""
    elem = ds._dict.get(_TAGS[keyword])
    if elem is None:
        return default
    if isinstance(elem, RawDataElement) and elem.value is not None and len(elem.value) >= 2:
        return int.from_bytes(elem.value[:2], "big" if not elem.is_little_endian else "little")
    try:
        return int(ds[_TAGS[keyword]].value)
    except (TypeError, ValueError):
        return default


class DeidError(Exception):
    """An input that cannot be de-identified; `code` is the quarantine reason code."""

    code = "unreadable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotDicom(DeidError):
    code = "not-dicom"


class Truncated(DeidError):
    code = "truncated"


class MissingUID(DeidError):
    code = "missing-uid"


@dataclass
class Result:
    parts: list[bytes | memoryview]  # the output file, in order (views of the input where it is unchanged)
    report: Report
    hits: list[GateHit]
    pixel_bytes: int = 0
    header: bytes = b""  # the output without its pixel data: what the gate searched
    # Where the pixel data sits: (start, end) in the input bytes and in the output bytes, when it was copied
    # as one untouched span (lets a caller copy it from the source file instead of moving it around).
    pixel_in: tuple[int, int] | None = None
    pixel_out: tuple[int, int] | None = None
    identifiers: Identifiers = field(default_factory=Identifiers)  # those the gate searched for
    # (PatientID, IssuerOfPatientID, AccessionNumber) of the input, for the re-identification crosswalk only:
    # never logged, never written anywhere but the encrypted crosswalk.
    source: tuple[str, str, str] = ("", "", "")

    @cached_property
    def data(self) -> bytes:
        """The output file as one bytes object."""
        return b"".join(self.parts)


def patient_identity(ds: Dataset) -> tuple[str, str]:
    """(patient key, issuer) behind every pseudonym and the date offset of this instance's patient.

    Without a PatientID the name and birth date stand in; without those the study does, so that unknown
    patients are never merged into one pseudonym.
    """
    return _patient_identity(lambda kw: plain(ds, kw))


def _patient_identity(get: Callable[[str], str]) -> tuple[str, str]:
    pid = get("PatientID")
    issuer = get("IssuerOfPatientID")
    if pid:
        return pid, issuer
    name = get("PatientName")
    birth = get("PatientBirthDate")
    if name:
        return f"name:{name}:{birth}", issuer
    return f"study:{get('StudyInstanceUID')}", issuer


class _Walker:
    def __init__(
        self,
        policy: Policy,
        keys: Keys,
        ids: Identifiers,
        patient: tuple[str, str],
        fill: Callable[..., None],
    ) -> None:
        self.policy = policy
        self.keys = keys
        self.ids = ids
        self.patient = patient
        self.offset = keys.date_offset_days(*patient)
        self.counts: Counter[str] = Counter()
        self.fill = fill  # reads deferred values from the input bytes before they are converted

    # -- one dataset ---------------------------------------------------------------------------------
    def dataset(self, ds: Dataset, mode: str, top: bool) -> None:
        private: list[int] = []
        action = self.policy.action
        for tag, raw in list(ds._dict.items()):  # the stored elements, undecoded; no Tag() round trips
            t = int(tag)
            group = t >> 16
            if group & 1:
                private.append(t)
                continue
            if t & 0xFFFF == 0 or (group & 0xFF00) in (0x5000, 0x6000):
                # Group lengths are stale after any edit (and retired); overlays/curves go whole.
                self._remove(ds, t)
                continue
            if group == 0x0002:
                continue  # file meta in the body (malformed input); meta is rebuilt separately
            if top and t in PIXEL_TAGS:
                continue  # never decoded, never changed
            self.element(ds, t, action(t), mode, top, raw)
        if private:
            self._private(ds, private, mode)

    def _remove(self, ds: Dataset, t: int) -> None:
        del ds._dict[BaseTag(t)]
        self.counts["removed"] += 1

    def _get(self, ds: Dataset, t: int) -> DataElement:
        self.fill(ds, t)
        return ds[t]

    def element(
        self, ds: Dataset, t: int, act: str | None, mode: str, top: bool,
        raw: DataElement | RawDataElement | None = None,
    ) -> None:
        if raw is None:
            raw = raw_item(ds, t)
            if raw is None:
                return
        vr = vr_of(raw, t)
        if act is None:
            act = self.policy.net_action(vr, mode, t)
        elif act == KEEP and mode == DUMMY and vr in TEXT_VRS | {"PN"} and t not in CODE_TAGS:
            act = DUMMY
        if act == REMOVE:
            self._remove(ds, t)
            return
        if vr == "SQ":
            self._sequence(ds, t, act, mode)
            return
        self.counts[ACTION_NAMES.get(act, act)] += 1
        if act == KEEP:
            return
        if act == SCRUB:
            self._scrub(ds, t, raw)
            return
        # Replacement values are written as new elements: the old value is decoded only where it is needed
        # (UIDs, dates), and then straight from its ASCII bytes when it is still raw.
        if act == EMPTY:
            self._put(ds, t, vr, empty(vr))
        elif act == DUMMY:
            self._put(ds, t, vr, dummy(vr))
        elif act == UID:
            self._put(ds, t, vr, self.keys.uids(self._text(ds, t, raw)))
        elif act == PSEUDONYM:
            self._pseudonym(ds, t, vr, raw, top)
        elif act == CLEAN:
            self._clean(ds, t, vr, raw)
        else:
            raise ValueError(f"unknown action {act!r} for tag {t:08X}")

    def _put(self, ds: Dataset, t: int, vr: str, value: object) -> None:
        ds._dict[BaseTag(t)] = DataElement(t, vr, value)

    def _text(self, ds: Dataset, t: int, raw: DataElement | RawDataElement) -> str:
        """The value as text; ASCII-only VRs are decoded from their raw bytes without pydicom."""
        if isinstance(raw, RawDataElement) and raw.value is not None and vr_of(raw, t) in ASCII_ONLY_VRS:
            return raw.value.decode("ascii", "replace").strip(" \0")
        value = self._get(ds, t).value
        return "" if value is None else _text(value)

    def _sequence(self, ds: Dataset, t: int, act: str, mode: str) -> None:
        self.counts[ACTION_NAMES.get(act, act)] += 1
        elem = self._get(ds, t)
        if act == EMPTY:
            elem.value = Sequence()
            return
        inner = {DUMMY: DUMMY, CLEAN: SCRUB}.get(act, mode)
        for item in elem.value or []:
            self.dataset(item, inner, top=False)

    def _scrub(self, ds: Dataset, t: int, raw: DataElement | RawDataElement) -> None:
        # Fast check on the raw bytes first: most text holds no identifier and is never decoded.
        scrub_dates = self.policy.date_mode != "keep"
        if isinstance(raw, RawDataElement):
            if raw.value is None and raw.length == 0:
                return
            if (
                raw.value is not None
                and not self.ids.contains(raw.value)
                and not (scrub_dates and FREE_TEXT_DATES.search(raw.value))
            ):
                return
        elem = self._get(ds, t)
        if elem.value is None:
            return

        limit = MAX_LENGTH.get(elem.VR)

        def clean(text: str) -> str:
            text = self.ids.scrub(text)
            text = scrub_free_text_dates(text) if scrub_dates else text
            # "[REMOVED]" is longer than many a name: a value that no longer fits its VR becomes the dummy.
            return DUMMY_TEXT if limit is not None and len(text) > limit else text

        if elem.VM > 1:
            elem.value = [clean(str(v)) for v in elem.value]
        else:
            elem.value = clean(str(elem.value))

    def _pseudonym(self, ds: Dataset, t: int, vr: str, raw: DataElement | RawDataElement, top: bool) -> None:
        if top:
            pid, issuer = self.patient
        else:  # a patient named inside a sequence is pseudonymised on its own value
            pid, issuer = self._text(ds, t, raw), ""
        if t == 0x00100020:
            self._put(ds, t, vr, self.keys.patient_id(pid, issuer))
        else:
            self._put(ds, t, vr, self.keys.patient_name(pid, issuer) if top else dummy("PN"))

    def _clean(self, ds: Dataset, t: int, vr: str, raw: DataElement | RawDataElement) -> None:
        if vr in ("DA", "DT", "UI"):
            text = self._text(ds, t, raw)
            if not text:
                return
            if vr == "DA":
                self._put(ds, t, vr, shift_da(text, self.offset))
            elif vr == "DT":
                self._put(ds, t, vr, shift_dt(text, self.offset))
            else:
                self._put(ds, t, vr, self.keys.uids(text))
        elif vr == "PN":
            self._put(ds, t, vr, dummy("PN"))
        elif vr in TEXT_VRS:
            self._scrub(ds, t, raw)
        # TM (a time of day moves with no date shift), codes and numbers: nothing identifying to clean.

    def _private(self, ds: Dataset, tags: list[int], mode: str) -> None:
        if not self.policy.private_keep_safe:
            for t in tags:
                self._remove(ds, t)
            return
        creators: dict[tuple[int, int], str] = {}
        for t in tags:
            if 0x10 <= t & 0xFFFF <= 0xFF:
                creators[(t >> 16, t & 0xFF)] = str(self._get(ds, t).value or "")
        used: set[tuple[int, int]] = set()
        for t in tags:
            group, elem_no = t >> 16, t & 0xFFFF
            if elem_no <= 0xFF:
                continue
            block = (group, elem_no >> 8)
            creator = creators.get(block)
            if creator is None or not is_safe_private(creator, group, elem_no):
                self._remove(ds, t)
                continue
            used.add(block)
            vr = _ps315.SAFE_PRIVATE[(creator.strip(), group, elem_no & 0xFF)][0] or "UN"
            if vr in ("PN", "UI", "DA", "DT", "SQ") or vr in TEXT_VRS:
                self.element(ds, t, None, mode, top=False)
            else:
                self.counts["kept"] += 1
        for t in tags:
            if t & 0xFFFF <= 0xFF and ((t >> 16, t & 0xFF) not in used or t & 0xFFFF < 0x10):
                self._remove(ds, t)


def _text(value: object) -> str:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[attr-defined]
    return str(value)


def _no_fill(ds: Dataset, t: int) -> None:
    return None


_GROUPING_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")


def _check_uids(ds: Dataset) -> None:
    for kw in _GROUPING_UIDS:
        if not plain(ds, kw):
            raise MissingUID(f"the file has no {kw}; it cannot be placed in a series")


def burned_in_verdict(ds: Dataset, policy: Policy) -> str | None:
    """Why this instance may show the patient's identity in its pixels, or None."""
    return _burned_in(lambda kw: plain(ds, kw), policy)


def _burned_in(get: Callable[[str], str], policy: Policy) -> str | None:
    burned = get("BurnedInAnnotation").upper()
    if burned == "YES":
        return "BurnedInAnnotation is YES: the pixels show identifying text"
    if policy.burned_in_suspect != "quarantine":
        return None
    if burned == "NO":
        return None  # the producer states there is none
    modality = get("Modality").upper()
    sop_class = get("SOPClassUID")
    if modality in BURNED_IN_SUSPECT_MODALITIES:
        return f"modality {modality} often carries burned-in text and BurnedInAnnotation does not say NO"
    if sop_class.startswith(BURNED_IN_SUSPECT_SOP_PREFIXES):
        return (
            "this kind of object (secondary capture, ultrasound, photo or document) often carries "
            "burned-in text and BurnedInAnnotation does not say NO"
        )
    return None


def _marks(policy: Policy) -> dict[int, DataElement]:
    """PS3.15 E.1.1 marks for this policy, built once: they are the same for every instance."""
    cached: dict[int, DataElement] | None = getattr(policy, "_marks", None)
    if cached is not None:
        return cached
    ds = Dataset()
    ds.PatientIdentityRemoved = "YES"
    opts = [o for o in _ps315.OPTIONS if o in policy.options]
    ds.DeidentificationMethod = [
        f"anondrop {__version__}",
        f"PS3.15 {policy.edition} Basic Profile",
        *[o[:64] for o in opts],
    ]
    items = []
    for value, scheme, meaning in method_codes(policy):
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = scheme
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.LongitudinalTemporalInformationModified = {
        "keep": "UNMODIFIED",
        "shift": "MODIFIED",
        "remove": "REMOVED",
    }[policy.date_mode]
    marks = {int(tag): ds[tag] for tag in ds.keys()}
    object.__setattr__(policy, "_marks", marks)
    return marks


def _mark(ds: Dataset, policy: Policy, shared: bool) -> None:
    """Record that and how the instance was de-identified (shared: reuse the policy's element objects)."""
    for tag, elem in _marks(policy).items():
        ds._dict[BaseTag(tag)] = elem if shared else copy.deepcopy(elem)


def _report(ds: Dataset, counts: Counter[str], burned: str | None, policy: Policy) -> Report:
    return _make_report(lambda tag: plain_tag(ds, BaseTag(tag)), counts, burned, policy)


def _make_report(get: Callable[[int], str], counts: Counter[str], burned: str | None, policy: Policy) -> Report:
    """The report from the output's values; get(tag) gives one as `plain_tag` does."""
    number = get(_TAG_INTS["InstanceNumber"])
    try:
        inst = int(number) if number else None
    except ValueError:
        inst = None
    return Report(
        sop_class_uid=get(_TAG_INTS["SOPClassUID"]),
        sop_instance_uid=get(_TAG_INTS["SOPInstanceUID"]),
        study_uid=get(_TAG_INTS["StudyInstanceUID"]),
        series_uid=get(_TAG_INTS["SeriesInstanceUID"]),
        patient_id=get(_TAG_INTS["PatientID"]),
        modality=get(_TAG_INTS["Modality"]),
        series_number=get(_TAG_INTS["SeriesNumber"]),
        instance_number=inst,
        burned_in=burned,
        counts=counts,
        values={kw: get(tag) for kw, tag in policy.report_tags},
    )


def _new_meta(old: FileMetaDataset | None, ds: Dataset, ts: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    if old is not None:
        for elem in old:
            if int(elem.tag) not in META_REMOVE and int(elem.tag) != 0x00020000:
                meta.add(copy.deepcopy(elem))  # never share an element object with the input's meta
    meta.MediaStorageSOPClassUID = UIDType(ds.SOPClassUID)
    meta.MediaStorageSOPInstanceUID = UIDType(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = UIDType(ts)
    meta.ImplementationClassUID = UIDType(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    meta.FileMetaInformationVersion = b"\x00\x01"
    return meta


Overrides = Mapping[int, tuple[str, str]]  # tag -> (VR, value): a drop's own values (anondrop.toml)


def _apply(
    ds: Dataset, policy: Policy, keys: Keys, ids: Identifiers, fill: Callable[..., None], shared: bool = False,
    overrides: Overrides | None = None,
) -> Report:
    _check_uids(ds)
    burned = burned_in_verdict(ds, policy)
    walker = _Walker(policy, keys, ids, patient_identity(ds), fill)
    walker.dataset(ds, mode=SCRUB, top=True)
    for tag, (vr, value) in (overrides or {}).items():
        # Set after the profile: the value the drop asked for goes out as given (the gate still checks it).
        ds._dict[BaseTag(tag)] = DataElement(tag, vr, value)
        walker.counts["overridden"] += 1
    _mark(ds, policy, shared)
    return _report(ds, walker.counts, burned, policy)


def deidentify(
    ds: Dataset, policy: Policy, keys: Keys, identifiers: Identifiers | None = None,
    overrides: Overrides | None = None,
) -> tuple[Dataset, Report]:
    """De-identify a copy of ds (file meta included); the input is left untouched."""
    out = copy.deepcopy(ds)
    ids = identifiers if identifiers is not None else collect_identifiers(ds, policy)
    report = _apply(out, policy, keys, ids, _no_fill, shared=False, overrides=overrides)
    old_meta = getattr(ds, "file_meta", None)
    ts = str(getattr(old_meta, "TransferSyntaxUID", "") or ExplicitVRLittleEndian)
    out.file_meta = _new_meta(old_meta, out, ts)
    return out, report


# -- the production path: bytes in, bytes out ------------------------------------------------------------


def read_header(data: bytes) -> Dataset:
    """Parse a Part 10 file (or a bare dataset) lazily; raise NotDicom / Truncated with a reason."""
    try:
        return dcmread(BytesIO(data), defer_size=DEFER_SIZE)
    except InvalidDicomError:
        pass
    except (EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise Truncated(f"the file ends or breaks inside its header ({type(exc).__name__}: {exc})") from None
    # No preamble: accept a bare dataset only if it parses into something with DICOM UIDs.
    try:
        ds = dcmread(BytesIO(data), defer_size=DEFER_SIZE, force=True)
        if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
            raise NotDicom("not a DICOM file (no preamble and no DICOM attributes)")
        return ds
    except DeidError:
        raise
    except Exception:
        raise NotDicom("not a DICOM file (no 'DICM' preamble and it does not parse as DICOM)") from None


def deidentify_bytes(
    data: bytes, policy: Policy, keys: Keys, identifiers: Identifiers | None = None,
    overrides: Overrides | None = None,
) -> Result:
    """De-identify one Part 10 file given as bytes; gate the output; return the output bytes.

    `identifiers` are the series' identifiers (the union over its files); without them the file's own are
    used. A non-empty `Result.hits` means the output must not leave: the caller quarantines the series.

    The raw walker (rawwalk) handles what real archives hold; whatever it declines goes through pydicom.
    """
    try:
        return _deidentify_raw(data, policy, keys, identifiers, overrides)
    except rawwalk.Decline:
        pass
    return _deidentify_pydicom(data, policy, keys, identifiers, overrides)


def _deidentify_raw(
    data: bytes, policy: Policy, keys: Keys, identifiers: Identifiers | None, overrides: Overrides | None,
) -> Result:
    """deidentify_bytes by the raw walker; raises rawwalk.Decline for anything it does not cover."""
    parsed = rawwalk.parse(data)

    def get(keyword: str) -> str:
        return parsed.plain(_TAG_INTS[keyword])

    if any(not get(kw) for kw in _GROUPING_UIDS):
        raise rawwalk.Decline("a grouping UID is missing")  # the pydicom walker names which
    _check_native_pixels_raw(parsed, get)
    ids = identifiers if identifiers is not None else rawwalk.collect(parsed, policy)
    source = (get("PatientID"), get("IssuerOfPatientID"), get("AccessionNumber"))
    burned = _burned_in(get, policy)
    view = memoryview(data)
    out, changed, counts = rawwalk.walk(parsed, view, policy, keys, ids, _patient_identity(get), overrides)
    marks = _marks(policy)
    mark_bytes = _mark_bytes(policy, parsed.implicit, None)
    for tag, elem in marks.items():
        out[tag] = mark_bytes[tag]
        changed[tag] = elem.value

    def get_out(tag: int) -> str:
        if tag in changed:
            return plain_value(changed[tag])
        if tag not in out:
            return ""
        return parsed.plain(tag)

    sop_class, sop_instance = get_out(_TAG_INTS["SOPClassUID"]), get_out(_TAG_INTS["SOPInstanceUID"])
    if not (sop_class.isascii() and sop_instance.isascii()):
        raise rawwalk.Decline("a non-ASCII SOP UID")
    report = _make_report(get_out, counts, burned, policy)
    head = b"\0" * 128 + b"DICM" + _encode_meta(sop_class, sop_instance, parsed.ts)
    parts: list[bytes | memoryview] = [head]
    gate_parts: list[bytes | memoryview] = [head]
    pixel_bytes = 0
    pos = len(head)
    pixel_in: tuple[int, int] | None = None
    pixel_out: tuple[int, int] | None = None
    for tag in sorted(out):
        chunk = out[tag]
        parts.append(chunk)
        if tag in PIXEL_TAGS:
            pixel_bytes += len(chunk)
            if tag == 0x7FE00010:
                el = parsed.top[tag]
                pixel_in, pixel_out = (el.start, el.end), (pos, pos + len(chunk))
        else:
            gate_parts.append(chunk)
        pos += len(chunk)
    header = b"".join(gate_parts)
    hits = scan_bytes(header, ids, "")
    return Result(
        parts, report, hits, pixel_bytes=pixel_bytes, header=header, identifiers=ids,
        pixel_in=pixel_in, pixel_out=pixel_out, source=source,
    )


def _image_bytes(unsigned: Callable[[str, int], int], frames: int) -> int:
    """Bytes of native pixel data the image needs: rows x columns x samples x frames x bits allocated."""
    return (
        unsigned("Rows", 0) * unsigned("Columns", 0) * unsigned("SamplesPerPixel", 1) * frames
        * unsigned("BitsAllocated", 0) // 8
    )


def _check_native_pixels_raw(parsed: rawwalk.Parsed, get: Callable[[str], str]) -> None:
    """_check_native_pixels for the raw walker: pixel data too short for the image is declined, so that the
    pydicom walker reports the truncation."""
    el = parsed.top.get(0x7FE00010)
    if el is None or el.undefined:
        return
    try:
        frames = int(get("NumberOfFrames") or 1)
    except ValueError:
        raise rawwalk.Decline("NumberOfFrames is not a number") from None

    def unsigned(keyword: str, default: int) -> int:
        elem = parsed.top.get(_TAG_INTS[keyword])
        if elem is None or elem.items is not None or elem.vend - elem.vstart < 2:
            return default
        return int.from_bytes(parsed.value(elem)[:2], "little")

    need = _image_bytes(unsigned, frames)
    if el.vend - el.vstart < need:
        raise rawwalk.Decline("pixel data shorter than the image")


def _deidentify_pydicom(
    data: bytes, policy: Policy, keys: Keys, identifiers: Identifiers | None, overrides: Overrides | None,
) -> Result:
    """deidentify_bytes by pydicom: any encoding, and the reference the raw walker is tested against."""
    ds = read_header(data)
    meta = getattr(ds, "file_meta", None)
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
    implicit, little = ds.original_encoding if ds.original_encoding[0] is not None else (True, True)
    if not ts:
        ts = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    if ts == DeflatedExplicitVRLittleEndian:
        # Offsets in a deflated file refer to the inflated stream: read every value now instead.
        ds = dcmread(BytesIO(data))
        meta = ds.file_meta
    else:
        _check_truncation(ds, data)

    def fill(target: Dataset, t: int) -> None:
        raw = raw_item(target, t)
        if isinstance(raw, RawDataElement) and raw.value is None:
            start = raw.value_tell
            end = _undefined_end(data, start) - 8 if raw.length == 0xFFFFFFFF else start + raw.length
            target._dict[raw.tag] = raw._replace(value=data[start:end])

    ids = identifiers if identifiers is not None else collect_identifiers_raw(ds, policy, fill)
    original = {int(t): e for t, e in ds._dict.items()}
    source = (plain(ds, "PatientID"), plain(ds, "IssuerOfPatientID"), plain(ds, "AccessionNumber"))
    report = _apply(ds, policy, keys, ids, fill, shared=True, overrides=overrides)

    if ts in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian) or not little:
        # Rare encodings: let pydicom write the whole file (values are filled in first).
        for key in list(ds.keys()):
            fill(ds, int(key))
        ds.file_meta = _new_meta(meta, ds, ts)
        buf = BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        out = buf.getvalue()
        hits = scan_bytes(out, ids, "")
        return Result([out], report, hits, pixel_bytes=0, header=out, identifiers=ids, source=source)

    head = _meta_bytes(meta, ds, ts)
    if head is None:  # unusual meta elements to carry over: let pydicom encode the meta
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, _new_meta(meta, ds, ts), enforce_standard=True)
        head = fp.getvalue()
    parts: list[bytes | memoryview] = [b"\0" * 128 + b"DICM" + head]
    gate_parts: list[bytes | memoryview] = [parts[0]]
    view = memoryview(data)
    encodings = ds._character_set
    fast_text = _fast_charset(ds, True)
    mark_bytes = _mark_bytes(policy, implicit, encodings)
    marks = _marks(policy)
    pixel_bytes = 0
    pos = len(parts[0])
    pixel_in: tuple[int, int] | None = None
    pixel_out: tuple[int, int] | None = None
    for tag in sorted(ds._dict):
        t = int(tag)
        elem = ds._dict[tag]
        span = _raw_span(elem, original.get(t), implicit, data)
        if span is not None:
            chunk: bytes | memoryview = view[span[0] : span[1]]
        elif t in mark_bytes and elem is marks.get(t):
            chunk = mark_bytes[t]
        else:
            if isinstance(elem, RawDataElement) and elem.value is None:
                fill(ds, t)
                elem = ds._dict[tag]
            fast = _encode_simple(elem, implicit) if fast_text and isinstance(elem, DataElement) else None
            if fast is not None:
                chunk = fast
            else:
                fp = DicomBytesIO()
                fp.is_little_endian = True
                fp.is_implicit_VR = implicit
                write_data_element(fp, elem, encodings)
                chunk = fp.getvalue()
        parts.append(chunk)
        if t in PIXEL_TAGS:
            pixel_bytes += len(chunk)
            if t == 0x7FE00010 and span is not None:
                pixel_in, pixel_out = span, (pos, pos + len(chunk))
        else:
            gate_parts.append(chunk)
        pos += len(chunk)
    out = b"".join(parts)
    header = b"".join(gate_parts)
    hits = scan_bytes(header, ids, "")
    pieces: list[bytes | memoryview] = [out]
    if pixel_out is not None:  # the pixel data as a part of its own, as the raw walker gives it
        view = memoryview(out)
        pieces = [view[: pixel_out[0]], view[pixel_out[0] : pixel_out[1]], view[pixel_out[1] :]]
    return Result(
        pieces, report, hits, pixel_bytes=pixel_bytes, header=header, identifiers=ids, pixel_in=pixel_in,
        pixel_out=pixel_out, source=source,
    )


_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UC",
                        "UR", "UT"})


def _encode_simple(elem: DataElement, implicit: bool) -> bytes | None:
    """Encode an ASCII string value without pydicom's writer (most values the engine writes are these).

    Anything else (numbers, binary, sequences, non-ASCII text) returns None and goes to pydicom.
    """
    vr = elem.VR
    if vr not in _ASCII_VRS:
        return None
    value = elem.value
    if value is None or value == "":
        data = b""
    elif type(value) is str or isinstance(value, PersonName):
        text = str(value)
        if not text.isascii():
            return None
        data = text.encode("ascii")
    elif isinstance(value, (list, MultiValue)) and all(type(v) is str for v in value):
        text = "\\".join(value)
        if not text.isascii():
            return None
        data = text.encode("ascii")
    else:
        return None
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    tag = int(elem.tag)
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHL", group, element, len(data)) + data
    if vr in LONG_HEADER_VRS:
        return struct.pack("<HH2s2xL", group, element, vr.encode(), len(data)) + data
    if len(data) > 0xFFFF:
        return None
    return struct.pack("<HH2sH", group, element, vr.encode(), len(data)) + data


def _mark_bytes(policy: Policy, implicit: bool, encodings: object) -> dict[int, bytes]:
    """The marks encoded once per policy and encoding, by tag. Keyed by tag, not by object: the cache travels
    with a pickled policy to the workers, where the element objects are new ones."""
    cache: dict[bool, dict[int, bytes]] = getattr(policy, "_mark_bytes", None) or {}
    if implicit not in cache:
        out = {}
        for tag, elem in _marks(policy).items():
            fp = DicomBytesIO()
            fp.is_little_endian = True
            fp.is_implicit_VR = implicit
            write_data_element(fp, elem, ["iso8859"])  # ASCII content: the same bytes in any character set
            out[tag] = fp.getvalue()
        cache[implicit] = out
        object.__setattr__(policy, "_mark_bytes", cache)
    return cache[implicit]


def _meta_bytes(old: FileMetaDataset | None, ds: Dataset, ts: str) -> bytes | None:
    """File meta (PS3.10 7.1) encoded directly; None when the input carries other meta elements to keep."""
    if old is not None and any(int(t) not in META_STANDARD and int(t) not in META_REMOVE for t in old.keys()):
        return None
    return _encode_meta(plain(ds, "SOPClassUID"), plain(ds, "SOPInstanceUID"), ts)


def _encode_meta(sop_class: str, sop_instance: str, ts: str) -> bytes:
    values = [
        (0x00020002, "UI", sop_class),
        (0x00020003, "UI", sop_instance),
        (0x00020010, "UI", ts),
        (0x00020012, "UI", IMPLEMENTATION_CLASS_UID),
        (0x00020013, "SH", IMPLEMENTATION_VERSION),
    ]
    body = [struct.pack("<HH2s2xL", 2, 1, b"OB", 2) + b"\x00\x01"]
    for tag, vr, text in values:
        data = text.encode("ascii")
        if len(data) % 2:
            data += b"\0" if vr == "UI" else b" "
        body.append(struct.pack("<HH2sH", 2, tag & 0xFFFF, vr.encode(), len(data)) + data)
    rest = b"".join(body)
    return struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(rest)) + rest


def _raw_span(
    elem: DataElement | RawDataElement | None,
    before: DataElement | RawDataElement | None,
    implicit: bool,
    data: bytes,
) -> tuple[int, int] | None:
    """The input byte span of an unchanged, defined-length raw element, or None to encode it."""
    if not isinstance(elem, RawDataElement) or elem is not before:
        return None
    # PS3.5 7.1: implicit VR headers are 8 bytes; explicit OB/OW/SQ/UN/UT/... have 2 reserved bytes and a
    # 32-bit length (12 bytes), the others a 16-bit length (8 bytes).
    header = 8 if implicit or elem.VR not in LONG_HEADER_VRS else 12
    start = elem.value_tell - header
    if elem.length == 0xFFFFFFFF:
        if elem.value is not None or elem.VR == "SQ":
            return None  # read by pydicom already (or a sequence): let pydicom write it
        return start, _undefined_end(data, elem.value_tell)
    return start, elem.value_tell + elem.length


def _undefined_end(data: bytes, pos: int) -> int:
    """End (after the delimiter) of an undefined-length value made of items, e.g. encapsulated pixel data."""
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHL", data, pos)
        if (group, element) == (0xFFFE, 0xE0DD):
            return pos + 8
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise Truncated("encapsulated pixel data is malformed (an item or its delimiter is missing)")
        pos += 8 + length
    raise Truncated("encapsulated pixel data has no sequence delimiter: the file is truncated")


def _check_truncation(ds: Dataset, data: bytes) -> None:
    """A value that runs past the end of the file means the file was cut short (copy in progress, disk full)."""
    size = len(data)
    for tag, raw in ds._dict.items():
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF:
            if raw.value_tell + raw.length > size:
                raise Truncated(
                    f"element ({tag.group:04X},{tag.element:04X}) needs {raw.length} bytes but the file "
                    f"ends {len(data) - raw.value_tell} bytes after its start: the file is truncated"
                )
            if raw.value is not None and len(raw.value) < raw.length:
                raise Truncated("the file ends inside an element's value: the file is truncated")
    _check_native_pixels(ds)


def _check_native_pixels(ds: Dataset) -> None:
    """Uncompressed pixel data shorter than Rows x Columns x samples x bits x frames: the copy was cut."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None)
    if ts is not None and ts.is_compressed:
        return
    raw = raw_item(ds, 0x7FE00010)
    if raw is None:
        return
    have = raw.length if isinstance(raw, RawDataElement) else len(raw.value or b"")
    if have == 0xFFFFFFFF:
        return
    try:
        frames = int(plain(ds, "NumberOfFrames") or 1)
    except ValueError:
        return
    need = _image_bytes(lambda keyword, default: _unsigned(ds, keyword, default), frames)
    if have < need:
        raise Truncated(f"pixel data holds {have} bytes but the image needs {need}: the file is truncated")


def collect_identifiers_raw(ds: Dataset, policy: Policy, fill: Callable[[Dataset, int], None]) -> Identifiers:
    """collect_identifiers for a lazily parsed dataset: deferred values are filled before decoding."""
    for t in list(ds.keys()):
        raw = raw_item(ds, t)
        if isinstance(raw, RawDataElement) and raw.value is None and int(t) not in PIXEL_TAGS:
            vr = vr_of(raw, int(t))
            if vr not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "FL", "FD"):
                fill(ds, int(t))
    return collect_identifiers(ds, policy)
