"""The site secret behind every pseudonym: created once in state/ (mode 0600) or read from a named file.

Losing it means new pseudonyms for the same patients from then on; sharing it lets another site produce
the same pseudonyms. It never leaves the machine and is never logged.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_NAME = "site.key"
KEY_BYTES = 32


class SiteKeyError(Exception):
    pass


def load_or_create(state: Path, key_file: Path | None = None) -> bytes:
    if key_file is not None:
        return _read(key_file)
    path = state / KEY_NAME
    if not path.exists():
        state.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _read(path)  # another process created it first
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    return _read(path)


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SiteKeyError(f"{path}: cannot read the site key: {exc.strerror}") from None
    if len(data) < 16:
        raise SiteKeyError(f"{path}: the site key must hold at least 16 bytes (it has {len(data)})")
    if path.stat().st_mode & 0o077:
        raise SiteKeyError(f"{path}: the site key is readable by other users; run: chmod 600 {path}")
    return data
