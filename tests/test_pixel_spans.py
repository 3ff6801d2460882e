"""Pixel data goes from the source file to the series ZIP without being read again, and a source that changed
after its de-identification never lends the ZIP bytes the worker did not see: the series is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from anondrop import config as config_mod
from anondrop import package, pipeline
from anondrop.batch import run_once
from tests.conftest import Site, require_tool, sample, write_instances

ROWS = COLUMNS = 256  # 128 KB of pixel data: above the size that travels back from a worker as a span


def _series(site: Site, n: int = 3) -> list[Path]:
    ds = dcmread(sample("CT_small.dcm"))
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.PixelData = os.urandom(ROWS * COLUMNS * 2)
    files = write_instances(site.inbox / "ct", ds, n)
    an_hour_ago = time.time() - 3600  # written a while ago: a rewrite now gets another mtime
    for path in files:
        os.utime(path, (an_hour_ago, an_hour_ago))
    return files


def _config(site: Site) -> config_mod.Config:
    site.write_config(extra="[processing]\nworkers = 1\n")
    return config_mod.load(site.config)


def _after_first_outcome(monkeypatch: pytest.MonkeyPatch, change: Iterable[Path], how: str) -> None:
    """Change the sources once the worker has read them, before the main process packages them."""
    real_map = pipeline.Workers.map

    def changing_map(self: pipeline.Workers, batches: Iterable[pipeline.Job]) -> Iterator[pipeline.FileOutcome]:
        for i, outcome in enumerate(real_map(self, batches)):
            if i == 1:
                for path in change:
                    data = path.read_bytes()
                    if how == "shrink":
                        path.write_bytes(data[: len(data) - 1000])
                    else:  # rewritten in place: same size, other pixels
                        st = path.stat()
                        path.write_bytes(data[: len(data) - 1000] + os.urandom(1000))
                        if how == "rewrite, mtime set back":  # as `cp -p` or `touch -r` would leave it
                            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            yield outcome

    monkeypatch.setattr(pipeline.Workers, "map", changing_map)


def test_pixel_spans_are_copied_unread_and_come_out_whole(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = _series(site)
    cfg = _config(site)
    copied: list[int] = []
    real_copy = package.copy_range

    def spy(src: int, dst: int, offset: int, length: int, dst_offset: int, name: str) -> None:
        copied.append(length)
        real_copy(src, dst, offset, length, dst_offset, name)

    monkeypatch.setattr(package, "copy_range", spy)
    summary = run_once(cfg)
    assert summary.exit_code == 0
    assert len(copied) == len(sources)  # one span each: the pixel data (with or without its element header)
    assert min(copied) >= ROWS * COLUMNS * 2
    [out] = site.outputs()
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
        entries = json.loads(zf.read("manifest.json"))["entries"]
        for entry in entries:
            assert hashlib.sha256(zf.read(entry["name"])).hexdigest() == entry["sha256"]
        pixels = {dcmread(zf.open(e["name"])).PixelData for e in entries}
    assert pixels == {dcmread(p).PixelData for p in sources}
    unzip = require_tool("unzip")
    assert subprocess.run([unzip, "-tq", str(out)], capture_output=True).returncode == 0


@pytest.mark.parametrize(
    ("how", "message"),
    [("shrink", "became shorter"), ("rewrite", "CRC"), ("rewrite, mtime set back", "CRC")],
)
def test_a_source_changed_after_de_identification_refuses_the_series(
    site: Site, monkeypatch: pytest.MonkeyPatch, how: str, message: str
) -> None:
    sources = _series(site)
    cfg = _config(site)
    _after_first_outcome(monkeypatch, sources, how)
    with pytest.raises(OSError, match=message):
        run_once(cfg)
    assert not [p for p in site.outbox.rglob("*") if p.is_file()]  # no ZIP, and no temporary one left
    assert all(p.exists() for p in sources)
