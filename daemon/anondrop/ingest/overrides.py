"""Per-drop overrides: an ``anondrop.toml`` in a series' folder (or an ancestor, up to its route's folder or
the inbox) sets values that go out for that drop, e.g. a teacher's ``PatientName = "Case 12"``.

Keys are attribute keywords, values strings. The file nearest to the series wins key by key. Only the
attributes in ALLOWED can be set: the ones people review and edit by hand. The values replace what the
profile would write (the pseudonym, the emptied description); the release gate still checks them against
the series' identifiers. The file is read when the series is processed, so an edit made while the series
is still arriving applies; it is never delivered.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from anondrop.dicomdict import tag_for_keyword
from anondrop.ingest.scan import OVERRIDE_NAME

# keyword -> (VR, longest value the VR allows)
ALLOWED = {
    "PatientName": ("PN", 64),
    "PatientID": ("LO", 64),
    "StudyDescription": ("LO", 64),
    "SeriesDescription": ("LO", 64),
    "StudyID": ("SH", 16),
    "AccessionNumber": ("SH", 16),
}


class OverrideError(Exception):
    """An override file that cannot be used; the series goes to quarantine with this sentence."""

    code = "override-invalid"


@dataclass(frozen=True)
class Overrides:
    values: tuple[tuple[str, str], ...] = ()  # (keyword, value)

    def by_tag(self) -> dict[int, tuple[str, str]]:
        """tag -> (VR, value), as the engine takes them."""
        out = {}
        for kw, value in self.values:
            tag = tag_for_keyword(kw)
            assert tag is not None
            out[int(tag)] = (ALLOWED[kw][0], value)
        return out


def _check(keyword: str, value: object, where: str) -> str:
    if keyword not in ALLOWED:
        raise OverrideError(
            f"{where}: {keyword!r} cannot be set here; the keys an override may set are "
            f"{', '.join(ALLOWED)}"
        )
    if not isinstance(value, str):
        raise OverrideError(f"{where}: {keyword} must be a string in quotes, like {keyword} = \"Case 12\"")
    vr, longest = ALLOWED[keyword]
    text = value.strip()
    if not text:
        raise OverrideError(f"{where}: {keyword} is empty; remove the key to keep the de-identified value")
    if "\\" in text or any(ord(c) < 32 for c in text):
        raise OverrideError(f"{where}: {keyword} must be one line without backslashes")
    if vr == "PN":
        if any(len(group) > longest for group in text.split("=")) or text.count("^") > 4:
            raise OverrideError(f"{where}: {keyword} is a person name of at most {longest} characters, "
                                "with up to five parts separated by ^ (Family^Given^Middle^Prefix^Suffix)")
    elif len(text) > longest:
        raise OverrideError(f"{where}: {keyword} is longer than the {longest} characters a {vr} value may have")
    if vr == "SH" and not text.isascii():
        raise OverrideError(f"{where}: {keyword} must be plain ASCII text")
    return text


def read_file(path: Path, label: str) -> dict[str, str]:
    """One override file's values; OverrideError says what is wrong (never quoting a value)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise OverrideError(f"{label}: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise OverrideError(f"{label}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise OverrideError(f"{label}: cannot be read ({exc.strerror})") from None
    return {key: _check(key, value, label) for key, value in raw.items()}


def chain(folder: Path, stop: Path) -> list[Path]:
    """folder and its ancestors up to and including stop (nearest first); just folder if it is not below stop."""
    folders = [folder]
    if folder == stop or stop not in folder.parents:
        return folders
    for parent in folder.parents:
        folders.append(parent)
        if parent == stop:
            break
    return folders


def collect(folders: Iterable[Path]) -> Overrides:
    """Read anondrop.toml in each folder (nearest first); a nearer file's key wins."""
    merged: dict[str, str] = {}
    for depth, folder in enumerate(folders):
        path = folder / OVERRIDE_NAME
        if not path.is_file():
            continue
        label = f"{OVERRIDE_NAME} {depth} level(s) above the series" if depth else f"{OVERRIDE_NAME} of the series"
        for key, value in read_file(path, label).items():
            merged.setdefault(key, value)
    return Overrides(tuple(sorted(merged.items())))
