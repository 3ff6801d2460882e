"""`anondrop run`: the watched-folder daemon.

One main loop owns all state; it is never blocked by processing:
  watcher (inotify | polling) ──paths──► queue ─► main loop: observe (stat) ─► stable? read header
                                                   ─► completion evidence ─► series thread pool
  series threads ─► pipeline.process_series ─► shared worker processes ─► outcome ─► main loop:
                                                   journal, dispose sources, forget delivered files
A start-up scan picks up what arrived while the daemon was down, and a periodic rescan repairs missed
events. SIGTERM: stop taking work, cancel in-flight series (temporary files removed, sources untouched:
a restart redoes them), exit 0. SIGHUP: reload the config; an invalid one is refused and the old one kept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import shutil
import signal
import threading
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from pydicom import dcmread
from watchdog.observers.api import BaseObserver

from anondrop import config as config_mod
from anondrop import lease
from anondrop.batch import dispose_released, finish_series, settle_container
from anondrop.config import Config
from anondrop.deliver.courier import Courier
from anondrop.ingest import containers
from anondrop.ingest.completion import Rules, SeriesState, Tracker
from anondrop.ingest.scan import OVERRIDE_NAME, FileInfo, is_ignored, read_info, unpack_dir
from anondrop.ingest.watch import choose_mode, mode_of, start_observer
from anondrop.journal import Journal
from anondrop.notify import notify, watchdog_interval
from anondrop.package import clean_stale_temps
from anondrop.pipeline import (
    Cancelled,
    Context,
    SeriesOutcome,
    Summary,
    Workers,
    _quarantine,
    make_keys,
    open_crosswalk,
    process_series,
    prune_empty_dirs,
)
from anondrop.quarantine import QuarantineReason, quarantine_files
from anondrop.routes import build_routes

log = logging.getLogger("anondrop")

TICK = 0.2
PARSE_BUDGET = 0.2  # seconds of header reading per turn of the main loop


@dataclass
class _Running:
    state: SeriesState
    files: list[FileInfo]
    future: Future[SeriesOutcome]
    started: float


@dataclass
class Stats:
    delivered: int = 0
    quarantined: int = 0
    started: float = field(default_factory=time.monotonic)


class Service:
    def __init__(self, cfg_path: Path) -> None:
        self.cfg_path = cfg_path
        self.cfg: Config = config_mod.load(cfg_path)
        self.stopping = threading.Event()
        self.reload = threading.Event()
        self.changes: queue.Queue[Path] = queue.Queue()
        self.running: dict[tuple[str, str], _Running] = {}
        self.containers: dict[Path, list[Path]] = {}  # inbox ZIP -> unpacked member paths
        self.stats = Stats()
        self.unpacking: dict[Path, tuple[Path, Future[list[Path]]]] = {}  # inbox ZIP -> (folder, unpack job)
        self.member_of: dict[Path, tuple[Path, str]] = {}  # unpacked member -> (inbox ZIP, path inside it)
        self.paused_until = 0.0
        self.mode = "inotify"
        self.observer: BaseObserver | None = None
        # Held for the life of the process, through reloads: no `anondrop once` may work this journal meanwhile.
        self.lease = lease.take(self.cfg.paths.state, _command(self.cfg))
        self._setup()

    # -- set-up and reload ----------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        self.tracker = Tracker(
            Rules(cfg.watch.stable_seconds, cfg.completion.settle_seconds, cfg.completion.max_wait_seconds)
        )
        self.journal = Journal(cfg.paths.state / "journal.sqlite")
        self.routes, self.keys = build_routes(cfg), make_keys(cfg)
        self.match_tags = self.routes.match_tags
        self.crosswalk = open_crosswalk(cfg)
        self.workers = Workers(cfg.processing.worker_count(), self.routes.policies, self.keys)
        self.series_pool = ThreadPoolExecutor(cfg.processing.worker_count(), thread_name_prefix="series")
        self.io_pool = ThreadPoolExecutor(1, thread_name_prefix="unpack")
        self.ctx = Context(
            cfg, self.routes, self.keys, self.journal, cfg.paths.outbox, cfg.paths.inbox, crosswalk=self.crosswalk
        )
        self.ctx.cancel = self.stopping
        # Uploads run on their own threads, one lane per destination: a destination that is down holds up
        # neither the others nor the processing of new series.
        self.courier = Courier(cfg, self.journal, self._released) if cfg.destinations else None

    def _teardown(self, wait: bool) -> None:
        if self.courier is not None:
            self.courier.close(timeout=10.0 if wait else 5.0)
        self.series_pool.shutdown(wait=wait, cancel_futures=True)
        self.io_pool.shutdown(wait=wait, cancel_futures=True)
        self.workers.close()
        self.journal.close()
        if self.crosswalk is not None:
            self.crosswalk.close()

    def _reload(self) -> None:
        self.reload.clear()
        try:
            new = config_mod.load(self.cfg_path)
        except config_mod.ConfigError as exc:
            log.error("config_reload_refused: %s; the running config stays in force", exc)
            notify("STATUS=config reload refused; running with the previous config")
            return
        moved = None
        if new.paths.state != self.cfg.paths.state:
            try:
                moved = lease.take(new.paths.state, _command(new))
            except lease.LeaseHeld as exc:
                log.error("config_reload_refused: %s; the running config stays in force", exc)
                notify("STATUS=config reload refused; running with the previous config")
                return
        if self.running:
            log.info("config_reload: waiting for %d series in progress", len(self.running))
            # A series that failed is handled (and retried) by _collect, like any other: it must not end
            # the daemon here.
            futures.wait([run.future for run in self.running.values()])
            self._collect(time.monotonic())
        self._teardown(wait=True)
        observer_changed = new.paths.inbox != self.cfg.paths.inbox or new.watch != self.cfg.watch
        self.cfg = new
        if moved is not None:
            self.lease.release()
            self.lease = moved
        self._setup()
        if observer_changed and self.observer is not None:
            self.observer.stop()
            self._watch()
        now = time.monotonic()
        self._scan(now)
        # The new tracker knows nothing of members unpacked from inbox ZIPs (they live under state/): show
        # them again, so their containers can still finish.
        for member in list(self.member_of):
            with contextlib.suppress(OSError):
                st = member.stat()
                self.tracker.observe(member, st.st_size, st.st_mtime_ns, now - self.cfg.watch.stable_seconds)
        log.info("config_reloaded from %s", self.cfg_path)

    # -- main loop ------------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        removed = clean_stale_temps(cfg.paths.outbox)
        if removed:
            log.info("removed %d unfinished temporary file(s) left by an interrupted run", removed)
        self._watch()
        now = time.monotonic()
        self._scan(now)
        next_scan = now + cfg.watch.rescan_seconds
        notify("READY=1")
        self._status()
        ping = watchdog_interval()
        next_ping = 0.0
        next_status = 0.0
        log.info("daemon_ready: inbox %s, %s, %d worker(s)", cfg.paths.inbox, self.mode,
                 cfg.processing.worker_count())
        while not self.stopping.is_set():
            now = time.monotonic()
            # A reload waits for the series in progress without blocking the loop (watchdog pings and
            # SIGTERM go on); no new series starts meanwhile.
            if self.reload.is_set() and not self.running:
                self._reload()
                next_scan = now + self.cfg.watch.rescan_seconds
            self._drain(now)
            if now >= next_scan:
                self._scan(now)
                next_scan = now + self.cfg.watch.rescan_seconds
            backlog = self._parse_stable(now)
            self._collect(now)
            if self.courier is not None:
                self.courier.poll()
            self._collect_unpacks(now)
            if now >= self.paused_until and not self.reload.is_set():
                self._start_complete(now)
            if ping is not None and now >= next_ping:
                notify("WATCHDOG=1")
                next_ping = now + ping
            if now >= next_status:
                self._status()
                next_status = now + 5.0
            self.stopping.wait(0 if backlog else TICK)
        return self._shutdown()

    def _watch(self) -> None:
        """(Re)start the observer for the current config; the mode is chosen again (it may have changed)."""
        cfg = self.cfg
        mode = choose_mode(cfg.watch.mode, cfg.paths.inbox)
        self.observer = start_observer(cfg.paths.inbox, mode, self.changes, cfg.watch.poll_seconds)
        self.mode = mode_of(self.observer)

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload.set()

    def _shutdown(self) -> int:
        notify("STOPPING=1")
        log.info("daemon_stopping: %d series in progress are cancelled and will be redone", len(self.running))
        if self.observer is not None:
            self.observer.stop()
        for run in self.running.values():
            run.future.cancel()
        deadline = time.monotonic() + 20.0
        for run in list(self.running.values()):
            with contextlib.suppress(Exception):  # a cancelled series is redone after the restart
                run.future.result(timeout=max(0.1, deadline - time.monotonic()))
        self._collect(time.monotonic())
        self._teardown(wait=False)
        log.info("daemon_stopped")
        return 0

    def _status(self) -> None:
        # A delivered series whose sources are kept stays tracked (for late files), but collects nothing.
        collecting = sum(1 for s in self.tracker.series.values() if not s.in_flight and s.has_new_files())
        uploads = f", {len(self.courier.queue.pending())} uploads pending" if self.courier is not None else ""
        notify(
            f"STATUS={len(self.running)} processing, {collecting} collecting, "
            f"{self.stats.delivered} delivered, {self.stats.quarantined} quarantined{uploads}"
        )

    # -- noticing -------------------------------------------------------------------------------------
    def _drain(self, now: float) -> None:
        seen: set[Path] = set()
        for _ in range(10000):
            try:
                path = self.changes.get_nowait()
            except queue.Empty:
                break
            if path not in seen:
                seen.add(path)
                self._observe(path, now)

    def _observe(self, path: Path, now: float) -> None:
        inbox = self.cfg.paths.inbox
        if inbox not in path.parents:
            return
        if any(part.startswith(".") for part in path.relative_to(inbox).parts[:-1]):
            return
        news = (
            self.tracker.override if path.name == OVERRIDE_NAME
            else self.tracker.marker if path.name in self.cfg.completion.markers
            else None
        )
        if news is not None:  # not DICOM: a file whose appearance or change is itself the news
            try:
                news(path, path.stat().st_mtime_ns, now)
            except FileNotFoundError:
                news(path, None, now)
            except OSError:
                pass
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            self.tracker.vanished(path, now)
            return
        except OSError:
            return
        if not path.is_file() or is_ignored(path.name, self.cfg.input.ignore):
            return
        self.tracker.observe(path, st.st_size, st.st_mtime_ns, now)

    def _scan(self, now: float) -> None:
        """Start-up scan and periodic rescan: stat everything; vanished files are forgotten."""
        present: set[Path] = set()
        for dirpath, dirnames, filenames in os.walk(self.cfg.paths.inbox):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
            for name in filenames:
                path = Path(dirpath) / name
                present.add(path)
                self._observe(path, now)
        for path in [p for p in self.tracker.files if p not in present and not self._is_member(p)]:
            self.tracker.vanished(path, now)

    def _is_member(self, path: Path) -> bool:
        return (self.cfg.paths.state / "unpacked") in path.parents

    # -- reading headers ------------------------------------------------------------------------------
    def _parse_stable(self, now: float) -> bool:
        """Read the headers of stable files for at most PARSE_BUDGET; True when some are left for later.

        A backlog of 50,000 files takes minutes to read; reading it in one go would leave finished series
        uncollected and the workers idle meanwhile, so the main loop goes round between slices.
        """
        deadline = time.monotonic() + PARSE_BUDGET
        for path in self.tracker.stable(now):
            if time.monotonic() > deadline:
                return True
            if path.name.upper() == "DICOMDIR":
                self._dicomdir(path)
                self.tracker.parsed(path, None, now)
                continue
            if path in self.member_of:
                container, member = self.member_of[path]
                self._place(path, now, container=container, member=member)
                continue
            if not self._is_member(path) and containers.is_zip(path):
                self.tracker.parsed(path, None, now)
                self._unpack(path, now)
                continue
            self._place(path, now)
        return False

    def _place(self, path: Path, now: float, container: Path | None = None, member: str = "") -> None:
        inbox = self.cfg.paths.inbox
        rel = str(path.relative_to(inbox)) if inbox in path.parents else path.name
        if container is not None:
            # The same journal key as `anondrop once` uses: the member's path inside the ZIP, not just its
            # name (S1/IM1.dcm and S2/IM1.dcm are two files).
            rel = f"{container.relative_to(inbox)}!{member or path.name}"
        item = read_info(path, rel, container, self.match_tags, sniff_zip=False)  # ZIPs: see _parse_stable
        if isinstance(item, FileInfo):
            # Delivered by an earlier run (on_success = keep): it joins its series without starting it, so a
            # late file still makes a complete new version.
            delivered = self.journal.is_delivered(item.rel, item.size, item.mtime_ns)
            # The announced count is the same in every file of an acquisition; reading it costs a second
            # header parse, which for a backlog is most of the main loop's time, so only the first file pays.
            first = item.series_key not in self.tracker.series
            expected = _expected_count(path) if first else None
            self.tracker.parsed(path, item, now, expected=expected, delivered=delivered)
            return
        self.tracker.parsed(path, None, now)
        if item.code == "dicomdir":
            self._dicomdir(path)
            return
        info = FileInfo(path, rel, 0, 0, "", "", "", None, container)
        summary = Summary()
        _quarantine(self.ctx, [info], QuarantineReason(item.code, item.message), summary)
        self.stats.quarantined += 1

    def _unpack(self, zip_path: Path, now: float) -> None:
        """Unpack an inbox ZIP on the I/O thread: a big one takes long, and the main loop must keep going
        (watchdog pings, SIGTERM, other series). Its members are placed by _collect_unpacks."""
        cfg = self.cfg
        dest = unpack_dir(cfg.paths.state, zip_path)
        limits = containers.ZipLimits(cfg.input.max_zip_entries, cfg.input.max_zip_bytes, cfg.input.max_zip_ratio)

        def work() -> list[Path]:
            if dest.exists():
                shutil.rmtree(dest)
            return containers.unpack_zip(zip_path, dest, limits)

        self.unpacking[zip_path] = (dest, self.io_pool.submit(work))

    def _collect_unpacks(self, now: float) -> None:
        for zip_path, (dest, future) in list(self.unpacking.items()):
            if not future.done():
                continue
            del self.unpacking[zip_path]
            try:
                members = future.result()
            except containers.ContainerRejected as exc:
                cfg = self.cfg
                quarantine_files([zip_path], inbox=cfg.paths.inbox, quarantine=cfg.paths.quarantine,
                                 reason=QuarantineReason("zip-rejected", exc.reason))
                log.warning("zip-rejected: a ZIP container went to quarantine: %s", exc.reason)
                self.stats.quarantined += 1
                continue
            except OSError as exc:
                log.error("zip_unreadable: %s; it is tried again at the next rescan", exc.strerror)
                self.tracker.vanished(zip_path, now)
                continue
            members = [m for m in members if m.name != OVERRIDE_NAME]  # read with its series instead
            self.containers[zip_path] = members
            for member in members:
                st = member.stat()
                # Unpacked complete: stable at once. Headers are read by _parse_stable, within its budget.
                self.member_of[member] = (zip_path, str(member.relative_to(dest)))
                self.tracker.observe(member, st.st_size, st.st_mtime_ns, now - self.cfg.watch.stable_seconds)

    def _dicomdir(self, path: Path) -> None:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:
            return
        listing: dict[str, set[str]] = {}
        current: set[str] | None = None
        for rec in ds.get("DirectoryRecordSequence", []):
            kind = str(rec.get("DirectoryRecordType", "")).upper()
            if kind == "SERIES":
                current = listing.setdefault(str(rec.get("SeriesInstanceUID", "")), set())
            elif kind not in ("PATIENT", "STUDY") and current is not None:
                uid = str(rec.get("ReferencedSOPInstanceUIDInFile", "") or "")
                if uid:
                    current.add(uid)
        self.tracker.dicomdir(path.parent, listing)

    # -- processing -----------------------------------------------------------------------------------
    def _start_complete(self, now: float) -> None:
        for state, why in self.tracker.complete(now):
            if state.key in self.running or self.stopping.is_set():
                continue
            files = self.tracker.take(state)
            if "max_wait" in why:
                log.warning("series_complete by timeout (%s); processing what has arrived", why)
            else:
                log.info("series_complete: %d file(s): %s", len(files), why)
            summary = Summary()
            future = self.series_pool.submit(process_series, self.ctx, files, self.workers, summary)
            future.summary = summary  # type: ignore[attr-defined]
            self.running[state.key] = _Running(state, files, future, now)

    def _collect(self, now: float) -> None:
        for key, run in list(self.running.items()):
            if not run.future.done():
                continue
            del self.running[key]
            try:
                outcome = run.future.result()
            except Cancelled:
                self.tracker.release(run.state)
                continue
            except OSError as exc:
                self.tracker.release(run.state)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    pause = self.cfg.processing.disk_full_pause_seconds
                    self.paused_until = now + pause
                    log.error("outbox_full: no space left for output; pausing %g s, the series will be redone",
                              pause)
                else:
                    log.error("series_failed: %s; it will be retried", exc)
                run.state.processed_at = None
                run.state.last_change = now  # retry after the settle time
                continue
            except Exception:
                log.exception("series_failed unexpectedly; it will be retried after the settle time")
                self.tracker.release(run.state)
                run.state.last_change = now
                continue
            finish_series(self.cfg, self.journal, outcome, getattr(run.future, "summary", Summary()))
            if outcome.state == "delivered":
                self.stats.delivered += 1
            elif outcome.state in ("quarantined", "gated"):
                self.stats.quarantined += 1
            self.tracker.done(key, [f.path for f in run.files], now)
            self._finish_containers()
            if self.cfg.input.on_success != "keep":
                prune_empty_dirs(self.cfg.paths.inbox)

    def _released(self, released: list[str]) -> None:
        """Every destination confirmed a series: its held sources now follow on_success."""
        dispose_released(self.cfg, released)
        now = time.monotonic()
        for rel in released:
            self.tracker.vanished(self.cfg.paths.inbox / rel, now)

    def _finish_containers(self) -> None:
        """A ZIP container goes (per on_success) once every member is delivered or in quarantine, and the
        series packaged from it are confirmed by every destination (until then it is held)."""
        for zip_path, members in list(self.containers.items()):
            if any(self._member_pending(m) for m in members):
                continue
            try:
                unpacked: Path | None = unpack_dir(self.cfg.paths.state, zip_path)  # named from the ZIP's stat
            except FileNotFoundError:
                unpacked = None  # the ZIP was taken away; its members were handled all the same
            settle_container(self.cfg, self.journal, zip_path)
            if unpacked is not None:
                shutil.rmtree(unpacked, ignore_errors=True)
            for member in members:
                self.tracker.vanished(member, time.monotonic())
                self.member_of.pop(member, None)
            del self.containers[zip_path]

    def _member_pending(self, member: Path) -> bool:
        seen = self.tracker.files.get(member)
        if seen is None or seen.bad:
            return False
        if seen.info is None:
            return True
        state = self.tracker.series.get(seen.info.series_key)
        return state is not None and member in state.fresh


def _expected_count(path: Path) -> int | None:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=[0x00201002])
        value = ds.get("ImagesInAcquisition")
        return int(value) if value not in (None, "") else None
    except Exception:
        return None


def _command(cfg: Config) -> str:
    return f"anondrop run --config {cfg.source}"


def run(cfg_path: Path) -> int:
    return Service(cfg_path).run()
