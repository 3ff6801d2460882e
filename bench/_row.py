"""One benchmark row, run in a process of its own so that the row's peak RSS is its own.

    python bench/_row.py ROW CORPUS_DIR RESULT_JSON

Writes a Measurement as JSON to RESULT_JSON. A row that cannot run here (tool not installed, API not there
yet) is a result too, with a status saying why; only a bug in the harness exits non-zero.

Timing covers the work a user waits for: for tools, the whole child process (start-up included); for the
in-process rows, imports, the file walk and the loop. Set-up (inbox copies, certificates, syncing the
previous row's writes to disk) is not timed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
SCRATCH_ROOT = BENCH / "out"
TOOL_TIMEOUT = 3600.0
# A /proc walk costs ~2 ms; every 0.1 s keeps the sampler under 2% of one core on a 2-core machine.
SAMPLE_INTERVAL = 0.1
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None

# Row key (for --rows) -> the label printed in the table.
ROWS: dict[str, str] = {
    "cp": "cp -r",
    "zip": "zip -0 -r",
    "pydicom": "pydicom loop",
    "engine": "anondrop engine",
    "once": "anondrop once",
    "dicognito": "dicognito",
    "gdcmanon": "gdcmanon",
}
REFERENCE = "pydicom"
# Rows that do their work inside this process: their peak RSS is ru_maxrss of RUSAGE_SELF, no sampler.
IN_PROCESS = frozenset({"pydicom", "engine"})


@dataclass(frozen=True)
class Measurement:
    """One run of one row. Numbers are None when the row did not run; status then says why."""

    row: str
    status: str
    files: int
    bytes: int
    seconds: float | None = None
    # Largest single process of the row, from the kernel (ru_maxrss): exact, but blind to worker pools.
    max_process_rss_kb: int | None = None
    # Sum over all processes of the row alive at once, sampled every SAMPLE_INTERVAL: sees pools.
    tree_rss_kb: int | None = None
    outputs: int | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def peak_rss_kb(self) -> int | None:
        """What the row held in memory at its peak, counting every process it ran."""
        known = [v for v in (self.max_process_rss_kb, self.tree_rss_kb) if v is not None]
        return max(known) if known else None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Measurement:
        return cls(**raw)


class RowUnavailable(Exception):
    """The row cannot run on this machine (tool missing, API not there yet); the message is the status."""


class RowFailed(Exception):
    """The row ran and failed; the message says how (exit code, last line of stderr)."""


@dataclass(frozen=True)
class Run:
    seconds: float
    outputs: int
    note: str = ""
    max_rss_kb: int | None = None  # from GNU time, for rows that run a tool


class TreeSampler:
    """Samples the summed RSS of every descendant of this process until stopped."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        root = os.getpid()
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.peak_kb = max(self.peak_kb, descendants_rss_kb(root))


def descendants_rss_kb(root: int) -> int:
    """Summed resident set of all processes below ``root`` (not root itself), from /proc/*/stat."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited between the listing and the read
        # The command name may hold spaces and parentheses: count fields from the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        rss[pid] = int(fields[21]) * PAGE_KB
    total = 0
    for pid in rss:
        p = parent.get(pid, 0)
        while p not in (0, 1, root):
            p = parent.get(p, 0)
        if p == root:
            total += rss[pid]
    return total


@dataclass(frozen=True)
class ToolRun:
    seconds: float
    returncode: int
    # The tool's own peak (with its waited-for children) when GNU time could measure it, else None.
    max_rss_kb: int | None


def run_tool(argv: list[str], *, cwd: Path | None = None, accept: frozenset[int] = frozenset({0})) -> ToolRun:
    """Run a command as a child and time it; raise RowFailed on an exit code not in ``accept``.

    ru_maxrss of a child starts at the RSS of the process that forked it (Linux keeps the pre-exec
    high-water mark), so measured from here every tool would weigh at least this Python process. GNU time
    is a small C program: the peak it reports is the tool's own, give or take a megabyte.
    """
    rss_file = None
    if GNU_TIME is not None:
        fd, name = tempfile.mkstemp(prefix="rss-", suffix=".txt")
        os.close(fd)
        rss_file = Path(name)
        argv = [GNU_TIME, "--quiet", "--format=%M", f"--output={rss_file}", *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RowFailed(f"timed out after {TOOL_TIMEOUT:.0f} s") from None
    finally:
        seconds = time.perf_counter() - start
        max_rss = _read_rss(rss_file)
    if proc.returncode not in accept:
        lines = err.decode(errors="replace").strip().splitlines()
        raise RowFailed(f"exit {proc.returncode}: {lines[-1] if lines else '(no stderr)'}"[:200])
    return ToolRun(seconds, proc.returncode, max_rss)


def _read_rss(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        last = path.read_text(encoding="utf-8").strip().splitlines()[-1]
        return int(last)
    except (OSError, ValueError, IndexError):
        return None
    finally:
        path.unlink(missing_ok=True)


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def is_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def row_cp(corpus: Path, scratch: Path) -> Run:
    out = scratch / "copy"
    tool = run_tool(["cp", "-r", str(corpus), str(out)])
    return Run(tool.seconds, count_files(out), max_rss_kb=tool.max_rss_kb)


def row_zip(corpus: Path, scratch: Path) -> Run:
    if shutil.which("zip") is None:
        raise RowUnavailable("not installed (apt-get install zip)")
    archive = scratch / "corpus.zip"
    tool = run_tool(["zip", "-0", "-r", "-q", str(archive), corpus.name], cwd=corpus.parent)
    with zipfile.ZipFile(archive) as zf:
        members = sum(1 for info in zf.infolist() if not info.is_dir())
    return Run(tool.seconds, members, f"{archive.stat().st_size / 1e6:.0f} MB archive", tool.max_rss_kb)


def row_pydicom(corpus: Path, scratch: Path) -> Run:
    out = scratch / "out"
    out.mkdir()
    start = time.perf_counter()
    from pydicom import dcmread

    written = 0
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        ds = dcmread(path)
        ds.save_as(out / f"{written:06d}.dcm")
        written += 1
    return Run(time.perf_counter() - start, written)


def _engine_api() -> tuple[Callable[..., Any], Any, Any]:
    """deidentify_bytes with a default policy and a fixed key, or RowUnavailable while the API is missing."""
    try:
        engine = importlib.import_module("anondrop.deid.engine")
        policy_mod = importlib.import_module("anondrop.deid.policy")
        pseudonyms = importlib.import_module("anondrop.deid.pseudonyms")
    except ImportError as exc:
        raise RowUnavailable(f"n/a (engine API missing: {exc.name or exc})") from None
    missing = [
        name
        for mod, name in ((engine, "deidentify_bytes"), (policy_mod, "build_policy"), (pseudonyms, "Keys"))
        if not hasattr(mod, name)
    ]
    if missing:
        raise RowUnavailable(f"n/a (engine API missing: {', '.join(missing)})")
    try:
        policy = policy_mod.build_policy(options=[])
        keys = pseudonyms.Keys(secret=b"x" * 32)
    except TypeError as exc:
        raise RowFailed(f"engine API changed: {exc}") from None
    return engine.deidentify_bytes, policy, keys


def row_engine(corpus: Path, scratch: Path) -> Run:
    out = scratch / "out"
    out.mkdir()
    start = time.perf_counter()
    deidentify_bytes, policy, keys = _engine_api()
    written = gated = 0
    errors: dict[str, int] = {}
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        try:
            result = deidentify_bytes(path.read_bytes(), policy, keys)
        except Exception as exc:  # a file the engine refuses is a result to report, not a harness crash
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        data = getattr(result, "data", None)
        if not isinstance(data, bytes | bytearray | memoryview):
            errors["no .data bytes"] = errors.get("no .data bytes", 0) + 1
            continue
        if getattr(result, "hits", None):
            gated += 1
        (out / f"{written:06d}.dcm").write_bytes(data)
        written += 1
    seconds = time.perf_counter() - start
    note = ", ".join(f"{n} x {what}" for what, n in sorted(errors.items()))
    if gated:
        note += f"{', ' if note else ''}{gated} stopped by the gate"
    if written == 0 and errors:
        raise RowFailed(f"every file failed: {note}")
    return Run(seconds, written, note)


ONCE_CONFIG = """\
[paths]
inbox = "inbox"
outbox = "outbox"
quarantine = "quarantine"
state = "state"

[deidentify]
profile = "basic"
options = []

[input]
on_success = "keep"
"""


def _zipped_dicom_files(outbox: Path) -> tuple[int, int]:
    """(packages, DICOM members in them); members are recognised by content, whatever they are named."""
    packages = members = 0
    for archive in outbox.rglob("*.zip"):
        if archive.name.startswith("."):
            continue  # a temporary name: not a finished package
        packages += 1
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as member:
                        members += is_dicom(member.read(132))
    return packages, members


def row_once(corpus: Path, scratch: Path) -> Run:
    if importlib.util.find_spec("anondrop.cli") is None:
        raise RowUnavailable("n/a (anondrop.cli not written yet)")
    site = scratch / "site"
    site.mkdir()
    # A fresh hard-linked inbox and a fresh state folder: the journal of an earlier run never skips work.
    shutil.copytree(corpus, site / "inbox", copy_function=os.link)
    config = site / "anondrop.toml"
    config.write_text(ONCE_CONFIG, encoding="utf-8")
    os.sync()
    # Exit 3: the run finished but sent something to quarantine; the note and the output count show it.
    tool = run_tool([sys.executable, "-m", "anondrop", "once", "--config", str(config)],
                    accept=frozenset({0, 3}))
    packages, members = _zipped_dicom_files(site / "outbox")
    quarantined = count_files(site / "quarantine") if (site / "quarantine").is_dir() else 0
    note = f"{packages} zips"
    if quarantined:
        note += f", {quarantined} files in quarantine"
    if tool.returncode == 3:
        note += ", exit 3 (quarantine or gate)"
    return Run(tool.seconds, members, note, tool.max_rss_kb)


def row_dicognito(corpus: Path, scratch: Path) -> Run:
    if importlib.util.find_spec("dicognito") is not None:
        argv = [sys.executable, "-m", "dicognito"]
    elif exe := shutil.which("dicognito"):
        argv = [exe]
    else:
        raise RowUnavailable("not installed (.venv/bin/pip install dicognito)")
    out = scratch / "out"
    # Reads the corpus and writes elsewhere (-o); run.py checks afterwards that the corpus is unchanged.
    tool = run_tool([*argv, "--quiet", "--seed", "anondrop-bench", "-o", str(out), str(corpus)])
    return Run(tool.seconds, count_files(out), max_rss_kb=tool.max_rss_kb)


def row_gdcmanon(corpus: Path, scratch: Path) -> Run:
    exe = shutil.which("gdcmanon")
    if exe is None:
        raise RowUnavailable("not installed (apt-get install libgdcm-tools)")
    if shutil.which("openssl") is None:
        raise RowUnavailable("not runnable: openssl is needed for its certificate")
    # E.1.1 mode encrypts the original attributes into the output, so it needs a certificate.
    cert, key = scratch / "cert.pem", scratch / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "30", "-subj", "/CN=anondrop-bench"],
        check=True, capture_output=True,
    )
    out = scratch / "out"
    out.mkdir()
    tool = run_tool([exe, "-e", "-c", str(cert), "-r", "--continue", "-i", str(corpus), "-o", str(out)])
    return Run(tool.seconds, count_files(out), max_rss_kb=tool.max_rss_kb)


ROW_FUNCTIONS: dict[str, Callable[[Path, Path], Run]] = {
    "cp": row_cp,
    "zip": row_zip,
    "pydicom": row_pydicom,
    "engine": row_engine,
    "once": row_once,
    "dicognito": row_dicognito,
    "gdcmanon": row_gdcmanon,
}


def measure(row: str, corpus: Path) -> Measurement:
    files = bytes_ = 0
    for p in corpus.rglob("*"):
        if p.is_file():
            files += 1
            bytes_ += p.stat().st_size
    scratch = SCRATCH_ROOT / f"{corpus.name}-{row}-{os.getpid()}"
    scratch.mkdir(parents=True)
    try:
        # Write back the previous row's output now, so its disk traffic is not timed as this row's.
        os.sync()
        if row in IN_PROCESS:
            run, tree_kb = ROW_FUNCTIONS[row](corpus, scratch), None
        else:
            with TreeSampler() as sampler:
                run = ROW_FUNCTIONS[row](corpus, scratch)
            tree_kb = sampler.peak_kb
    except RowUnavailable as exc:
        return Measurement(row, str(exc), files, bytes_)
    except (RowFailed, OSError, subprocess.CalledProcessError) as exc:
        return Measurement(row, f"failed: {exc}", files, bytes_)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if row in IN_PROCESS:
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    else:
        # Without GNU time, fall back to the children's figure, which counts this process's size too.
        max_rss = run.max_rss_kb or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    note = run.note
    if run.outputs != files:
        note = f"(!) {run.outputs}/{files} files out" + (f", {note}" if note else "")
    return Measurement(
        row,
        "ok",
        files,
        bytes_,
        seconds=run.seconds,
        max_process_rss_kb=max_rss,
        tree_rss_kb=tree_kb,
        outputs=run.outputs,
        note=note,
    )


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ROW_FUNCTIONS:
        print(f"usage: _row.py {{{'|'.join(ROW_FUNCTIONS)}}} CORPUS_DIR RESULT_JSON", file=sys.stderr)
        return 2
    row, corpus, result = argv[0], Path(argv[1]).resolve(), Path(argv[2])
    measurement = measure(row, corpus)
    result.write_text(json.dumps(asdict(measurement)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
