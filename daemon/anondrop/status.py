"""What `anondrop status` reports, gathered from the journal and the quarantine folder."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from anondrop.config import Config
from anondrop.deliver.queue import DeliveryQueue
from anondrop.journal import Journal
from anondrop.quarantine import list_entries


def gather(cfg: Config, recent: int = 10) -> dict[str, Any]:
    journal = Journal(cfg.paths.state / "journal.sqlite")
    try:
        db = journal.db
        by_state = dict(db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall())
        now = time.time()
        in_progress = [
            {"series": s, "state": st, "age_seconds": now - upd}
            for s, st, upd in db.execute(
                "SELECT series, state, updated FROM series WHERE state NOT IN ('delivered', 'quarantined') "
                "ORDER BY updated"
            ).fetchall()
        ]
        events = [
            {"at": datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S"), "event": ev, "series": s,
             "detail": d}
            for at, ev, s, d in db.execute(
                "SELECT at, event, series, detail FROM events ORDER BY id DESC LIMIT ?", (recent,)
            ).fetchall()
        ]
        deliveries = _deliveries(DeliveryQueue(journal), now)
    finally:
        journal.close()
    entries = list_entries(cfg.paths.quarantine) if cfg.paths.quarantine.exists() else []
    reasons = Counter(e.reason.code for e in entries)
    return {
        "series_by_state": by_state,
        "in_progress": in_progress,
        "recent_events": events,
        "deliveries": deliveries,
        "quarantine": {
            "entries": len(entries),
            "files": sum(e.file_count for e in entries),
            "by_reason": dict(reasons),
        },
    }


def _deliveries(queue: DeliveryQueue, now: float) -> dict[str, Any]:
    """Per destination: rows by state; the dead letters with their last error; the oldest pending age."""
    pending = queue.pending()
    return {
        "by_destination": queue.counts(),
        "pending": len(pending),
        "oldest_pending_seconds": max((now - p.updated for p in pending), default=0.0),
        "dead_letters": [
            {"id": d.id, "series": d.series, "destination": d.destination, "output": d.output,
             "attempts": d.attempts, "error": d.error or "",
             "at": datetime.fromtimestamp(d.updated, UTC).strftime("%Y-%m-%d %H:%M:%S")}
            for d in queue.dead()
        ],
    }
