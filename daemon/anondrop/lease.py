"""The lease on a state folder: one working process (the daemon or `anondrop once`) per journal at a time.

Two processes on one state folder would both take the same inbox files: each would package a series the
other is packaging (a needless `_v2`), dispose of sources the other still reads, remove the other's
temporary ZIPs as left over from a crash, and work the same delivery queue. So `once` and `run` take an
exclusive `flock` on `state/anondrop.lock` for as long as they run, and the second one refuses at once.

The kernel releases a flock when its process ends, however it ends (`kill -9` included), so a lock file
left behind blocks nobody. The file holds the holder's pid and command line, for the refusal message only;
it is never deleted (deleting it would let a third process lock a new file while the holder keeps the old).
The operator commands (`status`, `deliveries`, `quarantine`) take no lease: they read the journal, or
change it in single SQLite transactions, which WAL lets run beside the daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

LOCK_NAME = "anondrop.lock"


class LeaseHeld(Exception):
    """Another process holds the state folder; the message names it and says what to do."""

    def __init__(self, state: Path, holder: str) -> None:
        self.state = state
        self.holder = holder
        super().__init__(
            f"the state folder {state} is in use by another anondrop process ({holder}), and two processes "
            "must not work on one journal at once. Wait for it to finish or stop it (the daemon: "
            "`systemctl stop anondrop`), or give this config a state folder of its own (paths.state)"
        )


class Lease:
    """An exclusive lock on `state/anondrop.lock`, held until `release()` or the end of the process.

    Keep a reference for as long as the lease is needed: a Lease that is garbage-collected closes its file,
    and with it the lock."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path = path
        self._handle: IO[str] | None = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the only descriptor releases the flock
            self._handle = None


def take(state: Path, command: str) -> Lease:
    """Lock `state` for this process, or raise LeaseHeld at once (never wait: the holder may run for days)."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / LOCK_NAME
    # Opened without truncating: until the lock is ours, the file's text belongs to the holder.
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open for the lease's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "it has not written its name yet"
        handle.close()
        raise LeaseHeld(state, holder) from None
    except BaseException:
        handle.close()
        raise
    since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}: {command}, since {since}\n")
    with contextlib.suppress(OSError):
        handle.flush()
    return Lease(path, handle)
