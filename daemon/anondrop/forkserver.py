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

For `once` and `anonymize` the pool itself is made as early as the server (start_early): its workers are
forked the moment the server has imported the engine, while the main process still reads its config, and
are up before it has a file for them. As the policies are not known yet then, a worker of the server gets
them with each batch (see anondrop.work._process_batch_in).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
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
    """Start the fork server and a pool of one worker per core now, where workers will be wanted (more than
    one core): the server imports the engine on another core while this process goes on (parsing its
    config), and forks the workers as soon as it has. `pool` hands that pool over. A server and pool started
    for nothing (a config that asks for one worker, or a wrong command line) only wait, and end with this
    process."""
    global _early
    count = os.cpu_count() or 1  # as [processing] workers = 0 counts them
    if count > 1 and _early is None and ready():
        _early = ServerPool(count)


def pool(count: int) -> ServerPool:
    """A pool of `count` workers from the fork server: the one start_early made if it has as many (it is
    then the caller's), else a new one."""
    global _early
    early, _early = _early, None
    if early is not None:
        if early.count == count:
            return early
        early.shutdown()
    return ServerPool(count)


def discard_early() -> None:
    """Shut down the pool start_early made, if nobody has taken it (the command ended before it had work)."""
    global _early
    early, _early = _early, None
    if early is not None:
        early.shutdown()


def ready() -> bool:
    """Whether the fork server runs, starting it if need be. False where it cannot start (it needs a Unix
    socket in a writable temporary folder): the caller then forks its workers itself."""
    try:
        context()
        forkserver.ensure_running()
    except OSError:
        return False
    return True


class ServerPool:
    """A process pool of up to `count` workers from the fork server, started at once.

    One warm-up task per worker is sent from a thread, since each start waits until the server has imported
    the engine, which the caller need not wait for. The executor starts a process for a task only when no
    started one is idle, so a quick warm-up may leave some to be started by the first batches (in a few
    milliseconds: the server has imported everything by then).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.executor = ProcessPoolExecutor(count, mp_context=context(), initializer=_init_worker)
        self._warming: list[Future[int]] = []
        self._error: BaseException | None = None
        self._starter = threading.Thread(target=self._start, name="workers", daemon=True)
        self._starter.start()

    def _start(self) -> None:
        try:
            for _ in range(self.count):
                self._warming.append(self.executor.submit(os.getpid))
        except BaseException as exc:  # raised where the pool is used (a pool shut down meanwhile never is)
            self._error = exc

    def ready(self) -> bool:
        """True once the warm-up is done: the pool's processes so far run."""
        return not self._starter.is_alive() and all(f.done() for f in self._warming)

    def started(self) -> ProcessPoolExecutor:
        """The pool, once its processes have been started; raises what starting them raised."""
        self._starter.join()
        if self._error is not None:
            raise self._error
        return self.executor

    def shutdown(self) -> None:
        self.executor.shutdown(cancel_futures=True)
        self._starter.join()


def _init_worker() -> None:
    from anondrop.work import init_server_worker

    init_server_worker()


_early: ServerPool | None = None
