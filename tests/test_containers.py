"""Unpacking inbox ZIPs: hostile names, links, bombs, lying headers, encryption, nesting, cleanup."""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from anondrop.ingest import containers
from anondrop.ingest.containers import ContainerRejected, ZipLimits, is_zip, unpack_zip

MiB = 1 << 20
LIMITS = ZipLimits()


def make_zip(
    path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_DEFLATED
) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def zip_bytes(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def special(name: str, mode: int, data: bytes = b"") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info, data


def rels(paths: list[Path], dest: Path) -> list[str]:
    return sorted(p.relative_to(dest).as_posix() for p in paths)


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def patch_headers(path: Path, name: str, **fields: int) -> None:
    """Overwrite fields of one entry in both its local header and its central directory record."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
        cd_start = zf.start_dir
    local = info.header_offset
    assert data[local : local + 4] == b"PK\x03\x04"
    cd = data.index(b"PK\x01\x02", cd_start)
    while data[cd + 46 : cd + 46 + len(name)] != name.encode():
        cd = data.index(b"PK\x01\x02", cd + 4)
    # (local header offset, central directory offset, struct format)
    layout = {"flags": (6, 8, "<H"), "method": (8, 10, "<H"), "file_size": (22, 24, "<I")}
    for field, value in fields.items():
        lo, co, fmt = layout[field]
        struct.pack_into(fmt, data, local + lo, value)
        struct.pack_into(fmt, data, cd + co, value)
    path.write_bytes(bytes(data))


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "unpacked" / "c1"


# -- ordinary containers ----------------------------------------------------------------------------------
def test_nested_folders_are_kept_and_content_is_exact(tmp_path: Path, dest: Path) -> None:
    payload = os.urandom(3 * MiB)
    z = make_zip(
        tmp_path / "study.zip",
        [("PAT/ST1/SE1/IM1.dcm", payload), ("PAT/ST1/SE1/IM2.dcm", b"two"), ("top.dcm", b"top")],
    )
    out = unpack_zip(z, dest, LIMITS)
    assert rels(out, dest) == ["PAT/ST1/SE1/IM1.dcm", "PAT/ST1/SE1/IM2.dcm", "top.dcm"]
    assert (dest / "PAT/ST1/SE1/IM1.dcm").read_bytes() == payload
    assert all(p.is_file() and not p.is_symlink() for p in out)
    # identifiable data: readable by the service user only
    assert stat.S_IMODE((dest / "top.dcm").stat().st_mode) == 0o600


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_every_stdlib_method_unpacks(tmp_path: Path, dest: Path, method: int) -> None:
    z = make_zip(tmp_path / "m.zip", [("a.dcm", b"x" * 1000)], method)
    assert [p.read_bytes() for p in unpack_zip(z, dest, LIMITS)] == [b"x" * 1000]


def test_junk_hidden_and_folder_entries_are_skipped(tmp_path: Path, dest: Path) -> None:
    z = make_zip(
        tmp_path / "mac.zip",
        [
            ("IM1.dcm", b"1"),
            ("__MACOSX/._IM1.dcm", b"resource fork"),
            ("sub/__macosx/x", b"junk"),
            (".DS_Store", b"junk"),
            ("sub/.DS_Store", b"junk"),
            ("sub/Thumbs.db", b"junk"),
            ("desktop.ini", b"junk"),
            (".hidden.dcm", b"junk"),
            (".git/config", b"junk"),
            ("sub/", b""),
            ("sub/IM2.dcm", b"2"),
        ],
    )
    assert rels(unpack_zip(z, dest, LIMITS), dest) == ["IM1.dcm", "sub/IM2.dcm"]
    assert all_files(dest) == ["IM1.dcm", "sub/IM2.dcm"]


def test_duplicate_names_never_overwrite(tmp_path: Path, dest: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        z = make_zip(
            tmp_path / "dup.zip",
            [("a.dcm", b"first"), ("a.dcm", b"second"), ("A.DCM", b"third"), ("x", b"file x"), ("x/y", b"y")],
        )
    out = unpack_zip(z, dest, LIMITS)
    assert sorted(p.read_bytes() for p in out) == sorted([b"first", b"second", b"third", b"file x", b"y"])
    assert rels(out, dest) == ["A_3.DCM", "a.dcm", "a_2.dcm", "x", "x_2/y"]


def test_existing_files_in_dest_are_not_overwritten(tmp_path: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    (dest / "a.dcm").write_bytes(b"already here")
    out = unpack_zip(make_zip(tmp_path / "z.zip", [("a.dcm", b"new")]), dest, LIMITS)
    assert rels(out, dest) == ["a_2.dcm"]
    assert (dest / "a.dcm").read_bytes() == b"already here"


def test_members_keep_the_entry_time_so_a_second_unpack_looks_unchanged(tmp_path: Path) -> None:
    dos = zipfile.ZipInfo("dos.dcm", date_time=(2024, 3, 2, 10, 20, 30))
    utc = zipfile.ZipInfo("utc.dcm", date_time=(2024, 3, 2, 10, 20, 30))
    utc.extra = struct.pack("<HHBi", 0x5455, 5, 1, 1_700_000_000)  # Info-ZIP extended timestamp, UTC
    z = make_zip(tmp_path / "t.zip", [(dos, b"d"), (utc, b"u")])
    first = unpack_zip(z, tmp_path / "one", LIMITS)
    second = unpack_zip(z, tmp_path / "two", LIMITS)
    assert [p.stat().st_mtime_ns for p in first] == [p.stat().st_mtime_ns for p in second]
    assert first[0].stat().st_mtime == time.mktime((2024, 3, 2, 10, 20, 30, 0, 0, -1))
    assert first[1].stat().st_mtime == 1_700_000_000


def test_small_very_compressible_entries_are_not_bombs(tmp_path: Path, dest: Path) -> None:
    # A blank 512x512 image deflates about 1000x; below ratio_min_bytes that is no threat.
    z = make_zip(tmp_path / "blank.zip", [("blank.dcm", bytes(512 * 1024))])
    assert len(unpack_zip(z, dest, LIMITS)) == 1


# -- names that try to escape -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "lands_at"),
    [
        ("../../evil", "evil"),
        ("/etc/x", "etc/x"),
        ("C:\\x", "x"),
        ("C:/Windows/y", "Windows/y"),
        ("a/../../b", "a/b"),
        ("..\\..\\win", "win"),
        ("./././c", "c"),
        ("e\nf", "e_f"),
    ],
)
def test_zip_slip_names_stay_inside_dest(tmp_path: Path, dest: Path, name: str, lands_at: str) -> None:
    z = make_zip(tmp_path / "slip.zip", [(name, b"payload")])
    before = set(tmp_path.rglob("*"))
    out = unpack_zip(z, dest, LIMITS)
    assert rels(out, dest) == [lands_at]
    created = {p for p in set(tmp_path.rglob("*")) - before if not p.is_dir()}
    assert created == {dest / lands_at}


def test_a_link_planted_in_dest_is_not_followed(tmp_path: Path, dest: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest.mkdir(parents=True)
    (dest / "link").symlink_to(outside)
    out = unpack_zip(make_zip(tmp_path / "z.zip", [("link/evil", b"x")]), dest, LIMITS)
    assert rels(out, dest) == ["link_2/evil"]
    assert list(outside.iterdir()) == []


def test_very_long_names_are_shortened_keeping_the_extension(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "long.zip", [("x" * 300 + ".dcm", b"1")])
    [out] = unpack_zip(z, dest, LIMITS)
    assert out.name.endswith(".dcm") and len(out.name.encode()) <= 200


# -- links and device files -------------------------------------------------------------------------------
def test_symlink_and_device_entries_are_never_created(tmp_path: Path, dest: Path) -> None:
    z = make_zip(
        tmp_path / "links.zip",
        [
            special("passwd", stat.S_IFLNK | 0o777, b"/etc/passwd"),
            special("sub/up", stat.S_IFLNK | 0o777, b"../../.."),
            special("sda", stat.S_IFBLK | 0o600),
            special("fifo", stat.S_IFIFO | 0o600),
            special("ok.dcm", stat.S_IFREG | 0o644, b"data"),
        ],
    )
    out = unpack_zip(z, dest, LIMITS)
    assert rels(out, dest) == ["ok.dcm"]
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert all_files(dest) == ["ok.dcm"]


# -- bombs and lies ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 MiB of zeros deflated to about 50 KiB: a real, if small, zip bomb."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.dcm", "w") as f:
        for _ in range(50):
            f.write(bytes(MiB))
    assert path.stat().st_size < MiB
    return path


def test_zip_bomb_is_refused_before_writing(bomb: Path, dest: Path) -> None:
    with pytest.raises(ContainerRejected) as exc:
        unpack_zip(bomb, dest, LIMITS)
    assert exc.value.reason.startswith("zip bomb: entry 'zeros.dcm' expands ")
    assert exc.value.reason.endswith("x (limit 200x)")
    assert not dest.exists()


def _count_streamed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Turn off the up-front checks, to prove the streaming ones alone stop a bomb, and count bytes."""
    produced: list[int] = []
    original = containers._Unpacker._stream

    def counting(self: containers._Unpacker, zf: zipfile.ZipFile, entry: containers._Entry) -> Iterator[bytes]:
        for chunk in original(self, zf, entry):
            produced.append(len(chunk))
            yield chunk

    monkeypatch.setattr(containers._Unpacker, "_check_declared", lambda *a, **k: None)
    monkeypatch.setattr(containers._Unpacker, "_stream", counting)
    return produced


def test_streaming_ratio_limit_stops_a_bomb_the_headers_hide(
    bomb: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    produced = _count_streamed(monkeypatch)
    with pytest.raises(ContainerRejected, match=r"zip bomb: entry 'zeros.dcm' expands \d+x \(limit 200x\)"):
        unpack_zip(bomb, dest, LIMITS)
    compressed = zipfile.ZipFile(bomb).getinfo("zeros.dcm").compress_size
    assert sum(produced) <= 200 * compressed  # stopped at the limit, not at the end of 50 MiB
    assert not dest.exists()


def test_streaming_total_limit_stops_at_the_limit(bomb: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    produced = _count_streamed(monkeypatch)
    limits = ZipLimits(max_total_bytes=5 * MiB, max_ratio=1e9)
    with pytest.raises(ContainerRejected, match=r"expands to more than 5\.0 MiB"):
        unpack_zip(bomb, dest, limits)
    assert sum(produced) <= 5 * MiB
    assert not dest.exists()


def test_declared_total_over_the_limit_is_refused_up_front(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "big.zip", [(f"{i}.dcm", os.urandom(MiB)) for i in range(3)], zipfile.ZIP_STORED)
    with pytest.raises(ContainerRejected, match=r"would expand to 3\.0 MiB \(limit 2\.0 MiB\)"):
        unpack_zip(z, dest, ZipLimits(max_total_bytes=2 * MiB))
    assert not dest.exists()


def test_header_declaring_less_than_the_data_is_caught(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "liar.zip", [("ok.dcm", b"fine"), ("liar.dcm", os.urandom(2 * MiB))], zipfile.ZIP_STORED)
    patch_headers(z, "liar.dcm", file_size=1000)
    assert zipfile.ZipFile(z).getinfo("liar.dcm").file_size == 1000
    with pytest.raises(ContainerRejected, match=r"entry 'liar\.dcm' is damaged"):
        unpack_zip(z, dest, LIMITS)
    assert not dest.exists()  # ok.dcm, unpacked first, went too


def test_header_declaring_a_huge_size_is_refused_up_front(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "huge.zip", [("a.dcm", os.urandom(MiB))], zipfile.ZIP_STORED)
    patch_headers(z, "a.dcm", file_size=0xFFFFFFF0)
    with pytest.raises(ContainerRejected, match=r"would expand to 4\.0 GiB"):
        unpack_zip(z, dest, ZipLimits(max_total_bytes=1 << 30, max_ratio=1e9))
    assert not dest.exists()


def test_overlapping_entries_are_a_bomb(tmp_path: Path, dest: Path) -> None:
    """Many directory records pointing at one stored kernel: each looks harmless on its own."""
    z = make_zip(tmp_path / "one.zip", [("k", os.urandom(MiB))], zipfile.ZIP_STORED)
    data = z.read_bytes()
    cd = data.index(b"PK\x01\x02")
    eocd = data.index(b"PK\x05\x06")
    record = data[cd:eocd]
    records = b"".join(record[:46] + bytes([ord("a") + i]) + record[47:] for i in range(20))
    end = bytearray(data[eocd:])
    struct.pack_into("<HHII", end, 8, 20, 20, len(records), cd)
    z.write_bytes(data[:cd] + records + bytes(end))
    assert len(zipfile.ZipFile(z).infolist()) == 20
    with pytest.raises(ContainerRejected, match="zip bomb: entries overlap"):
        unpack_zip(z, dest, ZipLimits(max_ratio=1e9))
    assert not dest.exists()


def test_too_many_entries(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "many.zip", [(f"{i}.dcm", b"x") for i in range(6)])
    with pytest.raises(ContainerRejected, match=r"too many entries: 6 or more \(limit 5\)"):
        unpack_zip(z, dest, ZipLimits(max_entries=5))
    assert len(unpack_zip(z, dest, ZipLimits(max_entries=6))) == 6


# -- unreadable containers --------------------------------------------------------------------------------
def test_encrypted_entry_is_refused(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "enc.zip", [("a.dcm", b"plain"), ("secret.dcm", b"pretend ciphertext")])
    patch_headers(z, "secret.dcm", flags=0x0001)
    with pytest.raises(ContainerRejected) as exc:
        unpack_zip(z, dest, LIMITS)
    assert exc.value.reason == "encrypted entries are not supported (entry 'secret.dcm')"
    assert not dest.exists()


def test_unsupported_compression_method_is_refused(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "d64.zip", [("a.dcm", b"data" * 100)])
    patch_headers(z, "a.dcm", method=9)  # deflate64: not in the stdlib
    with pytest.raises(ContainerRejected, match="compression method 9, which is not supported"):
        unpack_zip(z, dest, LIMITS)


def test_a_non_zip_with_a_zip_name(tmp_path: Path, dest: Path) -> None:
    fake = tmp_path / "study.zip"
    fake.write_bytes(b"this is a text file, not an archive\n" * 10)
    assert not is_zip(fake)
    with pytest.raises(ContainerRejected, match=r"^not a readable ZIP: "):
        unpack_zip(fake, dest, LIMITS)
    assert not dest.exists()


def test_an_unreadable_zip_is_rejected_but_a_vanished_one_is_not(
    tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    z = make_zip(tmp_path / "locked.zip", [("a.dcm", b"a")])

    def denied(*args: object, **kwargs: object) -> zipfile.ZipFile:
        raise PermissionError(errno.EACCES, "Permission denied")  # tests may run as root: simulate it

    monkeypatch.setattr(zipfile, "ZipFile", denied)
    with pytest.raises(ContainerRejected, match="cannot read the ZIP: Permission denied"):
        unpack_zip(z, dest, LIMITS)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        unpack_zip(tmp_path / "gone.zip", dest, LIMITS)
    assert not dest.exists()


def test_truncated_zip(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "cut.zip", [("a.dcm", os.urandom(10000))])
    z.write_bytes(z.read_bytes()[:5000])
    assert is_zip(z)
    with pytest.raises(ContainerRejected, match="not a readable ZIP"):
        unpack_zip(z, dest, LIMITS)


def test_a_zip_with_nothing_to_process_is_refused(tmp_path: Path, dest: Path) -> None:
    # Refused, hence quarantined: disposing of it as "done" could lose whatever the skipped entries held.
    z = make_zip(tmp_path / "junk.zip", [(".DS_Store", b"x"), ("dir/", b""), special("l", stat.S_IFLNK, b"/")])
    with pytest.raises(ContainerRejected, match="contains no files to process"):
        unpack_zip(z, dest, LIMITS)
    empty = make_zip(tmp_path / "empty.zip", [])
    assert is_zip(empty)
    with pytest.raises(ContainerRejected, match="contains no files to process"):
        unpack_zip(empty, dest, LIMITS)


def test_is_zip_reads_magic_bytes_not_the_name(tmp_path: Path) -> None:
    real = make_zip(tmp_path / "archive.dat", [("a", b"a")])
    assert is_zip(real)
    assert not is_zip(tmp_path / "missing.zip")
    (tmp_path / "empty.zip").write_bytes(b"")
    assert not is_zip(tmp_path / "empty.zip")
    # PS3.10 lets the preamble hold anything, even a ZIP signature: the DICM magic wins.
    dual = tmp_path / "dual.dcm"
    dual.write_bytes(b"PK\x03\x04" + bytes(124) + b"DICM" + bytes(100))
    assert not is_zip(dual)


# -- nesting ----------------------------------------------------------------------------------------------
def test_nested_zip_is_unpacked_in_place_of_itself(tmp_path: Path, dest: Path) -> None:
    inner = zip_bytes([("x/IM1.dcm", b"one"), ("IM2.dcm", b"two")])
    z = make_zip(tmp_path / "outer.zip", [("IM0.dcm", b"zero"), ("series/inner.zip", inner)])
    out = unpack_zip(z, dest, LIMITS)
    assert rels(out, dest) == ["IM0.dcm", "series/inner/IM2.dcm", "series/inner/x/IM1.dcm"]
    assert all_files(dest) == rels(out, dest)  # neither the nested ZIP nor its temp copy is left


def test_nesting_deeper_than_the_limit_is_refused(tmp_path: Path, dest: Path) -> None:
    level3 = zip_bytes([("deep.dcm", b"deep")])
    level2 = zip_bytes([("l3.zip", level3)])
    z = make_zip(tmp_path / "l1.zip", [("top.dcm", b"top"), ("l2.zip", level2)])
    with pytest.raises(ContainerRejected, match=r"nested ZIP 'l2.zip/l3.zip' is deeper than 2 levels"):
        unpack_zip(z, dest, LIMITS)
    assert not dest.exists()
    out = unpack_zip(z, dest, ZipLimits(max_depth=3))
    assert rels(out, dest) == ["l2/l3/deep.dcm", "top.dcm"]


def test_nested_bomb_counts_against_the_outer_budget(tmp_path: Path, dest: Path, bomb: Path) -> None:
    z = make_zip(tmp_path / "outer.zip", [("a.dcm", b"a"), ("b.zip", bomb.read_bytes())], zipfile.ZIP_STORED)
    with pytest.raises(ContainerRejected, match=r"zip bomb: entry 'b\.zip/zeros\.dcm'"):
        unpack_zip(z, dest, LIMITS)
    assert not dest.exists()


def test_nested_entry_named_zip_that_is_not_one_is_an_ordinary_file(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "outer.zip", [("notes.zip", b"not an archive")])
    out = unpack_zip(z, dest, LIMITS)
    assert rels(out, dest) == ["notes.zip"]
    assert out[0].read_bytes() == b"not an archive"


def test_broken_nested_zip_is_refused(tmp_path: Path, dest: Path) -> None:
    z = make_zip(tmp_path / "outer.zip", [("a.dcm", b"a"), ("b.zip", b"PK\x03\x04 and then garbage")])
    with pytest.raises(ContainerRejected, match=r"nested ZIP 'b\.zip' is not a readable ZIP"):
        unpack_zip(z, dest, LIMITS)
    assert not dest.exists()


# -- cleanup ----------------------------------------------------------------------------------------------
def test_rejection_leaves_an_existing_dest_as_it_was(tmp_path: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    (dest / "mine.txt").write_text("keep me")
    z = make_zip(tmp_path / "z.zip", [("new/a.dcm", b"a"), ("new/b.zip", b"PK\x03\x04 garbage")])
    with pytest.raises(ContainerRejected):
        unpack_zip(z, dest, LIMITS)
    assert all_files(dest) == ["mine.txt"]
    assert not (dest / "new").exists()


def test_write_errors_are_not_blamed_on_the_container(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "z.zip", [("a.dcm", b"a")])
    (tmp_path / "blocker").write_text("a file where a folder is needed")
    with pytest.raises(OSError):
        unpack_zip(z, tmp_path / "blocker" / "dest", LIMITS)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_ratio"):
        ZipLimits(max_ratio=0)
    with pytest.raises(ValueError, match="max_depth"):
        ZipLimits(max_depth=0)
