"""Properties of the pure engine: an identifier planted anywhere either does not survive, or the gate sees it.

Each example is a small dataset whose patient name, ID, date, institution and study UID sit in their usual
attributes (where the gate learns them) and are also copied to random places: random public attributes of
text VRs, DA and UI attributes, private blocks (text and UN), zero to four sequences deep (public or
private sequences, at random item positions), in free text at random positions and in the spellings
clerks use (``Given Family``, ``DD/MM/YYYY``). After ``deidentify`` the output is walked element by element
(file meta, private, every depth) and written with pydicom and searched as bytes; every copy found must be
reported by the release gate at that place.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
from dataclasses import dataclass
from functools import cache

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from anondrop.deid import _ps315
from anondrop.deid.engine import deidentify
from anondrop.deid.gate import GateHit, collect_identifiers, scan_dataset
from anondrop.deid.identifiers import scan_names
from anondrop.deid.policy import Policy, build_policy
from anondrop.deid.pseudonyms import Keys
from tests.phi_drop import element_bytes, find_needles, needle_pattern, walk

KEYS = Keys(secret=b"k" * 32)
TEXT_VRS = ("LO", "SH", "LT", "ST", "UT", "PN", "UC")
MAX_LEN = {"SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240, "UT": 100_000, "UC": 100_000}  # characters
# Option sets that do not keep any of the planted kinds on purpose (institution, dates, UIDs).
OPTION_SETS = (
    (),
    ("clean_descriptors",),
    ("retain_safe_private",),
    ("retain_longitudinal_modified_dates",),
    ("clean_structured_content", "clean_descriptors"),
    ("retain_safe_private", "retain_longitudinal_modified_dates", "clean_descriptors"),
)

FAMILY = ("HOLLOWAY", "PETTERSEN", "OKONKWO", "FAIRCLOUGH", "ABERNATHY", "WALLINGFORD", "SZYMANSKA", "MÜLLER",
          "ÅSTRÖM", "NAKAGAWA", "MUÑOZ", "BRANDAUER")
GIVEN = ("MARGARET", "DESMOND", "INGRID", "TOBIAS", "LUCINDA", "ROSALIND", "JÜRGEN", "SØREN", "KEIKO", "ZOFIA")
INSTITUTIONS = ("Ravensworth General Hospital", "St Aldhelm Infirmary", "Klinikum Nordstadt Süd",
                "Hôpital Saint-Éloi", "Kestrel Vale Imaging Centre")
CREATORS = ("ACME PACS 2.1", "RGH RIS EXTENSIONS", "VENDOR RAW HEADER", "Ravensworth private 1")
SEPARATORS = (" ", ", ", "; ", " (", ") ", ": ", " - ")


def _dictionary(vrs: tuple[str, ...]) -> list[int]:
    return sorted(
        tag for tag, (vr, vm, _name, retired, keyword) in DicomDictionary.items()
        if vr in vrs and vm == "1" and not retired and keyword and (tag >> 16) not in (0x0000, 0x0002, 0xFFFE)
    )


TEXT_TAGS_BY_VR = {vr: _dictionary((vr,)) for vr in TEXT_VRS}
DA_TAGS = _dictionary(("DA",))
UI_TAGS = _dictionary(("UI",))
SQ_TAGS = _dictionary(("SQ",))
SAFE_PRIVATE = sorted(_ps315.SAFE_PRIVATE)  # (creator, group, element offset) of Table E.3.10-1


# ---------------------------------------------------------------------------------------------------------
# Identifiers and where they go
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    family: str
    given: str
    pid: str
    date: dt.date
    institution: str
    study_uid: str

    @property
    def pn(self) -> str:
        return f"{self.family}^{self.given}"

    @property
    def yyyymmdd(self) -> str:
        return self.date.strftime("%Y%m%d")


@dataclass(frozen=True)
class Step:
    """One sequence on the way down: a public SQ tag, or a private SQ (creator, group, offset)."""

    tag: int
    private: tuple[str, int, int] | None
    index: int  # which item of the sequence holds the rest


@dataclass(frozen=True)
class Leaf:
    tag: int  # public tag, or the element offset of a private block
    vr: str
    private: tuple[str, int] | None  # (creator, group)


@dataclass(frozen=True)
class Placement:
    kind: str  # name | id | date | institution | uid
    text: str  # the identifier as written here
    needles: tuple[str, ...]  # what must not survive
    path: tuple[Step, ...]
    leaf: Leaf
    value: str | bytes


identities = st.builds(
    Identity,
    family=st.sampled_from(FAMILY),
    given=st.sampled_from(GIVEN),
    pid=st.from_regex(r"[A-Z]{2,3}[0-9]{5,8}|[A-Z]{3}[0-9]{2}-[0-9]{5}", fullmatch=True),
    date=st.dates(dt.date(1921, 1, 1), dt.date(2030, 12, 31)),
    institution=st.sampled_from(INSTITUTIONS),
    study_uid=st.from_regex(r"1\.3\.46\.670589\.11\.[1-9][0-9]{3,8}\.[1-9][0-9]{5,12}\.[1-9][0-9]{0,3}",
                            fullmatch=True),
)
filler = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x17F, categories=("Lu", "Ll", "Nd", "Zs")),
    max_size=40,
)


def _name_forms(who: Identity) -> list[tuple[str, tuple[str, ...]]]:
    g, f = who.given.title(), who.family.title()
    parts = (who.family, who.given)
    return [(who.pn, parts), (f"{g} {f}", parts), (f"{f}, {g}", parts), (f, (who.family,)),
            (who.family, (who.family,))]


def _date_forms(who: Identity) -> list[str]:
    d = who.date
    return [d.strftime(f) for f in ("%Y%m%d", "%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y")]


@st.composite
def steps(draw: st.DrawFn) -> Step:
    if draw(st.integers(0, 3)) == 0:
        creator = draw(st.sampled_from(CREATORS))
        group = draw(st.integers(0x0009, 0x7FEF).map(lambda g: g | 1))
        return Step(0, (creator, group, draw(st.integers(0x10, 0xFF))), draw(st.integers(0, 2)))
    return Step(draw(st.sampled_from(SQ_TAGS)), None, draw(st.integers(0, 2)))


@st.composite
def leaves(draw: st.DrawFn, kind: str, options: tuple[str, ...], length: int) -> Leaf:
    where = draw(st.sampled_from(["public", "public", "typed", "private", "safe-private"]))
    if where == "typed" and kind in ("date", "uid"):
        return Leaf(draw(st.sampled_from(DA_TAGS if kind == "date" else UI_TAGS)), "DA" if kind == "date" else "UI",
                    None)
    if where == "private":
        vr = draw(st.sampled_from([*(v for v in TEXT_VRS if MAX_LEN[v] >= length), "UN"]))
        group = draw(st.integers(0x0009, 0x7FEF).map(lambda g: g | 1))
        return Leaf(draw(st.integers(0x10, 0xFF)), vr, (draw(st.sampled_from(CREATORS)), group))
    if where == "safe-private" and "retain_safe_private" in options:
        creator, group, offset = draw(st.sampled_from(SAFE_PRIVATE))
        return Leaf(offset, "LO", (creator, group))
    vr = draw(st.sampled_from([v for v in TEXT_VRS if MAX_LEN[v] >= length]))
    tag = draw(st.sampled_from(TEXT_TAGS_BY_VR[vr]))
    return Leaf(tag, vr, None)


@st.composite
def placements(draw: st.DrawFn, who: Identity, options: tuple[str, ...]) -> Placement:
    kind = draw(st.sampled_from(["name", "id", "date", "institution", "uid"]))
    if kind == "name":
        text, needles = draw(st.sampled_from(_name_forms(who)))
    elif kind == "date":
        text = draw(st.sampled_from(_date_forms(who)))
        needles = (text,)
    else:
        text = {"id": who.pid, "institution": who.institution, "uid": who.study_uid}[kind]
        needles = (text,)
    leaf = draw(leaves(kind, options, len(text)))
    path = tuple(draw(st.lists(steps(), max_size=4)))
    if leaf.vr in ("DA", "UI"):
        value: str | bytes = who.yyyymmdd if leaf.vr == "DA" else who.study_uid
        needles = (value,)
    elif leaf.vr == "PN":
        value = who.pn if kind == "name" else text
    else:
        before, after = draw(filler), draw(filler)
        sep1, sep2 = draw(st.sampled_from(SEPARATORS)), draw(st.sampled_from(SEPARATORS))
        room = max(0, MAX_LEN.get(leaf.vr, 1024) - len(text) - len(sep1) - len(sep2))
        before = before[: room // 2]
        after = after[: room - len(before)]
        value = f"{before}{sep1}{text}{sep2}{after}".strip() if room else text
        if leaf.vr == "UN":
            value = value.encode("utf-8")
    return Placement(kind, text, needles, path, leaf, value)


# ---------------------------------------------------------------------------------------------------------
# Building the dataset
# ---------------------------------------------------------------------------------------------------------


def _item(seq_holder: Dataset, step: Step) -> Dataset:
    """The item at step.index of the sequence named by step (created with empty items before it)."""
    if step.private is not None:
        creator, group, offset = step.private
        block = seq_holder.private_block(group, creator, create=True)
        tag = block.get_tag(offset)
        if tag not in seq_holder or seq_holder[tag].VR != "SQ":
            block.add_new(offset, "SQ", Sequence())
    else:
        tag = step.tag
        if tag not in seq_holder or seq_holder[tag].VR != "SQ":
            seq_holder.add_new(tag, "SQ", Sequence())
    seq = seq_holder[tag].value
    while len(seq) <= step.index:
        seq.append(Dataset())
    item: Dataset = seq[step.index]
    return item


def _put(ds: Dataset, p: Placement) -> None:
    target = ds
    for step in p.path:
        target = _item(target, step)
    if p.leaf.private is not None:
        creator, group = p.leaf.private
        block = target.private_block(group, creator, create=True)
        block.add_new(p.leaf.tag, p.leaf.vr, p.value)
    else:
        target.add_new(p.leaf.tag, p.leaf.vr, p.value)


def _build(who: Identity, where: list[Placement]) -> Dataset:
    ds = Dataset()
    for p in where:
        _put(ds, p)
    # The usual attributes last, so that a placement at the top level cannot hide them from the gate.
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = who.study_uid + ".1.1"
    ds.SeriesInstanceUID = who.study_uid + ".1"
    ds.StudyInstanceUID = who.study_uid
    ds.Modality = "CT"
    ds.PatientName = who.pn
    ds.PatientID = who.pid
    ds.PatientBirthDate = who.yyyymmdd
    ds.StudyDate = who.yyyymmdd
    ds.InstitutionName = who.institution
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


@cache
def _policy(options: tuple[str, ...]) -> Policy:
    return build_policy(options=options)


# ---------------------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------------------


def _needles(who: Identity, where: list[Placement]) -> list[str]:
    """Everything that must not survive: the usual values, and every spelling that was planted."""
    out = {who.family, who.given, who.pid, who.yyyymmdd, who.institution}
    for p in where:
        out.update(p.needles)
    return sorted(n for n in out if n)


def _survivors(out: Dataset, who: Identity, where: list[Placement]) -> tuple[list[tuple[str, str]], list[str]]:
    texts = [n for n in _needles(who, where) if n != who.study_uid and not n.startswith(who.study_uid)]
    pattern = needle_pattern(texts, [who.study_uid])
    in_elements: list[tuple[str, str]] = []
    for part, ds in (("meta", out.file_meta), ("", out)):
        for path, elem in walk(ds):
            if elem.VR != "SQ":
                in_elements += [(path, f"{part} {path} {elem.VR}: {h}")
                                for h in find_needles(pattern, element_bytes(elem.value))]
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    in_bytes = [str(h) for h in find_needles(pattern, buf.getvalue())]
    return in_elements, in_bytes


def _reported(path: str, hits: list[GateHit]) -> bool:
    return any(h.where == path or h.where.endswith(f": {path}") or h.where.endswith(f".{path}") for h in hits)


def check(who: Identity, where: list[Placement], options: tuple[str, ...]) -> None:
    policy = _policy(options)
    ds = _build(who, where)
    ids = collect_identifiers(ds, policy)  # from the input as it came in, before anything touches it
    out, _report = deidentify(ds, policy, KEYS)
    hits = scan_dataset(out, ids)
    in_elements, in_bytes = _survivors(out, who, where)
    unreported = [desc for path, desc in in_elements if not _reported(path, hits)]
    assert not unreported, (
        f"options {options}: identifiers survived and the gate did not report them:\n  "
        + "\n  ".join(unreported) + f"\ngate hits: {[str(h) for h in hits]}"
    )
    assert not in_bytes or hits, f"options {options}: survived in the written file, gate silent: {in_bytes}"


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Identity, list[Placement], tuple[str, ...]]:
    who = draw(identities)
    options = draw(st.sampled_from(OPTION_SETS))
    where = draw(st.lists(placements(who, options), min_size=1, max_size=8))
    return who, where, options


# No "explain" phase: its line tracing makes one failure cost minutes instead of seconds.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=PHASES)
@given(scenarios())
def test_no_planted_identifier_survives_unreported(scenario: tuple[Identity, list[Placement], tuple[str, ...]]) -> None:
    who, where, options = scenario
    check(who, where, options)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=PHASES)
@given(identities, st.sampled_from(OPTION_SETS), st.data())
def test_identifiers_deep_in_sequences_are_removed(
    who: Identity, options: tuple[str, ...], data: st.DataObject
) -> None:
    """Depth alone must not matter: the same copy four sequences down is treated as at the top."""
    where = data.draw(st.lists(placements(who, options), min_size=1, max_size=4))
    deep = [Placement(p.kind, p.text, p.needles, (*p.path, *data.draw(st.lists(steps(), min_size=4, max_size=4)))[:4],
                      p.leaf, p.value) for p in where]
    check(who, deep, options)


def test_the_search_finds_what_was_planted() -> None:
    """Without de-identification every planted copy is found, so a clean output is not a blind search."""
    who = Identity("MÜLLER", "JÜRGEN", "PX5521098", dt.date(1978, 9, 22), "Klinikum Nordstadt Süd",
                   "1.3.46.670589.11.4711.2024030112.1")
    where = [
        Placement("name", "Jürgen Müller", ("MÜLLER", "JÜRGEN"),
                  (Step(0x0040A730, None, 1), Step(0, ("ACME PACS 2.1", 0x0071, 0x10), 0)),
                  Leaf(0x0040A160, "UT", None), "seen by Jürgen Müller today"),
        Placement("date", "22/09/1978", ("22/09/1978",), (), Leaf(0x12, "UN", ("VENDOR RAW HEADER", 0x0077)),
                  b"DOB 22/09/1978"),
    ]
    ds = _build(who, where)
    in_elements, in_bytes = _survivors(ds, who, where)
    paths = {path for path, _ in in_elements}
    assert "ContentSequence[1].(0071,1010)[0].TextValue" in paths, paths
    assert "(0077,1012)" in paths, paths
    assert any("22/09/1978" in b for b in in_bytes) and any("jürgen" in b.lower() for b in in_bytes), in_bytes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=PHASES)
@given(scenarios())
def test_deidentify_leaves_its_input_untouched(scenario: tuple[Identity, list[Placement], tuple[str, ...]]) -> None:
    """The gate learns identifiers from the input; an input rewritten in place would hide the originals."""
    who, where, options = scenario
    ds = _build(who, where)
    before = copy.deepcopy(ds)
    deidentify(ds, _policy(options), KEYS)
    assert ds == before, "deidentify changed its input dataset"
    changed = [f"{e.keyword}: {before.file_meta.get(e.tag).value!r} -> {e.value!r}"
               for e in ds.file_meta if e.tag not in before.file_meta or before.file_meta[e.tag].value != e.value]
    assert ds.file_meta == before.file_meta, f"deidentify changed its input's file meta: {changed}"


def _too_long(out: Dataset) -> list[str]:
    bad = []
    for path, elem in walk(out):
        if elem.VR in ("SH", "LO", "ST", "LT") and elem.value:
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            bad += [f"{path} {elem.VR} {v!r}" for v in values if len(str(v)) > MAX_LEN[elem.VR]]
    return bad


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=PHASES)
@given(scenarios())
def test_cleaned_text_still_fits_its_value_representation(
    scenario: tuple[Identity, list[Placement], tuple[str, ...]]
) -> None:
    """Replacing an identifier inside a value must not make the value too long for its VR (PS3.5 6.2)."""
    who, where, options = scenario
    out, _report = deidentify(_build(who, where), _policy(options), KEYS)
    assert not _too_long(out), f"options {options}: values longer than their VR allows: {_too_long(out)}"


# The gate's fast question (is any identifier in these bytes?) is answered by token shapes; it must agree
# with the full regex search on every input: words, phrases (spaces, non-ASCII, numbers), dates in all their
# spellings and UIDs, planted between arbitrary neighbours.
_NEIGHBOURS = st.sampled_from(["", " ", "x", "X", "1", "^", "\\", "/", ".", "-", "é", "\0", "_"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(FAMILY),
    given_name=st.sampled_from(GIVEN),
    institution=st.sampled_from(INSTITUTIONS),
    date=st.dates(dt.date(1930, 1, 1), dt.date(2030, 12, 31)),
    plant=st.sampled_from(["none", "family", "given", "institution", "date", "date-iso", "date-eu", "uid", "id",
                           "phone"]),
    case=st.sampled_from(["upper", "lower", "title"]),
    before=_NEIGHBOURS,
    after=_NEIGHBOURS,
    # Short values are cut into tokens; a long text (a header) is searched for substrings first.
    filler=st.one_of(st.binary(max_size=200), st.binary(min_size=300, max_size=900)),
)
def test_the_gate_fast_check_agrees_with_the_full_search(
    family: str, given_name: str, institution: str, date: dt.date, plant: str, case: str, before: str,
    after: str, filler: bytes,
) -> None:
    ds = Dataset()
    ds.PatientName = f"{family}^{given_name}"
    ds.PatientID = "MRN-0042-77"
    ds.OtherPatientIDs = "X9"
    ds.InstitutionName = institution
    ds.PatientTelephoneNumbers = "+1-908-555-8074"
    ds.PatientBirthDate = date.strftime("%Y%m%d")
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1234567"
    ids = collect_identifiers(ds, build_policy())
    text = {
        "none": "",
        "family": family,
        "given": given_name,
        "institution": institution,
        "date": date.strftime("%Y%m%d"),
        "date-iso": date.strftime("%Y-%m-%d"),
        "date-eu": date.strftime("%d.%m.%Y"),
        "uid": "1.2.826.0.1.3680043.8.498.1234567",
        "id": "MRN-0042-77",
        "phone": "+1-908-555-8074",
    }[plant]
    text = {"upper": text.upper(), "lower": text.lower(), "title": text.title()}[case]
    data = filler + (before + text + after).encode("utf-8") + filler
    assert ids.contains(data) == (next(ids.find(data), None) is not None)


# A series' identifying values, one of each kind, for the tests of the gate's series and name checks.
SERIES_VALUES = [("PatientName", "HOLLOWAY^MARGARET"), ("OtherPatientIDs", "MRN-0042-77"),
                 ("StudyDate", "20240311"), ("SOPInstanceUID", "1.2.826.0.1.3680043.8.498.77"),
                 ("InstitutionName", "Klinikum Nordstadt Süd"), ("AccessionNumber", "ACC99812")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mine=st.lists(st.sampled_from(range(6)), max_size=6),
    plant=st.sampled_from(range(7)),
    case=st.sampled_from(["upper", "lower", "title"]),
    before=_NEIGHBOURS,
    after=_NEIGHBOURS,
    filler=st.binary(max_size=200),
)
def test_the_series_cross_check_asks_only_for_the_other_files_identifiers(
    mine: list[int], plant: int, case: str, before: str, after: str, filler: bytes
) -> None:
    """A file's output is searched for the identifiers of the rest of its series: those of the series that
    the file does not hold itself. contains_beyond answers that without building the difference, and must
    answer it exactly as the difference's contains() does."""
    texts = ["HOLLOWAY", "MRN-0042-77", "11.03.2024", "1.2.826.0.1.3680043.8.498.77", "Nordstadt Süd",
             "ACC99812", ""]
    series, own = Dataset(), Dataset()
    for i, (keyword, value) in enumerate(SERIES_VALUES):
        setattr(series, keyword, value)
        if i in mine:
            setattr(own, keyword, value)
    policy = build_policy()
    ids, own_ids = collect_identifiers(series, policy), collect_identifiers(own, policy)
    text = {"upper": texts[plant].upper(), "lower": texts[plant].lower(), "title": texts[plant].title()}[case]
    data = filler + (before + text + after).encode("utf-8") + filler
    assert ids.contains_beyond(data, own_ids) == ids.minus(own_ids).contains(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(st.text(alphabet="AWYHOLab019._-/ é\n", max_size=40), min_size=1, max_size=30),
    where=st.integers(min_value=0, max_value=29),
    plant=st.sampled_from(range(7)),
    case=st.sampled_from(["upper", "lower", "title"]),
    before=_NEIGHBOURS,
    after=_NEIGHBOURS,
)
def test_output_names_are_gated_together_as_they_would_be_one_by_one(
    names: list[str], where: int, plant: int, case: str, before: str, after: str
) -> None:
    """scan_names asks all of a series' names at once before it looks at each: it must report exactly the
    names that hold an identifier, wherever in the list and between whatever neighbours it is."""
    ds = Dataset()
    for keyword, value in SERIES_VALUES:
        setattr(ds, keyword, value)
    ids = collect_identifiers(ds, build_policy())
    texts = ["HOLLOWAY", "MRN-0042-77", "2024-03-11", "1.2.826.0.1.3680043.8.498.77", "Nordstadt Süd", "AY", ""]
    text = {"upper": texts[plant].upper(), "lower": texts[plant].lower(), "title": texts[plant].title()}[case]
    i = where % len(names)
    names[i] = names[i] + before + text + after
    named = [(f"name {n}", name) for n, name in enumerate(names)]
    one_by_one = [
        GateHit(label, kind)
        for label, name in named
        for kind in list(ids.find(name.encode("utf-8", "surrogateescape")))[:1]
    ]
    assert scan_names(named, ids) == one_by_one
