"""Generate ``anondrop/deid/_ps315.py`` from the DICOM PS3.15 tables kept as JSON.

Usage:  python daemon/tools/gen_ps315.py [--source DIR] [--out FILE] [--check]

The source folder holds PS3.15 Table E.1-1 (profile and option actions), Table E.1-1a (action codes),
Table E.3.10-1 (safe private attributes) and PS3.16 CID 7050 (de-identification method codes), one JSON
file each. The generated module is data only; ``--check`` exits 1 when the committed module differs from
what the tables give (drift), so nobody edits the table by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "dicom-standard" / "ps3.15-2026d"
DEFAULT_OUT = REPO / "daemon" / "anondrop" / "deid" / "_ps315.py"

# Option keys of Table E.1-1 -> the CID 7050 code meaning that names the same option.
OPTION_CODE_MEANING = {
    "retain_safe_private": "Retain Safe Private Option",
    "retain_uids": "Retain UIDs Option",
    "retain_device_identity": "Retain Device Identity Option",
    "retain_institution_identity": "Retain Institution Identity Option",
    "retain_patient_characteristics": "Retain Patient Characteristics Option",
    "retain_longitudinal_full_dates": "Retain Longitudinal Temporal Information Full Dates Option",
    "retain_longitudinal_modified_dates": "Retain Longitudinal Temporal Information Modified Dates Option",
    "clean_descriptors": "Clean Descriptors Option",
    "clean_structured_content": "Clean Structured Content Option",
    "clean_graphics": "Clean Graphics Option",
}
BASIC_CODE_MEANING = "Basic Application Confidentiality Profile"

TAG_RE = re.compile(r"\(([0-9A-Fa-fx]{4}),([0-9A-Fa-fx]{4})\)")


def _load(source: Path, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((source / name).read_text(encoding="utf-8"))
    rows = doc["rows"]
    digest = hashlib.sha256(
        json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    if digest != doc["content_sha256"]:
        raise SystemExit(f"{name}: rows do not match content_sha256; the source table is damaged")
    return doc


def _mask(text: str) -> tuple[int, int]:
    """'50xx' -> (mask, value) over 16 bits; x digits are wildcards."""
    mask = int("".join("0" if c == "x" else "F" for c in text), 16)
    value = int(text.replace("x", "0"), 16)
    return mask, value


def generate(source: Path) -> str:
    e11 = _load(source, "e1_1.json")
    e11a = _load(source, "e1_1a.json")
    e3101 = _load(source, "e3_10_1.json")
    cid = _load(source, "cid_7050.json")
    edition = e11["edition"]
    for doc in (e11a, e3101, cid):
        if doc["edition"] != edition:
            raise SystemExit(f"{doc['table']} is edition {doc['edition']}, Table E.1-1 is {edition}")

    exact: dict[int, tuple[str, str, tuple[tuple[str, str], ...], bool]] = {}
    repeating: list[tuple[int, int, str, str, tuple[tuple[str, str], ...]]] = []
    private_row: tuple[str, str, tuple[tuple[str, str], ...]] | None = None
    for row in e11["rows"]:
        opts = tuple(sorted(row["options"].items()))
        for key in row["options"]:
            if key not in OPTION_CODE_MEANING:
                raise SystemExit(f"unknown option {key!r} in row {row['name']!r}")
        tag_text = row["tag"].upper().replace("X", "x")
        if "gggg is odd" in row["tag"]:
            private_row = (row["name"], row["basic_profile"], opts)
            continue
        match = TAG_RE.fullmatch(tag_text)
        if not match:
            raise SystemExit(f"unparsed tag {tag_text!r}")
        group, elem = match.groups()
        if "x" in group or "x" in elem:
            gm, gv = _mask(group)
            em, ev = _mask(elem)
            repeating.append(((gm << 16) | em, (gv << 16) | ev, row["name"], row["basic_profile"], opts))
            continue
        tag = int(group + elem, 16)
        if tag in exact:
            raise SystemExit(f"duplicate row for {tag_text}")
        exact[tag] = (row["name"], row["basic_profile"], opts, bool(row["in_standard_iod"]))
    if private_row is None:
        raise SystemExit("Table E.1-1 has no private-attributes row")

    safe: dict[tuple[str, int, int], tuple[str, str, str]] = {}
    for row in e3101["rows"]:
        match = TAG_RE.fullmatch(row["tag"].upper().replace("X", "x"))
        if not match or not match.group(2).lower().startswith("xx"):
            raise SystemExit(f"unparsed private tag {row['tag']!r}")
        group = int(match.group(1), 16)
        offset = int(match.group(2)[2:], 16)
        key = (row["private_creator"].strip(), group, offset)
        safe[key] = (row.get("vr", ""), row.get("vm", ""), row.get("meaning", ""))

    by_meaning = {r["code_meaning"]: r for r in cid["rows"]}
    codes: dict[str, tuple[str, str, str]] = {}
    for key, meaning in [("basic", BASIC_CODE_MEANING), *OPTION_CODE_MEANING.items()]:
        r = by_meaning[meaning]
        codes[key] = (r["code_value"], r["scheme_designator"], r["code_meaning"])

    out: list[str] = []
    w = out.append
    w('"""GENERATED by daemon/tools/gen_ps315.py -- do not edit by hand.')
    w("")
    w(f"DICOM PS3.15 edition {edition}: Table E.1-1 (Application Level Confidentiality Profile Attributes),")
    w("Table E.1-1a (action codes), Table E.3.10-1 (Safe Private Attributes); PS3.16 CID 7050.")
    w(f"{e11['acknowledgement']}")
    w('"""')
    w("")
    w("# fmt: off")
    w(f"EDITION = {edition!r}")
    w("SOURCE_SHA256 = {")
    for doc in (e11, e11a, e3101, cid):
        w(f"    {doc['table']!r}: {doc['content_sha256']!r},")
    w("}")
    w(f"OPTIONS = {tuple(OPTION_CODE_MEANING)!r}")
    w("")
    w("# Action codes (Table E.1-1a): code -> meaning.")
    w("ACTION_CODES = {")
    for r in e11a["rows"]:
        w(f"    {r['code']!r}: {r['description']!r},")
    w("}")
    w("")
    w("# tag -> (name, basic profile action, ((option, action), ...), in a standard IOD)")
    w("ATTRIBUTES = {")
    for tag in sorted(exact):
        w(f"    0x{tag:08X}: {exact[tag]!r},")
    w("}")
    w("")
    w("# Repeating-group rows: (mask, value, name, basic action, options); a tag t matches when t & mask == value.")
    w("REPEATING = (")
    for mask, value, name, basic, opts in repeating:
        w(f"    (0x{mask:08X}, 0x{value:08X}, {name!r}, {basic!r}, {opts!r}),")
    w(")")
    w("")
    w("# The row for all private attributes: (name, basic action, options).")
    w(f"PRIVATE = {private_row!r}")
    w("")
    w("# Safe private attributes: (private creator, group, element offset in block) -> (VR, VM, meaning).")
    w("SAFE_PRIVATE = {")
    for key in sorted(safe):
        w(f"    {key!r}: {safe[key]!r},")
    w("}")
    w("")
    w("# CID 7050 codes: 'basic' or option -> (code value, coding scheme designator, code meaning).")
    w("METHOD_CODES = {")
    for key, val in codes.items():
        w(f"    {key!r}: {val!r},")
    w("}")
    w("# fmt: on")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed module has drifted")
    args = ap.parse_args(argv)
    text = generate(args.source)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} differs from what {args.source} gives: run daemon/tools/gen_ps315.py")
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
