"""The re-identification crosswalk: original <-> pseudonym pairs, encrypted at rest (off by default).

With ``[crosswalk] enabled = true`` every delivered series adds its pairs (PatientID, Study Instance UID,
Accession Number) to ``state/crosswalk.sqlite``. Each pair is sealed with AES-256-GCM under a key derived
(HKDF-SHA256) from the key the config names, which lives outside the state folder; rows are found by a keyed
HMAC of their content, so without the key the file holds nothing but random-looking bytes and a row count.
Pairs leave only through ``anondrop crosswalk export --out FILE``.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FILE_NAME = "crosswalk.sqlite"
MIN_KEY_BYTES = 16
COLUMNS = ("kind", "original", "issuer", "pseudonym", "patient_pseudonym", "study_pseudonym", "first_seen")
_CHECK = b"anondrop crosswalk key check"


class CrosswalkError(Exception):
    """The crosswalk cannot be used (no key, wrong key, unreadable); the message says what to do."""


@dataclass(frozen=True)
class Pair:
    kind: str  # PatientID | StudyInstanceUID | AccessionNumber
    original: str
    issuer: str  # IssuerOfPatientID for PatientID pairs
    pseudonym: str
    patient_pseudonym: str
    study_pseudonym: str


def read_key(key_file: Path | None, key_env: str | None) -> bytes:
    if key_env is not None:
        value = os.environ.get(key_env, "")
        if not value:
            raise CrosswalkError(f"crosswalk.key_env: the environment variable {key_env} is not set or empty")
        material = value.encode()
    elif key_file is not None:
        try:
            material = key_file.read_bytes()
        except OSError as exc:
            raise CrosswalkError(f"crosswalk.key_file: cannot read {key_file}: {exc.strerror}") from None
    else:
        raise CrosswalkError("the crosswalk has no key: set crosswalk.key_file or crosswalk.key_env")
    material = material.strip()
    if len(material) < MIN_KEY_BYTES:
        raise CrosswalkError(
            f"the crosswalk key is shorter than {MIN_KEY_BYTES} bytes; make one with head -c 32 /dev/urandom"
        )
    return material


def _derive(material: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=b"anondrop crosswalk v1").derive(material)
    return okm[:32], okm[32:]


class Crosswalk:
    """Thread-safe: the daemon records pairs from several series threads."""

    def __init__(self, state: Path, material: bytes) -> None:
        self._enc, self._mac = _derive(material)
        self._aead = AESGCM(self._enc)
        self._lock = threading.Lock()
        self.path = state / FILE_NAME
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        os.chmod(self.path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS pairs (lookup BLOB PRIMARY KEY, sealed BLOB NOT NULL)")
        check = hmac.new(self._mac, _CHECK, hashlib.sha256).digest()
        row = self.db.execute("SELECT value FROM meta WHERE name = 'check'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('check', ?)", (check,))
        elif not hmac.compare_digest(row[0], check):
            self.db.close()
            raise CrosswalkError(
                f"{self.path} was written with another key: use the key it was made with "
                "(a new key needs a new state folder, or move the old crosswalk away)"
            )

    def _lookup(self, pair: Pair) -> bytes:
        text = "\0".join((pair.kind, pair.original, pair.issuer, pair.pseudonym, pair.study_pseudonym))
        return hmac.new(self._mac, text.encode(), hashlib.sha256).digest()

    def record(self, pairs: Iterable[Pair]) -> int:
        """Add pairs not yet known; returns how many were new."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        new = 0
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for pair in pairs:
                    lookup = self._lookup(pair)
                    if self.db.execute("SELECT 1 FROM pairs WHERE lookup = ?", (lookup,)).fetchone():
                        continue
                    payload = json.dumps([*(getattr(pair, c) for c in COLUMNS[:-1]), now]).encode()
                    nonce = os.urandom(12)
                    sealed = nonce + self._aead.encrypt(nonce, payload, lookup)
                    self.db.execute("INSERT INTO pairs VALUES (?, ?)", (lookup, sealed))
                    new += 1
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return new

    def rows(self) -> Iterator[list[str]]:
        with self._lock:
            sealed_rows = self.db.execute("SELECT lookup, sealed FROM pairs").fetchall()
        out = []
        for lookup, sealed in sealed_rows:
            try:
                out.append(json.loads(self._aead.decrypt(sealed[:12], sealed[12:], lookup)))
            except InvalidTag:
                raise CrosswalkError(f"{self.path}: a row does not decrypt; the file was altered") from None
        out.sort(key=lambda r: (r[-1], r[0], r[1]))
        yield from out

    def export(self, out: Path) -> int:
        """Write every pair as CSV to out (mode 0600, written whole or not at all); returns the row count."""
        tmp = out.with_name(f".{out.name}.tmp")
        count = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(COLUMNS)
                for row in self.rows():
                    writer.writerow(row)
                    count += 1
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return count

    def close(self) -> None:
        with self._lock:
            self.db.close()


def open_from_config(state: Path, key_file: Path | None, key_env: str | None) -> Crosswalk:
    return Crosswalk(state, read_key(key_file, key_env))
