"""How worker processes start: forked from a server that has already imported what a worker runs.

Not plain fork: the daemon has threads (watcher, courier, series) by the time it starts a pool, and the child
of a threaded process can inherit a lock held by a thread that does not exist in it. Not spawn either: each
worker would import pydicom and the engine itself, about half a second apiece, before its first file. The
fork server imports them once, in parallel with the caller, and forks every worker ready to work.
"""

from __future__ import annotations

from multiprocessing import current_process, forkserver, get_context
from multiprocessing.context import ForkServerContext

# What a worker runs: anondrop.pipeline (the engine, pydicom without its pixel stack: anondrop.workerboot).
# Not `__main__` (multiprocessing's default): for
# a program started as a script, each worker runs the script again whatever the server imported; for the
# installed `anondrop` command that imports the CLI module, which is kept light for this reason.
PRELOAD = ["anondrop.workerboot"]


def context() -> ForkServerContext:
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # in effect only if the server is not running yet
    return ctx


def start() -> None:
    """Start the fork server now, without waiting for it: it imports while the caller reads its config and
    inbox, and the worker pool forks from it later at no cost. Not from a worker process, which may be
    running the program's script again as it starts."""
    if current_process().name != "MainProcess":
        return
    context()
    forkserver.ensure_running()
