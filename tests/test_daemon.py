"""`anondrop run` as a real process: series completion by observation, crashes, signals, bad input, logs.

Every test starts the daemon with short timings, drops files into its inbox the way scanners, copy tools and
people do, and watches only what a user can see: ZIPs in the outbox, entries in the quarantine, files left in
the inbox, the exit code and the log. The daemon is always stopped (SIGTERM, then SIGKILL of its process
group), and its log is searched for the planted patient name and ID when it ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import config as config_mod
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import REPO, CliResult, Site, run_cli, sample, write_instances
from tests.deliver_servers import free_port

SETTLE = 2.0
STABLE = 0.3
TIMINGS = f"""
[watch]
stable_seconds = {STABLE}
rescan_seconds = 2

[completion]
settle_seconds = {SETTLE}
"""
# Planted in every generated instance; none of them may ever reach the log or the journal.
PATIENT_NAME = "Quixworth^Zebedee"
PATIENT_ID = "QX-99117-Z"
ACCESSION = "ACC778812"
BIRTH_DATE = "1961-03-14"  # not a valid DA (YYYYMMDD), as some exports write it
PHI = ("Quixworth", "Zebedee", PATIENT_ID, ACCESSION)


# ---------------------------------------------------------------------------------------------------------
# Building series and looking at what came out
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """Instances of one series, written to a staging folder outside the inbox (ready to be dropped)."""

    files: list[Path]
    study_uid: str
    series_uid: str

    def data(self, i: int) -> bytes:
        return self.files[i].read_bytes()


def make_series(stage: Path, n: int, *, study_uid: str | None = None, first: int = 1) -> Series:
    ds = dcmread(sample("CT_small.dcm"))
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    files = write_instances(stage, ds, n, first=first)
    return Series(files, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def more_of(series: Series, stage: Path, n: int, first: int) -> Series:
    """Further instances of the same series (a late arrival)."""
    files = write_instances(stage, dcmread(series.files[0]), n, first=first)
    return Series(files, series.study_uid, series.series_uid)


def drop_file(src: Path, dest: Path) -> Path:
    """Copy one file into place the plain way (written in place, as most copy tools do)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def drop_all(series: Series, folder: Path) -> list[Path]:
    return [drop_file(f, folder / f.name) for f in series.files]


@dataclass(frozen=True)
class Delivered:
    path: Path
    manifest: dict[str, object]
    instance_numbers: list[int]
    series_uids: set[str]
    sop_uids: set[str]


def read_zip(path: Path) -> Delivered:
    numbers: list[int] = []
    series: set[str] = set()
    sops: set[str] = set()
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None, f"{path.name} is corrupt"
        manifest = json.loads(zf.read("manifest.json"))
        for name in zf.namelist():
            if name.endswith(".dcm"):
                ds = dcmread(io.BytesIO(zf.read(name)))
                numbers.append(int(ds.InstanceNumber))
                series.add(str(ds.SeriesInstanceUID))
                sops.add(str(ds.SOPInstanceUID))
    return Delivered(path, manifest, sorted(numbers), series, sops)


def assert_complete(out: Delivered, numbers: range) -> None:
    assert out.instance_numbers == list(numbers), f"{out.path.name} holds instances {out.instance_numbers}"
    assert out.manifest["instances"] == len(numbers)
    assert len(out.series_uids) == 1, f"{out.path.name} mixes series {out.series_uids}"
    assert len(out.sop_uids) == len(numbers)


def hidden_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.is_file()] if folder.exists() else []


def quarantine_entries(site: Site) -> list[dict[str, object]]:
    if not site.quarantine.exists():
        return []
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(site.quarantine.glob("*/reason.json"))]


def quarantined_files(site: Site) -> list[Path]:
    return [p for p in site.quarantine.glob("*/files/**/*") if p.is_file()] if site.quarantine.exists() else []


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll until `condition()` is true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_outputs(site: Site, count: int, timeout: float) -> list[Path]:
    wait_for(lambda: len(site.outputs()) >= count, timeout, f"{count} ZIP(s) in the outbox")
    return site.outputs()


# ---------------------------------------------------------------------------------------------------------
# The daemon as a process
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Daemon:
    site: Site
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        wait_for(lambda: self.log().count(text) >= count or self.proc.poll() is not None, timeout,
                 f"{text!r} in the daemon's log")
        assert self.log().count(text) >= count, f"the daemon ended before logging {text!r}:\n{self.log()[-3000:]}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 15.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill_group()

    def kill_group(self) -> None:
        """SIGKILL what is left of the daemon's process group (its worker processes included)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def start_daemon(site: Site) -> Iterator[Callable[[], Daemon]]:
    started: list[Daemon] = []

    def start() -> Daemon:
        log_path = site.root / f"daemon-{len(started) + 1}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "anondrop", "run", "--config", str(site.config)],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                cwd=REPO,
                env={**os.environ, "COLUMNS": "200"},
                start_new_session=True,  # its own process group, so a crash test can kill the workers too
            )
        daemon = Daemon(site, proc, log_path)
        started.append(daemon)
        daemon.wait_log("daemon_ready", timeout=30)
        return daemon

    yield start
    for daemon in started:
        try:
            daemon.terminate()
        except subprocess.TimeoutExpired:
            daemon.kill_group()
        print(f"--- {daemon.log_path.name} ---\n{daemon.log()[-6000:]}")  # shown by pytest when the test fails
        leaked = [word for word in PHI if word.lower() in daemon.log().lower()]
        assert not leaked, f"the daemon logged patient identifiers {leaked}"


@pytest.fixture(scope="module")
def big_series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    """Big enough that writing its ZIP takes a moment: long enough to crash or stop the daemon in the middle."""
    return make_series(tmp_path_factory.mktemp("big"), 150)


def config(site: Site, extra: str = "", *, timings: str = TIMINGS, deidentify: str = "") -> None:
    site.write_config(extra=timings + "\n" + extra, profile_extra=deidentify)


# ---------------------------------------------------------------------------------------------------------
# Completion: one ZIP per series, only once the series has stopped arriving
# ---------------------------------------------------------------------------------------------------------


def test_series_dropped_file_by_file_gives_one_zip_after_the_last_file(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site)
    series = make_series(tmp_path / "stage", 4)
    start_daemon()
    folder = site.inbox / "scanner1"
    last_drop = 0.0
    for src in series.files:
        last_drop = time.monotonic()
        drop_file(src, folder / src.name)
        # A pause longer than the stable time (each file is read) but shorter than the settle time.
        pause_until = time.monotonic() + 0.8
        while time.monotonic() < pause_until:
            assert site.outputs() == [], "a ZIP appeared while files of the series were still arriving"
            time.sleep(0.05)
    zips = wait_outputs(site, 1, timeout=SETTLE + 10)
    seen_at = time.monotonic()
    assert seen_at - last_drop >= SETTLE - 0.1, "the ZIP came before the settle time had passed"
    assert len(zips) == 1
    assert_complete(read_zip(zips[0]), range(1, 5))
    time.sleep(0.1)  # an extra ZIP would be committed in the same breath as the first
    assert site.outputs() == zips


def test_two_interleaved_series_in_one_folder_give_two_complete_zips(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site)
    a = make_series(tmp_path / "a", 4)
    b = make_series(tmp_path / "b", 4, study_uid=a.study_uid)
    start_daemon()
    folder = site.inbox / "export"
    for fa, fb in zip(a.files, b.files, strict=True):
        drop_file(fa, folder / f"A_{fa.name}")
        time.sleep(0.2)
        drop_file(fb, folder / f"B_{fb.name}")
        time.sleep(0.2)
    zips = wait_outputs(site, 2, timeout=SETTLE + 10)
    assert len(zips) == 2
    outs = [read_zip(z) for z in zips]
    for out in outs:
        assert_complete(out, range(1, 5))
    assert outs[0].series_uids != outs[1].series_uids
    assert outs[0].path.parent == outs[1].path.parent, "two series of one study belong in one study folder"


def test_copies_that_keep_old_mtimes_still_wait_for_the_settle_time(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site)
    series = make_series(tmp_path / "stage", 3)
    year_ago = time.time() - 365 * 86400
    for f in series.files:
        os.utime(f, (year_ago, year_ago))
    start_daemon()
    dropped_at = time.monotonic()
    for src in series.files:
        dest = site.inbox / "restored" / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)  # keeps the year-old mtime, as cp -p, rsync -t and robocopy do
    assert all((site.inbox / "restored" / f.name).stat().st_mtime < year_ago + 1 for f in series.files)
    zips = wait_outputs(site, 1, timeout=SETTLE + 10)
    assert time.monotonic() - dropped_at >= SETTLE - 0.1, "old mtimes were taken as proof that the copy was over"
    assert_complete(read_zip(zips[0]), range(1, 4))


def test_marker_file_completes_the_series_before_the_settle_time(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site, timings=TIMINGS.replace(f"settle_seconds = {SETTLE}", "settle_seconds = 30"))
    first = make_series(tmp_path / "first", 4)
    second = make_series(tmp_path / "second", 2, study_uid=first.study_uid)
    start_daemon()
    folder = site.inbox / "study"
    drop_all(first, folder)
    marker = folder / "DONE"
    marker.touch()
    marker_at = time.monotonic()
    [out] = wait_outputs(site, 1, timeout=10)
    assert time.monotonic() - marker_at < 6, "the DONE marker did not complete the series"
    assert_complete(read_zip(out), range(1, 5))

    # The old marker is not a signal for the next series in the same folder, even when a rescan sees it again.
    for f in second.files:
        drop_file(f, folder / f"B_{f.name}")
    deadline = time.monotonic() + 2.5  # longer than rescan_seconds
    while time.monotonic() < deadline:
        assert len(site.outputs()) == 1, "a marker left from the last series completed the next one"
        time.sleep(0.1)
    marker.touch()  # touched again: a new signal
    zips = wait_outputs(site, 2, timeout=6)
    [out2] = [z for z in zips if z != out]
    assert_complete(read_zip(out2), range(1, 3))


def test_late_file_after_delivery_gives_a_complete_second_version(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site, '[input]\non_success = "keep"\n')
    series = make_series(tmp_path / "stage", 3)
    late = more_of(series, tmp_path / "late", 1, first=4)
    later = more_of(series, tmp_path / "later", 1, first=5)
    daemon = start_daemon()
    folder = site.inbox / "study"
    drop_all(series, folder)
    [v1] = wait_outputs(site, 1, timeout=SETTLE + 10)
    v1_bytes = v1.read_bytes()
    assert_complete(read_zip(v1), range(1, 4))

    drop_all(late, folder)  # right after the first ZIP appeared
    zips = wait_outputs(site, 2, timeout=SETTLE + 10)
    [v2] = [z for z in zips if z != v1]
    assert v2.name == v1.name.removesuffix(".zip") + "_v2.zip"
    assert_complete(read_zip(v2), range(1, 5))
    assert v1.read_bytes() == v1_bytes, "the first version was changed"
    v2_bytes = v2.read_bytes()

    # After a restart, the kept sources are known as delivered: no new version until a new file comes.
    assert daemon.terminate() == 0
    start_daemon()
    deadline = time.monotonic() + STABLE + SETTLE + 0.5
    while time.monotonic() < deadline:
        assert len(site.outputs()) == 2, "kept sources were delivered again"
        time.sleep(0.1)
    drop_all(later, folder)
    zips = wait_outputs(site, 3, timeout=SETTLE + 10)
    [v3] = [z for z in zips if z not in (v1, v2)]
    assert v3.name == v1.name.removesuffix(".zip") + "_v3.zip"
    assert_complete(read_zip(v3), range(1, 6))
    assert (v1.read_bytes(), v2.read_bytes()) == (v1_bytes, v2_bytes)


# ---------------------------------------------------------------------------------------------------------
# Crashes and signals
# ---------------------------------------------------------------------------------------------------------


def test_kill_9_during_processing_then_restart_gives_exactly_one_complete_zip(
    site: Site, start_daemon: Callable[[], Daemon], big_series: Series
) -> None:
    config(site, '[input]\non_success = "delete"\n[processing]\nworkers = 1\n')
    daemon = start_daemon()
    sources = drop_all(big_series, site.inbox / "big")
    # The ZIP is being written once its hidden temporary file exists: crash right then.
    wait_for(lambda: hidden_files(site.outbox), timeout=SETTLE + 15, what="a ZIP being written", interval=0.005)
    daemon.kill_group()
    assert daemon.proc.returncode == -signal.SIGKILL
    assert site.outputs() == [], "the crash happened too late to test anything"
    assert all(p.exists() for p in sources), "a source was deleted before its ZIP was delivered"

    start_daemon()
    [out] = wait_outputs(site, 1, timeout=SETTLE + 30)
    delivered = read_zip(out)
    assert_complete(delivered, range(1, 151))
    wait_for(lambda: not any(p.exists() for p in sources), timeout=10, what="sources deleted after delivery")
    assert site.outputs() == [out], "the interrupted series came out twice"
    assert hidden_files(site.outbox) == [], "a temporary file of the crashed run is left in the outbox"
    assert quarantine_entries(site) == []


def test_sigterm_exits_0_promptly_and_leaves_no_temporary_files(
    site: Site, start_daemon: Callable[[], Daemon], big_series: Series
) -> None:
    config(site, '[input]\non_success = "delete"\n[processing]\nworkers = 1\n')
    daemon = start_daemon()
    sources = drop_all(big_series, site.inbox / "big")
    wait_for(lambda: hidden_files(site.outbox), timeout=SETTLE + 15, what="a ZIP being written", interval=0.005)
    sent = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(timeout=15)
    assert code == 0
    assert time.monotonic() - sent < 5, "SIGTERM took too long"
    assert hidden_files(site.outbox) == [], "the cancelled series left a temporary file"
    if not site.outputs():
        assert all(p.exists() for p in sources), "a cancelled series lost its sources"
    assert "daemon_stopped" in daemon.log()


# ---------------------------------------------------------------------------------------------------------
# Noticing files: polling, half-written files, partial-download names
# ---------------------------------------------------------------------------------------------------------


def test_polling_mode_delivers(site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path) -> None:
    # A long rescan, so that only the polling observer can notice the files in time.
    timings = TIMINGS.replace("rescan_seconds = 2", "rescan_seconds = 300").replace(
        "[watch]\n", '[watch]\nmode = "poll"\npoll_seconds = 0.5\n'
    )
    config(site, timings=timings)
    series = make_series(tmp_path / "stage", 3)
    daemon = start_daemon()
    assert "with polling" in daemon.log()
    drop_all(series, site.inbox / "share")
    [out] = wait_outputs(site, 1, timeout=SETTLE + 10)
    assert_complete(read_zip(out), range(1, 4))


def test_half_written_file_is_never_read_half(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site)
    series = make_series(tmp_path / "stage", 4)
    start_daemon()
    folder = site.inbox / "slow"
    for src in series.files[:3]:
        drop_file(src, folder / src.name)
    data = series.data(3)
    with (folder / series.files[3].name).open("wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(STABLE + 0.7)  # a stalled copy: long enough to look stable, shorter than the settle time
        f.write(data[len(data) // 2 :])
    [out] = wait_outputs(site, 1, timeout=SETTLE + 10)
    assert_complete(read_zip(out), range(1, 5))
    assert quarantine_entries(site) == [], "the half-written file was quarantined"


def test_part_files_are_ignored_until_renamed(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site)
    partial = make_series(tmp_path / "partial", 3)
    clock = make_series(tmp_path / "clock", 2)
    start_daemon()
    folder = site.inbox / "download"
    parts = [drop_file(f, folder / f"{f.name}.part") for f in partial.files]
    drop_all(clock, site.inbox / "other")
    # Once the other series is out, the daemon has had every chance to take the .part files.
    [clock_zip] = wait_outputs(site, 1, timeout=SETTLE + 10)
    assert_complete(read_zip(clock_zip), range(1, 3))
    assert all(p.exists() for p in parts)
    assert quarantine_entries(site) == [], ".part files were read"
    for p in parts:
        p.rename(p.with_suffix(""))
    zips = wait_outputs(site, 2, timeout=SETTLE + 10)
    [out] = [z for z in zips if z != clock_zip]
    assert_complete(read_zip(out), range(1, 4))


# ---------------------------------------------------------------------------------------------------------
# Configuration reload, bad input, logs
# ---------------------------------------------------------------------------------------------------------


def test_sighup_refuses_an_invalid_config_and_applies_a_valid_one(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site)
    daemon = start_daemon()
    config(site, '[watch]\nmode = "sometimes"\n', timings="")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("config_reload_refused")
    assert "watch.mode" in daemon.log(), "the refusal does not say which key is wrong"
    drop_all(make_series(tmp_path / "s1", 2), site.inbox / "one")
    [first] = wait_outputs(site, 1, timeout=SETTLE + 10)
    assert first.relative_to(site.outbox).parts[0].startswith("ANON")

    # A new pseudonym format, and polling instead of inotify (as for an inbox moved to a network share).
    polling = TIMINGS.replace("rescan_seconds = 2", "rescan_seconds = 300").replace(
        "[watch]\n", '[watch]\nmode = "poll"\npoll_seconds = 0.5\n'
    )
    config(site, deidentify='patient_id_format = "SITE{digest}"\n', timings=polling)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded")
    assert "with polling" in daemon.log(), "the new watch mode was not applied"
    drop_all(make_series(tmp_path / "s2", 2), site.inbox / "two")
    zips = wait_outputs(site, 2, timeout=SETTLE + 10)
    [second] = [z for z in zips if z != first]
    assert second.relative_to(site.outbox).parts[0].startswith("SITE"), "the new patient ID format is not used"
    assert daemon.alive()


def test_bad_file_goes_to_quarantine_and_the_next_series_is_delivered(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site)
    daemon = start_daemon()
    bad = site.inbox / "misc" / "IM0001.dcm"
    bad.parent.mkdir()
    bad_bytes = f"Referral letter for {PATIENT_NAME}, {PATIENT_ID}\n".encode() * 50
    bad.write_bytes(bad_bytes)
    # reason.json is written first, then the file is moved: wait for the move.
    wait_for(lambda: quarantined_files(site), timeout=SETTLE + 10, what="a file in quarantine")
    [reason] = quarantine_entries(site)
    assert reason["code"] == "not-dicom"
    [kept] = quarantined_files(site)
    assert kept.read_bytes() == bad_bytes
    assert not bad.exists()
    assert daemon.alive()

    drop_all(make_series(tmp_path / "good", 3), site.inbox / "good")
    [out] = wait_outputs(site, 1, timeout=SETTLE + 10)
    assert_complete(read_zip(out), range(1, 4))
    assert daemon.alive()


def test_logs_and_journal_hold_no_planted_patient_name_or_id(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site, '[input]\non_success = "delete"\n')
    daemon = start_daemon()
    series = make_series(tmp_path / "stage", 3)
    with config_mod.disable_value_validation():
        for f in series.files:  # a malformed date, the kind a parser complains about, quoting the value
            ds = dcmread(f)
            ds.PatientBirthDate = BIRTH_DATE
            ds.save_as(f)
    cut_in_pixels = make_series(tmp_path / "cut", 1).data(0)[:20000]
    cut_in_header = make_series(tmp_path / "cut2", 1).data(0)[:1200]  # just after the patient's name and ID
    drop_all(series, site.inbox / "a")
    (site.inbox / "b").mkdir()
    (site.inbox / "b" / "copy1.dcm").write_bytes(cut_in_pixels)
    (site.inbox / "b" / "copy2.dcm").write_bytes(cut_in_header)
    (site.inbox / "c").mkdir()
    (site.inbox / "c" / "note.txt").write_text(f"{PATIENT_NAME} {PATIENT_ID} {ACCESSION}\n")
    wait_outputs(site, 1, timeout=SETTLE + 10)
    wait_for(lambda: len(quarantined_files(site)) >= 3, timeout=10, what="three files in quarantine")
    assert daemon.terminate() == 0
    for event in ("series_delivered", "truncated", "not-dicom", "quarantine entry"):
        assert event in daemon.log(), f"the log does not report {event}"
    text = daemon.log().lower()
    journal = b"".join(p.read_bytes() for p in site.state.glob("journal.sqlite*")).lower()
    for word in (*PHI, BIRTH_DATE):
        assert word.lower() not in text, f"the log names the patient ({word!r})"
        assert word.lower().encode() not in journal, f"the journal names the patient ({word!r})"


# ---------------------------------------------------------------------------------------------------------
# One working process per state folder: the daemon and `anondrop once` never share a journal
# ---------------------------------------------------------------------------------------------------------

EXIT_BUSY = 4


def said(result: CliResult) -> str:
    """stderr with the console's line wrapping undone."""
    return " ".join(result.stderr.split())


def test_once_on_the_daemons_state_folder_is_refused_and_the_daemon_carries_on(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site)
    daemon = start_daemon()
    drop_all(make_series(tmp_path / "s1", 2), site.inbox / "one")

    asked = time.monotonic()
    refused = run_cli("once", "--config", site.config, timeout=60)

    assert refused.returncode == EXIT_BUSY, refused.stdout + refused.stderr
    assert time.monotonic() - asked < 20, "a refusal must not wait for the holder"
    assert f"the state folder {site.state.resolve()} is in use by another anondrop process" in said(refused)
    assert f"pid {daemon.proc.pid}: anondrop run --config {site.config.resolve()}" in said(refused)
    assert "series delivered" not in refused.stdout, "a refused once must not run at all"
    # The operator's commands stay usable beside the daemon (retry writes one SQLite transaction).
    for command in (["status"], ["status", "--json"], ["deliveries", "list"], ["deliveries", "retry", "--all"],
                    ["quarantine", "list"]):
        result = run_cli(*command, "--config", site.config, timeout=60)
        assert result.returncode == 0, f"anondrop {' '.join(command)}: {result.stderr}"
    [out] = wait_outputs(site, 1, timeout=SETTLE + 15)
    assert_complete(read_zip(out), range(1, 3))
    drop_all(make_series(tmp_path / "s2", 3), site.inbox / "two")
    assert len(wait_outputs(site, 2, timeout=SETTLE + 15)) == 2
    assert daemon.alive()

    # Killed outright, the daemon leaves its lock file behind, but the kernel has released the lock itself.
    daemon.kill_group()
    assert f"pid {daemon.proc.pid}: anondrop run" in (site.state / "anondrop.lock").read_text()
    after = run_cli("once", "--config", site.config, timeout=120)
    assert after.returncode == 0, after.stdout + after.stderr
    assert len(site.outputs()) == 2, "the once after the daemon repeated a delivered series"


def test_run_is_refused_while_once_works_the_state_folder_and_a_killed_once_blocks_nothing(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    # A destination nobody listens on, retried after ten minutes: the `once` keeps the state folder that long.
    config(site, f"""
[[destinations]]
name = "pacs"
kind = "dimse"
host = "127.0.0.1"
port = {free_port()}
called_aet = "NOBODY"
max_attempts = 100
backoff_seconds = 600
timeout_seconds = 2
""")
    drop_all(make_series(tmp_path / "s1", 2), site.inbox / "one")
    lock = site.state / "anondrop.lock"
    with (site.root / "once.log").open("wb") as log_file:
        once = subprocess.Popen([sys.executable, "-m", "anondrop", "once", "--config", str(site.config)],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: lock.exists() and f"pid {once.pid}: anondrop once" in lock.read_text(), 30,
                 "the once to take the state folder")
        wait_for(lambda: site.outputs(), 60, "the once's ZIP")

        refused = run_cli("run", "--config", site.config, timeout=60)

        assert refused.returncode == EXIT_BUSY, refused.stdout + refused.stderr
        assert f"pid {once.pid}: anondrop once --config {site.config.resolve()}" in said(refused)
        assert "Wait for it to finish or stop it" in said(refused)
        assert once.poll() is None, "the refused daemon disturbed the once"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(once.pid, signal.SIGKILL)
        once.wait(10)

    daemon = start_daemon()  # the killed once left its lock file, and it blocks nothing
    assert f"pid {daemon.proc.pid}: anondrop run" in lock.read_text()
    assert daemon.alive()


def test_a_reload_onto_a_state_folder_in_use_is_refused_and_a_reload_that_moves_releases_the_old_one(
    site: Site, start_daemon: Callable[[], Daemon], tmp_path: Path
) -> None:
    config(site)
    daemon = start_daemon()
    moved = site.root / "state2"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from anondrop import lease; "
         "held = lease.take(Path(sys.argv[1]), 'a helper holding the lease'); print('held', flush=True); "
         "time.sleep(600)",
         str(moved)], stdout=subprocess.PIPE, cwd=REPO, start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        site.config.write_text(site.config.read_text().replace('state = "state"', 'state = "state2"'))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("config_reload_refused")
        assert f"pid {holder.pid}: a helper holding the lease" in daemon.log()
    finally:
        holder.kill()
        holder.wait(10)

    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded")
    assert f"pid {daemon.proc.pid}: anondrop run" in (moved / "anondrop.lock").read_text()
    # The first state folder is free again: a `once` pointed at it runs.
    other = site.root / "old.toml"
    other.write_text(site.config.read_text().replace('state = "state2"', 'state = "state"'))
    assert run_cli("once", "--config", other, timeout=120).returncode == 0
    assert run_cli("once", "--config", site.config, timeout=60).returncode == EXIT_BUSY
    assert daemon.alive()
