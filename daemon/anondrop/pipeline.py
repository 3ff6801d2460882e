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
import pickle
import shutil
import sys
import threading
import zipfile
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from anondrop import __version__, forkserver
from anondrop.deid.identifiers import GateHit, Identifiers, scan_names
from anondrop.deid.policy import Policy
from anondrop.deid.pseudonyms import Keys
from anondrop.deid.report import Report
from anondrop.ingest import containers
from anondrop.ingest import overrides as overrides_mod
from anondrop.ingest.scan import (
    CONTAINER,
    OVERRIDE_NAME,
    BadFile,
    FileInfo,
    Inventory,
    read_info,
    unpack_dir,
    walk,
)
from anondrop.naming import Namer, as_path, folder_levels, unique_entry
from anondrop.package import SeriesZip, read_parts, unique_path
from anondrop.quarantine import QuarantineReason, quarantine_files
from anondrop.sitekey import load_or_create
from anondrop.work import FileOutcome as FileOutcome  # re-exported: the pipeline's outcome types
from anondrop.work import Job as Job
from anondrop.work import Packed as Packed
from anondrop.work import (
    _info_batch,
    _init_pool_worker,
    _init_worker,
    _process_batch,
    _process_batch_in,
)

# For types only: the crosswalk (and cryptography) is imported only where it is switched on; the config
# (pydantic), the journal and the routes belong to the main process. What runs in the workers is in
# anondrop.work; the engine (and pydicom with it) is imported by the workers, and by the main process only
# where it works on DICOM itself (see Workers): the main process of `once` runs without it.
if TYPE_CHECKING:
    from anondrop.config import Config
    from anondrop.crosswalk import Crosswalk, Pair
    from anondrop.journal import Journal
    from anondrop.routes import Lane, RouteTable

log = logging.getLogger("anondrop")

# Events (named as in the journal and the logs).
FILE_QUARANTINED = "file_quarantined"
SERIES_DELIVERED = "series_delivered"
SERIES_QUARANTINED = "series_quarantined"
SERIES_GATED = "series_stopped_by_gate"

_BATCH_FILES = 16
_BATCH_BYTES = 8 * 1024 * 1024
# Batches in flight per worker. Two left a worker waiting for its next batch while the main process was busy
# packaging (about a tenth of a CT series' time); a result holds a batch's headers and small files' bytes,
# large pixel data only as spans of the source, so four cost little memory.
_WINDOW_PER_WORKER = 4
# A series' output headers are kept for the cross-check at its end: as they are up to this many bytes,
# compressed beyond (so memory does not grow with the series).
_HEADERS_PLAIN = 16 * 1024 * 1024


# A large file is read in chunks of this size where it is read again (a source changed, a carried entry).
_READ_CHUNK = 1 << 20


def _can_fork() -> bool:
    """Whether worker processes may be forked from this process itself: on Linux, while it runs no other
    thread. (The child of a threaded process can inherit a lock that a thread held at the fork, held for
    ever since the thread does not exist in the child.)"""
    return sys.platform.startswith("linux") and threading.active_count() == 1


class Workers:
    """In-process for one worker; otherwise a process pool, fed a bounded window of batches (flat memory).

    Where the pool's processes come from:
    - `light` (`once`, `anonymize`): this process never imports the engine (nor pydicom). The fork server
      (anondrop.forkserver), started as early as the command allows, imports it meanwhile on another core
      and forks every worker from there, usually before this process has a file for them. Until they are
      up, this process reads headers itself, and waits for them to de-identify.
    - otherwise (the daemon): forked from this process, with the engine imported first, while it runs no
      other thread yet (the daemon makes its pool before its threads); they start at once. When threads
      already run (the daemon's pool after a reload) they come from the fork server, and this process does
      the work itself until they are up.
    A worker forked from this process inherits the policies and keys; one from the fork server gets them
    with each batch, pickled once here (anondrop.work._process_batch_in).
    """

    def __init__(self, count: int, policies: dict[str, Policy], keys: Keys, *, light: bool = False) -> None:
        self.count = count
        self.pool: ProcessPoolExecutor | None = None
        self._server: forkserver.ServerPool | None = None
        self._state = b""  # policies and keys, pickled, for the fork server's workers
        self._here = threading.Lock()  # one batch at a time in this process (series run on threads)
        if light and count <= 1:
            forkserver.discard_early()  # one worker: this process does the work, the early pool is not needed
        if light and count > 1 and not forkserver.ready():
            light = False  # no fork server here: this process imports the engine and forks its workers
        self._works_here = count <= 1 or not light  # de-identifies in this process (until the pool is up)
        if self._works_here:
            _init_worker(policies, keys)
        if count > 1 and not light and _can_fork():
            self.pool = ProcessPoolExecutor(
                count,
                mp_context=get_context("fork"),
                initializer=_init_pool_worker,
                initargs=(policies, keys),
            )
            # A task now: a pool of forked processes forks every worker at its first submit, before its own
            # threads start (as forkserver.ServerPool warms up with the same task).
            self.pool.submit(os.getpid)
        elif count > 1:
            # Pickled now: this process may de-identify with the same objects meanwhile (and cache in them).
            self._state = pickle.dumps((policies, keys))
            self._server = forkserver.pool(count)
            self.pool = self._server.executor

    def _started(self) -> ProcessPoolExecutor:
        """The pool, once its processes have been started; raises what starting them raised."""
        assert self.pool is not None
        return self._server.started() if self._server is not None else self.pool

    def ready(self) -> bool:
        """True once every process of the pool runs (never without a pool)."""
        if self._server is not None:
            return self._server.ready()
        return self.pool is not None

    def _submit(self, pool: ProcessPoolExecutor, batch: Job) -> Future[list[FileOutcome]]:
        if self._server is not None:
            return pool.submit(_process_batch_in, self._state, batch)
        return pool.submit(_process_batch, batch)

    def map(self, batches: Iterable[Job]) -> Iterator[FileOutcome]:
        todo = iter(batches)
        # This process does the batches itself, one at a time, until the pool is up (all of them without a
        # pool): the first series does not wait for the workers to start.
        while self._works_here and not self.ready():
            batch = next(todo, None)
            if batch is None:
                return
            with self._here:
                outcomes = _process_batch(batch)
            yield from outcomes
        pool = self._started()
        window: deque[Future[list[FileOutcome]]] = deque()
        for batch in todo:
            window.append(self._submit(pool, batch))
            if len(window) >= self.count * _WINDOW_PER_WORKER:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()

    def read_infos(
        self, items: Iterable[tuple[Path, str, Path | None]], extra: tuple[int, ...] = ()
    ) -> list[FileInfo | BadFile]:
        """Read the grouping attributes (and those routes match on) of many files, on every core, in the
        order of `items`. Batches go to the workers as `items` come (from a walk of the inbox, say).

        Until the pool is up, this process reads them itself (a header costs about 0.1 ms here): a small
        inbox is read before the workers would have been ready, and a big one is not held up by them.
        """
        parts: list[list[FileInfo | BadFile] | Future[list[FileInfo | BadFile]]] = []
        todo = iter(items)
        while batch := [(str(p), rel, str(c) if c else None) for p, rel, c in islice(todo, 64)]:
            if self.ready():
                parts.append(self._started().submit(_info_batch, (extra, batch)))
            else:
                parts.append(_info_batch((extra, batch)))
        return [info for part in parts for info in (part if isinstance(part, list) else part.result())]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        elif self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        # Let go of the pool: its queues' semaphores are then released here, not left for the resource
        # tracker to find (and warn about) when the process ends.
        self.pool = self._server = None


def _batches(files: list[FileInfo], route: str, overrides: dict[int, tuple[str, str]]) -> Iterator[Job]:
    batch: list[tuple[int, str]] = []
    size = 0
    for i, f in enumerate(files):
        batch.append((i, str(f.path)))
        size += f.size
        if len(batch) >= _BATCH_FILES or size >= _BATCH_BYTES:
            yield route, overrides, batch
            batch, size = [], 0
    if batch:
        yield route, overrides, batch


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

    def absorb(self, part: Summary) -> None:
        """Add what one series recorded (quarantined files, gate stops) to the run's summary."""
        self.quarantined.update(part.quarantined)
        for code, message in part.reasons.items():
            self.reasons.setdefault(code, message)
        self.gated.extend(part.gated)


class Cancelled(Exception):
    """The daemon is stopping: the series is abandoned cleanly (no output, sources untouched)."""


@dataclass
class Context:
    cfg: Config
    routes: RouteTable
    keys: Keys
    journal: Journal | None
    outbox: Path
    base: Path  # what source paths (FileInfo.rel) are relative to: the inbox, or `anonymize`'s folder
    dispose: bool = True  # False for `anonymize`: sources are never touched
    progress: Callable[[int], None] | None = None
    cancel: threading.Event | None = None
    crosswalk: Crosswalk | None = None


def make_keys(cfg: Config) -> Keys:
    d = cfg.deidentify
    return Keys(
        secret=load_or_create(cfg.paths.state, d.key_file),
        patient_id_format=d.patient_id_format,
        patient_name_format=d.patient_name_format,
        digest_length=d.digest_length,
        date_shift_days=d.date_shift_days,
    )


def open_crosswalk(cfg: Config) -> Crosswalk | None:
    cw = cfg.crosswalk
    if not cw.enabled:
        return None
    from anondrop.crosswalk import open_from_config

    return open_from_config(cfg.paths.state, cw.key_file, cw.key_env)


# -- inventory --------------------------------------------------------------------------------------------
def take_inventory(
    cfg: Config, roots: list[Path], base: Path, summary: Summary, workers: Workers | None = None,
    extra: tuple[int, ...] = (),
) -> Inventory:
    """`extra`: tags the routes match on (RouteTable.match_tags), read from every file."""
    inv = Inventory()
    limits = containers.ZipLimits(
        max_entries=cfg.input.max_zip_entries,
        max_total_bytes=cfg.input.max_zip_bytes,
        max_ratio=cfg.input.max_zip_ratio,
    )

    def todo() -> Iterator[tuple[Path, str, Path | None]]:
        for root in roots:
            if root.is_file():
                yield root, _rel(root, base), None
                continue
            prefix = "" if root == base else f"{_rel(root, base)}/"
            yield from ((path, prefix + rel, None) for path, rel in walk(root, cfg.input.ignore))

    def read(items: Iterable[tuple[Path, str, Path | None]]) -> list[FileInfo | BadFile]:
        return workers.read_infos(items, extra) if workers is not None else [read_info(*i, extra) for i in items]

    # ZIP archives are told from DICOM files as the headers are read (by their first bytes); their members
    # are read in a second round, once they are unpacked. The walk goes on while the workers read.
    members: list[tuple[Path, str, Path | None]] = []
    for item in read(todo()):
        if not (isinstance(item, BadFile) and item.code == CONTAINER):
            _place(inv, item)
            continue
        path, rel = item.path, item.rel
        inv.containers.append(path)
        dest = unpack_dir(cfg.paths.state, path)
        try:
            if dest.exists():
                shutil.rmtree(dest)
            unpacked = containers.unpack_zip(path, dest, limits)
        except containers.ContainerRejected as exc:
            inv.rejected_containers.append(BadFile(path, rel, "zip-rejected", exc.reason))
            continue
        unpacked = [m for m in unpacked if m.name != OVERRIDE_NAME]  # read with its series instead
        members += [(m, f"{rel}!{m.relative_to(dest)}", path) for m in unpacked]
    for item in read(members) if members else []:
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
    if base in path.parents and not path.is_symlink():
        return str(path.relative_to(base))  # the walk's own paths: no need to ask the filesystem
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return path.name


# -- one series -------------------------------------------------------------------------------------------
def _order(files: list[FileInfo]) -> list[FileInfo]:
    return sorted(files, key=lambda f: (f.instance_number is None, f.instance_number or 0, f.sop_uid, f.rel))


@dataclass
class SeriesOutcome:
    state: str  # delivered | quarantined | gated | empty
    output: Path | None = None
    files_done: list[FileInfo] = field(default_factory=list)
    label: str = ""
    patient: str = ""  # de-identified PatientID and Study Instance UID, for the journal
    study: str = ""
    destinations: tuple[str, ...] = ()  # the route's; () means the outbox alone


@dataclass(frozen=True)
class _Plan:
    """Where a series goes and what it is called: its route, its folder below the route's, its overrides."""

    lane: Lane
    folder: tuple[str, ...]
    overrides: overrides_mod.Overrides


def _plan(ctx: Context, files: list[FileInfo]) -> _Plan:
    lane, folder = ctx.routes.choose(files)
    folder = folder[len(lane.folder) :]
    found = overrides_mod.Overrides()
    if ctx.cfg.input.overrides:
        found = overrides_mod.collect(_override_folders(ctx, files, lane))
    return _Plan(lane, folder, found)


def _override_folders(ctx: Context, files: list[FileInfo], lane: Lane) -> list[Path]:
    """Folders whose anondrop.toml applies to the series, nearest first (inside an inbox ZIP, then around it)."""
    stop = ctx.base.joinpath(*lane.folder)
    plain = [f.path.parent for f in files if f.container is None]
    if plain:
        return overrides_mod.chain(Path(os.path.commonpath(plain)), stop)
    first = files[0]
    assert first.container is not None
    unpacked = ctx.cfg.paths.state / "unpacked"
    inner = Path(os.path.commonpath([f.path.parent for f in files if f.container == first.container]))
    root = next((p for p in (inner, *inner.parents) if p.parent == unpacked), inner)
    return overrides_mod.chain(inner, root) + overrides_mod.chain(first.container.parent, stop)


def _values(report: Report, route: str, keys: Keys) -> dict[str, str]:
    return {
        **report.values,
        "route": route,
        "study_key": keys.name_key(report.study_uid),
        "series_key": keys.name_key(report.series_uid),
    }


def process_series(ctx: Context, files: list[FileInfo], workers: Workers, summary: Summary) -> SeriesOutcome:
    files = _order(files)
    try:
        plan = _plan(ctx, files)
    except overrides_mod.OverrideError as exc:
        label = ctx.keys.uid(files[0].series_uid) if files else "?"
        _quarantine(ctx, files, QuarantineReason(exc.code, str(exc), label), summary)
        return SeriesOutcome("quarantined", label=label)
    lane = plan.lane
    namer = lane.namer
    dupes: list[FileInfo] = []
    sizes: dict[str, int] = {}  # original SOP Instance UID -> size of the copy written
    cfg = ctx.cfg
    zipw: SeriesZip | None = None
    first: Report | None = None
    rel_out: PurePosixPath | None = None
    folders: list[tuple[int, str]] = []
    headers: list[tuple[bytes, bool, Identifiers]] = []  # (header, compressed, the file's identifiers)
    plain = 0
    bad: list[tuple[FileInfo, str, str]] = []
    burned: str | None = None
    hits: list[GateHit] = []
    written: list[FileInfo] = []
    sources: set[tuple[str, str, str]] = set()
    entry_names: list[str] = []
    taken: set[str] = set()
    series_values: dict[str, str] = {}

    def entry_name(values: dict[str, str]) -> str:
        name = unique_entry(namer.entry({**series_values, **values}, len(entry_names) + 1), taken)
        taken.add(name)
        entry_names.append(name)
        return name

    carried = _Carried.open(ctx, files, lane)  # the previous version's entries, for a complete new version
    try:
        for outcome in workers.map(_batches(files, lane.name, plan.overrides.by_tag())):
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
            plain += len(res.header)
            if plain <= _HEADERS_PLAIN:
                headers.append((res.header, False, res.identifiers))
            else:
                headers.append((zlib.compress(res.header, 1), True, res.identifiers))
            if zipw is None:
                first = res.report
                if lane.naming.preserve_folders:
                    folders = folder_levels(plan.folder, lane.naming.folders, first.patient_id)
                series_values = _values(first, lane.name, ctx.keys)
                rel_out = namer.zip_path(series_values, [n for _lvl, n in folders])
                zipw = SeriesZip(
                    unique_path(as_path(ctx.outbox, rel_out)),
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
            sources.add(res.source)
            if carried is not None:
                carried.copy_before(zipw, res.report.instance_number, entry_name)
            _add(zipw, entry_name(res.report.values), f, res)
            written.append(f)
        ids = Identifiers.union(own for _blob, _packed, own in headers)
        if carried is not None and zipw is not None and not burned and not hits:
            carried.copy_before(zipw, None, entry_name)
            hits.extend(carried.gate(ids))
        if not burned and not hits and zipw is not None and first is not None and rel_out is not None:
            # Cross-check: an identifier of any file of the series, in any file's output.
            # Each worker already searched its file for the file's own identifiers; what is left is
            # the rest of the series' (other instances' UIDs, another file's dates).
            for i, (blob, packed, own) in enumerate(headers):
                header = zlib.decompress(blob) if packed else blob
                if ids.contains_beyond(header, own):
                    from anondrop.deid.gate import scan_bytes  # confirms on the parsed header

                    hits.extend(scan_bytes(header, ids.minus(own), f"instance {i + 1}: "))
            manifest = _manifest(lane, first, len(entry_names))
            named = _output_names(namer, series_values, lane, rel_out, folders, entry_names, manifest)
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
        if ctx.crosswalk is not None:
            # Before the ZIP is in place: a series out in the world always has its pairs recorded.
            ctx.crosswalk.record(_pairs(sources, files[0].study_uid, first))
        same = _identical_version(ctx.outbox, rel_out, zipw.entry_digests()) if rel_out is not None else None
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
        return SeriesOutcome(
            "delivered", final, written + dupes, first.series_uid, patient=first.patient_id, study=first.study_uid,
            destinations=lane.destinations,
        )
    finally:
        if zipw is not None:
            zipw.abort()
        if carried is not None:
            carried.close()


def _add(zipw: SeriesZip, name: str, f: FileInfo, res: Packed) -> None:
    """One instance into the ZIP. Its pixel data, a span of the source, goes from file to file unread when the
    source is still the file the inventory saw before the worker read it (same inode, size, mtime and ctime):
    the bytes, and so the CRC the worker computed, hold. Otherwise it is read again, and must match that CRC
    on the way, or the series is refused."""
    if not any(isinstance(p, tuple) for p in res.parts):
        zipw.add_parts(name, res.parts, None, size=res.size, crc=res.crc, sha256=res.sha256)
        return
    fd = os.open(f.path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (f.inode, f.size, f.mtime_ns, f.ctime_ns):
            zipw.add_parts(name, res.parts, fd, size=res.size, crc=res.crc, sha256=res.sha256)
        else:
            zipw.add_stream(name, read_parts(fd, res.parts, name), size=res.size, crc=res.crc, sha256=res.sha256)
    finally:
        os.close(fd)


def _output_names(
    namer: Namer,
    values: dict[str, str],
    lane: Lane,
    rel_out: PurePosixPath,
    folders: list[tuple[int, str]],
    entries: list[str],
    manifest: dict[str, object],
) -> list[tuple[str, str]]:
    """Every name that goes out, labelled for the gate's report: path levels, entries, the manifest.

    Names taken from source folders are checked on their own (labelled with their source level) and, when
    the route allows identifiers in them, not at all; the rest of the path is then checked without them.
    """
    named: list[tuple[str, str]] = []
    if folders and lane.allow_folder_identifiers:
        rel_out = namer.zip_path(values, [])
    elif folders:
        named += [(f"source folder name kept from level {lvl}", name) for lvl, name in folders]
    named += [(f"output folder level {i + 1}", part) for i, part in enumerate(rel_out.parts[:-1])]
    named.append(("zip name", rel_out.parts[-1]))
    named += [(f"entry name {n}", n) for n in entries]
    named.append(("manifest.json", json.dumps(manifest)))
    return named


def _pairs(sources: set[tuple[str, str, str]], study: str, first: Report) -> list[Pair]:
    from anondrop.crosswalk import Pair

    patient, new_study = first.patient_id, first.study_uid
    pairs = [Pair("StudyInstanceUID", study, "", new_study, patient, new_study)]
    for pid, issuer, accession in sorted(sources):
        if pid:
            pairs.append(Pair("PatientID", pid, issuer, patient, patient, new_study))
        if accession:
            pairs.append(Pair("AccessionNumber", accession, "", first.values.get("AccessionNumber", ""), patient,
                              new_study))
    return pairs


class _Carried:
    """Entries of the series' previous ZIP that a late file's new version must carry, in instance order.

    With on_success = "delete" or "move" the earlier sources are gone; the new version is still complete
    because their de-identified entries are copied over (verified by their stored CRC). Entries replaced by a
    newly arrived copy of the same instance are left out.
    """

    def __init__(
        self,
        zf: zipfile.ZipFile,
        entries: list[tuple[float, zipfile.ZipInfo, dict[str, str]]],
        sha: dict[str, str],
    ):
        self.zf = zf
        self.entries = entries
        self.sha = sha
        self.copied: list[str] = []

    @classmethod
    def open(cls, ctx: Context, files: list[FileInfo], lane: Lane) -> _Carried | None:
        if ctx.journal is None or not files:
            return None
        label = _deid_uid(lane, ctx.keys, files[0].series_uid)
        row = ctx.journal.series(label)
        if row is None or row.state != "delivered" or not row.output:
            return None
        path = ctx.outbox / row.output
        if not path.is_file():
            return None
        from pydicom import dcmread
        from pydicom.tag import BaseTag

        from anondrop.deid.engine import plain_tag

        arriving = {_deid_uid(lane, ctx.keys, f.sop_uid) for f in files}
        tags = [0x00080018, 0x00200013, *(tag for _kw, tag in lane.policy.report_tags)]
        zf = zipfile.ZipFile(path)
        try:
            manifest = json.loads(zf.read("manifest.json"))
            sha = {e["name"]: e["sha256"] for e in manifest.get("entries", [])}
            entries = []
            for info in zf.infolist():
                if info.filename == "manifest.json":
                    continue
                with zf.open(info) as fh:
                    ds = dcmread(fh, stop_before_pixels=True, specific_tags=tags)
                if str(ds.get("SOPInstanceUID", "")) in arriving:
                    continue
                number = ds.get("InstanceNumber")
                values = {kw: plain_tag(ds, BaseTag(tag)) for kw, tag in lane.policy.report_tags}
                entries.append((float(number) if number not in (None, "") else float("inf"), info, values))
        except Exception:
            zf.close()
            raise
        entries.sort(key=lambda e: e[0])
        return cls(zf, entries, sha)

    def copy_before(self, zipw: SeriesZip, number: int | None, entry_name: Callable[[dict[str, str]], str]) -> None:
        """Copy the carried entries that sort before instance `number` (all of them for None)."""
        limit = float("inf") if number is None else float(number)
        while self.entries and (number is None or self.entries[0][0] <= limit):
            _n, info, values = self.entries.pop(0)
            name = entry_name(values)
            sha = self.sha.get(info.filename) or hashlib.sha256(self.zf.read(info)).hexdigest()
            zipw.add_stream(name, _zip_chunks(self.zf, info), size=info.file_size, crc=info.CRC, sha256=sha)
            self.copied.append(info.filename)

    def gate(self, ids: Identifiers) -> list[GateHit]:
        """The carried entries against the identifiers of the files that arrived now."""
        from pydicom import dcmread

        from anondrop.deid.gate import scan_dataset

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


def _deid_uid(lane: Lane, keys: Keys, uid: str) -> str:
    return uid if lane.policy.has("retain_uids") else keys.uid(uid)


def _identical_version(outbox: Path, rel_out: PurePosixPath, digests: list[str]) -> Path | None:
    """An existing version of this series' ZIP whose entries have exactly these SHA-256s, in order."""
    base = as_path(outbox, rel_out)
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


def _manifest(lane: Lane, first: Report, instances: int) -> dict[str, object]:
    policy = lane.policy
    return {
        "format": "anondrop-series/1",
        "anondrop_version": __version__,
        "profile": "basic",
        "options": sorted(policy.options),
        "edition": policy.edition,
        "route": lane.name,
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
    folders: set[Path] = set()
    for path in paths:
        if not path.exists():
            continue
        folders.add(path.parent)
        _dispose_one(cfg, path)
    _dispose_leftovers(cfg, folders)


def _dispose_one(cfg: Config, path: Path) -> None:
    if cfg.input.on_success == "delete":
        path.unlink()
        return
    assert cfg.paths.done is not None
    target = cfg.paths.done / _rel(path, cfg.paths.inbox)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = unique_path(target)
    shutil.move(str(path), target)


def _dispose_leftovers(cfg: Config, folders: set[Path]) -> None:
    """Override files and completion markers go with the last source of their folder (and of the folders
    below it): left alone they would keep the folder, whose name may name the patient, in the inbox."""
    inbox = cfg.paths.inbox.resolve()
    names = {OVERRIDE_NAME, *cfg.completion.markers}
    done: set[Path] = set()
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        folder = folder.resolve()
        while folder not in done and inbox in folder.parents:
            done.add(folder)
            try:
                entries = list(folder.iterdir())
            except OSError:
                break
            if any(e.is_dir() or e.name not in names for e in entries):
                break
            for entry in entries:
                with contextlib.suppress(OSError):
                    _dispose_one(cfg, entry)
            with contextlib.suppress(OSError):
                folder.rmdir()
            folder = folder.parent


def prune_empty_dirs(root: Path) -> None:
    """Remove folders left empty below root (their names may still name the patient)."""
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
        p = Path(dirpath)
        if p != root:
            with contextlib.suppress(OSError):
                p.rmdir()
