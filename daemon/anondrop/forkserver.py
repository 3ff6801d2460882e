"""Where worker processes come from when they cannot be forked from the main process: a fork server that
has already imported what a worker runs.

Plain fork is used while the main process runs no other thread (see pipeline.Workers). Once it does (the
daemon after a reload: watcher, courier, series threads), the child of a fork could inherit a lock held by a
thread that does not exist in it. Spawn would have each worker import pydicom and the engine itself before
its first file; the fork server imports them once and forks every worker ready to work.
"""

from __future__ import annotations

from multiprocessing import get_context
from multiprocessing.context import ForkServerContext

# What a worker runs: anondrop.pipeline (the engine, pydicom without its pixel stack: anondrop.workerboot).
# Not `__main__` (multiprocessing's default): for a program started as a script, each worker would run the
# script again whatever the server imported.
PRELOAD = ["anondrop.workerboot"]


def context() -> ForkServerContext:
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # in effect only if the server is not running yet
    return ctx
