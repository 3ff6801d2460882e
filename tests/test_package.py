"""Series ZIPs: exact entries and manifest, atomic appearance, no overwrite, clean-up of crashed runs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from anondrop import libc, package
from anondrop.package import SeriesZip, clean_stale_temps, fsync_dir, unique_path
from tests.conftest import require_tool


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def everything(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_entries_and_manifest(tmp_path: Path) -> None:
    final = tmp_path / "out" / "PAT" / "STUDY" / "CT_1_series.zip"
    blobs = {"IM00001.dcm": os.urandom(5000), "IM00002.dcm": b"second", "sub/IM00003.dcm": b""}
    with SeriesZip(final) as z:
        digests = {name: z.add(name, data) for name, data in blobs.items()}
        assert z.commit({"format": "anondrop-series/1", "instances": 3}) == final
    with zipfile.ZipFile(final) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == [*blobs, "manifest.json"]  # manifest last
        manifest = json.loads(zf.read("manifest.json"))
        for name, data in blobs.items():
            assert zf.read(name) == data
        # The processing date would hint at the acquisition date: entries carry the ZIP epoch.
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert manifest["format"] == "anondrop-series/1"
    assert manifest["instances"] == 3
    assert manifest["entries"] == [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in blobs.items()
    ]
    assert digests == {n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()}
    assert everything(final.parent) == ["CT_1_series.zip"]


def test_readers_never_see_a_partial_zip(tmp_path: Path) -> None:
    final = tmp_path / "series.zip"
    z = SeriesZip(final)
    z.add("IM00001.dcm", b"x" * 10000)
    # While writing: no final name, nothing a `*.zip` glob or a non-hidden listing would pick up.
    assert not final.exists()
    assert list(tmp_path.glob("*.zip")) == []
    assert visible(tmp_path) == []
    [temp] = tmp_path.iterdir()
    assert temp == z.temp_path
    assert temp.name.startswith(f".series.zip.tmp-{os.getpid()}-")
    z.commit({})
    assert everything(tmp_path) == ["series.zip"]


def test_commit_order_file_fsync_then_rename_then_folder_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, package.rename_no_replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def rename(src: Path, dst: Path) -> None:
        calls.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(package, "rename_no_replace", rename)
    with SeriesZip(tmp_path / "new" / "deeper" / "s.zip") as z:
        z.add("a", b"a")
        z.commit({})
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell files from folders")
    # file data durable before the name appears; then the folder, and each newly created folder's parent
    assert calls == ["fsync-file", "rename", "fsync-dir", "fsync-dir", "fsync-dir"]


def test_exception_in_block_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), SeriesZip(tmp_path / "s.zip") as z:
        z.add("a", b"a")
        raise RuntimeError("boom")
    assert everything(tmp_path) == []


def test_abort_leaves_nothing_and_is_idempotent(tmp_path: Path) -> None:
    z = SeriesZip(tmp_path / "s.zip")
    z.add("a", b"a")
    z.abort()
    z.abort()
    assert everything(tmp_path) == []
    with pytest.raises(RuntimeError, match="already aborted"):
        z.add("b", b"b")
    with pytest.raises(RuntimeError, match="already aborted"):
        z.commit({})


def test_leaving_the_block_without_commit_removes_the_temp(tmp_path: Path) -> None:
    with SeriesZip(tmp_path / "s.zip") as z:
        z.add("a", b"a")
    assert everything(tmp_path) == []


def test_commit_refuses_to_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "s.zip"
    final.write_bytes(b"delivered earlier")
    z = SeriesZip(final)
    z.add("a", b"a")
    with pytest.raises(FileExistsError):
        z.commit({})
    assert final.read_bytes() == b"delivered earlier"
    assert everything(tmp_path) == ["s.zip"]  # the temp file went too


def test_no_overwrite_without_renameat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = libc.function
    # as on a system whose libc lacks the call
    monkeypatch.setattr(libc, "function", lambda name, *types: None if name == "renameat2" else real(name, *types))
    final = tmp_path / "s.zip"
    with SeriesZip(final) as z:
        z.add("a", b"a")
        z.commit({})
    assert zipfile.ZipFile(final).read("a") == b"a"
    with pytest.raises(FileExistsError), SeriesZip(final) as z:
        z.commit({})
    assert zipfile.ZipFile(final).read("a") == b"a"
    assert everything(tmp_path) == ["s.zip"]


def test_double_commit_is_an_error(tmp_path: Path) -> None:
    z = SeriesZip(tmp_path / "s.zip")
    z.commit({})
    with pytest.raises(RuntimeError, match="already committed"):
        z.commit({})


@pytest.mark.parametrize(
    "name", ["", "/abs.dcm", "../up.dcm", "a/../b", "a\\b.dcm", "a//b", "./a", "dir/", "C:x", "x\ny", "manifest.json"]
)
def test_bad_entry_names_are_refused(tmp_path: Path, name: str) -> None:
    with SeriesZip(tmp_path / "s.zip") as z:
        with pytest.raises(ValueError, match="entry name"):
            z.add(name, b"x")
        z.add("ok", b"still usable after a refused name")
        z.commit({})


def test_duplicate_entry_names_are_refused(tmp_path: Path) -> None:
    with SeriesZip(tmp_path / "s.zip") as z:
        z.add("IM1.dcm", b"1")
        with pytest.raises(ValueError, match="already in the ZIP"):
            z.add("IM1.dcm", b"again")
        with pytest.raises(ValueError, match="already in the ZIP"):
            z.add("im1.DCM", b"case only")  # would collide when unpacked on Windows or macOS
        z.commit({})


def test_manifest_entries_key_is_reserved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="entries"), SeriesZip(tmp_path / "s.zip") as z:
        z.commit({"entries": []})
    assert everything(tmp_path) == []


def test_unserialisable_manifest_leaves_nothing(tmp_path: Path) -> None:
    z = SeriesZip(tmp_path / "s.zip")
    z.add("a", b"a")
    with pytest.raises(TypeError):
        z.commit({"when": object()})
    assert everything(tmp_path) == []


@pytest.mark.parametrize("compression", ["stored", "deflate"])
def test_stored_and_deflate_are_readable_by_zipfile_and_unzip(tmp_path: Path, compression: str) -> None:
    final = tmp_path / f"{compression}.zip"
    data = b"DICM" + bytes(100_000) + os.urandom(1000)
    with SeriesZip(final, compression=compression, compresslevel=9) as z:  # type: ignore[arg-type]
        z.add("IM00001.dcm", data)
        z.add("IM00002.dcm", b"")
        z.commit({"n": 2})
    expected = zipfile.ZIP_STORED if compression == "stored" else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(final) as zf:
        assert {i.compress_type for i in zf.infolist()} == {expected}
        assert zf.testzip() is None
        assert zf.read("IM00001.dcm") == data
    unzip = require_tool("unzip")
    test = subprocess.run([unzip, "-t", str(final)], capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "No errors detected" in test.stdout
    listing = subprocess.run([unzip, "-Z", "-l", str(final)], capture_output=True, text=True, check=True)
    assert "-rw-r--r--" in listing.stdout  # unpacks readable, not owner-only


def test_zip64_when_the_entry_count_needs_it(tmp_path: Path) -> None:
    final = tmp_path / "many.zip"
    n = 65_536  # one more than the classic end record can count
    with SeriesZip(final) as z:
        for i in range(n):
            z.add(f"{i}", b"")
        z.commit({})
    with zipfile.ZipFile(final) as zf:
        assert len(zf.infolist()) == n + 1
    unzip = require_tool("unzip")
    assert subprocess.run([unzip, "-tq", str(final)], capture_output=True).returncode == 0


# -- entries from a worker's parts: bytes, and spans of the source copied from file to file ------------------
Parts = list[bytes | tuple[int, int]]


def _source(tmp_path: Path, size: int = 300_000) -> tuple[Path, bytes]:
    path = tmp_path / "source.dcm"
    data = os.urandom(size)
    path.write_bytes(data)
    return path, data


def _parts_of(data: bytes, start: int, end: int) -> tuple[Parts, bytes]:
    """Parts as a worker hands them back: header and tail as bytes, the pixel data as a span of the source."""
    head, tail = b"HEADER" + os.urandom(300), os.urandom(50)
    return [head, (start, end - start), tail], head + data[start:end] + tail


def _add_parts(z: SeriesZip, name: str, parts: Parts, out: bytes, source: Path | None) -> str:
    fd = os.open(source, os.O_RDONLY) if source is not None else None
    try:
        sha = hashlib.sha256(out).hexdigest()
        return z.add_parts(name, parts, fd, size=len(out), crc=zlib.crc32(out), sha256=sha)
    finally:
        if fd is not None:
            os.close(fd)


def _check_readable(final: Path, expected: dict[str, bytes]) -> None:
    """zipfile reads every entry back with its CRC, the manifest lists each SHA-256, and unzip agrees."""
    with zipfile.ZipFile(final) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == [*expected, "manifest.json"]
        for name, data in expected.items():
            assert zf.read(name) == data
            stored_crc = zf.getinfo(name).CRC
            assert stored_crc == zlib.crc32(data)
        entries = json.loads(zf.read("manifest.json"))["entries"]
    assert entries == [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in expected.items()
    ]
    unzip = require_tool("unzip")
    test = subprocess.run([unzip, "-t", str(final)], capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "No errors detected" in test.stdout


@pytest.mark.parametrize("compression", ["stored", "deflate"])
def test_parts_with_spans_of_the_source(tmp_path: Path, compression: str) -> None:
    source, data = _source(tmp_path)
    parts1, out1 = _parts_of(data, 1000, 250_000)
    parts2, out2 = _parts_of(data, 0, len(data))
    final = tmp_path / "out" / "series.zip"
    with SeriesZip(final, compression=compression) as z:  # type: ignore[arg-type]
        z.add("IM00001.dcm", b"from zipfile")
        assert _add_parts(z, "IM00002.dcm", parts1, out1, source) == hashlib.sha256(out1).hexdigest()
        _add_parts(z, "IM00003.dcm", [b"bytes ", b"only"], b"bytes only", None)
        _add_parts(z, "IM00004.dcm", parts2, out2, source)
        z.add("IM00005.dcm", b"zipfile again")
        z.commit({})
    _check_readable(final, {"IM00001.dcm": b"from zipfile", "IM00002.dcm": out1, "IM00003.dcm": b"bytes only",
                            "IM00004.dcm": out2, "IM00005.dcm": b"zipfile again"})
    assert everything(final.parent) == ["series.zip"]


def test_stored_spans_are_copied_by_the_kernel_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, data = _source(tmp_path)
    parts, out = _parts_of(data, 100, 200_100)
    reads: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    final = tmp_path / "series.zip"
    with SeriesZip(final) as z:
        _add_parts(z, "IM00001.dcm", parts, out, source)
        z.commit({})
    monkeypatch.undo()
    if hasattr(os, "copy_file_range") or hasattr(os, "sendfile"):
        assert reads == []
    _check_readable(final, {"IM00001.dcm": out})


@pytest.mark.parametrize("refuse", ["copy_file_range", "both", "copy_file_range answers 0"])
def test_span_copy_falls_back_where_the_kernel_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: str
) -> None:
    source, data = _source(tmp_path)
    parts, out = _parts_of(data, 7, 290_000)

    def other_filesystem(*_args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def not_supported(*_args: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    if refuse == "copy_file_range answers 0":  # as some filesystems do for a call they do not support
        monkeypatch.setattr(os, "copy_file_range", lambda *_args: 0, raising=False)
    else:
        monkeypatch.setattr(os, "copy_file_range", other_filesystem, raising=False)
    if refuse == "both":
        monkeypatch.setattr(os, "sendfile", not_supported, raising=False)
    final = tmp_path / "series.zip"
    with SeriesZip(final) as z:
        _add_parts(z, "IM00001.dcm", parts, out, source)
        z.add("IM00002.dcm", b"after")
        z.commit({})
    monkeypatch.undo()
    _check_readable(final, {"IM00001.dcm": out, "IM00002.dcm": b"after"})


@pytest.mark.parametrize("compression", ["stored", "deflate"])
def test_a_source_shorter_than_its_span_refuses_the_zip(tmp_path: Path, compression: str) -> None:
    source, data = _source(tmp_path)
    parts, out = _parts_of(data, 1000, 250_000)
    final = tmp_path / "series.zip"
    z = SeriesZip(final, compression=compression)  # type: ignore[arg-type]
    z.add("IM00001.dcm", b"first")
    with source.open("r+b") as f:
        f.truncate(200_000)  # the source shrank after the worker read it
    with pytest.raises(OSError, match="became shorter"):
        _add_parts(z, "IM00002.dcm", parts, out, source)
    assert everything(tmp_path) == ["source.dcm"]  # the temp ZIP is gone
    with pytest.raises(RuntimeError, match="aborted"):
        z.commit({})


def test_parts_that_do_not_add_up_to_the_size_refuse_the_zip(tmp_path: Path) -> None:
    source, data = _source(tmp_path)
    parts, out = _parts_of(data, 0, 1000)
    final = tmp_path / "series.zip"
    z = SeriesZip(final)
    with pytest.raises(OSError, match="do not add up"):
        _add_parts(z, "IM00001.dcm", parts, out + b"x", source)
    assert everything(tmp_path) == ["source.dcm"]


def test_deflated_parts_are_checked_against_the_crc(tmp_path: Path) -> None:
    source, data = _source(tmp_path)
    parts, out = _parts_of(data, 0, 100_000)
    source.write_bytes(bytes(len(data)))  # same size, other content: the CRC no longer holds
    z = SeriesZip(tmp_path / "series.zip", compression="deflate")
    with pytest.raises(OSError, match="CRC"):
        _add_parts(z, "IM00001.dcm", parts, out, source)
    assert everything(tmp_path) == ["source.dcm"]


def test_zip64_sizes_and_offsets_for_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Entries and offsets past 4 GB take ZIP64 fields; a lowered limit exercises the same code paths
    # (local headers, central directory, end records) without writing gigabytes.
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1000)
    source, data = _source(tmp_path, 20_000)
    expected = {}
    final = tmp_path / "big.zip"
    with SeriesZip(final) as z:
        for i in range(4):
            parts, out = _parts_of(data, i * 100, 10_000 + i)
            _add_parts(z, f"IM{i:05d}.dcm", parts, out, source)
            expected[f"IM{i:05d}.dcm"] = out
        z.add("small.dcm", b"x" * 10)
        expected["small.dcm"] = b"x" * 10
        z.commit({})
    with zipfile.ZipFile(final) as zf:
        zip64 = [i.filename for i in zf.infolist() if i.extract_version >= zipfile.ZIP64_VERSION]
    assert zip64 == [*expected, "manifest.json"]  # every entry's sizes or offset is past the limit
    _check_readable(final, expected)


def test_zip64_when_the_entry_count_needs_it_with_parts(tmp_path: Path) -> None:
    final = tmp_path / "many.zip"
    n = 65_536
    with SeriesZip(final) as z:
        for i in range(n):
            z.add_parts(f"{i}", [b"a"], None, size=1, crc=zlib.crc32(b"a"), sha256="")
        z.commit({})
    with zipfile.ZipFile(final) as zf:
        assert len(zf.infolist()) == n + 1
        assert zf.read(f"{n - 1}") == b"a"
    unzip = require_tool("unzip")
    assert subprocess.run([unzip, "-tq", str(final)], capture_output=True).returncode == 0


def test_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression"):
        SeriesZip(tmp_path / "s.zip", compression="lzma")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compresslevel"):
        SeriesZip(tmp_path / "s.zip", compresslevel=10)
    assert everything(tmp_path) == []


# -- housekeeping -----------------------------------------------------------------------------------------
def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_clean_stale_temps(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    (outbox / "p" / "s").mkdir(parents=True)
    dead = _dead_pid()
    crashed = outbox / "p" / "s" / f".a.zip.tmp-{dead}-0123abcd"
    old_own = outbox / f".b.zip.tmp-{os.getpid()}-aaaa0000"
    live = outbox / f".c.zip.tmp-{os.getpid()}-bbbb1111"
    kept = [outbox / "p" / "s" / "done.zip", outbox / ".hidden", outbox / "notes.tmp-1-2", live]
    for p in [crashed, old_own, *kept]:
        p.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old_own, (hours_ago, hours_ago))  # a pid reused since the crash: age decides
    assert clean_stale_temps(outbox) == 2
    assert not crashed.exists() and not old_own.exists()
    assert all(p.exists() for p in kept)
    assert clean_stale_temps(outbox) == 0
    assert clean_stale_temps(tmp_path / "no-such-outbox") == 0


def test_clean_stale_temps_spares_a_live_writer_and_takes_an_abandoned_one(tmp_path: Path) -> None:
    z = SeriesZip(tmp_path / "s.zip")
    z.add("a", b"a")
    assert clean_stale_temps(tmp_path) == 0  # this process is alive: the writer may still finish
    # A crashed writer: its process is gone, its file stays.
    os.link(z.temp_path, z.temp_path.with_name(f".s.zip.tmp-{_dead_pid()}-deadbeef"))
    assert clean_stale_temps(tmp_path) == 1
    z.commit({})
    assert everything(tmp_path) == ["s.zip"]


def test_unique_path(tmp_path: Path) -> None:
    p = tmp_path / "CT_1_x.zip"
    assert unique_path(p) == p
    p.write_bytes(b"")
    assert unique_path(p) == tmp_path / "CT_1_x_v2.zip"
    (tmp_path / "CT_1_x_v2.zip").write_bytes(b"")
    (tmp_path / "CT_1_x_v3.zip").symlink_to(tmp_path / "nowhere")  # a dangling link still takes the name
    assert unique_path(p) == tmp_path / "CT_1_x_v4.zip"
    d = tmp_path / "IM1.dcm"
    d.write_bytes(b"")
    assert unique_path(d) == tmp_path / "IM1_v2.dcm"


def test_fsync_dir(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
