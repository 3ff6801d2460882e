"""Profile + options + site rules -> one action for every element.

Precedence, highest first:
  1. site rules (``[deidentify] rules``), by tag or keyword;
  2. the Table E.1-1 row, under the selected options: where several selected options name an action for
     the same row, C (clean) wins over K (keep), because cleaning is the more protective of the two
     (e.g. Calibration Date under retain_device_identity + retain_longitudinal_modified_dates is shifted);
  3. the basic profile action of the row, with combined codes resolved by ``requirements``;
  4. for elements the table does not list: the safety net by value representation (see ``engine``).

PatientID and PatientName are pseudonymised (action P) rather than emptied: the table allows Z/D, and a
keyed pseudonym is a D value that keeps one patient's series together.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from anondrop.deid import _ps315
from anondrop.deid.actions import CODE_TAGS, TEXT_VRS
from anondrop.deid.requirements import resolve_combined
from anondrop.dicomdict import keyword_for_tag, tag_for_keyword

EDITION = _ps315.EDITION
OPTIONS: tuple[str, ...] = _ps315.OPTIONS

# Actions after resolution. P = keyed pseudonym (PatientID, PatientName).
REMOVE, EMPTY, DUMMY, KEEP, CLEAN, UID, PSEUDONYM = "X", "Z", "D", "K", "C", "U", "P"
SCRUB = "S"  # internal: keep free text but replace identifiers of the series inside it
# How each action is counted in an instance's report.
ACTION_NAMES = {REMOVE: "removed", EMPTY: "emptied", DUMMY: "dummied", KEEP: "kept", CLEAN: "cleaned",
                UID: "uid", PSEUDONYM: "pseudonym", SCRUB: "scrubbed"}
PSEUDONYMISED_TAGS = {0x00100010: "name", 0x00100020: "id"}

# Burned-in text is likely in these kinds of image even when BurnedInAnnotation is absent.
BURNED_IN_SUSPECT_MODALITIES = frozenset({"US", "IVUS", "OT", "XC", "ES", "GM", "SM", "DOC", "OP", "XA"})
BURNED_IN_SUSPECT_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture family (screenshots, scanned documents)
    "1.2.840.10008.5.1.4.1.1.6.",  # Ultrasound (single and multi-frame)
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
    "1.2.840.10008.5.1.4.1.1.77.",  # VL endoscopy, microscopy, photography
    "1.2.840.10008.5.1.4.1.1.104.",  # Encapsulated PDF / CDA / STL: documents that carry their own text
)

_TAG_TEXT = re.compile(r"^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?$")


@dataclass(frozen=True)
class Policy:
    """Everything the engine needs to decide about one element; built once per configuration."""

    options: frozenset[str]
    burned_in_suspect: str = "quarantine"
    exact: Mapping[int, str] = field(default_factory=dict)
    repeating: tuple[tuple[int, int, str], ...] = ()
    site_rules: Mapping[int, str] = field(default_factory=dict)
    private_keep_safe: bool = False
    # (keyword, tag) of output values each instance's report carries, for the naming templates.
    report_tags: tuple[tuple[str, int], ...] = ()

    @property
    def edition(self) -> str:
        return EDITION

    def has(self, option: str) -> bool:
        return option in self.options

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cache", {})

    def action(self, tag: int) -> str | None:
        """The action for a public tag, or None when no rule or table row names it (safety net applies)."""
        cache: dict[int, str | None] = self._cache  # type: ignore[attr-defined]
        try:
            return cache[tag]
        except KeyError:
            pass
        result = cache[tag] = self._lookup(tag)
        return result

    def _lookup(self, tag: int) -> str | None:
        site = self.site_rules.get(tag)
        if site is not None:
            return site
        act = self.exact.get(tag)
        if act is not None:
            return act
        for mask, value, rep_act in self.repeating:
            if tag & mask == value:
                return rep_act
        return None

    def net_action(self, vr: str, mode: str, tag: int) -> str:
        """The safety net: the action for an element no rule or table row names, by its VR; `mode` is the
        enclosing sequence's (DUMMY inside a dummied sequence, SCRUB otherwise)."""
        if vr == "PN":
            return DUMMY
        if vr == "UI":
            return KEEP if self.has("retain_uids") else UID
        if vr in ("DA", "DT"):
            return {"keep": KEEP, "shift": CLEAN, "remove": EMPTY}[self.date_mode]
        if vr in TEXT_VRS and tag not in CODE_TAGS:
            return DUMMY if mode == DUMMY else SCRUB
        return KEEP

    @cached_property
    def date_mode(self) -> str:
        """'keep' (full dates), 'shift' (modified dates) or 'remove' (basic)."""
        if self.has("retain_longitudinal_full_dates"):
            return "keep"
        if self.has("retain_longitudinal_modified_dates"):
            return "shift"
        return "remove"

    def describe(self) -> list[tuple[str, str, str]]:
        """(tag, keyword, action) for every exact row: the effective policy, for check-config."""
        rows = []
        for tag in sorted(set(self.exact) | set(self.site_rules)):
            act = self.action(tag) or ""
            rows.append((f"({tag >> 16:04X},{tag & 0xFFFF:04X})", keyword_for_tag(tag) or "?", act))
        return rows


def _row_action(basic: str, opts: tuple[tuple[str, str], ...], selected: frozenset[str], tag: int) -> str:
    chosen = [act for opt, act in opts if opt in selected]
    if chosen:
        return CLEAN if CLEAN in chosen else chosen[0]
    if tag in PSEUDONYMISED_TAGS:
        return PSEUDONYM
    return resolve_combined(tag, basic)


def parse_rule_key(key: str) -> int:
    match = _TAG_TEXT.match(key)
    if match:
        return int(match.group(1) + match.group(2), 16)
    tag = tag_for_keyword(key)
    if tag is None:
        raise ValueError(f"{key!r} is neither a DICOM keyword nor a tag like (0008,103E)")
    return int(tag)


def build_policy(
    options: Iterable[str] = (),
    rules: Mapping[str, str] | None = None,
    burned_in_suspect: str = "quarantine",
    report_keywords: Iterable[str] = (),
) -> Policy:
    selected = frozenset(options)
    unknown = selected - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
    if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= selected:
        raise ValueError("retain_longitudinal_full_dates and retain_longitudinal_modified_dates contradict")
    exact = {
        tag: _row_action(basic, opts, selected, tag)
        for tag, (_name, basic, opts, _in_iod) in _ps315.ATTRIBUTES.items()
    }
    repeating = tuple(
        (mask, value, _row_action(basic, opts, selected, value))
        for mask, value, _name, basic, opts in _ps315.REPEATING
    )
    site = {parse_rule_key(k): v for k, v in (rules or {}).items()}
    _pname, _pbasic, popts = _ps315.PRIVATE
    keep_safe = any(opt in selected for opt, _act in popts)
    return Policy(
        options=selected,
        burned_in_suspect=burned_in_suspect,
        exact=exact,
        repeating=repeating,
        site_rules=site,
        private_keep_safe=keep_safe,
        report_tags=tuple((kw, parse_rule_key(kw)) for kw in sorted(set(report_keywords))),
    )


def is_safe_private(creator: str, group: int, element: int) -> bool:
    """Table E.3.10-1: is (creator, group, element offset) a safe private attribute?"""
    return (creator.strip(), group, element & 0xFF) in _ps315.SAFE_PRIVATE


def method_codes(policy: Policy) -> list[tuple[str, str, str]]:
    """CID 7050 codes for the profile and every selected option, in table order."""
    keys = ["basic", *[o for o in OPTIONS if o in policy.options]]
    return [_ps315.METHOD_CODES[k] for k in keys]
