"""One series: read -> de-identify (both cores) -> gate -> package -> record -> dispose of the sources.

Order of durability, which is the product's promise to the hospital: the ZIP is written under a hidden
temporary name, fsynced and renamed into place; the journal then records the series as delivered; only
after that are sources deleted or moved. A crash anywhere before the rename leaves the sources untouched
and no visible output; a crash after it leaves a complete ZIP and a series that the journal may redo
(the redo writes a new version, never a partial one).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import zipfile
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from pydicom import dcmread

from anondrop import __version__
from anondrop.config import Config
from anondrop.deid import engine
from anondrop.deid.gate import GateHit, Identifiers, scan_bytes, scan_dataset, scan_names
from anondrop.deid.policy import Policy, build_policy
from anondrop.deid.pseudonyms import Keys
from anondrop.ingest import containers
from anondrop.ingest.scan import BadFile, FileInfo, Inventory, read_info, unpack_dir, walk
from anondrop.journal import Journal
from anondrop.package import SeriesZip, unique_path
from anondrop.quarantine import QuarantineReason, quarantine_files
from anondrop.sitekey import load_or_create

log = logging.getLogger("anondrop")

# Events (named as in the journal and the logs).
FILE_QUARANTINED = "file_quarantined"
SERIES_DELIVERED = "series_delivered"
SERIES_QUARANTINED = "series_quarantined"
SERIES_GATED = "series_stopped_by_gate"

_BATCH_FILES = 16
_BATCH_BYTES = 8 * 1024 * 1024
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# -- worker side ------------------------------------------------------------------------------------------
_worker_state: tuple[Policy, Keys] | None = None


def _init_worker(policy: Policy, keys: Keys) -> None:
    from anondrop.logs import quiet_pydicom

    quiet_pydicom()  # worker stderr is the daemon's log
    global _worker_state
    _worker_state = (policy, keys)


# Above this size the pixel data travels back from a worker as a reference into the source file, not bytes.
_SPAN_MIN = 64 * 1024
_READ_CHUNK = 1 << 20


@dataclass
class Packed:
    """A de-identified instance as a worker hands it back: ready to stream into the ZIP.

    `parts` are bytes, or (offset, length) spans of the source file that the output carries unchanged
    (the pixel data); size, CRC-32 and SHA-256 cover the whole output and were computed by the worker.
    """

    parts: list[bytes | tuple[int, int]]
    size: int
    crc: int
    sha256: str
    report: engine.Report
    hits: list[GateHit]
    identifiers: Identifiers
    header: bytes


@dataclass
class FileOutcome:
    index: int
    packed: Packed | None = None
    code: str = ""
    message: str = ""


def _pack(res: engine.Result) -> Packed:
    out = res.data
    parts: list[bytes | tuple[int, int]] = [out]
    if res.pixel_in is not None and res.pixel_out is not None and res.pixel_out[1] - res.pixel_out[0] >= _SPAN_MIN:
        (in_start, in_end), (out_start, out_end) = res.pixel_in, res.pixel_out
        parts = [out[:out_start], (in_start, in_end - in_start), out[out_end:]]
    return Packed(
        parts,
        len(out),
        zlib.crc32(out),
        hashlib.sha256(out).hexdigest(),
        res.report,
        res.hits,
        res.identifiers,
        res.header,
    )


def _process_batch(batch: list[tuple[int, str]]) -> list[FileOutcome]:
    assert _worker_state is not None
    policy, keys = _worker_state
    out = []
    for index, path in batch:
        try:
            data = Path(path).read_bytes()
            out.append(FileOutcome(index, _pack(engine.deidentify_bytes(data, policy, keys))))
        except engine.DeidError as exc:
            out.append(FileOutcome(index, None, exc.code, exc.message))
        except OSError as exc:
            out.append(FileOutcome(index, None, "unreadable", f"cannot read the file: {exc.strerror}"))
        except Exception as exc:  # a bad file must never stop the run: it goes to quarantine, with why
            out.append(FileOutcome(index, None, "unreadable", f"cannot be parsed: {type(exc).__name__}: {exc}"))
    return out


def _info_batch(batch: list[tuple[str, str, str | None]]) -> list[FileInfo | BadFile]:
    return [read_info(Path(p), rel, Path(c) if c else None) for p, rel, c in batch]


def _stream(path: Path, parts: list[bytes | tuple[int, int]]) -> Iterator[bytes]:
    """The output's bytes: given parts as they are, spans read from the source file in chunks."""
    fd: int | None = None
    try:
        for part in parts:
            if isinstance(part, bytes):
                yield part
                continue
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
            offset, length = part
            while length > 0:
                chunk = os.pread(fd, min(length, _READ_CHUNK), offset)
                if not chunk:
                    raise OSError(f"{path.name}: the file became shorter while it was packaged")
                yield chunk
                offset += len(chunk)
                length -= len(chunk)
    finally:
        if fd is not None:
            os.close(fd)


class Workers:
    """In-process for one worker; otherwise a process pool, fed a bounded window of batches (flat memory)."""

    def __init__(self, count: int, policy: Policy, keys: Keys) -> None:
        self.count = count
        self.pool: ProcessPoolExecutor | None = None
        if count > 1:
            self.pool = ProcessPoolExecutor(
                count, mp_context=get_context("forkserver"), initializer=_init_worker, initargs=(policy, keys)
            )
        else:
            _init_worker(policy, keys)

    def map(self, batches: Iterable[list[tuple[int, str]]]) -> Iterator[FileOutcome]:
        if self.pool is None:
            for batch in batches:
                yield from _process_batch(batch)
            return
        window: deque[Future[list[FileOutcome]]] = deque()
        for batch in batches:
            window.append(self.pool.submit(_process_batch, batch))
            if len(window) >= self.count * 2:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()

    def read_infos(self, items: list[tuple[Path, str, Path | None]]) -> list[FileInfo | BadFile]:
        """Read the grouping attributes of many files, on every core."""
        jobs = [(str(p), rel, str(c) if c else None) for p, rel, c in items]
        batches = [jobs[i : i + 64] for i in range(0, len(jobs), 64)]
        if self.pool is None:
            return [info for b in batches for info in _info_batch(b)]
        return [info for result in self.pool.map(_info_batch, batches) for info in result]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _batches(files: list[FileInfo]) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    size = 0
    for i, f in enumerate(files):
        batch.append((i, str(f.path)))
        size += f.size
        if len(batch) >= _BATCH_FILES or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# -- run summary ------------------------------------------------------------------------------------------
@dataclass
class Summary:
    delivered: list[tuple[str, int]] = field(default_factory=list)  # (output relative to outbox, files)
    quarantined: Counter[str] = field(default_factory=Counter)  # reason code -> files
    reasons: dict[str, str] = field(default_factory=dict)  # reason code -> one example sentence
    gated: list[tuple[str, list[str]]] = field(default_factory=list)  # (series label, hit descriptions)
    skipped: int = 0  # files already delivered in an earlier run
    files_in: int = 0
    bytes_in: int = 0
    sent: Counter[str] = field(default_factory=Counter)  # destination -> series ZIPs it confirmed
    dead: list[tuple[str, str, str]] = field(default_factory=list)  # (series, destination, why), dead-lettered

    @property
    def exit_code(self) -> int:
        return 3 if (self.quarantined or self.gated or self.dead) else 0


class Cancelled(Exception):
    """The daemon is stopping: the series is abandoned cleanly (no output, sources untouched)."""


@dataclass
class Context:
    cfg: Config
    policy: Policy
    keys: Keys
    journal: Journal | None
    outbox: Path
    dispose: bool = True  # False for `anonymize`: sources are never touched
    progress: Callable[[int], None] | None = None
    cancel: threading.Event | None = None


def make_keys(cfg: Config) -> Keys:
    d = cfg.deidentify
    return Keys(
        secret=load_or_create(cfg.paths.state, d.key_file),
        patient_id_format=d.patient_id_format,
        patient_name_format=d.patient_name_format,
        digest_length=d.digest_length,
        date_shift_days=d.date_shift_days,
    )


def make_policy(cfg: Config) -> Policy:
    d = cfg.deidentify
    return build_policy(d.options, d.rules, d.burned_in_suspect)


# -- inventory --------------------------------------------------------------------------------------------
def take_inventory(
    cfg: Config, roots: list[Path], base: Path, summary: Summary, workers: Workers | None = None
) -> Inventory:
    inv = Inventory()
    limits = containers.ZipLimits(
        max_entries=cfg.input.max_zip_entries,
        max_total_bytes=cfg.input.max_zip_bytes,
        max_ratio=cfg.input.max_zip_ratio,
    )
    todo: list[tuple[Path, str, Path | None]] = []
    for root in roots:
        paths = [root] if root.is_file() else list(walk(root, cfg.input.ignore))
        for path in paths:
            rel = _rel(path, base)
            if containers.is_zip(path):
                inv.containers.append(path)
                dest = unpack_dir(cfg.paths.state, path)
                try:
                    if dest.exists():
                        shutil.rmtree(dest)
                    members = containers.unpack_zip(path, dest, limits)
                except containers.ContainerRejected as exc:
                    inv.rejected_containers.append(BadFile(path, rel, "zip-rejected", exc.reason))
                    continue
                todo += [(m, f"{rel}!{m.relative_to(dest)}", path) for m in members]
                continue
            todo.append((path, rel, None))
    infos = workers.read_infos(todo) if workers is not None else [read_info(*item) for item in todo]
    for item in infos:
        _place(inv, item)
    return inv


def _place(inv: Inventory, item: FileInfo | BadFile) -> None:
    if isinstance(item, FileInfo):
        inv.add(item)
    elif item.code == "dicomdir":
        inv.dicomdirs.append(item.path)
    else:
        inv.bad.append(item)


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return path.name


# -- one series -------------------------------------------------------------------------------------------
def _order(files: list[FileInfo]) -> list[FileInfo]:
    return sorted(files, key=lambda f: (f.instance_number is None, f.instance_number or 0, f.sop_uid, f.rel))


def _safe(text: str, fallback: str) -> str:
    text = _SAFE_NAME.sub("_", text.strip())[:64].strip("._")
    return text or fallback


def output_path(outbox: Path, report: engine.Report) -> Path:
    """Names from de-identified values only: pseudonymous patient, new study UID, modality, number, new UID."""
    name = f"{_safe(report.modality, 'OT')}_{_safe(report.series_number, '0')}_{_safe(report.series_uid, 'series')}"
    return outbox / _safe(report.patient_id, "patient") / _safe(report.study_uid, "study") / f"{name}.zip"


@dataclass
class SeriesOutcome:
    state: str  # delivered | quarantined | gated | empty
    output: Path | None = None
    files_done: list[FileInfo] = field(default_factory=list)
    label: str = ""


def process_series(ctx: Context, files: list[FileInfo], workers: Workers, summary: Summary) -> SeriesOutcome:
    files = _order(files)
    dupes: list[FileInfo] = []
    sizes: dict[str, int] = {}  # original SOP Instance UID -> size of the copy written
    cfg = ctx.cfg
    zipw: SeriesZip | None = None
    first: engine.Report | None = None
    ids = Identifiers()
    headers: list[tuple[bytes, Identifiers]] = []
    bad: list[tuple[FileInfo, str, str]] = []
    burned: str | None = None
    hits: list[GateHit] = []
    written: list[FileInfo] = []
    entry_names: list[str] = []
    carried = _Carried.open(ctx, files)  # the previous version's entries, for a complete new version
    try:
        for outcome in workers.map(_batches(files)):
            if ctx.cancel is not None and ctx.cancel.is_set():
                raise Cancelled()
            f = files[outcome.index]
            if ctx.progress:
                ctx.progress(1)
            res = outcome.packed
            if res is None:
                bad.append((f, outcome.code, outcome.message))
                continue
            burned = burned or res.report.burned_in
            if res.hits:
                hits.extend(GateHit(f"instance {len(written) + 1}: {h.where}", h.kind) for h in res.hits)
            if burned or hits:
                continue  # the series will not go out; keep reading only to account for every file
            ids = ids.merge(res.identifiers)
            headers.append((zlib.compress(res.header, 1), res.identifiers))
            if zipw is None:
                first = res.report
                zipw = SeriesZip(
                    unique_path(output_path(ctx.outbox, res.report)),
                    compression=cfg.output.compression,
                    compresslevel=cfg.output.compresslevel,
                )
            if f.sop_uid in sizes:
                # The same instance dropped twice: one copy goes out. A copy of another size is a different
                # object under the same UID, which must not vanish silently.
                if sizes[f.sop_uid] == f.size:
                    dupes.append(f)
                else:
                    bad.append(
                        (
                            f,
                            "duplicate-instance",
                            "another file of this series has the same SOP Instance UID but other content",
                        )
                    )
                continue
            sizes[f.sop_uid] = f.size
            if carried is not None:
                entry_names += carried.copy_before(zipw, res.report.instance_number, len(entry_names))
            name = f"IM{len(entry_names) + 1:05d}.dcm"
            zipw.add_stream(name, _stream(f.path, res.parts), size=res.size, crc=res.crc, sha256=res.sha256)
            entry_names.append(name)
            written.append(f)
        if carried is not None and zipw is not None and not burned and not hits:
            entry_names += carried.copy_before(zipw, None, len(entry_names))
            hits.extend(carried.gate(ids))
        if not burned and not hits and zipw is not None and first is not None:
            # Cross-check: an identifier of any file of the series, in any file's output.
            # Each worker already searched its file for the file's own identifiers; what is left is
            # the rest of the series' (other instances' UIDs, another file's dates).
            for i, (blob, own) in enumerate(headers):
                rest = ids.minus(own)
                if rest:
                    hits.extend(scan_bytes(zlib.decompress(blob), rest, f"instance {i + 1}: "))
            manifest = _manifest(ctx.policy, first, len(entry_names))
            rel_out = zipw.final_path.relative_to(ctx.outbox)
            named = [(f"output folder level {i + 1}", part) for i, part in enumerate(rel_out.parts)]
            named += [(f"entry name {n}", n) for n in entry_names]
            named.append(("manifest.json", json.dumps(manifest)))
            hits.extend(scan_names(named, ids))
        label = first.series_uid if first else "?"
        if burned or hits or zipw is None or first is None:
            if zipw is not None:
                zipw.abort()
            for f, code, message in bad:
                _quarantine(ctx, [f], QuarantineReason(code, message, label), summary)
            if burned:
                _quarantine(
                    ctx,
                    written + _rest(files, written, bad),
                    QuarantineReason("burned-in", burned, label),
                    summary,
                )
                return SeriesOutcome("quarantined", label=label)
            if hits:
                text = "; ".join(str(h) for h in hits[:10])
                _quarantine(
                    ctx,
                    written + _rest(files, written, bad),
                    QuarantineReason("gate-hit", f"release gate stopped the series: {text}", label),
                    summary,
                )
                summary.gated.append((label, [str(h) for h in hits[:10]]))
                return SeriesOutcome("gated", label=label)
            return SeriesOutcome("empty", label=label)
        same = _identical_version(ctx.outbox, first, zipw.entry_digests())
        if same is not None:
            # A crash between the rename of this very output and the journal write: it is there already,
            # complete and identical (de-identification is deterministic), so it is adopted, not repeated.
            zipw.abort()
            zipw = None
            final = same
        else:
            final = zipw.commit(manifest)
            zipw = None
        for f, code, message in bad:
            _quarantine(ctx, [f], QuarantineReason(code, message, first.series_uid), summary)
        return SeriesOutcome("delivered", final, written + dupes, first.series_uid)
    finally:
        if zipw is not None:
            zipw.abort()
        if carried is not None:
            carried.close()


class _Carried:
    """Entries of the series' previous ZIP that a late file's new version must carry, in instance order.

    With on_success = "delete" or "move" the earlier sources are gone; the new version is still complete
    because their de-identified entries are copied over (verified by their stored CRC). Entries replaced by a
    newly arrived copy of the same instance are left out.
    """

    def __init__(self, zf: zipfile.ZipFile, entries: list[tuple[float, zipfile.ZipInfo]], sha: dict[str, str]):
        self.zf = zf
        self.entries = entries
        self.sha = sha
        self.copied: list[str] = []

    @classmethod
    def open(cls, ctx: Context, files: list[FileInfo]) -> _Carried | None:
        if ctx.journal is None or not files:
            return None
        label = _deid_uid(ctx, files[0].series_uid)
        row = ctx.journal.series(label)
        if row is None or row.state != "delivered" or not row.output:
            return None
        path = ctx.outbox / row.output
        if not path.is_file():
            return None
        arriving = {_deid_uid(ctx, f.sop_uid) for f in files}
        zf = zipfile.ZipFile(path)
        try:
            manifest = json.loads(zf.read("manifest.json"))
            sha = {e["name"]: e["sha256"] for e in manifest.get("entries", [])}
            entries = []
            for info in zf.infolist():
                if not info.filename.endswith(".dcm"):
                    continue
                with zf.open(info) as fh:
                    ds = dcmread(fh, stop_before_pixels=True, specific_tags=[0x00080018, 0x00200013])
                if str(ds.get("SOPInstanceUID", "")) in arriving:
                    continue
                number = ds.get("InstanceNumber")
                entries.append((float(number) if number not in (None, "") else float("inf"), info))
        except Exception:
            zf.close()
            raise
        entries.sort(key=lambda e: e[0])
        return cls(zf, entries, sha)

    def copy_before(self, zipw: SeriesZip, number: int | None, done: int) -> list[str]:
        """Copy the carried entries that sort before instance `number` (all of them for None)."""
        names: list[str] = []
        limit = float("inf") if number is None else float(number)
        while self.entries and (number is None or self.entries[0][0] <= limit):
            _n, info = self.entries.pop(0)
            name = f"IM{done + len(names) + 1:05d}.dcm"
            sha = self.sha.get(info.filename) or hashlib.sha256(self.zf.read(info)).hexdigest()
            zipw.add_stream(name, _zip_chunks(self.zf, info), size=info.file_size, crc=info.CRC, sha256=sha)
            names.append(name)
            self.copied.append(info.filename)
        return names

    def gate(self, ids: Identifiers) -> list[GateHit]:
        """The carried entries against the identifiers of the files that arrived now."""
        hits: list[GateHit] = []
        for name in self.copied:
            with self.zf.open(name) as fh:
                ds = dcmread(fh, stop_before_pixels=True)
            hits.extend(scan_dataset(ds, ids, f"carried {name}: "))
        return hits

    def close(self) -> None:
        self.zf.close()


def _zip_chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    with zf.open(info) as fh:
        while chunk := fh.read(_READ_CHUNK):
            yield chunk


def _deid_uid(ctx: Context, uid: str) -> str:
    return uid if ctx.policy.has("retain_uids") else ctx.keys.uid(uid)


def _identical_version(outbox: Path, report: engine.Report, digests: list[str]) -> Path | None:
    """An existing version of this series' ZIP whose entries have exactly these SHA-256s, in order."""
    base = output_path(outbox, report)
    candidates = sorted(base.parent.glob(f"{glob.escape(base.stem)}*.zip")) if base.parent.is_dir() else []
    for path in candidates:
        if path.name != base.name and not path.stem.removeprefix(base.stem).startswith("_v"):
            continue
        try:
            with zipfile.ZipFile(path) as zf:
                entries = json.loads(zf.read("manifest.json")).get("entries", [])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            continue
        if [e.get("sha256") for e in entries] == digests:
            return path
    return None


def _rest(files: list[FileInfo], written: list[FileInfo], bad: list[tuple[FileInfo, str, str]]) -> list[FileInfo]:
    done = {id(f) for f in written} | {id(b[0]) for b in bad}
    return [f for f in files if id(f) not in done]


def _manifest(policy: Policy, first: engine.Report, instances: int) -> dict[str, object]:
    return {
        "format": "anondrop-series/1",
        "anondrop_version": __version__,
        "profile": "basic",
        "options": sorted(policy.options),
        "edition": policy.edition,
        "patient_id": first.patient_id,
        "study_instance_uid": first.study_uid,
        "series_instance_uid": first.series_uid,
        "modality": first.modality,
        "series_number": first.series_number,
        "instances": instances,
    }


def _quarantine(ctx: Context, files: list[FileInfo], reason: QuarantineReason, summary: Summary) -> None:
    if not files:
        return
    summary.quarantined[reason.code] += len(files)
    summary.reasons.setdefault(reason.code, reason.message)
    log.warning("%s: %d file(s) to quarantine: %s", reason.code, len(files), reason.message)
    if not ctx.dispose:
        return  # ad-hoc runs never touch the sources; the summary says what would have happened
    cfg = ctx.cfg
    plain = [f.path for f in files if f.container is None]
    members = [f.path for f in files if f.container is not None]
    if plain:
        quarantine_files(plain, inbox=cfg.paths.inbox, quarantine=cfg.paths.quarantine, reason=reason)
    if members:
        quarantine_files(
            members,
            inbox=cfg.paths.state / "unpacked",
            quarantine=cfg.paths.quarantine,
            reason=reason,
            copy=True,
        )
    if ctx.journal is not None:
        ctx.journal.mark_files([(f.rel, f.size, f.mtime_ns) for f in files], reason.series, "quarantined")
        ctx.journal.event(FILE_QUARANTINED, reason.series, f"{reason.code}: {len(files)} file(s)")


# -- disposal ---------------------------------------------------------------------------------------------
def dispose(cfg: Config, paths: Iterable[Path]) -> None:
    """Delete or move sources whose output is durable (called only after the ZIP is renamed into place)."""
    mode = cfg.input.on_success
    if mode == "keep":
        return
    for path in paths:
        if not path.exists():
            continue
        if mode == "delete":
            path.unlink()
            continue
        assert cfg.paths.done is not None
        target = cfg.paths.done / _rel(path, cfg.paths.inbox)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = unique_path(target)
        shutil.move(str(path), target)


def prune_empty_dirs(root: Path) -> None:
    """Remove folders left empty below root (their names may still name the patient)."""
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
        p = Path(dirpath)
        if p != root:
            with contextlib.suppress(OSError):
                p.rmdir()
