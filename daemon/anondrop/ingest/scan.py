"""Walk the inbox, read just enough of each header to place a file in its series, unpack ZIP containers.

Nothing here de-identifies: the scan only answers "which files belong to which series" and "which files
are bad". Headers are read up to the pixel data and only the grouping attributes are decoded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from anondrop.ingest.containers import JUNK_DIRS, JUNK_NAMES, is_zip_head  # one list of OS junk for folders and ZIPs

# pydicom only for the files the quick reader below declines: the main process reads headers itself while
# its workers start, and it does not import pydicom for that (see pipeline.Workers).
if TYPE_CHECKING:
    from pydicom import Dataset

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# BadFile.code of a ZIP archive found in the inbox (read_info tells it from its first bytes): not bad, a
# container, which the caller unpacks and whose members it reads instead.
CONTAINER = "container"
OVERRIDE_NAME = "anondrop.toml"
_GROUPING_TAGS = [
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x0020000D,  # StudyInstanceUID
    0x0020000E,  # SeriesInstanceUID
    0x00200013,  # InstanceNumber
]


@dataclass(frozen=True)
class FileInfo:
    """One DICOM instance found in the inbox. `rel` is its journal key (relative to the inbox)."""

    path: Path
    rel: str
    size: int
    mtime_ns: int
    study_uid: str
    series_uid: str
    sop_uid: str
    instance_number: int | None
    container: Path | None = None  # the inbox ZIP this file was unpacked from
    attrs: tuple[tuple[int, str], ...] = ()  # (tag, value) of the attributes routes match on
    # The file's inode and status-change time when it was read here: any write since changes the ctime (which
    # no program can set back), so the same (size, mtime, ctime, inode) later means the same bytes.
    inode: int = 0
    ctime_ns: int = 0

    @property
    def series_key(self) -> tuple[str, str]:
        return (self.study_uid, self.series_uid)


@dataclass(frozen=True)
class BadFile:
    path: Path
    rel: str
    code: str
    message: str
    container: Path | None = None


@dataclass
class Inventory:
    series: dict[tuple[str, str], list[FileInfo]] = field(default_factory=dict)
    bad: list[BadFile] = field(default_factory=list)
    containers: list[Path] = field(default_factory=list)
    dicomdirs: list[Path] = field(default_factory=list)
    rejected_containers: list[BadFile] = field(default_factory=list)

    def add(self, info: FileInfo) -> None:
        self.series.setdefault(info.series_key, []).append(info)


def is_ignored(name: str, patterns: list[str]) -> bool:
    """Hidden names, OS junk and partial-download names are never read (they may still be written)."""
    if name.startswith(".") or name.casefold() in JUNK_NAMES or name == OVERRIDE_NAME:
        return True
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def walk(root: Path, patterns: list[str]) -> Iterator[tuple[Path, str]]:
    """(path, path relative to root) of every candidate file below root, in a stable order: a folder's files
    by name, then its subfolders by name. Hidden and junk folders are skipped, symbolic links are not
    followed, unreadable folders are passed over. The directory entries say what is a regular file: no
    call per file."""
    yield from _walk(str(root), "", patterns)


def _walk(folder: str, prefix: str, patterns: list[str]) -> Iterator[tuple[Path, str]]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    subfolders = []
    for entry in entries:
        name = entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                if not name.startswith(".") and name.casefold() not in JUNK_DIRS:
                    subfolders.append(entry)
            elif entry.is_file(follow_symlinks=False) and not is_ignored(name, patterns):
                yield Path(entry.path), prefix + name
        except OSError:
            continue
    for entry in subfolders:
        yield from _walk(entry.path, f"{prefix}{entry.name}/", patterns)


def _last_tag(extra: tuple[int, ...]) -> int:
    # Elements are stored in tag order and the grouping UIDs all sit in groups 0008 and 0020: stop there
    # (or after the last attribute a route matches on) instead of parsing the rest of the header; the
    # de-identification pass reads it anyway. The pixel data is never read.
    return min(max((0x00200013, *extra)), 0x7FE0000F)


def _read_grouping(path: Path, force: bool, extra: tuple[int, ...] = ()) -> Dataset:
    from pydicom.filereader import read_partial
    from pydicom.tag import BaseTag

    last = _last_tag(extra)

    def past(tag: BaseTag, vr: str | None, length: int) -> bool:
        return int(tag) > last

    with path.open("rb") as fh:
        return read_partial(fh, stop_when=past, force=force, specific_tags=[*_GROUPING_TAGS, *extra])


def _attr(ds: Dataset, tag: int) -> str:
    from pydicom.multival import MultiValue

    elem = ds.get(tag)
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip("\0 ")


# -- the quick path: the common Part 10 file, read as raw elements --------------------------------------------
_QUICK_BYTES = 16384  # the grouping attributes sit in the first few kilobytes of a header
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_VRS = frozenset({
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF", b"OL",
    b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US",
    b"UT", b"UV",
})
_IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_QUICK_TS = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})  # big endian, deflated
_UNDEFINED = 0xFFFFFFFF
_EXPLICIT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_IMPLICIT = struct.Struct("<HHI")  # group, element, 32-bit length
_U32 = struct.Struct("<I")


def _quick_values(data: bytes, last: int, wanted: frozenset[int]) -> tuple[str, dict[int, str]] | None:
    """(MediaStorageSOPClassUID, {tag: text}) of a Part 10 file in little endian, without pydicom, from its
    first _QUICK_BYTES bytes (or all of it, when shorter).

    Reading 5 UIDs with pydicom costs a millisecond a file, most of a backlog's inventory. This reads the
    elements' bytes directly, and answers None for anything unusual (no preamble, big endian or deflated,
    an undefined length before the last wanted tag, a header longer than the first block, non-ASCII text,
    a length running past the end): pydicom then reads the file and says what is wrong with it.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    whole = len(data) < _QUICK_BYTES  # the block holds the whole file
    size = len(data)
    meta: dict[int, bytes] = {}
    pos = 132
    while True:  # the file meta: explicit VR little endian, group 0002
        if pos + 8 > size:
            return None
        group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
        if group != 2:
            break
        if vr not in _VRS:
            return None
        start = pos + 8
        if vr in _LONG_VRS:
            if pos + 12 > size:
                return None
            (length,) = _U32.unpack_from(data, pos + 8)
            start = pos + 12
        end = start + length
        if length == _UNDEFINED or end > size:
            return None
        meta[element] = data[start:end]
        pos = end
    ts = meta.get(0x0010, b"").rstrip(b"\0 ").decode("ascii", "replace")
    if not ts or ts in _NOT_QUICK_TS:
        return None
    implicit = ts == _IMPLICIT_LE
    values: dict[int, str] = {}
    while True:  # the dataset, up to the last wanted tag
        if pos == size and whole:
            break
        if pos + 8 > size:
            return None
        if implicit:
            group, element, length = _IMPLICIT.unpack_from(data, pos)
            tag = group << 16 | element
            if tag > last:
                break
            if data[pos + 4 : pos + 6] in _VRS:
                return None  # an explicit VR in an implicit VR file: pydicom copes
            start = pos + 8
        else:
            group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
            tag = group << 16 | element
            if tag > last:
                break
            if vr not in _VRS:
                return None  # an implicit VR in an explicit VR file: pydicom copes
            start = pos + 8
            if vr in _LONG_VRS:
                if pos + 12 > size:
                    return None
                (length,) = _U32.unpack_from(data, pos + 8)
                start = pos + 12
        end = start + length
        if length == _UNDEFINED or end > size:
            return None
        if tag in wanted:
            raw = data[start:end]
            if not raw.isascii():
                return None
            values[tag] = "\\".join(v.strip("\0 ") for v in raw.decode("ascii").split("\\"))
        pos = end
    return meta.get(0x0002, b"").rstrip(b"\0 ").decode("ascii", "replace"), values


def read_info(
    path: Path, rel: str, container: Path | None = None, extra: tuple[int, ...] = (), *, sniff_zip: bool = True
) -> FileInfo | BadFile:
    """Place one file: a FileInfo, or a BadFile with the quarantine reason (or CONTAINER for a ZIP archive
    outside a container, unless `sniff_zip` is off: the daemon tells containers apart before it reads).

    `extra`: tags of attributes the routes match on, read into FileInfo.attrs.
    """
    try:
        st = path.stat()
    except OSError as exc:
        return BadFile(path, rel, "unreadable", f"cannot read the file: {exc.strerror}", container)
    try:
        with path.open("rb") as fh:
            head = fh.read(_QUICK_BYTES)
    except OSError:
        head = b""  # pydicom's read below says what the problem is
    if sniff_zip and container is None and is_zip_head(head):
        return BadFile(path, rel, CONTAINER, "a ZIP archive in the inbox: its members are read instead")
    quick = _quick_values(head, _last_tag(extra), frozenset((*_GROUPING_TAGS, *extra))) if head else None
    if quick is not None:
        return _info(path, rel, st, container, extra, *quick)
    return _read_info_pydicom(path, rel, st, container, extra)


def _read_info_pydicom(
    path: Path, rel: str, st: os.stat_result, container: Path | None, extra: tuple[int, ...]
) -> FileInfo | BadFile:
    """read_info for a file the quick reader declines: pydicom reads it, and says what is wrong with it."""
    from anondrop.lean import install

    install()
    from pydicom.errors import InvalidDicomError

    try:
        ds = _read_grouping(path, force=False, extra=extra)
    except InvalidDicomError:
        try:
            ds = _read_grouping(path, force=True, extra=extra)
        except Exception:
            return BadFile(path, rel, "not-dicom", "not a DICOM file (no 'DICM' preamble)", container)
        if "SOPInstanceUID" not in ds and "SeriesInstanceUID" not in ds:
            return BadFile(path, rel, "not-dicom", "not a DICOM file (no 'DICM' preamble)", container)
    except PermissionError as exc:
        return BadFile(path, rel, "unreadable", f"permission denied: {exc.strerror}", container)
    except (EOFError, ValueError, OSError, KeyError, TypeError, NotImplementedError) as exc:
        return BadFile(path, rel, "truncated", f"the header cannot be read to its end ({exc})", container)
    meta = getattr(ds, "file_meta", None)
    values = {t: _attr(ds, t) for t in (*_GROUPING_TAGS, *extra)}
    return _info(path, rel, st, container, extra, str(getattr(meta, "MediaStorageSOPClassUID", "")), values)


_UID_TAGS = (("StudyInstanceUID", 0x0020000D), ("SeriesInstanceUID", 0x0020000E), ("SOPInstanceUID", 0x00080018))


def _info(
    path: Path, rel: str, st: os.stat_result, container: Path | None, extra: tuple[int, ...], media_class: str,
    values: dict[int, str],
) -> FileInfo | BadFile:
    if media_class == DICOMDIR_SOP_CLASS:
        return BadFile(path, rel, "dicomdir", "DICOMDIR index (never copied out)", container)
    uids = {}
    for kw, tag in _UID_TAGS:
        value = values.get(tag, "").strip("\0 ")
        if not value:
            return BadFile(
                path, rel, "missing-uid", f"the file has no {kw}, so its series is unknown", container
            )
        uids[kw] = value
    try:
        number = values.get(0x00200013, "").strip()
        inst = int(number) if number else None
    except ValueError:
        inst = None
    return FileInfo(
        path=path,
        rel=rel,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        instance_number=inst,
        container=container,
        attrs=tuple((t, values.get(t, "")) for t in extra),
        inode=st.st_ino,
        ctime_ns=st.st_ctime_ns,
    )


def unpack_dir(state: Path, zip_path: Path) -> Path:
    """Where a container's members are unpacked: under state/, named by a hash (never by the ZIP's name)."""
    st = zip_path.stat()
    digest = hashlib.sha256(f"{zip_path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:20]
    return state / "unpacked" / digest
