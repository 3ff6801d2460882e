"""Benchmark anondrop against reference rows measured in the same run.

    python bench/run.py [--corpus ct600|small5000|all] [--repeat N] [--rows cp,zip,...] [--json FILE]

The machine is noisy, so absolute seconds say little from one run to the next; what is compared is each
row's files/s against the bare pydicom loop (read, then write back) measured minutes apart on the same
files. Every row runs in a fresh child process (bench/_row.py) so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import corpus as corpora
from _row import REFERENCE, ROWS, TOOL_TIMEOUT, Measurement

BENCH = Path(__file__).resolve().parent
TARGET_RATIO = 1.5
TARGET_RSS_MB = 300.0
TARGET_LINE = (
    f"target: anondrop once >= {TARGET_RATIO}x pydicom loop files/s; peak RSS < {TARGET_RSS_MB:.0f} MB"
)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def files_per_s(m: Measurement) -> float | None:
    return m.files / m.seconds if m.ok and m.seconds else None


def mb_per_s(m: Measurement) -> float | None:
    return m.bytes / 1e6 / m.seconds if m.ok and m.seconds else None


def ratio(m: Measurement, reference: Measurement | None) -> float | None:
    mine, ref = files_per_s(m), (files_per_s(reference) if reference else None)
    return mine / ref if mine is not None and ref else None


def run_row(row: str, corpus: corpora.Corpus) -> Measurement:
    """One measurement of one row, in a child process of its own."""
    with tempfile.TemporaryDirectory(prefix="anondrop-bench-") as tmp:
        result = Path(tmp) / "result.json"
        try:
            proc = subprocess.run(
                [sys.executable, str(BENCH / "_row.py"), row, str(corpus.path), str(result)],
                capture_output=True, text=True, timeout=TOOL_TIMEOUT + 600,
            )
        except subprocess.TimeoutExpired:
            return Measurement(row, "failed: harness: the row did not finish", corpus.files, corpus.bytes)
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return Measurement(row, f"failed: harness: {tail}", corpus.files, corpus.bytes)
        return Measurement.from_json(json.loads(result.read_text(encoding="utf-8")))


def best_of(runs: list[Measurement]) -> Measurement:
    """The fastest good run; its RSS figures are the largest seen over all good runs (memory is not noise)."""
    good = [m for m in runs if m.ok]
    if not good:
        return runs[0]
    fastest = min(good, key=lambda m: m.seconds or float("inf"))

    def largest(values: list[int | None]) -> int | None:
        known = [v for v in values if v is not None]
        return max(known) if known else None

    return replace(
        fastest,
        max_process_rss_kb=largest([m.max_process_rss_kb for m in good]),
        tree_rss_kb=largest([m.tree_rss_kb for m in good]),
    )


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def warm(corpus: corpora.Corpus) -> None:
    """Read every file once, so that no row pays for the disk and the rows after it for the page cache."""
    for path in corpora.corpus_files(corpus.path):
        with path.open("rb") as f:
            while f.read(1 << 20):
                pass


def compile_bytecode() -> None:
    """Byte-compile anondrop, as `pip install` does for an installed package and as Python does on the
    first run of an editable one. Without it, under PYTHONDONTWRITEBYTECODE (which some shells and CI
    images set), an editable install would compile its modules again in every process of every run,
    while the pydicom loop imports pydicom from installed bytecode."""
    import anondrop

    compileall.compile_dir(Path(anondrop.__file__).parent, quiet=1)


def measure_corpus(corpus: corpora.Corpus, rows: list[str], repeat: int) -> list[Measurement]:
    results = []
    for row in rows:
        runs = []
        for i in range(repeat):
            _progress(f"  {corpus.name}: {ROWS[row]} (run {i + 1}/{repeat})")
            runs.append(run_row(row, corpus))
            if not runs[-1].ok and not runs[-1].status.startswith("failed"):
                break  # not installed / not written yet: repeating will not change that
        results.append(best_of(runs))
    _progress("")
    return results


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = (
    ("row", 16, "<"), ("files", 6, ">"), ("seconds", 8, ">"), ("files/s", 9, ">"), ("MB/s", 8, ">"),
    ("peak RSS MB", 11, ">"), ("vs pydicom loop", 15, ">"),
)


def _line(cells: list[str], note: str) -> str:
    body = "  ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, COLUMNS, strict=True))
    return f"{body}  {note}".rstrip()


def table(results: list[Measurement]) -> str:
    reference = next((m for m in results if m.row == REFERENCE), None)
    lines = [_line([name for name, _, _ in COLUMNS], "note")]
    for m in results:
        if not m.ok:
            lines.append(_line([ROWS[m.row], str(m.files), *["-"] * 5], m.status))
            continue
        r = ratio(m, reference)
        lines.append(_line([
            ROWS[m.row],
            str(m.files),
            _num(m.seconds, ".2f"),
            _num(files_per_s(m), ".1f"),
            _num(mb_per_s(m), ".1f"),
            _num(_mb(m.peak_rss_kb), ".1f"),
            "-" if r is None else f"{r:.2f}x",
        ], m.note))
    return "\n".join(lines)


def verdict(results: list[Measurement]) -> Verdict:
    by_row = {m.row: m for m in results}
    once, reference = by_row.get("once"), by_row.get(REFERENCE)
    if once is None:
        return Verdict(False, "not measured (add 'once' to --rows)")
    if not once.ok:
        return Verdict(False, f"anondrop once did not run: {once.status}")
    if once.outputs != once.files:
        return Verdict(False, f"anondrop once delivered {once.outputs} of {once.files} files ({once.note})")
    r = ratio(once, reference)
    rss = _mb(once.peak_rss_kb)
    if r is None or rss is None:
        return Verdict(False, "no pydicom loop reference to compare with")
    misses = []
    if r < TARGET_RATIO:
        misses.append(f"speed {r:.2f}x < {TARGET_RATIO}x")
    if rss >= TARGET_RSS_MB:
        misses.append(f"peak RSS {rss:.0f} MB >= {TARGET_RSS_MB:.0f} MB")
    summary = f"{r:.2f}x pydicom loop, peak RSS {rss:.0f} MB"
    return Verdict(not misses, summary + (f" ({'; '.join(misses)})" if misses else ""))


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "pydicom": _version("pydicom"),
        "anondrop": _version("anondrop"),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }


def _row_list(text: str | None) -> list[str]:
    chosen = set(ROWS) if text is None else {r.strip() for r in text.split(",") if r.strip()}
    unknown = chosen - set(ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {', '.join(sorted(unknown))}; choose from {','.join(ROWS)}")
    # Every ratio is against the pydicom loop, so it always runs.
    chosen.add(REFERENCE)
    return [r for r in ROWS if r in chosen]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--corpus", choices=[*corpora.SPECS, "all"], default="all", help="default: all")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="best of N per row (default 1)")
    parser.add_argument("--rows", metavar="ROW,ROW", help=f"rows to run (default all): {','.join(ROWS)}")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.rows = _row_list(args.rows)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(corpora.SPECS) if args.corpus == "all" else [args.corpus]
    info = machine()
    print(f"anondrop {info['anondrop']}, python {info['python']}, pydicom {info['pydicom']}, "
          f"{info['cpus']} CPUs, load {' '.join(map(str, info['load_average']))}; best of {args.repeat}")
    report: dict[str, Any] = {"machine": info, "repeat": args.repeat, "corpora": {}}
    verdicts: dict[str, Verdict] = {}
    damaged = False
    compile_bytecode()
    for name in names:
        if corpora.load(name) is None:
            print(f"\nbuilding corpus {name} (once; later runs reuse it)...", flush=True)
        corpus = corpora.build(name)
        try:
            corpora.verify(corpus)
        except corpora.CorpusError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        warm(corpus)
        print(f"\n{name}: {corpus.files} files, {corpus.megabytes:.1f} MB ({corpus.path})")
        results = measure_corpus(corpus, args.rows, args.repeat)
        print(table(results))
        verdicts[name] = verdict(results)
        try:
            corpora.verify(corpus)
        except corpora.CorpusError as exc:
            print(f"error: a row changed the corpus, so its numbers are suspect: {exc}", file=sys.stderr)
            damaged = True
        report["corpora"][name] = {
            "files": corpus.files,
            "bytes": corpus.bytes,
            "rows": [_row_json(m, results) for m in results],
            "target": asdict(verdicts[name]),
        }
    print(f"\n{TARGET_LINE}")
    for name, v in verdicts.items():
        print(f"  {name:<10} {'PASS' if v.passed else 'FAIL'}  {v.reason}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if damaged else 0


def _row_json(m: Measurement, results: list[Measurement]) -> dict[str, Any]:
    reference = next((r for r in results if r.row == REFERENCE), None)
    return {
        **asdict(m),
        "label": ROWS[m.row],
        "files_per_s": files_per_s(m),
        "mb_per_s": mb_per_s(m),
        "peak_rss_mb": _mb(m.peak_rss_kb),
        "ratio_vs_pydicom_loop": ratio(m, reference),
    }


if __name__ == "__main__":
    sys.exit(main())
