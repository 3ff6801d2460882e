"""One ZIP per series, written so that a reader of the outbox sees either nothing or the whole file.

The ZIP is built under a hidden temporary name in its final folder (same filesystem, so the last step is an
atomic rename; hidden, so `*.zip` globs and folder watchers skip it), fsynced, renamed into place without
ever replacing an existing file, and the folder is fsynced. Only once `commit()` has returned is the output
durable, and only then may the caller dispose of the sources.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from anondrop import libc

try:  # CRC-32 with carry-less multiplication: four times zlib's speed, and the same checksum
    from isal.isal_zlib import crc32 as crc32
except ImportError:  # a platform without an isal wheel
    from zlib import crc32 as crc32

log = logging.getLogger("anondrop")

Compression = Literal["stored", "deflate"]
MANIFEST_NAME = "manifest.json"
TEMP_PATTERN = ".*.tmp-*"
_METHODS: dict[str, int] = {"stored": zipfile.ZIP_STORED, "deflate": zipfile.ZIP_DEFLATED}
# Entry timestamps are fixed at the ZIP epoch: the processing time would otherwise sit in every entry, and
# the day a study is dropped usually is the day it was acquired, which date shifting exists to hide.
_ENTRY_TIME = (1980, 1, 1, 0, 0, 0)
_ENTRY_MODE = (stat.S_IFREG | 0o644) << 16
_UNIX = 3  # ZipInfo.create_system: makes unzip honour the mode bits above
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A temp file untouched this long belongs to no live writer, even if its pid has been reused since.
_STALE_AFTER_S = 3600.0


class SeriesZip:
    """A ZIP being written under a hidden temp name; `commit()` publishes it, anything else removes it.

    Use as a context manager: an exception inside the block, or leaving it without `commit()`, aborts.
    Entries are written through as they are added, so memory stays flat whatever the series size.
    """

    def __init__(self, final_path: Path, compression: Compression = "stored", compresslevel: int = 6) -> None:
        if compression not in _METHODS:
            raise ValueError(f"compression must be 'stored' or 'deflate', not {compression!r}")
        if not 0 <= compresslevel <= 9:
            raise ValueError(f"compresslevel must be 0 to 9, not {compresslevel}")
        self.final_path = final_path
        self._method = _METHODS[compression]
        self._level = compresslevel
        self._new_dirs = _makedirs(final_path.parent)
        self.temp_path = final_path.parent / _temp_name(final_path.name)
        fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._file = os.fdopen(fd, "wb")
        try:
            self._zip = zipfile.ZipFile(self._file, "w", compression=self._method, allowZip64=True)
        except BaseException:
            self._file.close()
            self.temp_path.unlink(missing_ok=True)
            raise
        self._entries: list[dict[str, object]] = []
        self._names: set[str] = set()
        self._state: Literal["open", "committed", "aborted"] = "open"
        self._unflushed = 0  # bytes written since the kernel was last asked to start writing them out

    def __enter__(self) -> SeriesZip:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state == "open":
            if exc_type is None:
                log.warning("%s: left without commit(); the partial ZIP is removed", self.final_path.name)
            self.abort()

    def add(self, name: str, data: bytes) -> str:
        """Write one entry; returns the SHA-256 (hex) of its bytes, as recorded in the manifest."""
        self._require_open()
        self._check_name(name)
        info = _entry_info(name, self._method)
        try:
            self._zip.writestr(info, data, compresslevel=self._level)
        except BaseException:
            self.abort()  # a half-written entry leaves the ZIP unusable; nothing may be committed from it
            raise
        digest = hashlib.sha256(data).hexdigest()
        self._names.add(name.casefold())
        self._entries.append({"name": name, "size": len(data), "sha256": digest})
        return digest

    def add_stream(self, name: str, parts: Iterable[bytes | memoryview], *, size: int, crc: int, sha256: str) -> str:
        """Write one entry from parts whose size, CRC-32 and SHA-256 were computed elsewhere (a worker).

        The parts are streamed into the entry, so a large pixel span never needs to sit in this process's
        memory whole. The CRC that zipfile computes on the way must equal the given one: a mismatch means a
        source changed between de-identification and packaging, and the entry (and so the ZIP) is refused.
        """
        self._require_open()
        self._check_name(name)
        info = _entry_info(name, self._method)
        info.file_size = size
        try:
            with self._zip.open(info, "w", force_zip64=size > zipfile.ZIP64_LIMIT) as entry:
                for part in parts:
                    entry.write(part)
            if crc != info.CRC or info.file_size != size:
                raise OSError(f"entry {name}: content changed while it was packaged (CRC or size mismatch)")
        except BaseException:
            self.abort()
            raise
        return self._added(name, size, sha256)

    def add_parts(
        self, name: str, parts: Sequence[bytes | tuple[int, int]], source: int | None, *, size: int, crc: int,
        sha256: str,
    ) -> str:
        """Write one entry made of bytes and (offset, length) spans of the open file `source`; its size,
        CRC-32 and SHA-256 were computed elsewhere (a worker), over the whole entry.

        Stored, the entry is written as it is: the local header with the given CRC and sizes, the bytes, and
        the spans copied from file to file by the kernel, so that pixel data never passes through this
        process. The caller vouches that the spans still hold what the worker read (pipeline compares the
        source's inode, size, mtime and ctime with the inventory's). Parts that do not add up to `size`, or a
        source that ends before a span does, refuse the entry (and so the ZIP). Deflated, the parts are read
        and go through zipfile, which checks the CRC.
        """
        if self._method != zipfile.ZIP_STORED:
            return self.add_stream(name, read_parts(source, parts, name), size=size, crc=crc, sha256=sha256)
        self._require_open()
        self._check_name(name)
        info = _entry_info(name, self._method)
        info.file_size = info.compress_size = size
        info.CRC = crc
        try:
            if sum(len(p) if isinstance(p, bytes) else p[1] for p in parts) != size:
                raise OSError(f"entry {name}: its parts do not add up to its size")
            self._file.flush()  # what zipfile wrote so far, before writing past it by file offset
            info.header_offset = self._zip.start_dir
            pos = _write_parts(self._file.fileno(), info.header_offset, [info.FileHeader(), *parts], source, name)
            # The entry is zipfile's from here on: it goes into the central directory, and the next entry
            # starts after it.
            self._file.seek(pos)
            self._zip.start_dir = pos
            self._zip.filelist.append(info)
            self._zip.NameToInfo[info.filename] = info
        except BaseException:
            self.abort()
            raise
        return self._added(name, size, sha256)

    def _added(self, name: str, size: int, sha256: str) -> str:
        self._names.add(name.casefold())
        self._entries.append({"name": name, "size": size, "sha256": sha256})
        self._unflushed += size
        if self._unflushed >= _WRITEBACK_BYTES:
            # Start writing the ZIP to disk now, without waiting: the fsync in commit() then has only the
            # tail left, instead of the whole series (a 600-slice CT is 300 MB) at the very end.
            self._unflushed = 0
            self._file.flush()
            start_writeback(self._file.fileno())
        return sha256

    def entry_digests(self) -> list[str]:
        """SHA-256 of every entry added so far, in order (what the manifest will list)."""
        return [str(e["sha256"]) for e in self._entries]

    def commit(self, manifest: dict[str, object]) -> Path:
        """Write manifest.json last, make the ZIP durable and move it into place; returns the final path.

        Raises FileExistsError (after removing the temp file) when the final path already exists: an output
        that was delivered is never replaced.
        """
        self._require_open()
        if "entries" in manifest:
            raise ValueError("the manifest's 'entries' are written by SeriesZip itself")
        try:
            doc = {**manifest, "entries": self._entries}
            payload = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
            self._zip.writestr(_entry_info(MANIFEST_NAME, self._method), payload, compresslevel=self._level)
            self._zip.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            rename_no_replace(self.temp_path, self.final_path)
            fsync_dir(self.final_path.parent)
            for d in self._new_dirs:
                fsync_dir(d.parent)  # a new folder's own entry must be durable too, or the ZIP is unreachable
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return self.final_path

    def abort(self) -> None:
        """Drop the temp file. Safe to call more than once, and after a failed commit."""
        if self._state != "open":
            return
        self._state = "aborted"
        # The ZIP is being thrown away: failing to finish it is expected after a write error.
        with contextlib.suppress(Exception):
            self._zip.close()
        with contextlib.suppress(OSError):
            self._file.close()
        self.temp_path.unlink(missing_ok=True)

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.final_path.name}: the ZIP is already {self._state}")

    def _check_name(self, name: str) -> None:
        parts = name.split("/")
        if not name or name.startswith("/") or "\\" in name or _CONTROL.search(name):
            problem = "must be a relative path with '/' separators and no control characters"
        elif any(p in ("", ".", "..") for p in parts):
            problem = "must not contain empty, '.' or '..' parts"
        elif re.match(r"^[A-Za-z]:", name):
            problem = "must not start with a drive letter"
        elif name.casefold() == MANIFEST_NAME:
            problem = "is reserved for the manifest"
        elif name.casefold() in self._names:
            problem = "is already in the ZIP (names must be unique, ignoring case)"
        else:
            return
        raise ValueError(f"entry name {name!r} {problem}")


_CHUNK = 1 << 20  # what is read at a time where bytes do pass through this process


def read_parts(source: int | None, parts: Iterable[bytes | tuple[int, int]], name: str) -> Iterator[bytes]:
    """The bytes of entry `name`: bytes parts as they are, (offset, length) spans read from `source` in chunks."""
    for part in parts:
        if isinstance(part, bytes):
            yield part
            continue
        if source is None:
            raise ValueError(f"entry {name}: a span of the source, but no source")
        offset, length = part
        while length > 0:
            chunk = os.pread(source, min(length, _CHUNK), offset)
            if not chunk:
                raise OSError(f"entry {name}: its source became shorter while it was packaged")
            yield chunk
            offset += len(chunk)
            length -= len(chunk)


# copy_file_range and sendfile answer these where they cannot copy between the two files (another filesystem
# on older kernels, a filesystem or sandbox without the call): the next way is tried.
_CANNOT_COPY = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.ENOTSOCK}
)


def copy_range(src: int, dst: int, offset: int, length: int, dst_offset: int, name: str) -> None:
    """Copy `length` bytes at `offset` of file `src` to `dst_offset` of file `dst`: with copy_file_range
    (which can share the blocks on filesystems that allow it), else sendfile, else pread and pwrite.

    Raises OSError when `src` ends before the range does (naming entry `name`).
    """
    ways = [_by_pread]
    if hasattr(os, "sendfile"):
        ways.insert(0, _by_sendfile)
    if hasattr(os, "copy_file_range"):
        ways.insert(0, _by_copy_file_range)
    while length > 0:
        try:
            n = ways[0](src, dst, offset, min(length, 1 << 30), dst_offset)
        except OSError as exc:
            if exc.errno in _CANNOT_COPY and len(ways) > 1:
                ways.pop(0)
                continue
            raise
        if n == 0:
            if len(ways) > 1 and os.fstat(src).st_size >= offset + length:
                ways.pop(0)  # some filesystems answer 0 where they do not support the call
                continue
            raise OSError(f"entry {name}: its source became shorter while it was packaged")
        offset += n
        dst_offset += n
        length -= n


def _by_copy_file_range(src: int, dst: int, offset: int, count: int, dst_offset: int) -> int:
    return os.copy_file_range(src, dst, count, offset, dst_offset)


def _by_sendfile(src: int, dst: int, offset: int, count: int, dst_offset: int) -> int:
    os.lseek(dst, dst_offset, os.SEEK_SET)  # sendfile writes at the file position of dst
    return os.sendfile(dst, src, offset, count)


def _by_pread(src: int, dst: int, offset: int, count: int, dst_offset: int) -> int:
    data = os.pread(src, min(count, _CHUNK), offset)
    _pwrite_all(dst, data, dst_offset)
    return len(data)


def _write_parts(out: int, pos: int, parts: Sequence[bytes | tuple[int, int]], source: int | None, name: str) -> int:
    """Write parts at `pos` of file `out` (bytes in one write where they follow each other, spans copied from
    `source`); returns the position after them."""
    pending: list[bytes] = []
    for part in parts:
        if isinstance(part, bytes):
            pending.append(part)
            continue
        if source is None:
            raise ValueError(f"entry {name}: a span of the source, but no source")
        pos = _pwrite_all(out, b"".join(pending), pos)
        pending = []
        copy_range(source, out, *part, pos, name)
        pos += part[1]
    return _pwrite_all(out, b"".join(pending), pos)


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
    return offset


def _entry_info(name: str, method: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ENTRY_TIME)
    info.compress_type = method
    info.external_attr = _ENTRY_MODE
    info.create_system = _UNIX
    return info


def _temp_name(final_name: str) -> str:
    # Truncated so that the temp name stays within the usual 255-byte limit for any final name that fits.
    return f".{final_name[:200]}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _makedirs(folder: Path) -> list[Path]:
    """Create `folder` and missing parents; return the ones created, shallowest first."""
    missing = []
    p = folder
    while not p.is_dir() and p.parent != p:
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:
            if not d.is_dir():
                raise
    return created


# -- rename without replacing -----------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_WRITEBACK_BYTES = 4 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages (Linux sync_file_range, not waiting); a no-op
    where that call does not exist. Durability still comes from fsync alone."""
    fn = libc.function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if fn is not None:
        fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename src to dst, failing with FileExistsError if dst exists.

    Linux's renameat2(RENAME_NOREPLACE) checks and renames in one step, so a concurrent writer of the same
    name cannot be overwritten. It is still a rename (readers watching for moved-in files see it). Where the
    call or the filesystem lacks it, a check before os.replace leaves only a very narrow window.
    """
    fn = libc.function("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if fn is not None:
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, "the output already exists; refusing to overwrite it", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "the output already exists; refusing to overwrite it", str(dst))
    os.replace(src, dst)


def fsync_dir(path: Path) -> None:
    """Make creations and renames inside `path` durable: on POSIX a new directory entry survives a crash
    only once the directory itself has been fsynced."""
    if os.name == "nt":
        return  # a directory cannot be opened for fsync on Windows; NTFS journals its metadata
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network filesystems refuse fsync on a directory; their server commits metadata itself.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def clean_stale_temps(outbox: Path) -> int:
    """Remove temp ZIPs left below `outbox` by crashed runs; returns how many were removed.

    A temp file whose writer is still running here and that was touched within the hour is left alone, so a
    second anondrop process starting up does not pull the file from under a running one.
    """
    removed = 0
    for dirpath, _dirs, filenames in os.walk(outbox):
        for name in filenames:
            if not fnmatch.fnmatchcase(name, TEMP_PATTERN):
                continue
            path = Path(dirpath) / name
            if _in_use(path, name):
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            log.info("removed a partial ZIP left by an interrupted run: %s", path)
    return removed


def _in_use(path: Path, name: str) -> bool:
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return True  # already gone; nothing to do
    if age > _STALE_AFTER_S:
        return False
    pid_text = name.rpartition(".tmp-")[2].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    return _pid_alive(int(pid_text))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def unique_path(path: Path) -> Path:
    """`path` if nothing is there, else the first free `<stem>_v2<suffix>`, `<stem>_v3<suffix>`, ..."""
    if not os.path.lexists(path):
        return path
    n = 2
    while True:
        candidate = path.with_name(f"{path.stem}_v{n}{path.suffix}")
        if not os.path.lexists(candidate):
            return candidate
        n += 1
