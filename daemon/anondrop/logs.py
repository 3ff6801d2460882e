"""Daemon logging: journald with structured fields when systemd-python is installed, else plain stderr.

Log lines carry pseudonymised IDs and paths relative to the inbox only; the event name leads each line
(`series_delivered: ...`) so a log line, a journal row and a metric about one series read the same.
"""

from __future__ import annotations

import logging
import os
import sys


def _stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd set up for this service (not just inherited vars).

    systemd puts "device:inode" of the stream in JOURNAL_STREAM; a child started from such a service, or a
    shell that kept the variable, has another stderr, and its lines must not vanish into a journal that
    may not even be running.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def quiet_pydicom() -> None:
    """pydicom's validation warnings quote the offending value, which may be a patient's name or date:
    such a line must never reach a log. Values are validated by the engine and the release gate instead.
    Takes effect now or when pydicom is imported, whichever comes later (anondrop.lean)."""
    from anondrop.lean import install

    install()


def setup_daemon_logging(verbose: bool = True) -> None:
    quiet_pydicom()
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    if _stderr_is_journal():
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found, import-untyped, unused-ignore]

            root.addHandler(JournalHandler(SYSLOG_IDENTIFIER="anondrop"))
            return
        except ImportError:
            pass
    handler = logging.StreamHandler(sys.stderr)
    # journald adds its own timestamps; a plain terminal run gets them here.
    fmt = "%(levelname)s %(message)s" if _stderr_is_journal() else "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
