"""`anondrop once` and `anondrop anonymize`: one pass over a folder, every series through the pipeline."""

from __future__ import annotations

import logging
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from anondrop import lease
from anondrop.config import Config
from anondrop.deliver.queue import DEAD, DeliveryQueue
from anondrop.ingest.scan import FileInfo, Inventory, unpack_dir
from anondrop.journal import Journal
from anondrop.package import clean_stale_temps
from anondrop.pipeline import (
    SERIES_DELIVERED,
    SERIES_GATED,
    SERIES_QUARANTINED,
    Context,
    SeriesOutcome,
    Summary,
    Workers,
    _quarantine,
    _rel,
    dispose,
    make_keys,
    open_crosswalk,
    process_series,
    prune_empty_dirs,
    take_inventory,
)
from anondrop.quarantine import QuarantineReason, quarantine_files
from anondrop.routes import build_routes

if TYPE_CHECKING:  # the senders (TLS, their clients) are imported only when destinations are configured
    from anondrop.deliver.courier import Courier, Report

log = logging.getLogger("anondrop")

ProgressFactory = Callable[[int], Callable[[int], None]]


def run_once(cfg: Config, progress: ProgressFactory | None = None) -> Summary:
    """Every complete series under the inbox becomes one ZIP in the outbox; bad input goes to quarantine."""
    summary = Summary()
    # Before the outbox's leftovers are cleaned and the journal opened: a daemon on this state folder would
    # lose its temporary ZIPs and share the journal (see lease.py).
    held = lease.take(cfg.paths.state, f"anondrop once --config {cfg.source}")
    removed = clean_stale_temps(cfg.paths.outbox)
    if removed:
        log.info("removed %d unfinished temporary file(s) from an earlier run", removed)
    journal = Journal(cfg.paths.state / "journal.sqlite")
    routes, keys = build_routes(cfg), make_keys(cfg)
    cross = open_crosswalk(cfg)
    workers = Workers(cfg.processing.worker_count(), routes.policies, keys, light=True)
    series_pool = ThreadPoolExecutor(2, thread_name_prefix="series")
    courier: Courier | None = None
    try:
        if cfg.destinations:
            from anondrop.deliver.courier import Courier

            # Uploads (earlier runs' pending ones too) go on while the next series are de-identified.
            courier = Courier(cfg, journal, lambda released: dispose_released(cfg, released))
            _tally(courier.poll(), summary)
        inv = take_inventory(cfg, [cfg.paths.inbox], cfg.paths.inbox, summary, workers, routes.match_tags)
        # Named from each ZIP's stat: taken now, as a confirmation may dispose of a container during the run.
        unpacked = {c: unpack_dir(cfg.paths.state, c) for c in inv.containers}
        ctx = Context(cfg, routes, keys, journal, cfg.paths.outbox, cfg.paths.inbox, crosswalk=cross)
        _quarantine_bad(ctx, inv, summary)
        todo = _pending(journal, inv, summary)
        total = sum(len(f) for f in todo.values())
        ctx.progress = progress(total) if progress else None
        handled: set[Path] = set()
        # Two series in flight: while one is finished (gate cross-check, ZIP commit, journal), the next one
        # already keeps the workers busy. Each is recorded in the order the inbox listed it.
        in_flight: deque[tuple[list[FileInfo], Summary, Future[SeriesOutcome]]] = deque()

        def finish_next() -> None:
            files, part, future = in_flight.popleft()
            outcome = future.result()
            summary.absorb(part)
            handled.update(f.path for f in files)
            finish_series(cfg, journal, outcome, summary)
            if courier is not None:
                _tally(courier.poll(), summary)

        for files in todo.values():
            summary.files_in += len(files)
            summary.bytes_in += sum(f.size for f in files)
            part = Summary()
            in_flight.append((files, part, series_pool.submit(process_series, ctx, files, workers, part)))
            while len(in_flight) > 1:
                finish_next()
        while in_flight:
            finish_next()
        if courier is not None:
            _tally(courier.run_until_settled(), summary)
        _finish_containers(cfg, journal, inv, handled, unpacked)
        if cfg.input.on_success != "keep":
            _dispose_dicomdirs(cfg, inv)
            prune_empty_dirs(cfg.paths.inbox)
    finally:
        if courier is not None:
            courier.close()
        series_pool.shutdown(wait=True, cancel_futures=True)
        workers.close()
        journal.close()
        if cross is not None:
            cross.close()
        held.release()
    return summary


def _tally(reports: list[Report], summary: Summary) -> None:
    for report in reports:
        d = report.delivery
        if report.ok:
            summary.sent[d.destination] += 1
        elif d.state == DEAD:
            summary.dead.append((d.series, d.destination, report.message))


def finish_series(cfg: Config, journal: Journal, outcome: SeriesOutcome, summary: Summary) -> None:
    """Record a processed series in the journal and, for a delivered one, only then dispose of its sources."""
    if outcome.state == "delivered" and outcome.output is not None:
        rel = str(outcome.output.relative_to(cfg.paths.outbox))
        summary.delivered.append((rel, len(outcome.files_done)))
        sources = [f for f in outcome.files_done if f.container is None]
        destinations = list(outcome.destinations)
        if destinations:
            # Queued before the journal records the series: a crash in between redoes the series (one more
            # version goes out), never leaves a ZIP that no destination is sent. The sources are held until
            # every destination has confirmed; members of inbox ZIPs are held through their container.
            DeliveryQueue(journal).enqueue(outcome.label, rel, destinations, [f.rel for f in sources])
        journal.set_series(
            outcome.label, study=outcome.study, patient=outcome.patient,
            state="delivered", files=len(outcome.files_done), output=rel, new_version=True,
        )
        journal.mark_files([(f.rel, f.size, f.mtime_ns) for f in outcome.files_done], outcome.label, "delivered")
        journal.event(SERIES_DELIVERED, outcome.label, f"{len(outcome.files_done)} files -> {rel}")
        log.info("%s: series %s, %d files -> %s", SERIES_DELIVERED, outcome.label, len(outcome.files_done), rel)
        if destinations:
            log.info("delivery_queued: series %s -> %s", outcome.label, ", ".join(destinations))
            return
        # Only now, with the ZIP renamed into place and the journal saying so, may sources go.
        dispose(cfg, [f.path for f in sources])
    elif outcome.state in ("quarantined", "gated"):
        event = SERIES_GATED if outcome.state == "gated" else SERIES_QUARANTINED
        journal.event(event, outcome.label)
        journal.set_series(outcome.label, study="", patient="", state="quarantined", reason=event)


def run_anonymize(cfg: Config, source: Path, out: Path, progress: ProgressFactory | None = None) -> Summary:
    """Ad hoc: de-identify a file or folder into ZIPs under `out`; the source and the inbox stay untouched."""
    summary = Summary()
    out.mkdir(parents=True, exist_ok=True)
    routes, keys = build_routes(cfg), make_keys(cfg)
    workers = Workers(cfg.processing.worker_count(), routes.policies, keys, light=True)
    try:
        base = source if source.is_dir() else source.parent
        inv = take_inventory(cfg, [source], base, summary, workers, routes.match_tags)
        ctx = Context(cfg, routes, keys, None, out, base, dispose=False)
        for bad in inv.bad + inv.rejected_containers:
            summary.quarantined[bad.code] += 1
            summary.reasons.setdefault(bad.code, bad.message)
        total = sum(len(f) for f in inv.series.values())
        ctx.progress = progress(total) if progress else None
        for files in inv.series.values():
            summary.files_in += len(files)
            summary.bytes_in += sum(f.size for f in files)
            outcome = process_series(ctx, files, workers, summary)
            if outcome.state == "delivered" and outcome.output is not None:
                summary.delivered.append((str(outcome.output.relative_to(out)), len(outcome.files_done)))
        for container in inv.containers:
            shutil.rmtree(unpack_dir(cfg.paths.state, container), ignore_errors=True)
    finally:
        workers.close()
    return summary


def _quarantine_bad(ctx: Context, inv: Inventory, summary: Summary) -> None:
    cfg = ctx.cfg
    for bad in inv.rejected_containers:
        reason = QuarantineReason(bad.code, bad.message)
        quarantine_files([bad.path], inbox=cfg.paths.inbox, quarantine=cfg.paths.quarantine, reason=reason)
        summary.quarantined[bad.code] += 1
        summary.reasons.setdefault(bad.code, bad.message)
        log.warning("%s: a ZIP container went to quarantine: %s", bad.code, bad.message)
    for bad in inv.bad:
        info = FileInfo(bad.path, bad.rel, _size(bad.path), 0, "", "", "", None, bad.container)
        _quarantine(ctx, [info], QuarantineReason(bad.code, bad.message), summary)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _pending(journal: Journal, inv: Inventory, summary: Summary) -> dict[tuple[str, str], list[FileInfo]]:
    """Series with at least one file not yet delivered (a late file makes a new, complete version)."""
    todo = {}
    for key, files in inv.series.items():
        fresh = [f for f in files if not journal.is_delivered(f.rel, f.size, f.mtime_ns)]
        if fresh:
            todo[key] = files
        else:
            summary.skipped += len(files)
    return todo


def _finish_containers(
    cfg: Config, journal: Journal, inv: Inventory, handled: set[Path], unpacked: dict[Path, Path]
) -> None:
    """A ZIP container is disposed once every member is delivered or in quarantine (as a copy)."""
    members: dict[Path, list[Path]] = {}
    for files in inv.series.values():
        for f in files:
            if f.container is not None:
                members.setdefault(f.container, []).append(f.path)
    for container in inv.containers:
        paths = members.get(container, [])
        if all(p in handled for p in paths):
            settle_container(cfg, journal, container)
        shutil.rmtree(unpacked[container], ignore_errors=True)


def settle_container(cfg: Config, journal: Journal, container: Path) -> bool:
    """Dispose of an inbox ZIP whose members are all handled, unless a series packaged from it still waits
    for a destination: then it is held by those series' ZIPs and disposed with the last confirmation."""
    rel = _rel(container, cfg.paths.inbox)
    queue = DeliveryQueue(journal)
    waiting = queue.unsettled_outputs(queue.series_of_members(rel))
    if waiting:
        queue.hold(waiting, rel)
        return False
    if queue.is_held(rel):
        return False
    dispose(cfg, [container])
    return True


def dispose_released(cfg: Config, released: list[str]) -> None:
    """Sources (relative to the inbox) whose every delivery has confirmed: now they follow on_success."""
    inbox = cfg.paths.inbox.resolve()
    paths = [inbox / rel for rel in released]
    dispose(cfg, [p for p in paths if inbox in p.resolve().parents])
    if released and cfg.input.on_success != "keep":
        prune_empty_dirs(cfg.paths.inbox)


def _dispose_dicomdirs(cfg: Config, inv: Inventory) -> None:
    """A DICOMDIR is never copied out; it goes with its folder once no DICOM file is left beside it."""
    for dicomdir in inv.dicomdirs:
        folder = dicomdir.parent
        left = [p for p in folder.rglob("*") if p.is_file() and p != dicomdir and not p.name.startswith(".")]
        if not left:
            dispose(cfg, [dicomdir])
