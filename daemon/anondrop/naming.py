"""Output names: the ZIP's path in the outbox, the entry names inside it, and the source folder rules.

Names are built from templates (``{PatientID}/{StudyDate}/{SeriesNumber:03d}_{Modality}.zip``) whose fields are
de-identified attributes of the output, never of the input: a field is the value that goes out, read from the
de-identified first instance of the series (the entry template: from each instance). Every value is made safe
for a file name (``/`` and other separators become ``_``), so a value can never add or climb a folder level.

A field that would carry an original identifier under a route's policy (a date kept by
retain_longitudinal_full_dates, a UID kept by retain_uids, an attribute a rule keeps, free text the profile
keeps) is refused when the config loads; the release gate still checks every name that goes out.

Source folder names are mirrored only with ``[naming] preserve_folders = true``, level by level as the
``[[naming.folders]]`` rules say (keep by default, the patient's pseudonym, a regex substitution, or drop).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydicom and the policy are imported where used: the config (and so the CLI) imports this
    from anondrop.config import FolderRule, Naming
    from anondrop.deid.policy import Policy

# Fields that are not DICOM keywords.
INDEX, ROUTE, FOLDERS, FOLDERS_FLAT = "index", "route", "folders", "folders_flat"
STUDY_KEY, SERIES_KEY = "study_key", "series_key"  # keyed digests of the output UIDs
PATH_SPECIAL = frozenset({ROUTE, FOLDERS, FOLDERS_FLAT, STUDY_KEY, SERIES_KEY})
ENTRY_SPECIAL = frozenset({INDEX, ROUTE, STUDY_KEY, SERIES_KEY})
DEFAULT_PATH_TEMPLATE = "{PatientID}/{StudyInstanceUID}/{Modality}_{SeriesNumber}_{SeriesInstanceUID}.zip"
DEFAULT_ENTRY_TEMPLATE = "IM{index:05d}.dcm"
# With retain_uids the UIDs are the originals: the default names use keyed digests of them instead.
RETAINED_UIDS_PATH_TEMPLATE = "{PatientID}/{study_key}/{Modality}_{SeriesNumber}_{series_key}.zip"
# What an empty value becomes, so that no level of a path is ever empty.
FALLBACK = {"Modality": "OT", "SeriesNumber": "0", "PatientID": "patient", "StudyInstanceUID": "study",
            "SeriesInstanceUID": "series"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_INT_SPEC = re.compile(r"[bcdoxXn]$")
_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template that cannot be used; the message says which field and why."""


def safe_name(text: str, fallback: str = "NA") -> str:
    """One path level: letters, digits, '.', '_' and '-' only, at most 64 characters, never '.' or '..'."""
    text = _UNSAFE.sub("_", text.strip())[:64].strip("._")
    return text or fallback


@dataclass(frozen=True)
class _Piece:
    literal: str
    field: str | None
    spec: str


def _parse(component: str, what: str) -> tuple[_Piece, ...]:
    try:
        parsed = list(_FORMATTER.parse(component))
    except ValueError as exc:
        raise TemplateError(f"{what}: {exc} (write a literal brace as {{{{ or }}}})") from None
    pieces = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (conversion or not name.isidentifier()):
            raise TemplateError(f"{what}: {{{name}}} is not a plain field name like {{SeriesNumber}}")
        if spec and "{" in spec:
            raise TemplateError(f"{what}: nested fields in a format spec are not supported")
        pieces.append(_Piece(literal, name, spec or ""))
    return tuple(pieces)


@lru_cache(maxsize=64)  # templates are rendered once per instance; parse each once
def _split(template: str, what: str) -> tuple[tuple[_Piece, ...], ...]:
    if template.startswith("/"):
        raise TemplateError(f"{what}: the template is relative to the outbox; remove the leading '/'")
    components = template.split("/")
    for c in components:
        if c in ("", ".", ".."):
            raise TemplateError(f"{what}: empty, '.' and '..' levels are not allowed ({template!r})")
    return tuple(_parse(c, what) for c in components)


def fields_of(template: str) -> set[str]:
    return {p.field for comp in _split(template, "template") for p in comp if p.field}


def _render_value(value: str, spec: str) -> str:
    if _INT_SPEC.search(spec):
        try:
            number = int(float(value.strip())) if value.strip() else 0
        except ValueError:
            number = 0
        return format(number, spec)
    return format(value, spec)


def _check_field(name: str, special: frozenset[str], what: str) -> None:
    if name in special:
        return
    others = sorted((PATH_SPECIAL | ENTRY_SPECIAL) - special)
    if name in others:
        raise TemplateError(f"{what}: {{{name}}} cannot be used here")
    from anondrop.dicomdict import tag_for_keyword

    if tag_for_keyword(name) is None:
        raise TemplateError(
            f"{what}: unknown field {{{name}}}: use the keyword of a de-identified DICOM attribute "
            f"(e.g. PatientID, StudyDate, SeriesNumber, Modality) or one of {', '.join(sorted(special))}"
        )


def check_templates(naming: Naming) -> None:
    """Syntax, known fields and format specs of both templates (the config loader calls this)."""
    path = _split(naming.path, "naming.path")
    if not naming.path.endswith(".zip"):
        raise TemplateError("naming.path: the last level is the ZIP's name and must end with '.zip'")
    for comp in path:
        for piece in comp:
            if piece.field is None:
                continue
            _check_field(piece.field, PATH_SPECIAL, "naming.path")
            if piece.field in (FOLDERS, FOLDERS_FLAT) and not naming.preserve_folders:
                raise TemplateError(
                    f"naming.path: {{{piece.field}}} needs preserve_folders = true (source folder names are "
                    "left out unless you ask for them)"
                )
            if piece.field == FOLDERS and (len(comp) != 1 or piece.literal or piece.spec):
                raise TemplateError("naming.path: {folders} stands for whole levels; give it a level of its own")
    if path and any(p.field == FOLDERS for p in path[-1]):
        raise TemplateError("naming.path: {folders} cannot be the ZIP's name; use {folders_flat} there")
    entry = _split(naming.entry, "naming.entry")
    if len(entry) != 1:
        raise TemplateError("naming.entry: an entry name has no '/' (entries sit side by side in the ZIP)")
    for piece in entry[0]:
        if piece.field is not None:
            _check_field(piece.field, ENTRY_SPECIAL, "naming.entry")
    sample = {f: "1" for f in fields_of(naming.path) | fields_of(naming.entry)}
    for what, comps in (("naming.path", path), ("naming.entry", entry)):
        for comp in comps:
            for piece in comp:
                if piece.field and piece.field != FOLDERS:
                    try:
                        _render_value(sample[piece.field], piece.spec)
                    except ValueError as exc:
                        raise TemplateError(f"{what}: {{{piece.field}:{piece.spec}}}: {exc}") from None
    if naming.entry == "manifest.json":
        raise TemplateError("naming.entry: manifest.json is the name of the ZIP's manifest")


def identity_reason(keyword: str, policy: Policy) -> str | None:
    """Why a template field would carry an original identifier under this policy (None: it is safe)."""
    from anondrop.deid.actions import TEXT_VRS
    from anondrop.deid.policy import CLEAN, KEEP
    from anondrop.dicomdict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    vr = dictionary_VR(tag)
    action = policy.action(tag)
    if action is None:  # not in Table E.1-1: the safety net by VR decides
        if vr == "UI" and policy.has("retain_uids"):
            return "retain_uids keeps the original UIDs"
        if vr in ("DA", "DT") and policy.date_mode == "keep":
            return "retain_longitudinal_full_dates keeps the original dates"
        if vr in TEXT_VRS and vr not in ("CS", "AS"):
            return "it is free text that the profile keeps (only identifiers found elsewhere are scrubbed)"
        return None
    if action not in (KEEP, CLEAN) or (tag in policy.site_rules and action != KEEP):
        return None
    if vr in ("DA", "DT") and policy.date_mode == "keep" and tag not in policy.site_rules:
        return "retain_longitudinal_full_dates keeps the original dates"
    if vr == "UI" and policy.has("retain_uids") and tag not in policy.site_rules:
        return "retain_uids keeps the original UIDs"
    if action == KEEP:
        how = "a rule in [deidentify] rules says K" if tag in policy.site_rules else "a selected option keeps it"
        return f"the policy keeps its original value ({how})"
    return None


def keywords(naming: Naming) -> set[str]:
    """The DICOM keywords the templates read from the output."""
    special = PATH_SPECIAL | ENTRY_SPECIAL
    return {f for f in fields_of(naming.path) | fields_of(naming.entry) if f not in special}


# -- rendering --------------------------------------------------------------------------------------------
def folder_levels(rel_folder: Iterable[str], rules: Iterable[FolderRule], pseudonym: str) -> list[tuple[int, str]]:
    """(level, output name) for each source folder level the rules keep; dropped levels are left out."""
    by_level = {r.level: r for r in rules}
    out: list[tuple[int, str]] = []
    for level, name in enumerate(rel_folder, start=1):
        rule = by_level.get(level)
        action = rule.action if rule is not None else "keep"
        if action == "drop":
            continue
        if action == "pseudonym":
            out.append((level, safe_name(pseudonym, "patient")))
            continue
        if action == "regex":
            assert rule is not None and rule.pattern is not None
            name = re.sub(rule.pattern, rule.replace, name)
            if not name.strip():
                continue
        out.append((level, safe_name(name)))
    return out


def _render(pieces: Iterable[_Piece], values: Mapping[str, str]) -> str:
    out = []
    for piece in pieces:
        out.append(piece.literal)
        if piece.field is None:
            continue
        value = values.get(piece.field, "")
        if piece.field == FOLDERS_FLAT:
            out.append(format(value, piece.spec))  # already made of safe names
            continue
        out.append(safe_name(_render_value(value, piece.spec), FALLBACK.get(piece.field, "NA")))
    return "".join(out)


@dataclass(frozen=True)
class Namer:
    """Renders one naming configuration; built once per route."""

    naming: Naming

    def zip_path(self, values: Mapping[str, str], folders: list[str]) -> PurePosixPath:
        """The ZIP's path relative to the outbox."""
        values = {**values, FOLDERS_FLAT: "_".join(folders)}
        levels: list[str] = []
        comps = _split(self.naming.path, "naming.path")
        mirrored = any(p.field in (FOLDERS, FOLDERS_FLAT) for c in comps for p in c)
        if self.naming.preserve_folders and not mirrored:
            levels += folders  # preserve_folders alone: the source folders above the template's path
        for comp in comps:
            if len(comp) == 1 and comp[0].field == FOLDERS:
                levels += folders
                continue
            levels.append(_render(comp, values) or "NA")
        name = levels[-1]
        if not name.endswith(".zip"):
            name += ".zip"
        levels[-1] = name
        return PurePosixPath(*levels)

    def entry(self, values: Mapping[str, str], index: int) -> str:
        (comp,) = _split(self.naming.entry, "naming.entry")
        return _render(comp, {**values, INDEX: str(index)})


def unique_entry(name: str, taken: set[str]) -> str:
    """name, or name with _2, _3 ... before its suffix when the template gave two instances the same name."""
    if name not in taken and name != "manifest.json":
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    n = 2
    while True:
        candidate = f"{stem}_{n}{'.' + suffix if dot else ''}"
        if candidate not in taken:
            return candidate
        n += 1


def source_folder(rel: str) -> tuple[str, ...]:
    """The folder levels of one source file, relative to the inbox.

    A member of an inbox ZIP (``A/B/x.zip!C/f.dcm``) sits in A/B/x/C: the ZIP counts as a folder level.
    """
    outer, bang, inner = rel.partition("!")
    parts = list(PurePosixPath(outer).parent.parts)
    if bang:
        parts.append(PurePosixPath(outer).stem)
        parts += PurePosixPath(inner).parent.parts
    return tuple(p for p in parts if p not in ("", "."))


def common_folder(folders: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """The deepest folder holding every file of a series (a series may span folders)."""
    common: list[str] = []
    for level in zip(*folders, strict=False):  # folders of unequal depth: up to the shallowest
        if any(name != level[0] for name in level):
            break
        common.append(level[0])
    return tuple(common)


def as_path(outbox: Path, rel: PurePosixPath) -> Path:
    return outbox.joinpath(*rel.parts)
