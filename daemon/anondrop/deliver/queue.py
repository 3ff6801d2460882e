"""The delivery queue: rows of the journal's `deliveries` table, one per (series ZIP, destination).

A row is `pending` until its destination confirms (`delivered`) or it has failed `max_attempts` times
(`dead`: shown by `anondrop status`, retried by `anondrop deliveries retry`). Sources of a series are held
(`held_sources`) until every delivery of its ZIP has confirmed; a source held by two outputs (an inbox ZIP
with members in two series) is released with the last of them. Every change is one SQLite transaction in
the journal (synchronous=FULL), so a restart resumes exactly where the queue was.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from anondrop.journal import Journal

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
BACKOFF_CAP_SECONDS = 3600.0

# Events (named as in the journal and the logs).
DELIVERY_QUEUED = "delivery_queued"
DELIVERY_CONFIRMED = "delivery_confirmed"
DELIVERY_FAILED = "delivery_failed"
DELIVERY_DEAD = "delivery_dead_lettered"
DELIVERY_RETRIED = "delivery_retried"
SERIES_CONFIRMED = "series_confirmed_everywhere"

_COLUMNS = "id, series, output, destination, state, attempts, next_at, confirmed, error, updated"


@dataclass(frozen=True)
class Delivery:
    id: int
    series: str
    output: str  # the series ZIP, relative to the outbox
    destination: str
    state: str
    attempts: int
    next_at: float
    confirmed: frozenset[str]
    error: str | None
    updated: float

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> Delivery:
        id_, series, output, dest, state, attempts, next_at, confirmed, error, updated = row
        return cls(
            int(str(id_)), str(series), str(output), str(dest), str(state), int(str(attempts)),
            float(str(next_at)), frozenset(json.loads(str(confirmed))), None if error is None else str(error),
            float(str(updated)),
        )


def backoff_delay(failures: int, base: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `failures`-th failed attempt: base * 2^(failures-1), +-25 % jitter, capped.

    The jitter spreads the retries of many series that failed together (a PACS restart), so they do not all
    come back at the same moment.
    """
    delay = min(BACKOFF_CAP_SECONDS, base * 2.0 ** max(0, failures - 1))
    return float(delay * (0.75 + 0.5 * (rng or random).random()))


class DeliveryQueue:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.db = journal.db

    # -- filling --------------------------------------------------------------------------------------
    def enqueue(self, series: str, output: str, destinations: Iterable[str], sources: Iterable[str]) -> None:
        """Queue one ZIP for every destination and hold its sources, in one transaction."""
        now = time.time()
        names = list(destinations)
        with self.journal.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO deliveries(series, output, destination, state, attempts, next_at, "
                "created, updated) VALUES (?,?,?,?,0,?,?,?)",
                [(series, output, name, PENDING, now, now, now) for name in names],
            )
            db.executemany(
                "INSERT OR IGNORE INTO held_sources(output, path) VALUES (?,?)", [(output, p) for p in sources]
            )
            db.execute(
                "INSERT INTO events(at, event, series, detail) VALUES (?,?,?,?)",
                (now, DELIVERY_QUEUED, series, f"{output} -> {', '.join(names)}"),
            )

    def hold(self, outputs: Iterable[str], path: str) -> None:
        """Keep a source (an inbox ZIP container) until every listed output has confirmed everywhere."""
        with self.journal.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO held_sources(output, path) VALUES (?,?)",
                           [(o, path) for o in outputs])

    # -- reading --------------------------------------------------------------------------------------
    def get(self, delivery_id: int) -> Delivery | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        return Delivery.from_row(row) if row else None

    def due(self, now: float, destinations: Collection[str]) -> list[Delivery]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM deliveries WHERE state = ? AND next_at <= ? ORDER BY next_at, id",
            (PENDING, now),
        ).fetchall()
        return [d for d in map(Delivery.from_row, rows) if d.destination in destinations]

    def pending(self, destinations: Collection[str] | None = None) -> list[Delivery]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM deliveries WHERE state = ? ORDER BY next_at, id",
                               (PENDING,)).fetchall()
        return [d for d in map(Delivery.from_row, rows) if destinations is None or d.destination in destinations]

    def dead(self) -> list[Delivery]:
        return self.listing(DEAD)

    def listing(self, state: str | None = None) -> list[Delivery]:
        if state is None:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM deliveries ORDER BY id")
        else:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM deliveries WHERE state = ? ORDER BY id", (state,))
        return [Delivery.from_row(r) for r in rows.fetchall()]

    def for_series(self, series: str) -> list[Delivery]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM deliveries WHERE series = ? ORDER BY id", (series,))
        return [Delivery.from_row(r) for r in rows.fetchall()]

    def settled(self, series: str) -> bool:
        """True when no delivery of any version of the series is still pending or dead-lettered."""
        row = self.db.execute("SELECT 1 FROM deliveries WHERE series = ? AND state != ? LIMIT 1",
                              (series, DELIVERED)).fetchone()
        return row is None

    def unsettled_outputs(self, series: Iterable[str]) -> list[str]:
        out: list[str] = []
        for s in series:
            rows = self.db.execute("SELECT DISTINCT output FROM deliveries WHERE series = ? AND state != ?",
                                   (s, DELIVERED)).fetchall()
            out += [str(r[0]) for r in rows if str(r[0]) not in out]
        return out

    def series_of_members(self, container: str) -> list[str]:
        """Series packaged from members of an inbox ZIP (their journal paths are '<container>!<member>')."""
        prefix = container + "!"
        rows = self.db.execute(
            "SELECT DISTINCT series FROM files WHERE substr(path, 1, ?) = ? AND series IS NOT NULL",
            (len(prefix), prefix),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def is_held(self, path: str) -> bool:
        return self.db.execute("SELECT 1 FROM held_sources WHERE path = ? LIMIT 1", (path,)).fetchone() is not None

    def counts(self) -> dict[str, dict[str, int]]:
        """destination -> state -> rows."""
        out: dict[str, dict[str, int]] = {}
        for dest, state, n in self.db.execute(
            "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"
        ).fetchall():
            out.setdefault(str(dest), {})[str(state)] = int(n)
        return out

    # -- outcomes -------------------------------------------------------------------------------------
    def confirm(self, delivery: Delivery, confirmed: frozenset[str]) -> tuple[bool, list[str]]:
        """Record a confirmed delivery. Returns (the output is now confirmed everywhere, sources released).

        A released source is one no other output still holds; the caller disposes of it.
        """
        now = time.time()
        with self.journal.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, confirmed = ?, error = NULL, "
                "updated = ? WHERE id = ?",
                (DELIVERED, json.dumps(sorted(confirmed)), now, delivery.id),
            )
            db.execute("INSERT INTO events(at, event, series, detail) VALUES (?,?,?,?)",
                       (now, DELIVERY_CONFIRMED, delivery.series, f"{delivery.output} -> {delivery.destination}"))
            left = db.execute("SELECT 1 FROM deliveries WHERE output = ? AND state != ? LIMIT 1",
                              (delivery.output, DELIVERED)).fetchone()
            if left is not None:
                return False, []
            held = [str(r[0]) for r in db.execute("SELECT path FROM held_sources WHERE output = ?",
                                                  (delivery.output,)).fetchall()]
            db.execute("DELETE FROM held_sources WHERE output = ?", (delivery.output,))
            released = [p for p in held
                        if db.execute("SELECT 1 FROM held_sources WHERE path = ? LIMIT 1", (p,)).fetchone() is None]
            db.execute("INSERT INTO events(at, event, series, detail) VALUES (?,?,?,?)",
                       (now, SERIES_CONFIRMED, delivery.series, delivery.output))
        return True, released

    def fail(self, delivery: Delivery, error: str, confirmed: frozenset[str], *, max_attempts: int,
             backoff_seconds: float, rng: random.Random | None = None) -> Delivery:
        """Record a failed attempt: pending again after the backoff, or dead after max_attempts."""
        now = time.time()
        attempts = delivery.attempts + 1
        state = DEAD if attempts >= max_attempts else PENDING
        next_at = now + (0.0 if state == DEAD else backoff_delay(attempts, backoff_seconds, rng))
        with self.journal.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_at = ?, confirmed = ?, error = ?, updated = ? "
                "WHERE id = ?",
                (state, attempts, next_at, json.dumps(sorted(confirmed)), error, now, delivery.id),
            )
            event = DELIVERY_DEAD if state == DEAD else DELIVERY_FAILED
            db.execute("INSERT INTO events(at, event, series, detail) VALUES (?,?,?,?)",
                       (now, event, delivery.series,
                        f"{delivery.output} -> {delivery.destination}, attempt {attempts}: {error}"))
        updated = self.get(delivery.id)
        assert updated is not None
        return updated

    def retry(self, delivery_id: int | None = None) -> int:
        """Dead-lettered deliveries (one, or all with None) become pending now, with a fresh attempt count.

        What was confirmed before stays confirmed: only the rest is sent again.
        """
        now = time.time()
        where, args = ("state = ?", [DEAD]) if delivery_id is None else ("state = ? AND id = ?", [DEAD, delivery_id])
        with self.journal.transaction() as db:
            rows = db.execute(f"SELECT id, series, output, destination FROM deliveries WHERE {where}",
                              args).fetchall()
            db.execute(f"UPDATE deliveries SET state = ?, attempts = 0, next_at = ?, updated = ? WHERE {where}",
                       [PENDING, now, now, *args])
            db.executemany("INSERT INTO events(at, event, series, detail) VALUES (?,?,?,?)",
                           [(now, DELIVERY_RETRIED, s, f"{o} -> {d}") for _id, s, o, d in rows])
        return len(rows)
