"""Daemon logging: journald with structured fields when systemd-python is installed, else plain stderr.

Log lines carry pseudonymised IDs and paths relative to the inbox only; the event name leads each line
(`series_delivered: ...`) so a log line, a journal row and a metric about one series read the same.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_daemon_logging(verbose: bool = True) -> None:
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found, unused-ignore]

            root.addHandler(JournalHandler(SYSLOG_IDENTIFIER="anondrop"))
            return
        except ImportError:
            pass
    handler = logging.StreamHandler(sys.stderr)
    # journald adds its own timestamps; a plain terminal run gets them here.
    fmt = "%(levelname)s %(message)s" if os.environ.get("INVOCATION_ID") else "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
