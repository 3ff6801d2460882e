"""A full outbox disk pauses the daemon with a clear log line and no partial output; it resumes by itself."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_REAL, Site, require_tool
from tests.test_daemon import Daemon, config, drop_all, make_series, start_daemon, wait_outputs  # noqa: F401 (start_daemon: the fixture)


@pytest.fixture
def small_outbox(site: Site) -> Iterator[Path]:
    """The outbox on a real 1 MB tmpfs (root only: CI runs as root)."""
    require_tool("mount")
    if os.geteuid() != 0:
        msg = "mounting a small tmpfs needs root"
        if REQUIRE_REAL:
            pytest.fail(msg)
        pytest.skip(msg)
    site.outbox.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(site.outbox)], check=True)
    try:
        yield site.outbox
    finally:
        subprocess.run(["umount", "-l", str(site.outbox)], check=False)


def test_full_outbox_pauses_then_delivers_once_there_is_room(
    site: Site, small_outbox: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    launch: Callable[[], Daemon] = request.getfixturevalue("start_daemon")
    config(site, "[processing]\nworkers = 1\ndisk_full_pause_seconds = 1\n")
    series = make_series(tmp_path / "stage", 40)  # about 1.6 MB: cannot fit in 1 MB
    daemon = launch()
    sources = drop_all(series, site.inbox / "ct")
    daemon.wait_log("outbox_full", timeout=60)
    # Nothing partial is visible, no temporary file is left, and every source is still there.
    assert not list(small_outbox.rglob("*.zip"))
    assert not [p for p in small_outbox.rglob("*") if p.is_file()]
    assert all(p.exists() for p in sources)
    assert daemon.alive()
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_outbox)], check=True)
    [out] = wait_outputs(site, 1, timeout=60)  # resumed by itself
    assert out.stat().st_size > 1_000_000
