"""Values the actions write: dummies valid for each VR, date shifts, UID tests.

Dummy values (action D) are fixed, recognisable and valid for their VR (PS3.5 6.2), so dciodvfy accepts them
and nobody mistakes them for data. The release gate never counts them as identifiers.
"""

from __future__ import annotations

import datetime as dt
import re
from functools import cache
from typing import TYPE_CHECKING

from anondrop.dicomdict import dictionary_VR, tag_for_keyword

# pydicom itself only where a function here is given its objects (the policy and the gate's names and
# constants are used where pydicom is not imported: see anondrop.dicomdict).
if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.dataelem import DataElement, RawDataElement
    from pydicom.tag import BaseTag

DUMMY_TEXT = "ANONYMIZED"
DUMMY_DATE = "19000101"
DUMMY_TIME = "000000"
DUMMY_DATETIME = "19000101000000"

# VR -> dummy value for action D (non-zero length, valid for the VR).
DUMMY_BY_VR: dict[str, object] = {
    "AE": "ANONYMOUS",
    "AS": "000Y",
    "CS": DUMMY_TEXT,
    "DA": DUMMY_DATE,
    "DS": "0",
    "DT": DUMMY_DATETIME,
    "IS": "0",
    "LO": DUMMY_TEXT,
    "LT": DUMMY_TEXT,
    "PN": DUMMY_TEXT,
    "SH": DUMMY_TEXT,
    "ST": DUMMY_TEXT,
    "TM": DUMMY_TIME,
    "UC": DUMMY_TEXT,
    "UR": "http://anonymized.invalid",
    "UT": DUMMY_TEXT,
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
    "SV": 0,
    "UV": 0,
    "AT": 0,
    "OB": b"\0\0",
    "OD": b"\0" * 8,
    "OF": b"\0" * 4,
    "OL": b"\0" * 4,
    "OV": b"\0" * 8,
    "OW": b"\0\0",
    "UN": b"\0\0",
}
# Our own fixed outputs, which the release gate must never mistake for a patient's value.
FIXED_VALUES = frozenset(
    {DUMMY_TEXT, DUMMY_DATE, DUMMY_TIME, DUMMY_DATETIME, "ANONYMOUS", "000Y", "YES", "NO", "[REMOVED]"}
)

# PS3.5 Table 6.2-1: maximum value length in characters (per value) of the text VRs the engine edits.
MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240, "UC": None}
TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
STRING_VRS = TEXT_VRS | {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "PN", "TM", "UI", "UR"}
LONG_HEADER_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
ASCII_ONLY_VRS = frozenset({"UI", "DA", "DT", "TM", "CS", "AS", "DS", "IS"})  # values read as ASCII
NUMERIC_VRS = frozenset({"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "AT", "OD", "OF", "OL", "OV"})

# File meta (PS3.10 7.1). The output's is written anew: the standard elements below, for the output's own
# SOP Class, Instance and transfer syntax. The application entity titles and addresses of the source, sender
# and receiver and the private information (META_REMOVE) are dropped; any other meta element is kept (the
# raw walker leaves such a file to the pydicom walker).
META_STANDARD = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013})
META_REMOVE = frozenset({0x00020016, 0x00020017, 0x00020018, 0x00020026, 0x00020027, 0x00020028, 0x00020100,
                         0x00020102})

# Coded values are controlled terminology, not free text: kept inside dummied sequences.
CODE_TAGS = frozenset(
    int(t)
    for k in (
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "LongCodeValue",
        "URNCodeValue",
        "ContextIdentifier",
        "MappingResource",
        "ContextGroupExtensionCreatorUID",
        "ValueType",
        "RelationshipType",
        "ContinuityOfContent",
        "TemplateIdentifier",
        "MappingResourceName",
    )
    if (t := tag_for_keyword(k)) is not None
)

DICOM_UID_ROOT = "1.2.840.10008."
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double float, pixel data


def raw_item(ds: Dataset, tag: int | BaseTag) -> DataElement | RawDataElement | None:
    """The element as stored: raw (undecoded) when never accessed; a deferred value stays unread."""
    # Dataset.get_item(tag, keep_deferred=True) without its Tag() conversion: tags are ints and BaseTags,
    # which hash and compare as their int; this runs for every element of every file, several times.
    return ds._dict.get(tag)  # type: ignore[arg-type]


def vr_of(elem: DataElement | RawDataElement, tag: int) -> str:
    """The VR of a raw or converted element; implicit-VR public elements take the dictionary's VR."""
    vr = elem.VR
    if vr and vr != "UN":
        return str(vr)
    if not (tag >> 16) & 1:
        try:
            return str(dictionary_VR(tag))
        except KeyError:
            pass
    return str(vr or "UN")


@cache
def _uid_dictionary() -> frozenset[str]:
    from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]

    return frozenset(UID_dictionary)


def is_well_known_uid(uid: str) -> bool:
    """SOP classes, transfer syntaxes, coding schemes, well-known frames of reference: never remapped."""
    uid = uid.strip("\0 ")
    return uid.startswith(DICOM_UID_ROOT) or uid in _uid_dictionary()


def dummy(vr: str) -> object:
    return DUMMY_BY_VR.get(vr, DUMMY_TEXT if vr in STRING_VRS else b"\0\0")


def empty(vr: str) -> object:
    if vr in STRING_VRS:
        return ""
    return None


_DA = re.compile(r"^(\d{4})(\d{2})?(\d{2})?$")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _shift_date_text(text: str, days: int) -> str:
    """Shift a DA value (or the date part of DT), keeping its precision; '' if it is not a date."""
    text = text.strip()
    match = _DA.match(text)
    if not match:
        return ""
    year, month, day = match.group(1), match.group(2), match.group(3)
    try:
        base = dt.date(int(year), int(month or 1), int(day or 1))
        shifted = base + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    if day:
        return shifted.strftime("%Y%m%d")
    if month:
        return shifted.strftime("%Y%m")
    return f"{shifted.year:04d}"


def shift_da(value: str, days: int) -> str:
    """Shift every value of a DA element (multi-valued and range values included)."""
    out = []
    for part in value.split("\\"):
        part = part.strip()
        if _ISO_DATE.match(part):  # "1961-03-15" (invalid for DA, but written by some systems)
            part = part.replace("-", "")
        if "-" in part:  # a range "A-B" (query form, sometimes stored)
            out.append("-".join(_shift_date_text(p, days) if p else "" for p in part.split("-", 1)))
        else:
            out.append(_shift_date_text(part, days) if part.strip() else "")
    return "\\".join(out)


_DT = re.compile(r"^(\d{4}(?:\d{2}(?:\d{2})?)?)(.*)$")


def shift_dt(value: str, days: int) -> str:
    """Shift the date part of each DT value; time, fraction and UTC offset stay as they are."""
    out = []
    for part in value.split("\\"):
        part = part.strip()
        match = _DT.match(part)
        if not match:
            out.append("")
            continue
        date = _shift_date_text(match.group(1), days)
        out.append(date + match.group(2) if date else "")
    return "\\".join(out)


# Written dates in free text ("Prior CT 2023-11-14", "seen 14/11/2023", "3 March 2021", "Mar 3, 2021",
# "20231114"): any date, not only the series' own, dates an event in the patient's life. Cleaning text
# removes them unless full dates are retained.
_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DATE_TEXT = (
    r"(?<![0-9])(?:19|20)[0-9]{2}[-/.][01]?[0-9][-/.][0-3]?[0-9](?![0-9])"
    r"|(?<![0-9])[0-3]?[0-9][-/.][01]?[0-9][-/.](?:19|20)?[0-9]{2}(?![0-9])"
    r"|(?<![0-9])(?:19|20)[0-9]{2}[01][0-9][0-3][0-9](?![0-9])"
    rf"|(?<![0-9A-Za-z])[0-3]?[0-9](?:st|nd|rd|th)?\s+{_MONTHS}\s+(?:19|20)[0-9]{{2}}(?![0-9])"
    rf"|(?<![A-Za-z]){_MONTHS}\s+[0-3]?[0-9](?:st|nd|rd|th)?,?\s+(?:19|20)[0-9]{{2}}(?![0-9])"
)
FREE_TEXT_DATES = re.compile(_DATE_TEXT.encode(), re.IGNORECASE)
_FREE_TEXT_DATES_STR = re.compile(_DATE_TEXT, re.IGNORECASE)


def scrub_free_text_dates(text: str) -> str:
    return _FREE_TEXT_DATES_STR.sub("[REMOVED]", text)
