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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
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
from anondrop.deid.policy import KEEP, Policy

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
_UIDISH = re.compile(rb"[0-9]+(?:\.[0-9]+)+")
_TOKEN = re.compile(rb"[A-Za-z0-9]+")
_DIGITS = re.compile(rb"[0-9]+")
# Every shape of Identifiers._date_forms: 8 digits, or 4-2-2 / 2-2-4 digits with one of - / . between.
_DATEISH = re.compile(
    rb"(?<![0-9])(?:[0-9]{8}|[0-9]{4}[-/.][0-9]{2}[-/.][0-9]{2}|[0-9]{2}[-/.][0-9]{2}[-/.][0-9]{4})(?![0-9])"
)
_SPLIT_NAME = re.compile(r"[\^=\s,./\\()\-]+")


@dataclass(frozen=True)
class GateHit:
    """Where an identifier of the input was found in the output (never the value itself)."""

    where: str  # "IM000003.dcm: RequestAttributesSequence[0].StudyDescription" or "zip name"
    kind: str  # name | id | date | uid | text

    def __str__(self) -> str:
        return f"{self.kind} of the input found in {self.where}"


@dataclass(frozen=True)
class Identifiers:
    """Identifying values of one series' input, as upper-case strings grouped by kind."""

    words: frozenset[str] = frozenset()  # single alphanumeric tokens: name words, simple IDs
    phrases: frozenset[tuple[str, str]] = frozenset()  # (kind, text) with separators or non-ASCII
    dates: frozenset[str] = frozenset()  # YYYYMMDD
    uids: frozenset[str] = frozenset()
    word_kinds: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __bool__(self) -> bool:
        return bool(self.words or self.phrases or self.dates or self.uids)

    def merge(self, other: Identifiers) -> Identifiers:
        return Identifiers(
            self.words | other.words,
            self.phrases | other.phrases,
            self.dates | other.dates,
            self.uids | other.uids,
            tuple(dict(self.word_kinds + other.word_kinds).items()),
        )

    @staticmethod
    def union(parts: Iterable[Identifiers]) -> Identifiers:
        """merge() of many at once (a series' files): one pass instead of a new set per file."""
        words: set[str] = set()
        phrases: set[tuple[str, str]] = set()
        dates: set[str] = set()
        uids: set[str] = set()
        kinds: dict[str, str] = {}
        for p in parts:
            words |= p.words
            phrases |= p.phrases
            dates |= p.dates
            uids |= p.uids
            kinds.update(p.word_kinds)
        return Identifiers(frozenset(words), frozenset(phrases), frozenset(dates), frozenset(uids),
                           tuple(kinds.items()))

    def minus(self, other: Identifiers) -> Identifiers:
        """The identifiers of self that other does not have."""
        words = self.words - other.words
        return Identifiers(
            words,
            self.phrases - other.phrases,
            self.dates - other.dates,
            self.uids - other.uids,
            tuple((w, k) for w, k in self.word_kinds if w in words),
        )

    @cached_property
    def _kind_of_word(self) -> dict[str, str]:
        return dict(self.word_kinds)

    @cached_property
    def _uids_bytes(self) -> frozenset[bytes]:
        return frozenset(u.encode("ascii") for u in self.uids)

    @cached_property
    def _date_forms(self) -> frozenset[bytes]:
        return _date_forms(self.dates)

    @cached_property
    def _pattern(self) -> re.Pattern[bytes] | None:
        """One regex for name words, IDs, phrases and dates, so a search is one pass in C.

        UIDs are found by their shape and looked up in a set instead: a series has hundreds of them.
        """
        return _compile(self._words_bytes | self._phrase_forms, self._date_forms)

    def _kind(self, match: bytes) -> str:
        if match in self._date_forms:
            return "date"
        try:
            return self._kind_of_word.get(match.decode("ascii").upper(), "text")
        except UnicodeDecodeError:
            return "text"

    def find(self, data: bytes) -> Iterator[str]:
        """Yield the kind of each identifier occurring in data (bytes of a header, a name, a manifest)."""
        pattern = self._pattern
        if pattern is not None:
            for m in pattern.finditer(data):
                yield self._kind(m.group())
        uids = self._uids_bytes
        if uids:
            for m in _UIDISH.finditer(data):
                if m.group() in uids:
                    yield "uid"

    @cached_property
    def _words_bytes(self) -> frozenset[bytes]:
        return frozenset(w.encode("ascii") for w in self.words)

    @cached_property
    def _phrase_forms(self) -> frozenset[bytes]:
        return _phrase_forms(self.phrases)

    @cached_property
    def _phrase_pattern(self) -> re.Pattern[bytes] | None:
        return _compile(self._phrase_forms, frozenset())

    @cached_property
    def _phrase_keys(self) -> frozenset[bytes] | None:
        return _phrase_keys(self._phrase_forms)

    @cached_property
    def _date_keys(self) -> frozenset[bytes]:
        """A date in any of its forms holds its year, or all of it, as a whole run of digits."""
        return frozenset(k for d in self.dates for k in (d.encode(), d[:4].encode()))

    def contains(self, data: bytes) -> bool:
        """Whether any identifier occurs in data: the gate's fast path, as exact as find().

        One regex alternation of every word is slow on a whole header (it is tried at every byte), so the
        question is asked by shape instead: a name word or ID is a whole alphanumeric token (the same
        boundaries find() uses, ASCII case folded alike), a date one of the date-shaped runs, a UID one of
        the UID-shaped runs; only phrases (with spaces or non-ASCII letters) are searched as text.
        """
        tokens = set(_TOKEN.findall(data.upper()))
        if not self._words_bytes.isdisjoint(tokens):
            return True
        date_keys = self._date_keys
        if (
            date_keys
            and not date_keys.isdisjoint(_DIGITS.findall(data))
            and not self._date_forms.isdisjoint(_DATEISH.findall(data))
        ):
            return True
        uids = self._uids_bytes
        if uids and not uids.isdisjoint(_UIDISH.findall(data)):
            return True
        phrases = self._phrase_pattern
        if phrases is None:
            return False
        keys = self._phrase_keys
        return (keys is None or not keys.isdisjoint(tokens)) and phrases.search(data) is not None

    def contains_beyond(self, data: bytes, own: Identifiers) -> bool:
        """self.minus(own).contains(data), without building the difference for every file of a series.

        What occurs in data is matched against the whole set first, which is cached once per series;
        only a match of something `own` does not hold (rare: it is what the cross-check looks for) asks
        the exact question of the difference.
        """
        tokens = set(_TOKEN.findall(data.upper()))
        words = self._words_bytes & tokens
        if words and not words <= own._words_bytes:
            return True
        if self._date_keys and not self._date_keys.isdisjoint(_DIGITS.findall(data)):
            forms = self._date_forms.intersection(_DATEISH.findall(data))
            if forms and not forms <= own._date_forms:
                return self.minus(own).contains(data)
        if self._uids_bytes:
            uids = self._uids_bytes.intersection(_UIDISH.findall(data))
            if uids and not uids <= own._uids_bytes:
                return True
        if self.phrases - own.phrases:
            return self.minus(own).contains(data)
        return False

    def scrub(self, text: str) -> str:
        """Replace every identifier occurring in free text by [REMOVED] (the clean action for text)."""
        if not self or not text:
            return text
        raw = text.encode("utf-8", "surrogateescape")
        if not self.contains(raw):
            return text
        out = raw
        pattern = self._pattern
        if pattern is not None:
            out = pattern.sub(b"[REMOVED]", out)
        if self._uids_bytes:
            out = _UIDISH.sub(lambda m: b"[REMOVED]" if m.group() in self._uids_bytes else m.group(), out)
        return out.decode("utf-8", "surrogateescape")


# The derived forms below are cached by value: every file of a series has its own Identifiers, but they
# mostly hold the same names, dates and phrases.
@lru_cache(maxsize=256)
def _date_forms(dates: frozenset[str]) -> frozenset[bytes]:
    forms: set[bytes] = set()
    for date in dates:
        y, m, d = date[:4], date[4:6], date[6:8]
        forms |= {f.encode() for f in (date, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{y}.{m}.{d}", f"{d}.{m}.{y}",
                                       f"{d}/{m}/{y}", f"{d}-{m}-{y}", f"{m}/{d}/{y}", f"{m}-{d}-{y}")}
    return frozenset(forms)


@lru_cache(maxsize=256)
def _phrase_forms(phrases: frozenset[tuple[str, str]]) -> frozenset[bytes]:
    texts: set[bytes] = set()
    for _kind, text in phrases:
        # re.IGNORECASE folds ASCII only in bytes patterns: spell out the case forms of non-ASCII text.
        for form in {text, text.upper(), text.lower(), text.title(), text.capitalize()}:
            for enc in ("utf-8", "latin-1"):
                try:
                    texts.add(form.encode(enc))
                except UnicodeEncodeError:
                    continue
    return frozenset(texts)


@lru_cache(maxsize=256)
def _phrase_keys(forms: frozenset[bytes]) -> frozenset[bytes] | None:
    """One alphanumeric run of every phrase form, upper-cased: where a phrase occurs, each of its runs is a
    whole token (the phrase's own boundaries and separators guarantee it). The longest run is the rarest key.
    None when some form has no run at all."""
    keys = set()
    for form in forms:
        runs = _TOKEN.findall(form)
        if not runs:
            return None
        keys.add(max(runs, key=lambda r: (len(r), not r.isdigit())).upper())
    return frozenset(keys)


@lru_cache(maxsize=256)
def _compile(texts: frozenset[bytes], dates: frozenset[bytes]) -> re.Pattern[bytes] | None:
    # Cached: the files of one series mostly share their identifiers, and compiling is the slow part.
    branches = []
    if texts:
        alts = b"|".join(re.escape(t) for t in sorted(texts, key=lambda t: (-len(t), t)))
        branches.append(b"(?<![A-Za-z0-9])(?:" + alts + b")(?![A-Za-z0-9])")
    if dates:
        alts = b"|".join(re.escape(t) for t in sorted(dates, key=lambda t: (-len(t), t)))
        branches.append(b"(?<![0-9])(?:" + alts + b")(?![0-9])")
    if not branches:
        return None
    return re.compile(b"|".join(branches), re.IGNORECASE)


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


def scan_names(named: Iterable[tuple[str, str]], ids: Identifiers) -> list[GateHit]:
    """Output names (ZIP path, folder names, entry names), given as (label, name); the label is reported.

    The label, not the name, goes into the hit: the name is what may hold the identifier.
    """
    hits = []
    for label, name in named:
        for kind in ids.find(name.encode("utf-8", "surrogateescape")):
            hits.append(GateHit(label, kind))
            break
    return hits
