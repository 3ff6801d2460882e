"""Walk the inbox, read just enough of each header to place a file in its series, unpack ZIP containers.

Nothing here de-identifies: the scan only answers "which files belong to which series" and "which files
are bad". Headers are read up to the pixel data and only the grouping attributes are decoded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from anondrop.ingest.containers import JUNK_DIRS, JUNK_NAMES  # one list of OS junk for folders and ZIPs

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
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


def walk(root: Path, patterns: list[str]) -> Iterator[Path]:
    """Every candidate file below root, in a stable order; hidden and junk folders are skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.casefold() not in JUNK_DIRS)
        for name in sorted(filenames):
            if not is_ignored(name, patterns):
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def _read_grouping(path: Path, force: bool, extra: tuple[int, ...] = ()) -> Dataset:
    # Elements are stored in tag order and the grouping UIDs all sit in groups 0008 and 0020: stop there
    # (or after the last attribute a route matches on) instead of parsing the rest of the header; the
    # de-identification pass reads it anyway. The pixel data is never read.
    last = min(max((0x00200013, *extra)), 0x7FE0000F)

    def past(tag: BaseTag, vr: str | None, length: int) -> bool:
        return int(tag) > last

    with path.open("rb") as fh:
        return read_partial(fh, stop_when=past, force=force, specific_tags=[*_GROUPING_TAGS, *extra])


def _attr(ds: Dataset, tag: int) -> str:
    elem = ds.get(tag)
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip("\0 ")


def read_info(path: Path, rel: str, container: Path | None = None, extra: tuple[int, ...] = ()) -> FileInfo | BadFile:
    """Place one file: a FileInfo, or a BadFile with the quarantine reason.

    `extra`: tags of attributes the routes match on, read into FileInfo.attrs.
    """
    try:
        st = path.stat()
    except OSError as exc:
        return BadFile(path, rel, "unreadable", f"cannot read the file: {exc.strerror}", container)
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
    if str(getattr(meta, "MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
        return BadFile(path, rel, "dicomdir", "DICOMDIR index (never copied out)", container)
    uids = {}
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(kw, "") or "").strip("\0 ")
        if not value:
            return BadFile(
                path, rel, "missing-uid", f"the file has no {kw}, so its series is unknown", container
            )
        uids[kw] = value
    try:
        number = ds.get("InstanceNumber")
        inst = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
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
        attrs=tuple((t, _attr(ds, t)) for t in extra),
    )


def unpack_dir(state: Path, zip_path: Path) -> Path:
    """Where a container's members are unpacked: under state/, named by a hash (never by the ZIP's name)."""
    st = zip_path.stat()
    digest = hashlib.sha256(f"{zip_path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:20]
    return state / "unpacked" / digest
