"""Shared fixtures: sample data, config files written for a test, the CLI as a real process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
REQUIRE_REAL = os.environ.get("ANONDROP_REQUIRE_REAL") == "1"


def require_tool(name: str) -> str:
    """Path of an external program; a missing one skips locally but fails in CI (ANONDROP_REQUIRE_REAL=1)."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} is not installed (apt-get install the package that provides it; .ci/run does)"
    if REQUIRE_REAL:
        pytest.fail(msg)
    pytest.skip(msg)


def sample(name: str) -> Path:
    """A file from pydicom's bundled test data, by file name (e.g. 'CT_small.dcm')."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} not found"
    return Path(str(path))


@cache
def sample_files() -> tuple[Path, ...]:
    """Every sample file there is: pydicom's bundled test files, pydicom-data's and deid-data's.

    Listed from their folders: pydicom's get_testdata_files("*") gives the same first two sets, but first
    tries to download the files neither package holds, which costs seconds (or a timeout) per call.
    """
    import data_store  # pydicom-data
    import deid_data
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"]
    files = [p for root in roots for p in sorted(root.iterdir()) if p.is_file()]
    files += [p for p in sorted(Path(deid_data.__file__).parent.rglob("*")) if p.suffix in ("", ".dcm")]
    return tuple(f for f in files if f.is_file() and f.stat().st_size > 0)


def write_instances(
    folder: Path, template: Dataset, n: int, *, first: int = 1, name: str = "IM{:04d}.dcm",
    implicit: set[int] | frozenset[int] = frozenset(),
) -> list[Path]:
    """Write n instances of the template's series into folder, numbered from `first`, each with a new SOP
    Instance UID; those numbered in `implicit` in Implicit VR Little Endian, the rest in Explicit VR."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for number in range(first, first + n):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if number in implicit else ExplicitVRLittleEndian
        )
        template.InstanceNumber = number
        path = folder / name.format(number)
        template.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@dataclass
class Site:
    """A throw-away installation: config file plus its folders under one tmp dir."""

    root: Path
    config: Path
    inbox: Path
    outbox: Path
    quarantine: Path
    state: Path
    done: Path

    def write_config(
        self, extra: str = "", options: list[str] | None = None, profile_extra: str = ""
    ) -> Path:
        opts = ", ".join(f'"{o}"' for o in (options or []))
        text = textwrap.dedent(
            f"""\
            [paths]
            inbox = "inbox"
            outbox = "outbox"
            quarantine = "quarantine"
            state = "state"
            done = "done"

            [deidentify]
            profile = "basic"
            options = [{opts}]
            """
        )
        text += textwrap.dedent(profile_extra) + "\n" + textwrap.dedent(extra)
        self.config.write_text(text, encoding="utf-8")
        return self.config

    def outputs(self) -> list[Path]:
        return sorted(p for p in self.outbox.rglob("*.zip") if not p.name.startswith("."))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    root = tmp_path / "site"
    s = Site(
        root=root,
        config=root / "anondrop.toml",
        inbox=root / "inbox",
        outbox=root / "outbox",
        quarantine=root / "quarantine",
        state=root / "state",
        done=root / "done",
    )
    s.inbox.mkdir(parents=True)
    s.write_config()
    return s


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
    """Run `python -m anondrop ARGS` as a real process, as a user would."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "anondrop", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    return run_cli


@pytest.fixture
def sample_file() -> Iterator[Callable[[str], Path]]:
    yield sample
