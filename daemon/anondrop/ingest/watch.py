"""Noticing files: watchdog observers (inotify, or polling for network filesystems).

The watcher is deliberately dumb: it only reports "this path changed" into a queue. Completion never
depends on which observer is used, and the periodic rescan repairs anything an observer missed.
"""

from __future__ import annotations

import logging
import os
import queue
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = logging.getLogger("anondrop")

# inotify sees only changes made through this kernel: CIFS/SMB and NFS shares changed by other machines
# raise no events, so such mounts are polled.
NETWORK_FS = frozenset({"cifs", "smb3", "smbfs", "nfs", "nfs4", "fuse.sshfs", "9p", "afs", "ceph", "glusterfs",
                        "fuse.glusterfs", "davfs", "fuse.rclone", "lustre", "gpfs"})


def filesystem_type(path: Path, mounts: Path = Path("/proc/self/mounts")) -> str:
    """The type of the filesystem holding path, from the mount table (longest mount point wins)."""
    target = str(path.resolve())
    best, fstype = "", ""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, fstype = mount, parts[2]
    return fstype


def choose_mode(mode: str, inbox: Path, mounts: Path = Path("/proc/self/mounts")) -> str:
    if mode != "auto":
        return mode
    fstype = filesystem_type(inbox, mounts)
    return "poll" if fstype in NETWORK_FS else "inotify"


class _Handler(FileSystemEventHandler):
    def __init__(self, changes: queue.Queue[Path]) -> None:
        self.changes = changes

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory and event.event_type != "moved":
            return
        for attr in ("src_path", "dest_path"):
            raw = getattr(event, attr, "")
            if raw:
                self.changes.put(Path(os.fsdecode(raw)))


def start_observer(inbox: Path, mode: str, changes: queue.Queue[Path], poll_seconds: float) -> BaseObserver:
    """Start watching; when inotify cannot be had, poll instead of not watching at all."""
    if mode != "poll":
        try:
            return _start(Observer(), inbox, changes, "inotify")
        except OSError as exc:
            # fs.inotify.max_user_watches or max_user_instances exhausted (one watch per folder), or no
            # inotify at all: polling is slower to notice, but notices.
            log.warning("watch_fallback: inotify is not available for %s (%s); polling every %g s instead. "
                        "Raise fs.inotify.max_user_watches, or set [watch] mode = \"poll\" to silence this",
                        inbox, exc.strerror or exc, poll_seconds)
    return _start(PollingObserver(timeout=poll_seconds), inbox, changes, "polling")


def mode_of(observer: BaseObserver) -> str:
    return "poll" if isinstance(observer, PollingObserver) else "inotify"


def _start(observer: BaseObserver, inbox: Path, changes: queue.Queue[Path], how: str) -> BaseObserver:
    observer.schedule(_Handler(changes), str(inbox), recursive=True)
    observer.daemon = True
    observer.start()
    log.info("watching %s with %s", inbox, how)
    return observer
