"""systemd notification (sd_notify): one datagram per message on $NOTIFY_SOCKET.

systemd-python's `systemd.daemon.notify` is used when installed (`anondrop[systemd]`); without it the
protocol is simple enough to speak directly, so the daemon works under Type=notify on any machine.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send e.g. "READY=1", "STATUS=...", "WATCHDOG=1", "STOPPING=1"; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    try:
        from systemd import daemon  # type: ignore[import-not-found, attr-defined, unused-ignore]
    except ImportError:
        daemon = None
    if daemon is not None:
        try:
            return bool(daemon.notify(message))
        except OSError:
            return False  # nobody listening (a stale NOTIFY_SOCKET) must never stop the daemon
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, in seconds, when systemd expects WATCHDOG=1 pings from this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
