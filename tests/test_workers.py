"""The worker pool: this process does the work itself until the pool's processes are up, and both ways give
the same results, in the same order."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from anondrop import forkserver, lease, pipeline
from anondrop.deid.policy import build_policy
from anondrop.deid.pseudonyms import Keys
from anondrop.ingest import scan
from anondrop.pipeline import Workers
from tests.conftest import Site, sample, sample_files, write_instances

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the odd sample files
ROUTE_TAGS = (0x00080060, 0x00080070, 0x00081010)  # Modality, Manufacturer, StationName
KEYS = Keys(secret=b"w" * 32)


@pytest.fixture(params=["fork", "forkserver"])
def workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workers]:
    """A pool of two, its processes forked from this one or from the fork server (as when threads run)."""
    monkeypatch.setattr(pipeline, "_can_fork", lambda: request.param == "fork")
    pool = Workers(2, {"default": build_policy(options=[])}, KEYS)
    assert pool.pool is not None
    assert pool.pool._mp_context.get_start_method() == request.param  # type: ignore[attr-defined]
    monkeypatch.undo()
    try:
        while not pool.ready():
            time.sleep(0.01)
        yield pool
    finally:
        pool.close()


def test_without_a_fork_server_once_forks_its_workers_itself(
    monkeypatch: pytest.MonkeyPatch, site: Site
) -> None:
    # Where the fork server cannot start (no writable temporary folder for its socket, say), `once` still
    # runs on every core: its main process imports the engine and forks the workers.
    monkeypatch.setattr(forkserver, "ready", lambda: False)
    monkeypatch.setattr(pipeline, "_can_fork", lambda: True)  # as in `once`, whatever threads this test run has
    pool = Workers(2, {"default": build_policy(options=[])}, KEYS, light=True)
    try:
        assert pool.pool is not None
        assert pool.pool._mp_context.get_start_method() == "fork"  # type: ignore[attr-defined]
        write_instances(site.inbox, dcmread(sample("CT_small.dcm")), 2)
        files = sorted(site.inbox.rglob("*.dcm"))
        outcomes = list(pool.map([("default", {}, [(i, str(f)) for i, f in enumerate(files)])]))
        assert [o.index for o in outcomes] == [0, 1] and all(o.packed is not None for o in outcomes)
    finally:
        pool.close()


def _ended(pids: list[int]) -> bool:
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(_gone(p) for p in pids)


def test_once_takes_the_pool_started_with_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `once` starts its workers before it has read its config (anondrop.launch); they get the policies with
    # their first batch, and de-identify as a pool made afterwards would.
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    forkserver.start_early()
    early = forkserver._early
    assert early is not None
    workers = Workers(2, {"default": build_policy(options=[])}, KEYS, light=True)
    try:
        assert workers.pool is early.executor and forkserver._early is None
        paths = write_instances(tmp_path, dcmread(sample("CT_small.dcm")), 3)
        batch = ("default", {}, [(i, str(p)) for i, p in enumerate(paths)])
        alone = Workers(1, {"default": build_policy(options=[])}, KEYS)
        expected = [o.packed and o.packed.sha256 for o in alone.map([batch])]
        got = list(workers.map([batch]))
        assert [o.packed and o.packed.sha256 for o in got] == expected and all(expected)
    finally:
        workers.close()


def test_a_pool_started_with_the_command_ends_when_it_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # A config that asks for another number of workers gets a pool of its own, one that asks for one worker
    # none; a command that stops before it has work (a config error) shuts the early one down: no idle
    # processes are left behind.
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    forkserver.start_early()
    early = forkserver._early
    assert early is not None
    early.started()
    pids = [f.result() for f in early._warming]  # each worker's pid
    workers = Workers(3, {"default": build_policy(options=[])}, KEYS, light=True)
    try:
        assert workers.pool is not early.executor
        assert _ended(pids)
        assert workers.pool._max_workers == 3  # type: ignore[union-attr]
    finally:
        workers.close()
    forkserver.start_early()
    again = forkserver._early
    assert again is not None
    again.started()
    pids = [f.result() for f in again._warming]
    Workers(1, {"default": build_policy(options=[])}, KEYS, light=True).close()  # `workers = 1`: no pool at all
    assert forkserver._early is None and _ended(pids)
    forkserver.start_early()
    third = forkserver._early
    assert third is not None
    third.started()
    pids = [f.result() for f in third._warming]
    forkserver.discard_early()
    assert forkserver._early is None and _ended(pids)


def _pool_up_after(monkeypatch: pytest.MonkeyPatch, checks: int | None) -> None:
    """Make the pool look up only from the given check on (never, for None)."""
    count = iter(range(10**6))
    monkeypatch.setattr(Workers, "ready", lambda self: checks is not None and next(count) >= checks)


@pytest.mark.parametrize("pool_up_after", [0, 2, None])  # batches done here before the pool takes over
def test_headers_are_read_alike_here_and_in_the_pool(
    workers: Workers, monkeypatch: pytest.MonkeyPatch, pool_up_after: int | None
) -> None:
    files = sample_files()[:300]
    expected = [scan.read_info(f, f.name, None, ROUTE_TAGS) for f in files]
    _pool_up_after(monkeypatch, pool_up_after)
    assert workers.read_infos([(f, f.name, None) for f in files], ROUTE_TAGS) == expected


@pytest.mark.parametrize("pool_up_after", [0, 1, None])
def test_instances_are_de_identified_alike_here_and_in_the_pool(
    workers: Workers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pool_up_after: int | None
) -> None:
    ds = dcmread(sample("CT_small.dcm"))
    paths = write_instances(tmp_path, ds, 5)
    paths.append(tmp_path / "junk.dcm")
    paths[-1].write_bytes(os.urandom(1000))
    batches = [("default", {}, [(i, str(p)) for i, p in enumerate(paths[:3])]),
               ("default", {}, [(i + 3, str(p)) for i, p in enumerate(paths[3:])])]
    alone = Workers(1, {"default": build_policy(options=[])}, KEYS)
    expected = list(alone.map(batches))
    _pool_up_after(monkeypatch, pool_up_after)
    got = list(workers.map(batches))
    assert [o.index for o in got] == list(range(6))
    assert [o.packed is None for o in got] == [False] * 5 + [True]  # the junk file fails, the rest go out
    assert [(o.index, o.code, o.message, o.packed and o.packed.sha256) for o in got] == [
        (o.index, o.code, o.message, o.packed and o.packed.sha256) for o in expected
    ]


def test_workers_get_the_policies_as_they_were_when_the_pool_was_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # This process de-identifies while the fork server's workers start, with the same policy objects; the
    # workers must get them as they were (pickled when the pool was made), whatever this process cached.
    monkeypatch.setattr(pipeline, "_can_fork", lambda: False)
    paths = write_instances(tmp_path, dcmread(sample("CT_small.dcm")), 4)
    batch = ("default", {}, [(i, str(p)) for i, p in enumerate(paths)])
    go = threading.Event()
    real_start = forkserver.ServerPool._start

    def held_start(self: forkserver.ServerPool) -> None:
        go.wait()
        real_start(self)

    monkeypatch.setattr(forkserver.ServerPool, "_start", held_start)
    workers = Workers(2, {"default": build_policy(options=[])}, KEYS)
    try:
        here = list(workers.map([batch]))  # the pool is not up: done in this process
        go.set()
        while not workers.ready():
            time.sleep(0.01)
        there = list(workers.map([batch]))
    finally:
        workers.close()
    assert [o.message for o in there] == [o.message for o in here] == [""] * 4
    assert [o.packed and o.packed.sha256 for o in there] == [o.packed and o.packed.sha256 for o in here]


PIXEL_STACK = {"numpy", "PIL", "requests"}


def _loaded() -> set[str]:
    import sys

    return {name.partition(".")[0] for name in sys.modules}


def test_workers_import_pydicom_without_its_pixel_stack(workers: Workers) -> None:
    # numpy, Pillow and requests are installed here (the test tools need them), yet a worker from the fork
    # server never loads them: it never decodes pixel data, and they would cost each process a fifth of a
    # second. (A forked worker has what this process has: the CLI's process, below.)
    loaded = workers._started().submit(_loaded).result()
    if workers.pool._mp_context.get_start_method() == "forkserver":  # type: ignore[union-attr]
        assert not PIXEL_STACK & loaded
    else:
        assert PIXEL_STACK & loaded == PIXEL_STACK & _loaded()


def test_the_main_process_of_once_never_loads_pydicom(site: Site) -> None:
    # Its workers de-identify; the main process only groups, packages and checks, and loads neither pydicom
    # nor its pixel stack: the workers' fork server imports them on another core meanwhile (anondrop.launch).
    write_instances(site.inbox / "ct", dcmread(sample("CT_small.dcm")), 3)
    site.write_config(extra="[processing]\nworkers = 2\n")
    code = (  # what the process has loaded when it ends (with os._exit: see cli.main)
        "import os, sys\n"
        "from anondrop.launch import main\n"
        f"sys.argv = ['anondrop', 'once', '--config', {str(site.config)!r}]\n"
        "end = os._exit\n"
        "def report(code):\n"
        f"    print(sorted(({PIXEL_STACK!r} | {{'pydicom'}}) & {{n.partition('.')[0] for n in sys.modules}}),\n"
        "          flush=True)\n"
        "    end(code)\n"
        "os._exit = report\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert len(site.outputs()) == 1


def test_the_cli_hides_the_pixel_stack_from_pydicom_only_while_importing_it() -> None:
    code = (
        "import sys\n"
        "from anondrop.lean import import_pydicom\n"
        "import_pydicom()\n"
        "import pydicom.pixels.utils as u\n"
        f"assert not {sorted(PIXEL_STACK)!r} & sys.modules.keys(), sorted(sys.modules)\n"
        "assert u.HAVE_NP is False\n"
        "import numpy\n"  # hidden from pydicom, not from the program
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")  # a zombie has ended
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while its entry is read
        return True


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_workers_end_with_the_process_that_made_them(tmp_path: Path, start: str) -> None:
    # A forked worker holds copies of its parent's descriptors, the lease's flock among them: after a
    # `kill -9` of `once`, an orphaned worker would keep the state folder locked, and the next run "busy".
    state = tmp_path / "state"
    script = (
        "import time\n"
        "from pathlib import Path\n"
        "from anondrop import lease, pipeline\n"
        "from anondrop.deid.policy import build_policy\n"
        "from anondrop.deid.pseudonyms import Keys\n"
        f"pipeline._can_fork = lambda: {start == 'fork'}\n"
        f"held = lease.take(Path({str(state)!r}), 'test')\n"
        "w = pipeline.Workers(2, {'default': build_policy(options=[])}, Keys(secret=b'w' * 32))\n"
        "while not w.ready():\n"
        "    time.sleep(0.01)\n"
        # A pool from the fork server starts a process for a task only when none is idle: two slow tasks
        # make sure both run.
        "busy = [w.pool.submit(time.sleep, 1) for _ in range(2)]\n"
        "while len(w.pool._processes) < 2:\n"
        "    time.sleep(0.01)\n"
        "print(*w.pool._processes, flush=True)\n"
        "time.sleep(120)\n"
    )
    # Its stderr is dropped: the resource tracker it started outlives the kill and reports (rightly) the
    # pool's semaphores it then cleans up, after this test has passed.
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        with pytest.raises(lease.LeaseHeld):
            lease.take(state, "while it runs")
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids)
    lease.take(state, "after it was killed").release()
