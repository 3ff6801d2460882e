"""Where worker processes come from when they are not forked from the main process: a fork server that
has already imported what a worker runs.

Two cases (see pipeline.Workers):
- `once` and `anonymize`: their main process never imports the engine or pydicom. The server is started at
  the top of the command and imports them on another core while the main process loads its config and
  walks the inbox; the workers it forks are ready to work.
- the daemon's pool after a reload: the daemon then runs threads (watcher, courier, series), and the child
  of a fork could inherit a lock held by a thread that does not exist in it.
Spawn would have each worker import pydicom and the engine itself before its first file; the fork server
imports them once.
"""

from __future__ import annotations

import os
from multiprocessing import forkserver, get_context
from multiprocessing.context import ForkServerContext

# What a worker runs: anondrop.work and the engine, on pydicom without its pixel stack (anondrop.workerboot).
# Not `__main__` (multiprocessing's default): for a program started as a script, each worker would run the
# script again whatever the server imported.
PRELOAD = ["anondrop.workerboot"]


def context() -> ForkServerContext:
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # in effect only if the server is not running yet
    return ctx


def start_early() -> None:
    """Start the fork server now, where workers will be wanted (more than one core): it imports the engine
    on another core while this process goes on (parsing its config, walking the inbox). A server started for
    nothing (a config that asks for one worker) only waits, and ends with this process."""
    if (os.cpu_count() or 1) > 1:  # as [processing] workers counts them
        ready()


def ready() -> bool:
    """Whether the fork server runs, starting it if need be. False where it cannot start (it needs a Unix
    socket in a writable temporary folder): the caller then forks its workers itself."""
    try:
        context()
        forkserver.ensure_running()
    except OSError:
        return False
    return True
