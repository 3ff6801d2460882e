"""The journal is shared by threads: `once` quarantines files from its series threads while its main thread
records finished series (and the daemon's courier writes deliveries meanwhile). No write may fail or vanish
because another thread was writing at the same moment."""

from __future__ import annotations

import threading
from pathlib import Path

from anondrop.journal import Journal


def test_threads_writing_at_once_neither_fail_nor_lose_rows(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def series_thread(n: int) -> None:  # what a series thread does when it quarantines a bad file
        try:
            start.wait()
            for i in range(150):
                journal.mark_files([(f"t{n}/f{i}.dcm", i, i)], f"2.25.{n}", "quarantined")
                journal.event("file_quarantined", f"2.25.{n}", f"bad: {i}")
        except BaseException as exc:
            errors.append(exc)

    def main_thread() -> None:  # what the main thread does when a series is delivered
        try:
            start.wait()
            for i in range(150):
                journal.set_series(f"2.25.9{i}", study="2.25.1", patient="P", state="delivered", files=1)
                journal.mark_files([(f"main/f{i}.dcm", i, i)], f"2.25.9{i}", "delivered")
                assert journal.series(f"2.25.9{i}") is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=series_thread, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=main_thread))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert journal.db.execute("SELECT COUNT(*) FROM files").fetchone() == (4 * 150,)
    assert journal.db.execute("SELECT COUNT(*) FROM events").fetchone() == (3 * 150,)
    assert journal.counts() == {"delivered": 150}
    journal.close()
