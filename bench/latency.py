"""How fast `anondrop run` turns a finished series into a ZIP, and how it copes with a backlog.

    python bench/latency.py [--backlog N] [--settle S] [--workers W] [--repeat N] [--keep]

The daemon runs as a real process (`python -m anondrop run`) on a scratch installation under
bench/out/latency/. Three scenarios, each on a fresh installation:

* one series of 200 small instances dropped into a running daemon (warmed up by a first series);
* 20 series of 200 dropped at once, file by file in turn, as a busy PACS export does;
* a backlog of N small files (series of 200) already in the inbox when the daemon starts.

Latency is measured from the moment the last file of a series has landed (its write returned) to the moment
its ZIP is visible in the outbox, minus the settle time the daemon waits on purpose. Peak RSS is the summed
resident memory of the daemon and every process it started, sampled from /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

from _row import TreeSampler

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SCRATCH = BENCH / "out" / "latency"
SERIES_SIZE = 200
CONCURRENT = 20
ROWS = COLUMNS = 64
TARGET_LATENCY_S = 1.0
TARGET_RSS_MB = 300.0
TARGET_LINE = (
    f"targets: latency < {TARGET_LATENCY_S:g} s beyond settle for a {SERIES_SIZE}-instance series; "
    f"peak RSS < {TARGET_RSS_MB:.0f} MB during the backlog"
)
# Every generated UID has this stem and length, so the instances of a series are made by patching one
# encoded template in place (the backlog is tens of thousands of files; pydicom per file would dominate).
_UID_STEM = "2.25.1"
_UID_DIGITS = 38
_SOP_PLACEHOLDER = (_UID_STEM + "9" * _UID_DIGITS).encode()
# InstanceNumber (IS, 6 characters); the '+' cannot occur in a UID, so the bytes cannot occur elsewhere.
_NUMBER_PLACEHOLDER = b"+98765"
_ZIP_NAME = re.compile(r"^[A-Z]+_(\d+)_")


# ---------------------------------------------------------------------------------------------------------
# Input: small MR series with the usual identifiers
# ---------------------------------------------------------------------------------------------------------


class SeriesMaker:
    """Makes the encoded instances of one series at a time; series numbers are unique per maker."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.next_number = 1

    def uid(self) -> str:
        return f"{_UID_STEM}{self.rng.randrange(10**_UID_DIGITS):0{_UID_DIGITS}d}"

    def series(self, count: int) -> tuple[int, list[bytes]]:
        number = self.next_number
        self.next_number += 1
        header, pixels = self._template(number)
        instances = []
        for i in range(1, count + 1):
            data = header.replace(_NUMBER_PLACEHOLDER, f"{i:>6d}".encode())
            instances.append(data.replace(_SOP_PLACEHOLDER, self.uid().encode()) + pixels)  # meta and dataset
        return number, instances

    def _template(self, number: int) -> tuple[bytes, bytes]:
        rng = self.rng
        ds = Dataset()
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = UID(_SOP_PLACEHOLDER.decode())
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = _SOP_PLACEHOLDER.decode()
        ds.PatientName = f"BENCH^PATIENT{number}"
        ds.PatientID = f"MRN{rng.randrange(10**7, 10**8)}"
        ds.PatientBirthDate = f"19{rng.randrange(30, 99)}0{rng.randrange(1, 9)}1{rng.randrange(0, 9)}"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = self.uid()
        ds.SeriesInstanceUID = self.uid()
        ds.FrameOfReferenceUID = self.uid()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250203"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = f"A{rng.randrange(10**7, 10**8)}"
        ds.ReferringPhysicianName = "REFERRER^RITA"
        ds.InstitutionName = "BENCH GENERAL HOSPITAL"
        ds.StationName = "MR1"
        ds.StudyDescription = f"MR BRAIN for patient {number}"
        ds.Modality = "MR"
        ds.SeriesNumber = number
        ds.InstanceNumber = _NUMBER_PLACEHOLDER.decode()
        ds.StudyID = "1"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = bytes(ROWS * COLUMNS * 2)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        encoded = buf.getvalue()
        head = encoded[: -len(ds.PixelData)]
        assert head.count(_SOP_PLACEHOLDER) == 2 and head.count(_NUMBER_PLACEHOLDER) == 1
        pixels = bytes(b & 0x0F if i % 2 else b for i, b in enumerate(rng.randbytes(ROWS * COLUMNS * 2)))
        return head, pixels


def write_series(folder: Path, instances: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(instances, 1):
        (folder / f"IM{i:05d}.dcm").write_bytes(data)


# ---------------------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    settle: float
    stable: float
    workers: int


class Site:
    """A scratch installation: config and folders, and the daemon running on it."""

    def __init__(self, root: Path, timings: Timings) -> None:
        if root.exists():
            shutil.rmtree(root)
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.inbox.mkdir(parents=True)
        self.config = root / "anondrop.toml"
        self.log = root / "daemon.log"
        self.config.write_text(textwrap.dedent(f"""\
            [paths]
            inbox = "inbox"
            outbox = "outbox"
            quarantine = "quarantine"
            state = "state"

            [processing]
            workers = {timings.workers}

            [watch]
            stable_seconds = {timings.stable}
            rescan_seconds = 300

            [completion]
            settle_seconds = {timings.settle}
            """), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[Path, float] = {}  # ZIP -> when this process first saw it

    def start(self) -> float:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "anondrop", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log, cwd=REPO, start_new_session=True,
            )
        return time.monotonic()

    def wait_ready(self, timeout: float) -> float:
        return self.wait(lambda: "daemon_ready" in self.log.read_text(errors="replace"), timeout, "start-up")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of its process group is left
        self.proc.wait()

    def poll_zips(self) -> dict[Path, float]:
        now = time.monotonic()
        if self.outbox.exists():
            for path in self.outbox.rglob("*.zip"):
                if not path.name.startswith("."):
                    self.seen.setdefault(path, now)
        return self.seen

    def wait(self, condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> float:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"the daemon exited ({self.proc.returncode}) during {what}: {self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}: {self.tail()}")
            time.sleep(interval)
        return time.monotonic()

    def wait_zips(self, count: int, timeout: float, what: str, interval: float = 0.01) -> float:
        return self.wait(lambda: len(self.poll_zips()) >= count, timeout, what, interval)

    def zip_for(self, series_number: int) -> float:
        for path, at in self.seen.items():
            match = _ZIP_NAME.match(path.name)
            if match and int(match.group(1)) == series_number:
                return at
        raise BenchError(f"no ZIP for series number {series_number}")

    def delivered_instances(self) -> int:
        total = 0
        for path in self.seen:
            with zipfile.ZipFile(path) as zf:
                total += int(json.loads(zf.read("manifest.json"))["instances"])
        return total

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return " | ".join(lines[-3:]) or "(empty log)"


class BenchError(Exception):
    """A scenario could not be measured (the daemon failed or took far too long)."""


# ---------------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    series: int
    files: int
    latencies: list[float] = field(default_factory=list)  # seconds beyond settle, one per series
    startup_s: float | None = None
    first_zip_s: float | None = None
    all_done_s: float | None = None
    peak_rss_mb: float | None = None
    error: str = ""


def latency_run(name: str, root: Path, timings: Timings, series_count: int, repeat: int) -> Result:
    """Series dropped into a running, warmed-up daemon; latency of each beyond the settle time."""
    result = Result(name, series_count * repeat, SERIES_SIZE * series_count * repeat)
    site = Site(root, timings)
    maker = SeriesMaker(seed=series_count)
    try:
        with TreeSampler() as sampler:
            site.start()
            site.wait_ready(120)
            # Warm-up: the worker pool starts on the first series; steady state is what is measured.
            _, warm = maker.series(40)
            write_series(site.inbox / "warmup", warm)
            site.wait_zips(1, 120, "the warm-up series")
            for _ in range(repeat):
                batch = [maker.series(SERIES_SIZE) for _ in range(series_count)]
                landed: dict[int, float] = {}
                for i in range(SERIES_SIZE):  # in turn, one file of each series, as concurrent senders do
                    for number, instances in batch:
                        folder = site.inbox / f"S{number:04d}"
                        folder.mkdir(exist_ok=True)
                        (folder / f"IM{i + 1:05d}.dcm").write_bytes(instances[i])
                        landed[number] = time.monotonic()
                expected = len(site.seen) + series_count
                site.wait_zips(expected, timings.settle + 60 + 2 * series_count * SERIES_SIZE / 50, name,
                               interval=0.005)
                result.latencies += [site.zip_for(n) - landed[n] - timings.settle for n, _ in batch]
        result.peak_rss_mb = sampler.peak_kb / 1024
    except BenchError as exc:
        result.error = str(exc)
    finally:
        site.stop()
    return result


def backlog_run(root: Path, timings: Timings, files: int) -> Result:
    """`files` small files already in the inbox at start-up: first ZIP, all done, peak memory."""
    site = Site(root, timings)
    maker = SeriesMaker(seed=files)
    print(f"  writing the backlog: {files} files ...", end="", flush=True, file=sys.stderr)
    made = 0
    series = 0
    while made < files:
        count = min(SERIES_SIZE, files - made)
        number, instances = maker.series(count)
        write_series(site.inbox / f"P{number % 97:02d}" / f"S{number:05d}", instances)
        made += count
        series += 1
    os.sync()
    print(" done", file=sys.stderr)
    result = Result(f"backlog of {files} files at start-up", series, files)
    try:
        with TreeSampler() as sampler:
            started = site.start()
            result.startup_s = site.wait_ready(max(120.0, files / 100)) - started
            result.first_zip_s = site.wait_zips(1, max(300.0, files / 20), "the first ZIP", 0.05) - started
            result.all_done_s = site.wait_zips(series, max(600.0, files / 5), "every ZIP", 0.25) - started
        result.peak_rss_mb = sampler.peak_kb / 1024
        delivered = site.delivered_instances()
        if delivered != files:
            result.error = f"{delivered} of {files} instances delivered"
    except BenchError as exc:
        result.error = str(exc)
    finally:
        site.stop()
    return result


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _n(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[Result], settle: float) -> str:
    head = (f"{'scenario':<36}{'series':>7}{'files':>8}{'latency median':>16}{'max':>8}"
            f"{'ready':>8}{'1st ZIP':>9}{'all done':>10}{'files/s':>9}{'peak RSS MB':>13}")
    lines = [f"latency = last file landed -> ZIP visible, minus settle_seconds = {settle:g} s; times in seconds",
             head]
    for r in results:
        med = statistics.median(r.latencies) if r.latencies else None
        worst = max(r.latencies) if r.latencies else None
        rate = r.files / r.all_done_s if r.all_done_s else None
        lines.append(
            f"{r.name:<36}{r.series:>7}{r.files:>8}{_n(med):>16}{_n(worst):>8}{_n(r.startup_s):>8}"
            f"{_n(r.first_zip_s):>9}{_n(r.all_done_s):>10}{_n(rate, 0):>9}{_n(r.peak_rss_mb, 0):>13}"
            + (f"  FAILED: {r.error}" if r.error else "")
        )
    return "\n".join(lines)


def verdict(single: Result, backlog: Result | None) -> list[str]:
    out = []
    if single.error or not single.latencies:
        out.append(f"FAIL  latency: not measured ({single.error})")
    else:
        worst = max(single.latencies)
        ok = worst < TARGET_LATENCY_S
        out.append(f"{'PASS' if ok else 'FAIL'}  latency: {worst:.2f} s beyond settle at worst (one series)")
    if backlog is None:
        out.append("-     backlog: not run (--backlog 0)")
    elif backlog.error or backlog.peak_rss_mb is None:
        out.append(f"FAIL  backlog: {backlog.error}")
    else:
        ok = backlog.peak_rss_mb < TARGET_RSS_MB
        out.append(f"{'PASS' if ok else 'FAIL'}  backlog: peak RSS {backlog.peak_rss_mb:.0f} MB")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backlog", type=int, default=50_000, metavar="N",
                        help="files in the inbox at start-up (default 50000; 0 skips the backlog)")
    parser.add_argument("--settle", type=float, default=3.0, metavar="S", help="settle_seconds (default 3)")
    parser.add_argument("--stable", type=float, default=0.5, metavar="S", help="stable_seconds (default 0.5)")
    parser.add_argument("--workers", type=int, default=0, metavar="W", help="processing.workers (default 0: CPUs)")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="single-series drops to measure (default 3)")
    parser.add_argument("--keep", action="store_true", help=f"keep the scratch folders under {SCRATCH}")
    args = parser.parse_args(argv)
    if args.backlog < 0 or args.repeat < 1 or args.stable > args.settle:
        parser.error("--backlog must be >= 0, --repeat >= 1, and --stable must not exceed --settle")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timings = Timings(args.settle, args.stable, args.workers)
    print(f"{os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"settle {args.settle:g} s, stable {args.stable:g} s, workers {args.workers or 'one per CPU'}", flush=True)
    results = []
    print("  one series ...", file=sys.stderr, flush=True)
    single = latency_run(f"1 series x {SERIES_SIZE}", SCRATCH / "single", timings, 1, args.repeat)
    results.append(single)
    print(f"  {CONCURRENT} concurrent series ...", file=sys.stderr, flush=True)
    results.append(latency_run(f"{CONCURRENT} concurrent series x {SERIES_SIZE}", SCRATCH / "concurrent",
                               timings, CONCURRENT, 1))
    backlog = None
    if args.backlog:
        backlog = backlog_run(SCRATCH / "backlog", timings, args.backlog)
        results.append(backlog)
    print(table(results, args.settle), flush=True)
    print(f"\n{TARGET_LINE}")
    for line in verdict(single, backlog):
        print(f"  {line}")
    if not args.keep:
        shutil.rmtree(SCRATCH, ignore_errors=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
