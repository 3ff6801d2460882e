"""Running under systemd: the unit files, the sd_notify protocol of `anondrop run`, and journald logging.

systemd is not PID 1 where the tests run, so the units are checked with `systemd-analyze` and
`systemd-sysusers`, and the daemon runs as a plain process given what systemd gives a Type=notify service:
NOTIFY_SOCKET (a datagram socket the test binds, by path or in the abstract namespace) and WATCHDOG_USEC.
The memory restriction of the units (MemoryDenyWriteExecute=yes) is applied with the kernel's equivalent,
PR_SET_MDWE, to show the daemon and its worker processes run under it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import itertools
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from anondrop.logs import setup_daemon_logging
from anondrop.notify import notify, watchdog_interval
from tests.conftest import REPO, REQUIRE_REAL, Site, require_tool, run_cli, sample

UNIT_DIR = REPO / "systemd"
DAEMON_UNIT = UNIT_DIR / "anondrop.service"
ONCE_UNIT = UNIT_DIR / "anondrop-once.service"
TIMER_UNIT = UNIT_DIR / "anondrop-once.timer"
SYSUSERS = UNIT_DIR / "anondrop.sysusers.conf"
UNITS = (DAEMON_UNIT, ONCE_UNIT, TIMER_UNIT)
INSTALLED_BINARY = "/usr/local/bin/anondrop"

# Short timings so that a dropped file is delivered within a few seconds.
TIMINGS = """
[completion]
settle_seconds = 1

[watch]
stable_seconds = 0.5
"""
# systemd's watchdog deadline for the daemon runs: pings are due every second, a missed one ends it at 2 s.
WATCHDOG_USEC = 2_000_000


# ---------------------------------------------------------------------------------------------------------
# Unit files
# ---------------------------------------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values, in order (a key may repeat; an empty assignment resets it)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def setting(path: Path, section: str, key: str) -> str:
    values = read_unit(path).get(section, {}).get(key, [])
    assert len(values) == 1, f"{path.name}: expected one {key}= in [{section}], found {values}"
    return values[0]


def venv_binary() -> Path:
    """The `anondrop` executable of the environment the tests run in."""
    path = Path(sys.executable).with_name("anondrop")
    if not path.exists():
        found = shutil.which("anondrop")
        assert found, "the anondrop executable is not installed in the test environment"
        path = Path(found)
    return path


def installable_copy(dest: Path) -> Path:
    """The units as a site installs them: ExecStart points at an `anondrop` that exists on this machine."""
    dest.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        text = unit.read_text(encoding="utf-8")
        assert INSTALLED_BINARY in text or unit.suffix == ".timer", f"{unit.name} does not run {INSTALLED_BINARY}"
        (dest / unit.name).write_text(text.replace(INSTALLED_BINARY, str(venv_binary())), encoding="utf-8")
    return dest


def exec_args(unit: Path, config: Path) -> list[str]:
    """The unit's ExecStart arguments after the binary, with the site's config in place of the installed one."""
    argv = shlex.split(setting(unit, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_BINARY, f"{unit.name}: ExecStart runs {argv[0]}"
    args = argv[1:]
    assert "--config" in args, f"{unit.name}: ExecStart names no --config"
    args[args.index("--config") + 1] = str(config)
    return args


@pytest.mark.real
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_file_passes_systemd_analyze_verify_without_a_warning(unit: Path, tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    units = installable_copy(tmp_path / "units")
    proc = subprocess.run(
        [analyze, "verify", str(units / unit.name)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    # verify exits 0 on a misspelt key or a bad value and only says so on stderr.
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"systemd-analyze verify {unit.name}:\n{proc.stderr}"


@pytest.mark.real
@pytest.mark.parametrize("unit", (DAEMON_UNIT, ONCE_UNIT), ids=lambda p: p.name)
def test_service_hardening_keeps_systemds_exposure_rating_low(unit: Path, tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    units = installable_copy(tmp_path / "units")
    # The threshold is on systemd's 0-100 scale: 20 is an exposure of 2.0 ("OK"; 10.0 is "UNSAFE").
    proc = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(units / unit.name)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    rating = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    assert proc.returncode == 0, f"{unit.name}: {rating}"
    for line in ("MemoryDenyWriteExecute=", "ProtectSystem=", "NoNewPrivileges=", "SystemCallFilter=~@mount"):
        assert re.search(rf"^✓ {re.escape(line)}", proc.stdout, re.MULTILINE), f"{unit.name}: {line} is not in force"


@pytest.mark.real
def test_sysusers_file_creates_the_system_user_the_units_run_as(tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    proc = subprocess.run(
        [sysusers, f"--root={root}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    users = {f[0]: f for f in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())}
    groups = {f[0]: f for f in (line.split(":") for line in (root / "etc/group").read_text().splitlines())}
    for unit in (DAEMON_UNIT, ONCE_UNIT):
        user, group = setting(unit, "Service", "User"), setting(unit, "Service", "Group")
        assert user in users, f"{unit.name} runs as {user}, which the sysusers file does not create"
        assert group in groups, f"{unit.name} runs in group {group}, which the sysusers file does not create"
    _, _, uid, gid, _, home, shell = users["anondrop"]
    assert int(uid) < 1000, "anondrop must be a system user"
    assert gid == groups["anondrop"][2]
    assert shell.endswith("nologin"), "the service user must not be able to log in"
    assert home == "/var/lib/anondrop"


def test_once_unit_treats_a_quarantine_as_success_and_a_bad_config_as_failure(site: Site) -> None:
    site.write_config()
    shutil.copyfile(sample("CT_small.dcm"), site.inbox / "ct.dcm")
    (site.inbox / "notes.dcm").write_bytes(b"not a DICOM file at all")
    args = exec_args(ONCE_UNIT, site.config)
    assert args[0] == "once"
    success = {0, *map(int, setting(ONCE_UNIT, "Service", "SuccessExitStatus").split())}

    result = run_cli(*args)
    assert result.returncode == 3, result.stderr  # delivered one series, quarantined one file
    assert result.returncode in success, "a nightly pass that quarantined a file would show as a failed unit"
    assert len(site.outputs()) == 1

    site.config.write_text('[paths]\ninbox = "no-such-folder"\n', encoding="utf-8")
    result = run_cli(*exec_args(ONCE_UNIT, site.config))
    assert result.returncode == 2
    assert result.returncode not in success, "a broken config must fail the unit, so that someone notices"


@pytest.mark.real
def test_timer_starts_the_once_service_every_night_and_catches_up_after_downtime(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    timer = read_unit(TIMER_UNIT)["Timer"]
    target = timer.get("Unit", [TIMER_UNIT.with_suffix(".service").name])[0]
    assert (UNIT_DIR / target) == ONCE_UNIT
    assert exec_args(ONCE_UNIT, tmp_path / "c.toml")[0] == "once"
    assert timer["Persistent"] == ["true"], "a pass missed while the machine was off must run at the next boot"
    (calendar,) = timer["OnCalendar"]
    proc = subprocess.run(
        [analyze, "calendar", "--iterations=3", calendar],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TZ": "UTC"},
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    stamps = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", proc.stdout)
    times = [dt.datetime.fromisoformat(s) for s in stamps]
    assert len(times) == 3, proc.stdout
    assert {b - a for a, b in itertools.pairwise(times)} == {dt.timedelta(days=1)}


def test_watchdog_pings_come_at_half_the_units_watchdog_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seconds = int(setting(DAEMON_UNIT, "Service", "WatchdogSec"))
    monkeypatch.setenv("WATCHDOG_USEC", str(seconds * 1_000_000))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == seconds / 2
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == seconds / 2
    # systemd addresses the watchdog to one process: a child that inherited the variables must not ping.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() is None


# ---------------------------------------------------------------------------------------------------------
# sd_notify: a socket in place of systemd's
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    text: str
    at: float
    pid: int | None  # the sender, from SCM_CREDENTIALS; systemd drops others under NotifyAccess=main

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


@dataclass
class NotifySocket:
    """systemd's side of Type=notify: a datagram socket, one notification per datagram."""

    env: str  # the value of NOTIFY_SOCKET
    sock: socket.socket
    messages: list[Message] = field(default_factory=list)

    def receive(self, timeout: float) -> Message | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            return None
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
        message = Message(data.decode("utf-8"), time.monotonic(), pid)
        self.messages.append(message)
        return message

    def wait_for(self, wanted: Callable[[Message], bool], timeout: float, what: str) -> Message:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and wanted(message):
                return message
        pytest.fail(f"no {what} within {timeout:g} s; received {[m.text for m in self.messages]}")

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.receive(left)


def has(line: str) -> Callable[[Message], bool]:
    return lambda m: line in m.lines


DELIVERED_ONE = re.compile(r"STATUS=0 processing, \d+ collecting, 1 delivered, 0 quarantined")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A socket path must fit in 108 bytes; pytest's tmp_path for a long test name does not.
    path = Path(tempfile.mkdtemp(prefix="anondrop-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[NotifySocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    if request.param == "path":
        address = str(short_dir / "notify")
        sock.bind(address)
        env = address
    else:  # NOTIFY_SOCKET="@name" names "\0name" in the abstract namespace (no file, gone with the socket)
        name = f"anondrop-test-{os.getpid()}-{secrets.token_hex(4)}"
        sock.bind(f"\0{name}")
        env = f"@{name}"
    with sock:
        yield NotifySocket(env, sock)


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        """SIGTERM if still running; then SIGKILL whatever is left of its process group (the workers)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def systemd_env(**extra: str) -> dict[str, str]:
    """This environment without anything systemd would have set for another service."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "JOURNAL_STREAM")}
    return {**env, "COLUMNS": "200", **extra}


@pytest.fixture
def spawn(site: Site) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(
        args: list[str], env: dict[str, str], preexec_fn: Callable[[], None] | None = None
    ) -> DaemonProcess:
        log_path = site.root / f"anondrop-{len(started) + 1}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "anondrop", *args],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                cwd=REPO,
                env=env,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
        started.append(DaemonProcess(proc, log_path))
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()


def test_daemon_tells_systemd_ready_status_watchdog_and_stopping(
    site: Site, notify_socket: NotifySocket, spawn: Callable[..., DaemonProcess]
) -> None:
    site.write_config(extra=TIMINGS)
    daemon = spawn(
        exec_args(DAEMON_UNIT, site.config),
        systemd_env(NOTIFY_SOCKET=notify_socket.env, WATCHDOG_USEC=str(WATCHDOG_USEC)),
    )
    main_pid = daemon.proc.pid

    ready = notify_socket.wait_for(has("READY=1"), 60, "READY=1")
    # Until READY=1 systemd holds `systemctl start` and every unit ordered after this one.
    assert notify_socket.messages[0] is ready, "the daemon notified systemd before it was ready"
    notify_socket.wait_for(lambda m: any(x.startswith("STATUS=") for x in m.lines), 10, "STATUS=")

    shutil.copyfile(sample("CT_small.dcm"), site.inbox / "ct.dcm")
    # `systemctl status anondrop` shows the STATUS= line; it is refreshed every 5 s.
    notify_socket.wait_for(lambda m: any(DELIVERED_ONE.fullmatch(x) for x in m.lines), 30,
                           "a STATUS= line counting the delivered series")
    assert len(site.outputs()) == 1
    notify_socket.collect(1.5)

    sent = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for(has("STOPPING=1"), 10, "STOPPING=1 after SIGTERM")
    assert daemon.proc.wait(10) == 0, daemon.log()[-3000:]
    assert time.monotonic() - sent < 10

    pings = [m.at for m in notify_socket.messages if "WATCHDOG=1" in m.lines]
    assert len(pings) >= 4, f"only {len(pings)} WATCHDOG=1 in {pings[-1] - ready.at if pings else 0:.1f} s"
    gaps = [b - a for a, b in itertools.pairwise([ready.at, *pings])]
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"a WATCHDOG=1 came {max(gaps):.2f} s after the previous one"
    assert {m.pid for m in notify_socket.messages} == {main_pid}, (
        "with NotifyAccess=main systemd ignores notifications from any process but the main one"
    )


def test_status_stops_counting_a_series_as_collecting_once_it_is_delivered(
    site: Site, short_dir: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    site.write_config(extra=TIMINGS)  # on_success = "keep", the default: the sources stay in the inbox
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        sock.bind(str(short_dir / "notify"))
        listener = NotifySocket(str(short_dir / "notify"), sock)
        spawn(exec_args(DAEMON_UNIT, site.config), systemd_env(NOTIFY_SOCKET=listener.env))
        listener.wait_for(has("READY=1"), 60, "READY=1")
        shutil.copyfile(sample("CT_small.dcm"), site.inbox / "ct.dcm")
        status = listener.wait_for(lambda m: any(DELIVERED_ONE.fullmatch(x) for x in m.lines), 30,
                                   "a STATUS= line counting the delivered series")
    assert status.text == "STATUS=0 processing, 0 collecting, 1 delivered, 0 quarantined"


# ---------------------------------------------------------------------------------------------------------
# notify(): with and without systemd-python
# ---------------------------------------------------------------------------------------------------------


def require_systemd_python() -> None:
    """Skip without systemd-python (fail in CI, which installs the `systemd` extra)."""
    try:
        import systemd.daemon  # type: ignore[import-not-found, import-untyped, unused-ignore]  # noqa: F401
    except ImportError:
        msg = "systemd-python is not installed (make test EXTRAS=dev,systemd; needs libsystemd-dev, pkg-config)"
        if REQUIRE_REAL:
            pytest.fail(msg)
        pytest.skip(msg)


def hide_systemd_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Imports of systemd-python fail from here on, as if it were not installed (even if already imported)."""
    for name in ("systemd", "systemd.daemon", "systemd.journal"):
        monkeypatch.setitem(sys.modules, name, None)


def use_implementation(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if name == "fallback":
        hide_systemd_python(monkeypatch)
    else:
        require_systemd_python()
    return name


@pytest.fixture(params=["fallback", "systemd-python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return use_implementation(request.param, monkeypatch)


def test_notify_sends_each_message_as_one_datagram_from_this_process(
    implementation: str, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env)
    for text in ("READY=1", "STATUS=2 processing, 5 collecting, 1 delivered, 0 quarantined", "WATCHDOG=1"):
        assert notify(text) is True
        message = notify_socket.wait_for(lambda m: True, 5, text)
        assert message.text == text
        assert message.pid == os.getpid()


def test_notify_outside_systemd_sends_nothing(implementation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


@pytest.fixture(params=["fallback", "systemd-python"])
def implementation_known_bug(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return use_implementation(request.param, monkeypatch)


def test_notify_to_a_socket_nobody_listens_on_returns_false(
    implementation_known_bug: str, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A NOTIFY_SOCKET inherited from elsewhere must not stop the daemon: the notification is lost, that is all.
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "gone"))
    assert notify("READY=1") is False


# ---------------------------------------------------------------------------------------------------------
# MemoryDenyWriteExecute=yes and NoNewPrivileges=yes: the daemon and its workers run under them
# ---------------------------------------------------------------------------------------------------------

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65  # Linux 6.3+: what MemoryDenyWriteExecute=yes asks for, enforced by the kernel
PR_MDWE_REFUSE_EXEC_GAIN = 1
RESTRICTION_UNSUPPORTED = 97
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _as_the_unit_restricts() -> None:
    # Runs in the child between fork and exec; inherited by exec and by every process it starts.
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or _prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os._exit(RESTRICTION_UNSUPPORTED)


def require_memory_restriction() -> None:
    """The kernel refuses writable+executable memory to a restricted process, or skip (fail in CI)."""
    probe = subprocess.run(
        [sys.executable, "-c",
         "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"],
        preexec_fn=_as_the_unit_restricts, capture_output=True, text=True, timeout=60,
    )
    if probe.returncode == RESTRICTION_UNSUPPORTED:
        msg = "this kernel has no PR_SET_MDWE (Linux 6.3 or newer has it)"
        if REQUIRE_REAL:
            pytest.fail(msg)
        pytest.skip(msg)
    assert "PermissionError" in probe.stderr, f"the restriction is not in force: {probe.stderr}"


def test_daemon_and_its_workers_deliver_under_memory_deny_write_execute(
    site: Site, short_dir: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    require_memory_restriction()
    # Two workers: the series goes through the process pool, not only the main process.
    site.write_config(extra=TIMINGS + "\n[processing]\nworkers = 2\n")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        sock.bind(str(short_dir / "notify"))
        listener = NotifySocket(str(short_dir / "notify"), sock)
        daemon = spawn(exec_args(DAEMON_UNIT, site.config), systemd_env(NOTIFY_SOCKET=listener.env),
                       preexec_fn=_as_the_unit_restricts)
        listener.wait_for(has("READY=1"), 60, "READY=1")
        shutil.copyfile(sample("CT_small.dcm"), site.inbox / "ct.dcm")
        shutil.copyfile(sample("MR_small.dcm"), site.inbox / "mr.dcm")
        deadline = time.monotonic() + 30
        while len(site.outputs()) < 2 and time.monotonic() < deadline and daemon.proc.poll() is None:
            time.sleep(0.1)
        assert len(site.outputs()) == 2, daemon.log()[-3000:]
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0, daemon.log()[-3000:]
    assert "Traceback" not in daemon.log()


def test_once_delivers_under_memory_deny_write_execute(site: Site) -> None:
    require_memory_restriction()
    site.write_config(extra="[processing]\nworkers = 2\n")
    shutil.copyfile(sample("CT_small.dcm"), site.inbox / "ct.dcm")
    proc = subprocess.run(
        [sys.executable, "-m", "anondrop", *exec_args(ONCE_UNIT, site.config)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=systemd_env(),
        preexec_fn=_as_the_unit_restricts,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(site.outputs()) == 1


# ---------------------------------------------------------------------------------------------------------
# Logging: journald under systemd, stderr otherwise
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def root_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """The root logger, restored afterwards; no systemd variables of the test's own environment."""
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def _journal_stream_of_stderr() -> str:
    st = os.fstat(sys.stderr.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_inherited_systemd_variables_alone_do_not_send_logs_to_the_journal(
    root_logging: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shell or child process that kept JOURNAL_STREAM/INVOCATION_ID has another stderr: lines must stay there.
    monkeypatch.setenv("JOURNAL_STREAM", "9:12345")
    monkeypatch.setenv("INVOCATION_ID", secrets.token_hex(16))
    setup_daemon_logging()
    (handler,) = root_logging.handlers
    assert type(handler) is logging.StreamHandler


def test_under_systemd_log_records_go_to_the_journal_as_anondrop(
    root_logging: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_systemd_python()
    from systemd.journal import JournalHandler  # type: ignore[import-not-found, import-untyped, unused-ignore]

    monkeypatch.setenv("JOURNAL_STREAM", _journal_stream_of_stderr())  # stderr is the journal stream
    setup_daemon_logging()
    (handler,) = root_logging.handlers
    assert isinstance(handler, JournalHandler)

    # What journald would receive, without needing a running journald.
    sent: list[tuple[str, dict[str, object]]] = []

    def send(text: str, /, **fields: object) -> None:
        sent.append((text, fields))

    handler.send = send
    logging.getLogger("anondrop").warning("outbox_full: no space left for output; pausing %d s", 30)
    ((message, fields),) = sent
    assert message == "outbox_full: no space left for output; pausing 30 s"
    assert fields["SYSLOG_IDENTIFIER"] == "anondrop"  # journalctl -t anondrop
    assert fields["PRIORITY"] == "4"  # warning: journalctl -p warning shows it


def test_under_systemd_without_systemd_python_stderr_lines_carry_no_timestamp(
    root_logging: logging.Logger, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hide_systemd_python(monkeypatch)
    import anondrop.logs

    monkeypatch.setattr(anondrop.logs, "_stderr_is_journal", lambda: True)  # detection is tested above
    setup_daemon_logging()
    logging.getLogger("anondrop").info("daemon_ready: inbox /srv/anondrop/inbox")
    # journald stamps every line of the service's stderr itself.
    assert capsys.readouterr().err == "INFO daemon_ready: inbox /srv/anondrop/inbox\n"


def test_outside_systemd_logs_go_to_stderr_with_a_timestamp(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_daemon_logging()
    logging.getLogger("anondrop").info("daemon_ready: inbox /srv/anondrop/inbox")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO daemon_ready: inbox /srv/anondrop/inbox\n",
                        capsys.readouterr().err)
