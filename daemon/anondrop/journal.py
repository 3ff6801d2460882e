"""The journal: a SQLite file in ``state/``, the single source of truth about files and series.

WAL mode with synchronous=FULL: a row committed is on disk, so a crash after "delivered" never repeats a
series and a crash before it always redoes it. The journal never holds an original identifier: series
are keyed by their de-identified UIDs and files by their path relative to the inbox (paths are shown to
operators, who can see the inbox anyway; the README says so).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path      TEXT PRIMARY KEY,          -- relative to the inbox ("zip:<container>!<entry>" for members)
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    series    TEXT,                      -- de-identified Series Instance UID
    state     TEXT NOT NULL,             -- seen | delivered | quarantined
    updated   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_series ON files(series);
CREATE TABLE IF NOT EXISTS series (
    series    TEXT PRIMARY KEY,          -- de-identified Series Instance UID
    study     TEXT NOT NULL,             -- de-identified Study Instance UID
    patient   TEXT NOT NULL,             -- pseudonymised PatientID
    state     TEXT NOT NULL,             -- collecting | complete | processing | delivered | quarantined
    versions  INTEGER NOT NULL DEFAULT 0,
    files     INTEGER NOT NULL DEFAULT 0,
    output    TEXT,                      -- last output, relative to the outbox
    reason    TEXT,
    updated   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        REAL NOT NULL,
    event     TEXT NOT NULL,             -- series_delivered, series_quarantined, file_quarantined, ...
    series    TEXT,
    detail    TEXT
);
-- Uploads (anondrop.deliver): one row per (series ZIP, destination), worked by retries with backoff.
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    series      TEXT NOT NULL,           -- de-identified Series Instance UID
    output      TEXT NOT NULL,           -- the series ZIP, relative to the outbox
    destination TEXT NOT NULL,           -- destinations[].name
    state       TEXT NOT NULL,           -- pending | delivered | dead
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL,           -- wall-clock time of the next attempt
    confirmed   TEXT NOT NULL DEFAULT '[]', -- JSON: ZIP entries the destination has confirmed so far
    error       TEXT,                    -- the last failure, as a sentence
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    UNIQUE(output, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_at);
-- Sources (relative to the inbox) kept until every delivery of the output that holds them has confirmed.
CREATE TABLE IF NOT EXISTS held_sources (
    output    TEXT NOT NULL,
    path      TEXT NOT NULL,
    PRIMARY KEY (output, path)
);
CREATE INDEX IF NOT EXISTS held_sources_path ON held_sources(path);
"""


@dataclass(frozen=True)
class SeriesRow:
    series: str
    study: str
    patient: str
    state: str
    versions: int
    files: int
    output: str | None
    reason: str | None
    updated: float


class Rows:
    """The rows a statement returned, read to the end while the connection was held."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._rows)


class Connection:
    """The journal's SQLite connection, shared by threads: `once` quarantines files from its series threads
    while its main thread records finished series, and the daemon's courier works alongside. Every
    statement, and every transaction as a whole (Journal.transaction), holds one lock, so a statement of
    one thread never lands inside another thread's transaction (SQLite would refuse a second BEGIN, or
    commit or roll back the other's write with its own)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
        self.lock = threading.RLock()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        with self.lock:
            return Rows(self._db.execute(sql, params).fetchall())

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        with self.lock:
            self._db.executemany(sql, params)

    def executescript(self, sql: str) -> None:
        with self.lock:
            self._db.executescript(sql)

    def close(self) -> None:
        with self.lock:
            self._db.close()


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = Connection(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.db.lock:  # held to the COMMIT: other threads' statements wait (see Connection)
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # -- files ---------------------------------------------------------------------------------------
    def is_delivered(self, rel: str, size: int, mtime_ns: int) -> bool:
        row = self.db.execute("SELECT size, mtime_ns, state FROM files WHERE path = ?", (rel,)).fetchone()
        return row is not None and row[2] == "delivered" and row[0] == size and row[1] == mtime_ns

    def mark_files(self, files: Iterable[tuple[str, int, int]], series: str | None, state: str) -> None:
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO files(path, size, mtime_ns, series, state, updated) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(path) DO UPDATE SET size=excluded.size, mtime_ns=excluded.mtime_ns, "
                "series=excluded.series, state=excluded.state, updated=excluded.updated",
                [(rel, size, mtime, series, state, now) for rel, size, mtime in files],
            )

    # -- series --------------------------------------------------------------------------------------
    def series(self, series: str) -> SeriesRow | None:
        row = self.db.execute(
            "SELECT series, study, patient, state, versions, files, output, reason, updated "
            "FROM series WHERE series = ?",
            (series,),
        ).fetchone()
        return SeriesRow(*row) if row else None

    def set_series(
        self,
        series: str,
        *,
        study: str,
        patient: str,
        state: str,
        files: int = 0,
        output: str | None = None,
        reason: str | None = None,
        new_version: bool = False,
    ) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO series(series, study, patient, state, versions, files, output, reason, updated) "
                "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(series) DO UPDATE SET state=excluded.state, "
                "versions=series.versions + ?, files=excluded.files, "
                "output=COALESCE(excluded.output, series.output), reason=excluded.reason, "
                "updated=excluded.updated",
                (
                    series,
                    study,
                    patient,
                    state,
                    int(new_version),
                    files,
                    output,
                    reason,
                    now,
                    int(new_version),
                ),
            )

    def event(self, event: str, series: str | None = None, detail: str = "") -> None:
        self.db.execute(
            "INSERT INTO events(at, event, series, detail) VALUES (?,?,?,?)",
            (time.time(), event, series, detail),
        )

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall())
