"""Quarantine: files set aside with a readable reason, across filesystems, listed, purged and restored."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from anondrop import quarantine as q
from anondrop.package import fsync_dir
from anondrop.quarantine import QuarantineReason, list_entries, purge, quarantine_files, restore

REASON = QuarantineReason("not-dicom", "not a DICOM file (no 'DICM' preamble)", "1.2.826.0.1.3680043.10.99")
T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    (path / "PAT" / "ST").mkdir(parents=True)
    return path


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    return tmp_path / "quarantine"


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path (tmpfs), so that rename fails with EXDEV."""
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to move across")
    path = Path(tempfile.mkdtemp(prefix="anondrop-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def drop(inbox: Path, rel: str, data: bytes | None = None) -> Path:
    path = inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None else rel.encode() * 100)
    return path


def stored(entry: Path) -> list[str]:
    files = entry / "files"
    return sorted(p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file())


def test_files_move_with_their_inbox_paths_and_a_reason(inbox: Path, qdir: Path) -> None:
    a = drop(inbox, "PAT/ST/IM1.dcm")
    b = drop(inbox, "loose.bin")
    entry = quarantine_files([a, b], inbox=inbox, quarantine=qdir, reason=REASON, now=T0)
    assert entry.parent == qdir
    assert re.fullmatch(r"20250304T050607Z-not-dicom-[0-9a-f]{6}", entry.name)
    assert not a.exists() and not b.exists()
    assert stored(entry) == ["PAT/ST/IM1.dcm", "loose.bin"]
    assert (entry / "files/PAT/ST/IM1.dcm").read_bytes() == b"PAT/ST/IM1.dcm" * 100
    doc = json.loads((entry / "reason.json").read_text())
    assert doc == {
        "code": "not-dicom",
        "message": REASON.message,
        "series": REASON.series,
        "created": "2025-03-04T05:06:07Z",
        "files": ["PAT/ST/IM1.dcm", "loose.bin"],
        "version": 1,
    }
    text = (entry / "REASON.txt").read_text()
    assert "Reason (not-dicom): not a DICOM file (no 'DICM' preamble)" in text
    assert "Series (pseudonymized): 1.2.826.0.1.3680043.10.99" in text
    assert "  PAT/ST/IM1.dcm" in text
    assert f"anondrop quarantine retry {entry.name}" in text
    # reason files were written under temp names and renamed: none is left behind
    assert sorted(p.name for p in entry.iterdir()) == ["REASON.txt", "files", "reason.json"]


def test_copy_keeps_the_originals(inbox: Path, qdir: Path, tmp_path: Path) -> None:
    unpacked = tmp_path / "state" / "unpacked"
    member = drop(unpacked, "c0ffee/series/IM1.dcm")
    entry = quarantine_files([member], inbox=unpacked, quarantine=qdir, reason=REASON, copy=True)
    assert member.read_bytes() == (entry / "files/c0ffee/series/IM1.dcm").read_bytes()


def test_files_outside_the_inbox_keep_only_their_name_without_clashing(inbox: Path, qdir: Path, tmp_path: Path) -> None:
    x1 = drop(tmp_path / "elsewhere1", "IM.dcm", b"one")
    x2 = drop(tmp_path / "elsewhere2", "IM.dcm", b"two")
    x3 = drop(tmp_path / "elsewhere3", "im.DCM", b"three")
    x4 = drop(tmp_path / "elsewhere4", "PAT", b"a file named like an inbox folder")
    inside = drop(inbox, "PAT/ST/IM.dcm", b"inside")
    entry = quarantine_files([x1, x2, x3, x4, inside], inbox=inbox, quarantine=qdir, reason=REASON)
    assert stored(entry) == ["IM.dcm", "IM_2.dcm", "PAT", "PAT_2/ST/IM.dcm", "im_3.DCM"]
    assert (entry / "files/IM_2.dcm").read_bytes() == b"two"
    assert json.loads((entry / "reason.json").read_text())["files"] == [
        "IM.dcm",
        "IM_2.dcm",
        "im_3.DCM",
        "PAT",
        "PAT_2/ST/IM.dcm",
    ]


def test_a_path_that_climbs_out_of_the_inbox_counts_as_outside(inbox: Path, qdir: Path, tmp_path: Path) -> None:
    f = drop(tmp_path, "sneaky.dcm")
    entry = quarantine_files([inbox / ".." / "sneaky.dcm"], inbox=inbox, quarantine=qdir, reason=REASON)
    assert stored(entry) == ["sneaky.dcm"]
    assert not f.exists()


def test_the_same_file_listed_twice_moves_once_and_a_vanished_one_is_skipped(inbox: Path, qdir: Path) -> None:
    a = drop(inbox, "a.dcm")
    gone = inbox / "gone.dcm"
    entry = quarantine_files([a, a, gone], inbox=inbox, quarantine=qdir, reason=REASON)
    assert stored(entry) == ["a.dcm"]
    assert json.loads((entry / "reason.json").read_text())["files"] == ["a.dcm"]


def test_code_is_made_safe_for_the_folder_name_but_kept_verbatim(inbox: Path, qdir: Path) -> None:
    reason = QuarantineReason("Odd Code/../x", "odd")
    entry = quarantine_files([drop(inbox, "a")], inbox=inbox, quarantine=qdir, reason=reason)
    assert entry.parent == qdir
    assert re.fullmatch(r"\d{8}T\d{6}Z-odd-code-x-[0-9a-f]{6}", entry.name)
    assert json.loads((entry / "reason.json").read_text())["code"] == "Odd Code/../x"


# -- across filesystems -----------------------------------------------------------------------------------
def test_move_across_filesystems(inbox: Path, other_fs: Path) -> None:
    a = drop(inbox, "PAT/ST/IM1.dcm", os.urandom(200_000))
    data, mtime = a.read_bytes(), a.stat().st_mtime_ns
    entry = quarantine_files([a], inbox=inbox, quarantine=other_fs / "q", reason=REASON)
    copy = entry / "files/PAT/ST/IM1.dcm"
    assert copy.read_bytes() == data
    assert copy.stat().st_mtime_ns == mtime  # copy2 keeps the times a user may sort by
    assert not a.exists()
    assert [p.name for p in copy.parent.iterdir()] == ["IM1.dcm"]  # no partial copy left


def test_move_across_filesystems_simulated(inbox: Path, qdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def cross_device(src: str | Path, dst: str | Path) -> None:
        if Path(src).is_relative_to(inbox):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", cross_device)
    a = drop(inbox, "x/IM1.dcm", b"data")
    entry = quarantine_files([a], inbox=inbox, quarantine=qdir, reason=REASON)
    assert (entry / "files/x/IM1.dcm").read_bytes() == b"data"
    assert not a.exists()


def test_failed_copy_across_filesystems_keeps_the_original(
    inbox: Path, qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def cross_device(src: str | Path, dst: str | Path) -> None:
        if Path(src).is_relative_to(inbox):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    def disk_full(src: str | Path, dst: str | Path) -> None:
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    a = drop(inbox, "a.dcm", b"precious")
    b = drop(inbox, "b.dcm", b"also precious")
    monkeypatch.setattr(os, "replace", cross_device)
    monkeypatch.setattr(shutil, "copy2", disk_full)
    with pytest.raises(OSError, match="No space left"):
        quarantine_files([a, b], inbox=inbox, quarantine=qdir, reason=REASON)
    monkeypatch.undo()
    assert a.read_bytes() == b"precious" and b.read_bytes() == b"also precious"
    [entry] = list_entries(qdir)
    assert entry.file_count == 0
    assert stored(entry.path) == []  # the partial copy was removed
    # the interrupted entry still explains itself, listing only what it really holds
    assert json.loads((entry.path / "reason.json").read_text())["files"] == []


# -- list, purge, restore ---------------------------------------------------------------------------------
def test_list_entries_oldest_first(inbox: Path, qdir: Path) -> None:
    later = quarantine_files(
        [drop(inbox, "b1"), drop(inbox, "b2")], inbox=inbox, quarantine=qdir, reason=REASON, now=T0
    )
    earlier = quarantine_files(
        [drop(inbox, "a1")],
        inbox=inbox,
        quarantine=qdir,
        reason=QuarantineReason("truncated", "the header cannot be read to its end"),
        now=T0 - timedelta(days=1),
    )
    (qdir / "not-an-entry").mkdir()
    (qdir / "README").write_text("operators' notes")
    entries = list_entries(qdir)
    assert [e.id for e in entries] == [earlier.name, later.name]
    assert [e.file_count for e in entries] == [1, 2]
    assert entries[0].reason == QuarantineReason("truncated", "the header cannot be read to its end", None)
    assert entries[1].reason == REASON
    assert entries[1].created == T0
    assert entries[1].path == later
    assert list_entries(qdir / "missing") == []


def test_an_entry_with_a_broken_reason_file_is_still_listed(inbox: Path, qdir: Path) -> None:
    entry = quarantine_files([drop(inbox, "a")], inbox=inbox, quarantine=qdir, reason=REASON, now=T0)
    (entry / "reason.json").write_text("{not json")
    [listed] = list_entries(qdir)
    assert listed.reason.code == "not-dicom"
    assert "reason.json is missing or unreadable" in listed.reason.message
    assert listed.created == T0
    assert listed.file_count == 1


def test_purge_removes_only_old_entries(inbox: Path, qdir: Path) -> None:
    old = quarantine_files([drop(inbox, "o")], inbox=inbox, quarantine=qdir, reason=REASON, now=T0)
    new = quarantine_files([drop(inbox, "n")], inbox=inbox, quarantine=qdir, reason=REASON, now=T0 + timedelta(days=20))
    (qdir / "keep-me").mkdir()
    assert purge(qdir, timedelta(days=30), now=T0 + timedelta(days=31)) == 1
    assert not old.exists() and new.exists() and (qdir / "keep-me").exists()
    assert purge(qdir, timedelta(days=30), now=T0 + timedelta(days=31)) == 0
    assert purge(qdir, timedelta(0)) == 1  # with the real clock
    assert [p.name for p in qdir.iterdir()] == ["keep-me"]
    with pytest.raises(ValueError):
        purge(qdir, timedelta(days=-1))


def test_restore_puts_files_back_and_removes_the_entry(inbox: Path, qdir: Path) -> None:
    a = drop(inbox, "PAT/ST/IM1.dcm", b"1")
    b = drop(inbox, "PAT/IM2.dcm", b"2")
    entry = quarantine_files([a, b], inbox=inbox, quarantine=qdir, reason=REASON)
    shutil.rmtree(inbox / "PAT")  # the scan prunes folders left empty
    (entry / "files" / ".IM9.dcm.part-0123abcd").write_bytes(b"partial copy from a crash")
    restored = restore(qdir, entry.name, inbox)
    assert sorted(restored) == sorted([a, b])
    assert a.read_bytes() == b"1" and b.read_bytes() == b"2"
    assert not entry.exists()
    assert not (inbox / ".IM9.dcm.part-0123abcd").exists()


def test_restore_refuses_to_overwrite_and_moves_nothing(inbox: Path, qdir: Path) -> None:
    a = drop(inbox, "a.dcm", b"old")
    b = drop(inbox, "sub/b.dcm", b"b")
    entry = quarantine_files([a, b], inbox=inbox, quarantine=qdir, reason=REASON)
    a.write_bytes(b"dropped again since")
    with pytest.raises(FileExistsError, match="nothing was restored"):
        restore(qdir, entry.name, inbox)
    assert a.read_bytes() == b"dropped again since"
    assert not b.exists()
    assert stored(entry) == ["a.dcm", "sub/b.dcm"]


def test_restore_refuses_when_a_file_stands_where_a_folder_must_go(inbox: Path, qdir: Path) -> None:
    b = drop(inbox, "sub/b.dcm")
    entry = quarantine_files([b], inbox=inbox, quarantine=qdir, reason=REASON)
    shutil.rmtree(inbox / "sub")
    (inbox / "sub").write_text("a file now")
    with pytest.raises(FileExistsError):
        restore(qdir, entry.name, inbox)
    assert stored(entry) == ["sub/b.dcm"]


def test_restore_across_filesystems(inbox: Path, other_fs: Path) -> None:
    a = drop(inbox, "PAT/ST/IM1.dcm", b"across")
    entry = quarantine_files([a], inbox=inbox, quarantine=other_fs, reason=REASON)
    assert restore(other_fs, entry.name, inbox) == [a]
    assert a.read_bytes() == b"across"
    assert not entry.exists()


def test_restore_rejects_bad_and_unknown_ids(qdir: Path, inbox: Path, tmp_path: Path) -> None:
    qdir.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    for bad in ["../victim", "/etc", "", "20250101T000000Z-x-abc"]:
        with pytest.raises(ValueError, match="is not a quarantine entry id"):
            restore(qdir, bad, inbox)
    with pytest.raises(FileNotFoundError):
        restore(qdir, "20250101T000000Z-not-dicom-abcdef", inbox)
    assert victim.exists()


def test_moves_fsync_destination_folders_before_sources(
    inbox: Path, qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = fsync_dir

    def spy(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(q, "fsync_dir", spy)
    a = drop(inbox, "PAT/ST/IM1.dcm")
    entry = quarantine_files([a], inbox=inbox, quarantine=qdir, reason=REASON)
    dst, src = entry / "files/PAT/ST", inbox / "PAT/ST"
    assert dst in synced and src in synced
    assert synced.index(dst) < synced.index(src)
    assert synced[-1] == entry  # the final reason files, after the moves
