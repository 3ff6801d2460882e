"""Delivery throughput: one 600-instance CT series to a real Orthanc, over STOW-RS and over C-STORE.

    python bench/deliver.py [--files N] [--repeat N] [--rows web-ref,web,...] [--json FILE] [--keep]

anondrop's own senders (`deliver/dicomweb.py`, `deliver/dimse.py`) are timed on the upload step alone: an
already-built series ZIP in the outbox, to every instance confirmed. Beside them, measured in the same run on
the same instances, a bare send by the client libraries themselves: dicomweb-client's `store_instances` and
pynetdicom's `send_c_store`. The `once ->` rows time `anondrop once` end to end (de-identification, the ZIP
and the upload) with the destination configured. Every row sends to a fresh Orthanc (a new process with an
empty storage folder, on loopback), runs in a child process of its own so that its peak RSS is its own, and
is checked afterwards against Orthanc's count of stored instances.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import corpus as corpora
from _row import TreeSampler, run_tool

BENCH = Path(__file__).resolve().parent
SCRATCH = BENCH / "out" / "deliver"
LOOPBACK = "127.0.0.1"
ORTHANC_AET = "ORTHANCBENCH"
TARGET_RATIO = 0.8
TARGET_LINE = f"target: anondrop's senders >= {TARGET_RATIO}x the bare send of the same protocol, files/s"

# Row key -> (label, the reference its ratio is taken against).
ROWS: dict[str, tuple[str, str | None]] = {
    "web-ref": ("dicomweb-client STOW-RS", None),
    "web": ("anondrop dicomweb", "web-ref"),
    "dimse-ref": ("pynetdicom C-STORE", None),
    "dimse": ("anondrop dimse", "dimse-ref"),
    "once": ("once, outbox only", None),
    "once-web": ("once -> dicomweb", "web-ref"),
    "once-dimse": ("once -> dimse", "dimse-ref"),
}
SENDERS = {"web": "web-ref", "dimse": "dimse-ref"}  # what the target is about


class BenchError(Exception):
    """The run cannot be measured here (a tool missing, a row that failed); the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Orthanc, started fresh for every row
# ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Orthanc:
    http_port: int
    dicom_port: int

    @property
    def dicomweb(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/dicom-web"

    def stored(self) -> int:
        import httpx

        r = httpx.get(f"http://{LOOPBACK}:{self.http_port}/statistics", timeout=30)
        r.raise_for_status()
        return int(r.json()["CountInstances"])


def orthanc_version() -> str:
    exe = _orthanc_exe()
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
    return f"Orthanc {out[1]}" if len(out) > 1 else "Orthanc"


def _orthanc_exe() -> str:
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if exe is None:
        raise BenchError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    return exe


@contextlib.contextmanager
def orthanc(root: Path) -> Iterator[Orthanc]:
    """An Orthanc with the DICOMweb plugin, no authentication, storage under root; removed afterwards."""
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not plugin.exists():
        raise BenchError(f"{plugin} is missing (apt-get install orthanc-dicomweb)")
    root.mkdir(parents=True)
    server = Orthanc(free_port(), free_port())
    conf = {
        "Name": "anondrop-bench", "HttpPort": server.http_port, "DicomPort": server.dicom_port,
        "DicomAet": ORTHANC_AET, "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(conf), encoding="utf-8")
    with (root / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([_orthanc_exe(), str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise BenchError(f"Orthanc exited with {proc.returncode}; see {root / 'orthanc.log'}")
            with contextlib.suppress(Exception):
                server.stored()
                with socket.create_connection((LOOPBACK, server.dicom_port), timeout=1):
                    break
            if time.monotonic() > deadline:
                raise BenchError("Orthanc did not start within 60 s")
            time.sleep(0.1)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The series: de-identified once, untimed; its ZIP and its instances are what every sender row sends
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    inbox: Path  # the original (identified) series, for the `once` rows
    zip_path: Path  # the series ZIP anondrop made of it
    instances: Path  # the ZIP's DICOM entries as files, for the bare senders
    files: int
    bytes: int  # of the instances


def once_config(site: Path, destination: str = "") -> Path:
    config = site / "anondrop.toml"
    config.write_text(
        '[paths]\ninbox = "inbox"\noutbox = "outbox"\nquarantine = "quarantine"\nstate = "state"\n\n'
        '[deidentify]\nprofile = "basic"\noptions = []\n\n[input]\non_success = "keep"\n' + destination,
        encoding="utf-8",
    )
    return config


def link_inbox(source: Path, inbox: Path) -> None:
    shutil.copytree(source, inbox, copy_function=os.link)


def prepare(corpus: corpora.Corpus, files: int) -> Prepared:
    inbox = SCRATCH / "series"
    originals = list(corpora.corpus_files(corpus.path))[:files]
    for path in originals:  # hard links: the corpus is neither copied nor changed
        dest = inbox / path.relative_to(corpus.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, dest)
    site = SCRATCH / "prepare"
    link_inbox(inbox, site / "inbox")
    proc = subprocess.run([sys.executable, "-m", "anondrop", "once", "--config", str(once_config(site))],
                          capture_output=True, text=True)
    zips = [p for p in (site / "outbox").rglob("*.zip") if not p.name.startswith(".")]
    if proc.returncode != 0 or len(zips) != 1:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"anondrop once did not make one series ZIP (exit {proc.returncode}): {tail}")
    zip_path = SCRATCH / "series.zip"
    zips[0].rename(zip_path)
    shutil.rmtree(site)
    instances = SCRATCH / "instances"
    instances.mkdir()
    size = count = 0
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".dcm"):
                (instances / Path(info.filename).name).write_bytes(zf.read(info))
                size += info.file_size
                count += 1
    return Prepared(inbox, zip_path, instances, count, size)


# ---------------------------------------------------------------------------------------------------------
# Rows, each in a child process: `deliver.py --row KEY --job JOB.json`
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    row: str
    http_port: int
    dicom_port: int
    zip_path: str
    instances: str
    inbox: str
    scratch: str
    batch: int
    result: str


@dataclass(frozen=True)
class Result:
    row: str
    seconds: float | None = None
    confirmed: int = 0  # what the sender itself saw confirmed (Orthanc's own count is checked by the parent)
    peak_rss_kb: int | None = None
    error: str = ""


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def row_web_ref(job: Job) -> tuple[float, int]:
    from dicomweb_client.api import DICOMwebClient
    from pydicom import dcmread

    files = _dicom_files(Path(job.instances))
    start = time.perf_counter()
    client = DICOMwebClient(url=f"http://{LOOPBACK}:{job.http_port}/dicom-web")
    stored = 0
    for i in range(0, len(files), job.batch):
        response = client.store_instances([dcmread(p) for p in files[i : i + job.batch]])
        if response.get("FailedSOPSequence"):
            raise BenchError(f"{len(response.FailedSOPSequence)} instance(s) failed")
        stored += len(response.get("ReferencedSOPSequence", []))
    return time.perf_counter() - start, stored


def row_dimse_ref(job: Job) -> tuple[float, int]:
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE

    files = _dicom_files(Path(job.instances))
    start = time.perf_counter()
    contexts = set()
    for path in files:
        meta = read_file_meta_info(path)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    ae = AE(ae_title="BENCHSCU")
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(LOOPBACK, job.dicom_port, ae_title=ORTHANC_AET)
    if not assoc.is_established:
        raise BenchError("no association with Orthanc")
    stored = 0
    try:
        for path in files:  # a path: pynetdicom sends the file's data set as it is, without decoding it
            status = assoc.send_c_store(path)
            stored += status is not None and "Status" in status and int(status.Status) == 0
    finally:
        assoc.release()
    return time.perf_counter() - start, stored


def _parcel(job: Job) -> Any:
    from anondrop.deliver.base import Parcel

    zip_path = Path(job.zip_path)
    return Parcel(series="bench", zip_path=zip_path, rel=zip_path.name)


def row_web(job: Job) -> tuple[float, int]:
    from anondrop.config import DicomWebDestination
    from anondrop.deliver.dicomweb import DicomWeb

    cfg = DicomWebDestination.model_validate(
        {"name": "bench", "kind": "dicomweb", "url": f"http://{LOOPBACK}:{job.http_port}/dicom-web"})
    start = time.perf_counter()
    confirmed = DicomWeb(cfg).deliver(_parcel(job), threading.Event())
    return time.perf_counter() - start, len(confirmed)


def row_dimse(job: Job) -> tuple[float, int]:
    from anondrop.config import DimseDestination
    from anondrop.deliver.dimse import Dimse

    cfg = DimseDestination.model_validate(
        {"name": "bench", "kind": "dimse", "host": LOOPBACK, "port": job.dicom_port, "called_aet": ORTHANC_AET})
    start = time.perf_counter()
    confirmed = Dimse(cfg, Path(job.scratch) / "outgoing").deliver(_parcel(job), threading.Event())
    return time.perf_counter() - start, len(confirmed)


def destination_toml(row: str, job: Job) -> str:
    if row == "once-web":
        return (f'\n[[destinations]]\nname = "orthanc"\nkind = "dicomweb"\n'
                f'url = "http://{LOOPBACK}:{job.http_port}/dicom-web"\nmax_attempts = 1\n')
    if row == "once-dimse":
        return (f'\n[[destinations]]\nname = "orthanc"\nkind = "dimse"\nhost = "{LOOPBACK}"\n'
                f'port = {job.dicom_port}\ncalled_aet = "{ORTHANC_AET}"\nmax_attempts = 1\n')
    return ""


def row_once(job: Job) -> tuple[float, int, int | None]:
    """`anondrop once` as a user runs it, on a fresh site: process start-up included, as in run.py."""
    site = Path(job.scratch) / "site"
    link_inbox(Path(job.inbox), site / "inbox")
    config = once_config(site, destination_toml(job.row, job))
    os.sync()
    # Exit 3 would mean a dead letter or a quarantine: run_tool raises, and the row says so.
    tool = run_tool([sys.executable, "-m", "anondrop", "once", "--config", str(config)])
    with zipfile.ZipFile(next((site / "outbox").rglob("*.zip"))) as zf:
        members = sum(1 for n in zf.namelist() if n.endswith(".dcm"))
    return tool.seconds, members, tool.max_rss_kb


def run_child_row(job: Job) -> Result:
    try:
        if job.row.startswith("once"):
            with TreeSampler() as sampler:
                seconds, confirmed, tool_kb = row_once(job)
            return Result(job.row, seconds, confirmed, max(tool_kb or 0, sampler.peak_kb) or None)
        run = {"web-ref": row_web_ref, "dimse-ref": row_dimse_ref, "web": row_web, "dimse": row_dimse}[job.row]
        seconds, confirmed = run(job)
        return Result(job.row, seconds, confirmed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except Exception as exc:  # any failure is the row's result, reported in its note
        return Result(job.row, error=f"{type(exc).__name__}: {exc}"[:300])


# ---------------------------------------------------------------------------------------------------------
# The parent: one fresh Orthanc and one child process per row
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    seconds: float | None
    files: int
    bytes: int
    stored: int | None  # Orthanc's count after the row (None for the outbox-only row)
    peak_rss_kb: int | None
    error: str = ""

    @property
    def files_per_s(self) -> float | None:
        return self.files / self.seconds if self.seconds and not self.error else None


def measure(key: str, prepared: Prepared, batch: int) -> Row:
    scratch = SCRATCH / f"row-{key}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        with orthanc(SCRATCH / "orthanc") as server:
            job = Job(key, server.http_port, server.dicom_port, str(prepared.zip_path), str(prepared.instances),
                      str(prepared.inbox), str(scratch), batch, str(scratch / "result.json"))
            (scratch / "job.json").write_text(json.dumps(asdict(job)), encoding="utf-8")
            os.sync()  # the previous row's writes go to disk now, not during this row
            proc = subprocess.run([sys.executable, __file__, "--row", str(scratch / "job.json")],
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not Path(job.result).is_file():
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                return Row(key, None, prepared.files, prepared.bytes, None, None, f"harness: {tail}")
            result = Result(**json.loads(Path(job.result).read_text(encoding="utf-8")))
            stored = server.stored() if key != "once" else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    error = result.error
    if not error and stored is not None and stored != prepared.files:
        error = f"(!) Orthanc holds {stored} of {prepared.files} instances"
    if not error and result.confirmed != prepared.files:
        error = f"(!) {result.confirmed} of {prepared.files} instances confirmed"
    return Row(key, result.seconds, prepared.files, prepared.bytes, stored, result.peak_rss_kb, error)


def best_of(runs: list[Row]) -> Row:
    good = [r for r in runs if not r.error and r.seconds]
    if not good:
        return runs[-1]
    fastest = min(good, key=lambda r: r.seconds or 0.0)
    return Row(fastest.key, fastest.seconds, fastest.files, fastest.bytes, fastest.stored,
               max((r.peak_rss_kb or 0) for r in good) or None)


def ratio(row: Row, rows: dict[str, Row]) -> float | None:
    ref_key = ROWS[row.key][1]
    ref = rows.get(ref_key) if ref_key else None
    mine, theirs = row.files_per_s, ref.files_per_s if ref else None
    return mine / theirs if mine and theirs else None


def table(rows: dict[str, Row]) -> str:
    lines = [f"{'row':<24}{'files':>6}{'seconds':>9}{'files/s':>9}{'MB/s':>8}{'peak RSS MB':>13}"
             f"{'vs bare send':>14}  note"]
    for key, row in rows.items():
        label = ROWS[key][0]
        if row.error and row.seconds is None:
            lines.append(f"{label:<24}{row.files:>6}{'-':>9}{'-':>9}{'-':>8}{'-':>13}{'-':>14}  {row.error}")
            continue
        r = ratio(row, rows)
        rate = row.files_per_s
        notes = [row.error] if row.error else []
        if key in ("web-ref", "dimse-ref"):
            notes.append("reference")
        alone = rows["once"].files_per_s if "once" in rows else None
        if key.startswith("once-") and alone and rate:
            notes.append(f"{rate / alone:.2f}x once alone")
        note = "; ".join(notes)
        lines.append(
            f"{label:<24}{row.files:>6}{row.seconds or 0:>9.2f}{rate or 0:>9.1f}"
            f"{row.bytes / 1e6 / (row.seconds or 1):>8.1f}"
            f"{(row.peak_rss_kb or 0) / 1024:>13.1f}{'-' if r is None else f'{r:.2f}x':>14}  {note}".rstrip())
    return "\n".join(lines)


def verdicts(rows: dict[str, Row]) -> list[str]:
    out = []
    for key, ref in SENDERS.items():
        row = rows.get(key)
        if row is None:
            continue
        r = ratio(row, rows)
        if r is None:
            why = row.error or (rows[ref].error if ref in rows else "") or "no reference"
            out.append(f"FAIL  {ROWS[key][0]}: not measured ({why})")
        else:
            out.append(f"{'PASS' if r >= TARGET_RATIO else 'FAIL'}  {ROWS[key][0]}: {r:.2f}x {ROWS[ref][0]}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=600, metavar="N",
                        help="instances of the ct600 series to send (default 600)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="best of N per row (default 1)")
    parser.add_argument("--rows", metavar="ROW,ROW", help=f"rows to run (default all): {','.join(ROWS)}")
    parser.add_argument("--batch", type=int, default=20, metavar="N",
                        help="instances per dicomweb-client request (default 20, as anondrop's batch_size)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true", help=f"keep the series and its ZIP under {SCRATCH}")
    parser.add_argument("--row", type=Path, help=argparse.SUPPRESS)  # the child's mode: a job file
    args = parser.parse_args(argv)
    if not 1 <= args.files <= 600 or args.repeat < 1 or args.batch < 1:
        parser.error("--files must be 1-600, --repeat and --batch at least 1")
    chosen = list(ROWS) if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(chosen) - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown row(s) {', '.join(sorted(unknown))}; choose from {','.join(ROWS)}")
    # A ratio needs its reference, measured in the same run.
    needed = set(chosen) | {ROWS[r][1] for r in chosen if ROWS[r][1]}
    args.rows = [r for r in ROWS if r in needed]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row is not None:
        job = Job(**json.loads(args.row.read_text(encoding="utf-8")))
        Path(job.result).write_text(json.dumps(asdict(run_child_row(job))), encoding="utf-8")
        return 0
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    try:
        corpus = corpora.build("ct600")
        print(f"{os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"{orthanc_version()}; best of {args.repeat}", flush=True)
        prepared = prepare(corpus, args.files)
        print(f"ct600: {prepared.files} de-identified instances, {prepared.bytes / 1e6:.1f} MB, from one series "
              f"ZIP; a fresh Orthanc on loopback per row", flush=True)
        rows: dict[str, Row] = {}
        for key in args.rows:
            runs = []
            for i in range(args.repeat):
                print(f"  {ROWS[key][0]} (run {i + 1}/{args.repeat})", file=sys.stderr, flush=True)
                runs.append(measure(key, prepared, args.batch))
            rows[key] = best_of(runs)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(SCRATCH, ignore_errors=True)
    print(table(rows))
    print(f"\n{TARGET_LINE}")
    for line in verdicts(rows):
        print(f"  {line}")
    if args.json:
        report = {key: {**asdict(row), "label": ROWS[key][0], "files_per_s": row.files_per_s,
                        "ratio": ratio(row, rows)} for key, row in rows.items()}
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if any(r.error for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
