"""Bad input goes to a quarantine folder with a reason a person can read, and is never lost on the way.

Each call makes one entry folder, `<UTC time>-<code>-<6 hex>/`, holding the files under `files/` at their path
relative to the inbox (so that `restore` can put them back), plus `reason.json` and `REASON.txt`. Within one
filesystem a move is a rename; across filesystems the copy is fsynced and in place before the original is
removed. The reason files are written before the first file moves and again after the last, so even an
interrupted quarantine explains itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from anondrop.package import fsync_dir, rename_no_replace

log = logging.getLogger("anondrop")

REASON_VERSION = 1
REASON_JSON = "reason.json"
REASON_TXT = "REASON.txt"
FILES_DIR = "files"
_STAMP = "%Y%m%dT%H%M%SZ"
_ENTRY_ID = re.compile(r"^(\d{8}T\d{6}Z)-([a-z0-9][a-z0-9-]*)-([0-9a-f]{6})$")
# Name of a copy still in progress; a crash can leave one behind, next to a source that still exists.
_PARTIAL = re.compile(r"^\..*\.part-[0-9a-f]{8}$")


@dataclass(frozen=True)
class QuarantineReason:
    """Why files were set aside. `series` is a pseudonymized label, never an original identifier."""

    code: str  # short slug: not-dicom, truncated, missing-uid, zip-bomb, burned-in, gate-hit, ...
    message: str
    series: str | None = None


@dataclass(frozen=True)
class QuarantineEntry:
    id: str
    path: Path
    reason: QuarantineReason
    file_count: int
    created: datetime


def quarantine_files(
    files: list[Path],
    *,
    inbox: Path,
    quarantine: Path,
    reason: QuarantineReason,
    copy: bool = False,
    now: datetime | None = None,
) -> Path:
    """Move (or copy) `files` into a new quarantine entry with its reason; returns the entry folder.

    A file that no longer exists is skipped with a warning (there is nothing left to lose). Any other error
    stops the quarantine and propagates, with the files not yet moved still in place and the reason files
    listing those that were.
    """
    created = (now or datetime.now(UTC)).astimezone(UTC)
    entry = _new_entry(quarantine, created, reason.code)
    plan = _plan(files, inbox)
    _write_reason(entry, reason, created, [rel for _, rel in plan])
    placed: list[str] = []
    sync = _DirSync()
    try:
        for src, rel in plan:
            dst = entry / FILES_DIR / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                _transfer(src, dst, keep_source=copy, no_replace=False, sync=sync)
            except FileNotFoundError:
                if os.path.lexists(src):
                    raise
                log.warning("%s: vanished before it could be quarantined", src)
                continue
            placed.append(rel)
    finally:
        sync.flush()
        _write_reason(entry, reason, created, placed)
    log.info("%s: %d file(s) %s to quarantine entry %s", reason.code, len(placed), _verb(copy), entry.name)
    return entry


def list_entries(quarantine: Path) -> list[QuarantineEntry]:
    """Every quarantine entry, oldest first. Folders not named like an entry are not ours and are ignored."""
    if not quarantine.is_dir():
        return []
    entries = []
    for d in quarantine.iterdir():
        match = _ENTRY_ID.match(d.name)
        if match and d.is_dir() and not d.is_symlink():
            entries.append(_read_entry(d, match))
    return sorted(entries, key=lambda e: (e.created, e.id))


def purge(quarantine: Path, older_than: timedelta, *, now: datetime | None = None) -> int:
    """Delete entries created more than `older_than` ago; returns how many were deleted."""
    if older_than < timedelta(0):
        raise ValueError(f"older_than must not be negative, not {older_than}")
    cutoff = (now or datetime.now(UTC)).astimezone(UTC) - older_than
    removed = 0
    for entry in list_entries(quarantine):
        if entry.created < cutoff:
            shutil.rmtree(entry.path)
            removed += 1
            log.info("purged quarantine entry %s (%d file(s))", entry.id, entry.file_count)
    if removed:
        fsync_dir(quarantine)
    return removed


def restore(quarantine: Path, entry_id: str, inbox: Path) -> list[Path]:
    """Move an entry's files back to their places in the inbox, then delete the entry; returns the paths.

    Nothing is moved when any target already exists (FileExistsError), so a retry never replaces a file
    dropped since.
    """
    if not _ENTRY_ID.match(entry_id):
        raise ValueError(
            f"{entry_id!r} is not a quarantine entry id (they look like 20250101T120000Z-not-dicom-a1b2c3)"
        )
    entry = quarantine / entry_id
    if not entry.is_dir() or entry.is_symlink():
        raise FileNotFoundError(errno.ENOENT, "no such quarantine entry", str(entry))
    moves = [(src, inbox / rel) for src, rel in _stored_files(entry)]
    clashes = [dst for _, dst in moves if _blocked(dst, inbox)]
    if clashes:
        raise FileExistsError(
            errno.EEXIST,
            f"{len(clashes)} file(s) of entry {entry_id} would replace something in the inbox; "
            "nothing was restored (move those away first)",
            str(clashes[0]),
        )
    restored: list[Path] = []
    sync = _DirSync()
    try:
        for src, dst in moves:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _transfer(src, dst, keep_source=False, no_replace=True, sync=sync)
            restored.append(dst)
    finally:
        sync.flush()
    shutil.rmtree(entry)
    fsync_dir(quarantine)
    log.info("restored %d file(s) of quarantine entry %s to the inbox", len(restored), entry_id)
    return restored


# -- entries ----------------------------------------------------------------------------------------------
def _slug(code: str) -> str:
    """The code as it may appear in a folder name (the reason file keeps it verbatim)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", code.lower()).strip("-")[:40].strip("-")
    return slug or "unknown"


def _new_entry(quarantine: Path, created: datetime, code: str) -> Path:
    quarantine.mkdir(parents=True, exist_ok=True)
    stamp = created.strftime(_STAMP)
    for _ in range(100):
        entry = quarantine / f"{stamp}-{_slug(code)}-{secrets.token_hex(3)}"
        try:
            entry.mkdir()
        except FileExistsError:
            continue
        (entry / FILES_DIR).mkdir()
        fsync_dir(quarantine)
        return entry
    raise FileExistsError(errno.EEXIST, "no free quarantine entry name", str(quarantine))


def _relative(path: Path, inbox: Path) -> tuple[str, ...]:
    """The path below the inbox, lexically first (the inbox may be reached through a link), else resolved;
    a file from elsewhere keeps just its name."""
    try:
        parts = Path(os.path.abspath(path)).relative_to(os.path.abspath(inbox)).parts
    except ValueError:
        try:
            parts = path.resolve().relative_to(inbox.resolve()).parts
        except (ValueError, OSError):
            parts = ()
    return parts or (path.name,)


def _plan(files: list[Path], inbox: Path) -> list[tuple[Path, str]]:
    """Source and unique relative destination for each file (the same source listed twice moves once)."""
    plan: list[tuple[Path, str]] = []
    seen: set[str] = set()
    taken_files: set[str] = set()
    taken_dirs: set[str] = set()
    for path in files:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            plan.append((path, _place(_relative(path, inbox), taken_files, taken_dirs)))
    return plan


def _place(parts: tuple[str, ...], taken_files: set[str], taken_dirs: set[str]) -> str:
    """A relative path for parts that no earlier file or folder of the entry holds.

    Case-insensitive, so the entry survives a copy to an SMB share; a folder whose name is held by a file
    (or the reverse) is numbered too, since neither can hold both.
    """
    folder = ""
    for part in parts[:-1]:
        n, candidate = 1, part
        while _join(folder, candidate).casefold() in taken_files:
            n += 1
            candidate = f"{part}_{n}"
        folder = _join(folder, candidate)
        taken_dirs.add(folder.casefold())
    n, name = 1, parts[-1]
    while (key := _join(folder, name).casefold()) in taken_files or key in taken_dirs:
        n += 1
        name = _numbered(parts[-1], n)
    rel = _join(folder, name)
    taken_files.add(rel.casefold())
    return rel


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _numbered(name: str, n: int) -> str:
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_{n}.{ext}" if dot and stem else f"{name}_{n}"


def _stored_files(entry: Path) -> list[tuple[Path, str]]:
    files_dir = entry / FILES_DIR
    found = []
    for dirpath, _dirs, names in os.walk(files_dir):
        for name in names:
            if _PARTIAL.match(name):
                continue
            path = Path(dirpath) / name
            found.append((path, path.relative_to(files_dir).as_posix()))
    return sorted(found, key=lambda t: t[1])


def _blocked(dst: Path, inbox: Path) -> bool:
    """True when dst exists, or one of its folders below the inbox exists as something else than a folder."""
    if os.path.lexists(dst):
        return True
    p = dst.parent
    while p != inbox and inbox in p.parents:
        if os.path.lexists(p) and not p.is_dir():
            return True
        p = p.parent
    return False


def _read_entry(path: Path, match: re.Match[str]) -> QuarantineEntry:
    stamp = datetime.strptime(match.group(1), _STAMP).replace(tzinfo=UTC)
    try:
        doc = json.loads((path / REASON_JSON).read_text(encoding="utf-8"))
        series = doc.get("series")
        reason = QuarantineReason(str(doc["code"]), str(doc["message"]), series if isinstance(series, str) else None)
        created = datetime.fromisoformat(str(doc["created"])).astimezone(UTC)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = QuarantineReason(match.group(2), f"{REASON_JSON} is missing or unreadable ({exc})")
        created = stamp
    return QuarantineEntry(path.name, path, reason, len(_stored_files(path)), created)


# -- reason files -----------------------------------------------------------------------------------------
def _write_reason(entry: Path, reason: QuarantineReason, created: datetime, files: list[str]) -> None:
    doc = {
        "code": reason.code,
        "message": reason.message,
        "series": reason.series,
        "created": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "files": files,
        "version": REASON_VERSION,
    }
    _write_atomic(entry / REASON_JSON, json.dumps(doc, indent=2) + "\n")
    _write_atomic(entry / REASON_TXT, _reason_text(entry.name, reason, created, files))
    fsync_dir(entry)


def _reason_text(entry_id: str, reason: QuarantineReason, created: datetime, files: list[str]) -> str:
    lines = [
        f"Quarantined by anondrop on {created:%Y-%m-%d %H:%M:%S} UTC.",
        "",
        f"Reason ({reason.code}): {reason.message}",
    ]
    if reason.series:
        lines.append(f"Series (pseudonymized): {reason.series}")
    lines += ["", f"{len(files)} file(s), under {FILES_DIR}/ at their place in the inbox:"]
    lines += [f"  {f}" for f in files]
    lines += [
        "",
        "To process them again once the cause is fixed:",
        f"  anondrop quarantine retry {entry_id}",
        "",
    ]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- durable moves ----------------------------------------------------------------------------------------
class _DirSync:
    """Folders whose entries changed by rename; fsynced once at the end, destinations before sources."""

    def __init__(self) -> None:
        self.dst: set[Path] = set()
        self.src: set[Path] = set()

    def flush(self) -> None:
        for d in sorted(self.dst) + sorted(self.src - self.dst):
            # A source folder removed meanwhile needs no sync: its files are already safe elsewhere.
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(d)
        self.dst.clear()
        self.src.clear()


def _transfer(src: Path, dst: Path, *, keep_source: bool, no_replace: bool, sync: _DirSync) -> None:
    """Put src at dst durably and, unless keep_source, remove src only after that."""
    if not keep_source:
        try:
            _rename(src, dst, no_replace)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        else:
            sync.dst.add(dst.parent)
            sync.src.add(src.parent)
            return
    tmp = dst.with_name(f".{dst.name[:200]}.part-{secrets.token_hex(4)}")
    try:
        shutil.copy2(src, tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        if tmp.stat().st_size != src.stat().st_size:
            raise OSError(errno.EIO, "the copy is shorter than the original", str(src))
        _rename(tmp, dst, no_replace)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The copy must be durable before the original goes: this fsync cannot wait for the batch at the end.
    fsync_dir(dst.parent)
    if not keep_source:
        src.unlink()
        sync.src.add(src.parent)


def _rename(src: Path, dst: Path, no_replace: bool) -> None:
    if no_replace:
        rename_no_replace(src, dst)
    else:
        os.replace(src, dst)


def _verb(copy: bool) -> str:
    return "copied" if copy else "moved"
