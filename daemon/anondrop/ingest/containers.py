"""Unpack ZIP containers dropped in the inbox without trusting anything the archive says about itself.

A ZIP in the inbox is a bag of DICOM files, and also the classic way to attack an unpacker: names that climb
out of the target folder (zip-slip), links, device nodes, sizes that lie, archives that expand a thousandfold.
So every entry name is rebuilt from sanitised parts, every limit is checked first on the declared sizes and
then again on the bytes actually produced, and a rejected container leaves nothing of itself in `dest`.
"""

from __future__ import annotations

import contextlib
import logging
import lzma
import os
import re
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger("anondrop")

MiB = 1 << 20
GiB = 1 << 30

# Local file header, empty archive (end record only), and the "spanned archive" marker that some tools write
# in front of the first local header. Anything else is not a ZIP we will open.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_DICM_OFFSET = 128  # PS3.10 7.1: 128-byte preamble, then "DICM"
_CHUNK = MiB
_MAX_NAME_BYTES = 200  # below the usual 255-byte limit, leaving room for a "_N" de-duplication suffix

JUNK_NAMES = frozenset(n.casefold() for n in ("Thumbs.db", "desktop.ini", "ehthumbs.db", "Icon\r"))
JUNK_DIRS = frozenset(n.casefold() for n in ("__MACOSX", "$RECYCLE.BIN", "System Volume Information"))
_SUPPORTED_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
_FLAG_ENCRYPTED = 0x0001
_FLAG_STRONG_ENCRYPTION = 0x0040
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Errors the stdlib decoders raise on damaged or hostile data. OSError is here because bz2 reports a bad
# stream with it and a crafted header offset can make a seek fail; errors while *writing* are not caught.
_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    OverflowError,
    OSError,
)


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on what one container (nested containers included) may expand to.

    `max_depth` counts ZIP levels: 1 is the container alone, 2 also unpacks ZIPs found inside it.
    `ratio_min_bytes`: the compression-ratio checks apply only above this size, because a small blank image
    legitimately deflates a thousandfold and cannot hurt anyone; the ratio exists to stop a bomb early.
    """

    max_entries: int = 100_000
    max_total_bytes: int = 64 * GiB
    max_ratio: float = 200.0
    max_depth: int = 2
    ratio_min_bytes: int = MiB

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_total_bytes", "max_ratio", "max_depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ZipLimits.{name} must be positive, not {getattr(self, name)!r}")
        if self.ratio_min_bytes < 0:
            raise ValueError(f"ZipLimits.ratio_min_bytes must not be negative, not {self.ratio_min_bytes!r}")


class ContainerRejected(Exception):
    """The container is not unpacked; `reason` says why in a sentence meant for the quarantine reason file."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_zip(path: Path) -> bool:
    """True when the file starts like a ZIP archive, whatever its name says.

    A file with the DICOM magic at offset 128 is DICOM even when its free-form preamble looks like a ZIP
    (dual-personality files exist): treating it as a container would lose the instance.
    """
    try:
        with path.open("rb") as f:
            head = f.read(_DICM_OFFSET + 4)
    except OSError:
        return False
    return is_zip_head(head)


def is_zip_head(head: bytes) -> bool:
    """is_zip for a file's first bytes (its first 132, or all of it when shorter)."""
    if head[_DICM_OFFSET : _DICM_OFFSET + 4] == b"DICM":
        return False
    return head[:4] in _ZIP_MAGIC


def unpack_zip(zip_path: Path, dest: Path, limits: ZipLimits) -> list[Path]:
    """Extract every regular file of `zip_path` (and of ZIPs nested in it) below `dest`; return their paths.

    Raises ContainerRejected for an unreadable, damaged, encrypted, oversized or empty container, after
    removing whatever was already written. Errors writing `dest` (a full disk) and a container that vanished
    propagate as OSError, also after cleanup: they say nothing about the container, which must not be
    quarantined for them.
    """
    unpacker = _Unpacker(dest, limits)
    try:
        unpacker.mkdirs(dest)
        unpacker.unpack(zip_path, prefix=(), depth=1, label="")
        if not unpacker.outputs:
            raise ContainerRejected(
                "the ZIP contains no files to process (only folders, links, hidden or OS junk files)"
            )
    except BaseException:
        unpacker.cleanup()
        raise
    return unpacker.outputs


# -- entry names ------------------------------------------------------------------------------------------
def _name_parts(raw: str) -> list[str] | None:
    """The entry name as safe path parts below dest, or None when the entry is junk or hidden.

    Both separators count (Windows tools write backslashes); absolute roots, drive letters, "." and ".."
    are dropped rather than obeyed, so no combination of parts can leave dest.
    """
    parts = [p for p in re.split(r"[/\\]", raw) if p not in ("", ".", "..")]
    if parts and _DRIVE.match(parts[0]):
        parts[0] = _DRIVE.sub("", parts[0])
        if not parts[0]:
            parts.pop(0)
    if not parts:
        return None
    if any(p.startswith(".") or p.casefold() in JUNK_DIRS for p in parts):
        return None
    if parts[-1].casefold() in JUNK_NAMES:
        return None
    return [_fit(_CONTROL.sub("_", p)) for p in parts]


def _fit(part: str) -> str:
    """Shorten an over-long name part, keeping its extension (the scan and the user both look at it)."""
    if len(part.encode()) <= _MAX_NAME_BYTES:
        return part
    stem, dot, ext = part.rpartition(".")
    if not dot or len(ext) > 16:
        stem, ext = part, ""
    keep = _MAX_NAME_BYTES - len(ext.encode()) - 1
    short = stem.encode()[:keep].decode(errors="ignore")
    return f"{short}.{ext}" if ext else short


def _numbered(part: str, n: int) -> str:
    stem, dot, ext = part.rpartition(".")
    if not dot or not stem:
        return f"{part}_{n}"
    return f"{stem}_{n}.{ext}"


def _show(name: str) -> str:
    """An entry name fit for a log line or a reason file: no control characters, bounded length."""
    text = _CONTROL.sub("?", name)
    return text if len(text) <= 120 else text[:117] + "..."


class _Names:
    """Unique places below dest for sanitised entry paths: duplicates never overwrite each other.

    Comparison is case-insensitive so that an unpacked folder stays valid when copied to a case-insensitive
    filesystem (SMB shares, macOS), and a name already on disk is never reused.
    """

    def __init__(self, dest: Path) -> None:
        self._dest = dest
        self._used: dict[str, bool] = {}  # casefolded relative path -> is a directory
        self._dirs: dict[str, str] = {}  # casefolded requested folder -> the folder chosen for it

    def folder(self, parts: tuple[str, ...]) -> str:
        """The relative folder chosen for requested folder parts (a file of the same name pushes it aside)."""
        chosen = ""
        for i, part in enumerate(parts):
            key = "/".join(parts[: i + 1]).casefold()
            if key in self._dirs:
                chosen = self._dirs[key]
                continue
            n, candidate = 1, part
            while not self._free_for_dir(_join(chosen, candidate)):
                n += 1
                candidate = _numbered(part, n)
            chosen = _join(chosen, candidate)
            self._dirs[key] = chosen
            self._used[chosen.casefold()] = True
        return chosen

    def file(self, folder: str, name: str) -> str:
        n, candidate = 1, name
        while not self._free_for_file(_join(folder, candidate)):
            n += 1
            candidate = _numbered(name, n)
        rel = _join(folder, candidate)
        self._used[rel.casefold()] = False
        return rel

    def _free_for_dir(self, rel: str) -> bool:
        if rel.casefold() in self._used:
            return self._used[rel.casefold()]
        path = self._dest / rel
        return not os.path.lexists(path) or (path.is_dir() and not path.is_symlink())

    def _free_for_file(self, rel: str) -> bool:
        return rel.casefold() not in self._used and not os.path.lexists(self._dest / rel)


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


# -- the unpacker -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    parts: list[str]
    label: str


class _Unpacker:
    """One container, its nested containers included, against one shared budget of entries and bytes."""

    def __init__(self, dest: Path, limits: ZipLimits) -> None:
        self.dest = dest
        self.limits = limits
        self.names = _Names(dest)
        self.outputs: list[Path] = []
        self.entries = 0
        self.written = 0
        self.top_size = 0
        self.top_mtime = 0.0
        self._files: list[Path] = []  # everything created, for cleanup after a rejection
        self._dirs: list[Path] = []
        self._nested = 0
        self._dest_real: Path | None = None

    def unpack(self, zip_path: Path, prefix: tuple[str, ...], depth: int, label: str) -> None:
        st = zip_path.stat()
        size = st.st_size
        if depth == 1:
            self.top_size, self.top_mtime = size, st.st_mtime
        try:
            zf = zipfile.ZipFile(zip_path)
        except FileNotFoundError:
            raise  # gone since the scan saw it: nothing to judge, nothing to quarantine
        except PermissionError as exc:
            # Like an unreadable DICOM file: set aside with a reason rather than stopping the whole run.
            raise ContainerRejected(f"cannot read the ZIP: {exc.strerror}") from exc
        except _READ_ERRORS as exc:
            where = f"nested ZIP '{_show(label.rstrip('/'))}' is " if label else ""
            raise ContainerRejected(f"{where}not a readable ZIP: {exc}") from exc
        with zf:
            entries = self._select(zf, label)
            self._check_declared(zf, entries, size, label)
            for entry in entries:
                self._extract(zf, entry, prefix, depth)

    def _select(self, zf: zipfile.ZipFile, label: str) -> list[_Entry]:
        infos = zf.infolist()
        self.entries += len(infos)
        if self.entries > self.limits.max_entries:
            raise ContainerRejected(f"too many entries: {self.entries} or more (limit {self.limits.max_entries})")
        chosen = []
        for info in infos:
            name = label + info.filename
            kind = _kind(info)
            if kind != "file":
                if kind != "folder":
                    log.warning("ZIP entry '%s' skipped: a %s is never unpacked", _show(name), kind)
                continue
            parts = _name_parts(info.filename)
            if parts is None:
                log.debug("ZIP entry '%s' skipped: hidden or OS junk", _show(name))
                continue
            chosen.append(_Entry(info, parts, name))
        return chosen

    def _check_declared(self, zf: zipfile.ZipFile, entries: list[_Entry], size: int, label: str) -> None:
        """Refuse before writing anything when the directory itself admits to a bomb or an unreadable entry."""
        lim = self.limits
        for e in entries:
            info = e.info
            if info.flag_bits & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION):
                raise ContainerRejected(f"encrypted entries are not supported (entry '{_show(e.label)}')")
            if info.compress_type not in _SUPPORTED_METHODS:
                raise ContainerRejected(
                    f"entry '{_show(e.label)}' uses compression method {info.compress_type}, which is not "
                    f"supported (use {', '.join(_SUPPORTED_METHODS.values())})"
                )
            self._check_ratio(e.label, info.file_size, info.compress_size)
        # Each entry's compressed bytes occupy their own span of the file, so a sum larger than the file means
        # overlapping entries: the "one kernel, many names" bomb that per-entry checks alone miss.
        if sum(i.compress_size for i in zf.infolist()) > size:
            where = f" in '{_show(label.rstrip('/'))}'" if label else ""
            raise ContainerRejected(f"zip bomb: entries{where} overlap or declare more data than the file holds")
        declared = sum(e.info.file_size for e in entries)
        if self.written + declared > lim.max_total_bytes:
            raise ContainerRejected(
                f"the ZIP would expand to {_human(self.written + declared)} (limit {_human(lim.max_total_bytes)})"
            )
        if declared > lim.ratio_min_bytes and declared > lim.max_ratio * max(size, 1):
            raise ContainerRejected(
                f"zip bomb: the ZIP expands {declared / max(size, 1):.0f}x in total (limit {lim.max_ratio:g}x)"
            )

    def _check_ratio(self, label: str, produced: int, compressed: int) -> None:
        lim = self.limits
        if produced > lim.ratio_min_bytes and produced > lim.max_ratio * max(compressed, 1):
            raise ContainerRejected(
                f"zip bomb: entry '{_show(label)}' expands {produced / max(compressed, 1):.0f}x "
                f"(limit {lim.max_ratio:g}x)"
            )

    def _extract(self, zf: zipfile.ZipFile, entry: _Entry, prefix: tuple[str, ...], depth: int) -> None:
        is_nested = entry.parts[-1].casefold().endswith(".zip")
        if is_nested:
            # Unpacked under a hidden name no sanitised entry can take (hidden entries are skipped).
            self._nested += 1
            target = self.dest / f".nested-{self._nested}.zip"
        else:
            folder = self.names.folder(prefix + tuple(entry.parts[:-1]))
            target = self.dest / self.names.file(folder, entry.parts[-1])
        self._write(zf, entry, target)
        if not is_nested:
            self.outputs.append(target)
            return
        if not is_zip(target):
            # Named .zip but it is not one: an ordinary member, which the scan will judge on its content.
            folder = self.names.folder(prefix + tuple(entry.parts[:-1]))
            final = self.dest / self.names.file(folder, entry.parts[-1])
            os.rename(target, final)
            self._files.append(final)
            self.outputs.append(final)
            return
        if depth >= self.limits.max_depth:
            raise ContainerRejected(
                f"nested ZIP '{_show(entry.label)}' is deeper than {self.limits.max_depth} levels of ZIPs"
            )
        inner = prefix + tuple(entry.parts[:-1]) + (entry.parts[-1][: -len(".zip")] or "zip",)
        self.unpack(target, inner, depth + 1, entry.label + "/")
        target.unlink()

    def _write(self, zf: zipfile.ZipFile, entry: _Entry, target: Path) -> None:
        self.mkdirs(target.parent)
        self._check_inside(target, entry.label)
        # O_EXCL and O_NOFOLLOW: never overwrite, never write through a link planted in dest.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        # Owner-only: members are identifiable data. No fsync: the container itself stays the durable copy
        # until every member's output is durable, so a crash here only costs a re-unpack.
        fd = os.open(target, flags, 0o600)
        self._files.append(target)
        with os.fdopen(fd, "wb") as out:
            for chunk in self._stream(zf, entry):
                out.write(chunk)
        # The entry's own time, not the time of this unpack: a container kept in the inbox is unpacked again
        # on every pass, and its members must look unchanged to the journal (same path, size and mtime).
        mtime = _entry_mtime(entry.info)
        if mtime is None:
            mtime = self.top_mtime
        os.utime(target, (mtime, mtime))

    def _stream(self, zf: zipfile.ZipFile, entry: _Entry) -> Iterator[bytes]:
        """The entry's bytes, chunk by chunk, each chunk paid for before it is handed out."""
        info, lim = entry.info, self.limits
        produced = 0
        try:
            src: IO[bytes] = zf.open(info)
        except _READ_ERRORS as exc:
            raise ContainerRejected(f"entry '{_show(entry.label)}' cannot be read: {exc}") from exc
        with src:
            while True:
                try:
                    chunk = src.read(_CHUNK)
                except _READ_ERRORS as exc:
                    raise ContainerRejected(f"entry '{_show(entry.label)}' is damaged: {exc}") from exc
                if not chunk:
                    return
                produced += len(chunk)
                self.written += len(chunk)
                # The directory may lie; what counts is what the decoder produces.
                if produced > info.file_size:
                    raise ContainerRejected(
                        f"entry '{_show(entry.label)}' is larger than its header declares ({_human(info.file_size)})"
                    )
                if self.written > lim.max_total_bytes:
                    raise ContainerRejected(f"the ZIP expands to more than {_human(lim.max_total_bytes)} (the limit)")
                self._check_ratio(entry.label, produced, info.compress_size)
                if self.written > lim.ratio_min_bytes and self.written > lim.max_ratio * max(self.top_size, 1):
                    raise ContainerRejected(
                        f"zip bomb: the ZIP expands more than {lim.max_ratio:g}x in total "
                        f"(reached at entry '{_show(entry.label)}')"
                    )
                yield chunk

    def mkdirs(self, folder: Path) -> None:
        missing = []
        p = folder
        while not p.is_dir():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            d.mkdir(mode=0o700)
            self._dirs.append(d)

    def _check_inside(self, target: Path, label: str) -> None:
        """Belt and braces after sanitising: the resolved folder must still be dest or below it."""
        if self._dest_real is None:
            self._dest_real = self.dest.resolve()
        parent = target.parent.resolve()
        if parent != self._dest_real and self._dest_real not in parent.parents:
            raise ContainerRejected(f"entry '{_show(label)}' would be written outside the unpack folder")

    def cleanup(self) -> None:
        for f in reversed(self._files):
            try:
                f.unlink(missing_ok=True)
            except OSError:
                log.warning("could not remove partially unpacked file %s", f)
        for d in reversed(self._dirs):
            with contextlib.suppress(OSError):  # not empty: holds something this unpack did not create
                d.rmdir()


def _kind(info: zipfile.ZipInfo) -> str:
    """What the entry is, from its name and its Unix mode bits (zero bits: a plain file from DOS/Windows)."""
    if info.is_dir():
        return "folder"
    mode = info.external_attr >> 16
    fmt = stat.S_IFMT(mode)
    if fmt == 0 or stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "device or special file"


def _entry_mtime(info: zipfile.ZipInfo) -> float | None:
    """Modification time of an entry: the UTC "extended timestamp" extra field when present (Info-ZIP and
    macOS write it), else the DOS date and time, which are local time. None when neither makes sense."""
    extra = info.extra
    i = 0
    while i + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4 : i + 4 + length]
        if tag == 0x5455 and len(body) >= 5 and body[0] & 1:
            return float(struct.unpack_from("<i", body, 1)[0])
        i += 4 + length
    try:
        return time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
