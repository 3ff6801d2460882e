"""The worker side: what runs in a worker process (and, for one worker, in the main process).

A worker de-identifies batches of files and reads headers for the inventory; what it returns (Packed,
FileOutcome, FileInfo) is pickled back to the main process, which packages and checks (anondrop.pipeline).
Nothing here imports the engine or pydicom at module level: the main process of `once` imports this module
to talk to its workers without loading either (see pipeline.Workers); a worker loads the engine when it
starts.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anondrop.deid.identifiers import GateHit, Identifiers
from anondrop.deid.policy import Policy
from anondrop.deid.pseudonyms import Keys
from anondrop.deid.report import Report
from anondrop.ingest.scan import BadFile, FileInfo, read_info
from anondrop.package import crc32

if TYPE_CHECKING:
    from anondrop.deid.engine import Result

_worker_state: tuple[dict[str, Policy], Keys] | None = None


def _init_worker_engine() -> None:
    from anondrop.lean import import_pydicom

    import_pydicom()  # lean, and quiet: worker stderr is the daemon's log
    import anondrop.deid.engine  # noqa: F401


def _init_worker(policies: dict[str, Policy], keys: Keys) -> None:
    global _worker_state
    _init_worker_engine()
    _worker_state = (policies, keys)


# Above this size the pixel data travels back from a worker as a reference into the source file, not bytes.
_SPAN_MIN = 64 * 1024


@dataclass
class Packed:
    """A de-identified instance as a worker hands it back: ready to stream into the ZIP.

    `parts` are bytes, or (offset, length) spans of the source file that the output carries unchanged
    (the pixel data); size, CRC-32 and SHA-256 cover the whole output and were computed by the worker.
    """

    parts: list[bytes | tuple[int, int]]
    size: int
    crc: int
    sha256: str
    report: Report
    hits: list[GateHit]
    identifiers: Identifiers
    header: bytes
    source: tuple[str, str, str]  # original (PatientID, issuer, AccessionNumber): for the crosswalk only


@dataclass
class FileOutcome:
    index: int
    packed: Packed | None = None
    code: str = ""
    message: str = ""


def _pack(res: Result) -> Packed:
    """Size, CRC-32 and SHA-256 over the output's parts; a large unchanged pixel span becomes a reference
    into the source file instead of bytes (the packager copies it from there)."""
    span = res.pixel_in
    if res.pixel_out is None or res.pixel_out[1] - res.pixel_out[0] < _SPAN_MIN:
        span = None
    crc, sha, pos = 0, hashlib.sha256(), 0
    parts: list[bytes | tuple[int, int]] = []
    pending: list[bytes | memoryview] = []
    for part in res.parts:
        crc = crc32(part, crc)
        sha.update(part)
        if span is not None and (pos, pos + len(part)) == res.pixel_out:
            parts += [b"".join(pending), (span[0], span[1] - span[0])]
            pending = []
        else:
            pending.append(part)
        pos += len(part)
    if pending or not parts:
        parts.append(b"".join(pending))
    if parts[0] == res.header:
        parts[0] = res.header  # the same object: pickled once on the way back (the usual case, pixel data last)
    return Packed(parts, pos, crc, sha.hexdigest(), res.report, res.hits, res.identifiers, res.header, res.source)


Job = tuple[str, dict[int, tuple[str, str]], list[tuple[int, str]]]  # (route, overrides, [(index, path)])


def _process_batch(job: Job) -> list[FileOutcome]:
    from anondrop.deid import engine

    assert _worker_state is not None
    policies, keys = _worker_state
    route, overrides, batch = job
    policy = policies[route]
    out = []
    for index, path in batch:
        try:
            data = Path(path).read_bytes()
            res = engine.deidentify_bytes(data, policy, keys, overrides=overrides or None)
            out.append(FileOutcome(index, _pack(res)))
        except engine.DeidError as exc:
            out.append(FileOutcome(index, None, exc.code, exc.message))
        except OSError as exc:
            out.append(FileOutcome(index, None, "unreadable", f"cannot read the file: {exc.strerror}"))
        except Exception as exc:  # a bad file must never stop the run: it goes to quarantine, with why
            out.append(FileOutcome(index, None, "unreadable", f"cannot be parsed: {type(exc).__name__}: {exc}"))
    return out


def _die_with_parent() -> None:
    """End this worker when the process that made the pool ends, `kill -9` included. Workers do not notice
    it otherwise (they wait on their queue), and an orphan would live on: one forked from the main process
    holds copies of its descriptors, the lease's flock among them, so the next run would find the state
    folder busy; one from the fork server keeps the fork server alive."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])  # readable once the parent has ended
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_pool_worker(policies: dict[str, Policy], keys: Keys) -> None:
    _die_with_parent()
    _init_worker(policies, keys)


def init_server_worker() -> None:
    """A worker from the fork server (anondrop.forkserver): it gets the policies and keys with each batch."""
    _die_with_parent()
    _init_worker_engine()


_state_pickled = b""


def _process_batch_in(state: bytes, job: Job) -> list[FileOutcome]:
    """_process_batch in a worker of the fork server, with the policies and keys it is given: pickled once
    by the main process (as they were when it made its Workers), unpickled here when they are not the
    previous batch's."""
    global _worker_state, _state_pickled
    if state != _state_pickled:
        _worker_state = pickle.loads(state)
        _state_pickled = state
    return _process_batch(job)


def _info_batch(job: tuple[tuple[int, ...], list[tuple[str, str, str | None]]]) -> list[FileInfo | BadFile]:
    extra, batch = job
    return [read_info(Path(p), rel, Path(c) if c else None, extra) for p, rel, c in batch]
