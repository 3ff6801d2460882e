"""What identifies the patient in a series' input, and the byte search for it in every output.

``Identifiers`` holds the identifying values of a series' input, grouped by kind; ``find`` and ``contains``
search raw bytes for them: the whole output header (every element, every depth, private, file meta), ZIP
entry names, folder names and the manifest. A search over bytes cannot be fooled by a VR, an odd character
set or an element the engine did not know. Hits (``GateHit``) name the place and the kind of identifier,
never the value itself, so that they are safe to log.

How the values are collected from an input, and how a hit is confirmed on the parsed output, is the gate's
part (anondrop.deid.gate, on pydicom). This module needs no pydicom: the main process, which assembles the
series and runs the cross-check between its files, uses it without importing pydicom.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

_UIDISH = re.compile(rb"[0-9]+(?:\.[0-9]+)+")
_TOKEN = re.compile(rb"[A-Za-z0-9]+")
_DIGITS = re.compile(rb"[0-9]+")
# Every shape of Identifiers._date_forms: 8 digits, or 4-2-2 / 2-2-4 digits with one of - / . between.
_DATEISH = re.compile(
    rb"(?<![0-9])(?:[0-9]{8}|[0-9]{4}[-/.][0-9]{2}[-/.][0-9]{2}|[0-9]{2}[-/.][0-9]{2}[-/.][0-9]{4})(?![0-9])"
)


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

        In a long text (a whole header) each kind is first looked for as plain substrings, which is cheaper
        than cutting the text into tokens, and only where one occurs is the exact question asked: every
        whole token, date, UID or phrase is also a substring (ASCII case folded), so nothing is missed.
        """
        if len(data) < _LONG_TEXT:
            return self._contains_by_tokens(data)
        upper = data.upper()
        words = self._words_bytes
        if words and _may_hold(upper, words) and not words.isdisjoint(_TOKEN.findall(upper)):
            return True
        date_keys = self._date_keys
        if (
            date_keys
            and _may_hold(data, self._date_forms)
            and not date_keys.isdisjoint(_DIGITS.findall(data))
            and not self._date_forms.isdisjoint(_DATEISH.findall(data))
        ):
            return True
        uids = self._uids_bytes
        if uids and _may_hold(data, uids) and not uids.isdisjoint(_UIDISH.findall(data)):
            return True
        phrases = self._phrase_pattern
        return phrases is not None and _may_hold(upper, self._phrases_upper) and phrases.search(data) is not None

    def _contains_by_tokens(self, data: bytes) -> bool:
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

    @cached_property
    def _phrases_upper(self) -> frozenset[bytes]:
        """The phrase forms, ASCII upper-cased: where the phrase pattern (ASCII case-insensitive) matches,
        one of these occurs in the upper-cased text."""
        return frozenset(f.upper() for f in self._phrase_forms)

    def contains_beyond(self, data: bytes, own: Identifiers) -> bool:
        """self.minus(own).contains(data), without building the difference for every file of a series.

        The files of a series mostly share their names, IDs and dates: what self holds beyond `own` is
        taken kind by kind (sets cached once per series and per file), and data is searched only for the
        kinds where there is something beyond; UIDs (every file has its own) always. A date, or a phrase,
        beyond `own` asks the exact question of the difference.
        """
        words = self._words_bytes - own._words_bytes
        if words and not words.isdisjoint(_TOKEN.findall(data.upper())):
            return True
        forms = self._date_forms - own._date_forms
        if forms and not forms.isdisjoint(_DATEISH.findall(data)):
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


_SUBSTRING_SEARCHES = 48  # beyond this many values, one pass cutting data into tokens is cheaper
_LONG_TEXT = 512  # below this many bytes (a value, a name), cutting into tokens is cheaper than searching


def _may_hold(data: bytes, values: frozenset[bytes]) -> bool:
    """False only when no value occurs in data even as a substring (a cheap test before an exact one)."""
    return len(values) > _SUBSTRING_SEARCHES or any(v in data for v in values)


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


def scan_names(named: Iterable[tuple[str, str]], ids: Identifiers) -> list[GateHit]:
    """Output names (ZIP path, folder names, entry names), given as (label, name); the label is reported.

    The label, not the name, goes into the hit: the name is what may hold the identifier.

    The names are first asked as one text, a line each (a series has hundreds of entry names): a line break
    is a boundary for every kind of identifier, as the start and end of a name are, so the whole holds one
    wherever some name does. Only then is each name searched, for its label.
    """
    encoded = [(label, name.encode("utf-8", "surrogateescape")) for label, name in named]
    if not ids.contains(b"\n".join(name for _, name in encoded)):
        return []
    hits = []
    for label, name in encoded:
        for kind in ids.find(name):
            hits.append(GateHit(label, kind))
            break
    return hits
