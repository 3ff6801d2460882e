"""The courier works the delivery queue: one lane per destination, each attempt on its own thread.

A lane runs one attempt at a time, so a destination that is down or slow holds up only its own deliveries:
the other lanes, and the processing of new series, carry on. When a destination cannot be reached at all,
its lane pauses until the failed delivery's next attempt, instead of spending an attempt of every queued
series. Attempt threads never touch the journal: the owner calls `poll()` from its own loop, which records
the outcomes and starts what is due, so the daemon's main loop and `once` drive the same code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from anondrop.config import Config
from anondrop.deliver import build
from anondrop.deliver.base import DeliveryError, Destination, Parcel, Stopped
from anondrop.deliver.queue import DEAD, Delivery, DeliveryQueue, backoff_delay
from anondrop.journal import Journal

log = logging.getLogger("anondrop")

# Client libraries log connection details at INFO and data at DEBUG; anondrop's own lines say what matters.
_QUIET = ("pynetdicom", "paramiko", "botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpcore")


@dataclass(frozen=True)
class Report:
    """What one finished attempt did, for the `once` summary."""

    delivery: Delivery  # the row after the attempt was recorded
    ok: bool
    message: str = ""
    everywhere: bool = False  # the series ZIP is now confirmed at every destination


class _Attempt:
    def __init__(self, delivery: Delivery, sender: Destination, parcel: Parcel, stop: threading.Event,
                 wake: threading.Event) -> None:
        self.delivery = delivery
        self.result: frozenset[str] | BaseException | None = None
        self.done = threading.Event()
        self._wake = wake
        # A daemon thread: an upload stuck in a network call must not keep the process from exiting.
        self.thread = threading.Thread(target=self._run, args=(sender, parcel, stop), daemon=True,
                                       name=f"deliver-{sender.name}")
        self.thread.start()

    def _run(self, sender: Destination, parcel: Parcel, stop: threading.Event) -> None:
        try:
            self.result = sender.deliver(parcel, stop)
        except DeliveryError as exc:
            exc.series = parcel.series
            self.result = exc
        except BaseException as exc:  # recorded as a failed attempt by the owner, with its sentence
            self.result = exc
        finally:
            self.done.set()
            self._wake.set()


class Courier:
    def __init__(self, cfg: Config, journal: Journal, release: Callable[[list[str]], None]) -> None:
        for name in _QUIET:
            logger = logging.getLogger(name)
            logger.setLevel(max(logging.WARNING, logger.level))
        # pynetdicom logs a refused connection as an error of its own; the delivery_failed line says it better.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        self.cfg = cfg
        self.queue = DeliveryQueue(journal)
        self.release = release
        self.settings = {d.name: d for d in cfg.destinations}
        self.senders: dict[str, Destination] = {d.name: build(d, cfg) for d in cfg.destinations}
        self.running: dict[str, _Attempt] = {}
        self.paused: dict[str, float] = {}
        self.stop = threading.Event()
        self.wake = threading.Event()
        orphans = {d.destination for d in self.queue.pending()} - set(self.senders)
        for name in sorted(orphans):
            log.warning("delivery_orphaned: deliveries wait for destination %r, which is no longer configured; "
                        "add it back to deliver them (their sources stay held until then)", name)

    # -- driving --------------------------------------------------------------------------------------
    def poll(self) -> list[Report]:
        """Record finished attempts, then start every due delivery whose lane is free."""
        reports = []
        for name, attempt in list(self.running.items()):
            if attempt.done.is_set():
                del self.running[name]
                report = self._record(attempt)
                if report is not None:
                    reports.append(report)
        if not self.stop.is_set():
            self._start_due(time.time())
        return reports

    def busy(self) -> bool:
        return bool(self.running) or bool(self.queue.pending(self.senders))

    def run_until_settled(self) -> list[Report]:
        """For `once`: until every queued delivery is confirmed or dead-lettered (retries bounded by the config)."""
        reports: list[Report] = []
        while True:
            reports += self.poll()
            if not self.busy():
                return reports
            self.wake.wait(self._sleep())
            self.wake.clear()

    def close(self, timeout: float = 10.0) -> list[Report]:
        """Stop starting attempts, give running ones `timeout` seconds to finish, record those that did.

        An attempt still running is abandoned without being counted: its delivery stays pending and is
        resumed at the next start (a destination receiving an instance twice stores it once).
        """
        self.stop.set()
        deadline = time.monotonic() + timeout
        for attempt in self.running.values():
            attempt.thread.join(max(0.0, deadline - time.monotonic()))
        reports = []
        for attempt in self.running.values():
            if attempt.done.is_set():
                report = self._record(attempt)
                if report is not None:
                    reports.append(report)
        self.running.clear()
        return reports

    def _sleep(self) -> float:
        now = time.time()
        waits = [max(d.next_at, self.paused.get(d.destination, 0.0)) - now
                 for d in self.queue.pending(self.senders) if d.destination not in self.running]
        return min([1.0, *waits]) if waits else 1.0

    def _start_due(self, now: float) -> None:
        for delivery in self.queue.due(now, self.senders):
            name = delivery.destination
            if name in self.running or self.paused.get(name, 0.0) > now:
                continue
            parcel = Parcel(delivery.series, self.cfg.paths.outbox / delivery.output, delivery.output,
                            delivery.confirmed)
            self.running[name] = _Attempt(delivery, self.senders[name], parcel, self.stop, self.wake)

    # -- recording ------------------------------------------------------------------------------------
    def _record(self, attempt: _Attempt) -> Report | None:
        d = attempt.delivery
        result = attempt.result
        if isinstance(result, Stopped):
            return None
        if isinstance(result, frozenset):
            everywhere, released = self.queue.confirm(d, result)
            log.info("delivery_confirmed: series %s -> %s (%s)", d.series, d.destination, d.output)
            if everywhere:
                log.info("series_confirmed_everywhere: series %s (%s)", d.series, d.output)
                try:
                    self.release(released)
                except OSError as exc:  # the uploads stand; a source that cannot go yet must not stop the run
                    log.error("sources_not_disposed: series %s: %s; they stay in the inbox, already delivered",
                              d.series, exc.strerror or exc)
            row = self.queue.get(d.id)
            assert row is not None
            return Report(row, True, everywhere=everywhere)
        reachable = True
        if isinstance(result, DeliveryError):
            message, confirmed, reachable = result.message, d.confirmed | result.confirmed, result.reachable
        else:
            message = f"unexpected error: {type(result).__name__}: {result}"
            confirmed = d.confirmed
            log.error("delivery_failed unexpectedly for %s", d.destination, exc_info=result)
        setting = self.settings[d.destination]
        row = self.queue.fail(d, message, confirmed, max_attempts=setting.max_attempts,
                              backoff_seconds=setting.backoff_seconds)
        if row.state == DEAD:
            log.error("delivery_dead_lettered: series %s -> %s after %d attempt(s): %s; once fixed, run "
                      "`anondrop deliveries retry %d`", d.series, d.destination, row.attempts, message, d.id)
        else:
            log.warning("delivery_failed: series %s -> %s, attempt %d of %d: %s; next attempt in %.3g s",
                        d.series, d.destination, row.attempts, setting.max_attempts, message,
                        max(0.0, row.next_at - time.time()))
        if not reachable:
            self.paused[d.destination] = max(row.next_at, time.time() + backoff_delay(1, setting.backoff_seconds))
        return Report(row, False, message)
