"""Evidence -> "series complete". Pure bookkeeping: the caller supplies observations and the time.

A file counts only once the daemon has seen the same size and mtime for `stable_seconds` (a half-written
file keeps changing). "Changed" means *observed* by the daemon, through an event or a scan, never the
file's own mtime: copies often keep old mtimes (cp -p, rsync -t, robocopy, shutil.copytree).

A series is complete when every file of it is stable and parsed and one of these holds:
  * a marker file (e.g. DONE, .complete) sits in a folder holding files of the series, newer than them;
  * a DICOMDIR in such a folder lists every instance it names for the series;
  * the series has as many instances as the data says it should (ImagesInAcquisition, NumberOfSlices...);
  * no file of the series changed for `settle_seconds`;
  * the series has been collecting for `max_wait_seconds` (processed with a warning, never dropped).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from anondrop.ingest.scan import FileInfo


@dataclass
class Observed:
    size: int
    mtime_ns: int
    changed_at: float  # when the daemon last saw size or mtime differ (or first saw the file)
    info: FileInfo | None = None  # set once parsed
    bad: bool = False  # parsed and found bad (already quarantined)


@dataclass
class SeriesState:
    key: tuple[str, str]
    files: dict[Path, FileInfo] = field(default_factory=dict)
    first_seen: float = 0.0
    last_change: float = 0.0
    expected: int | None = None
    in_flight: bool = False
    processed_at: float | None = None  # last time it went through the pipeline

@dataclass(frozen=True)
class Rules:
    stable_seconds: float = 2.0
    settle_seconds: float = 30.0
    max_wait_seconds: float = 3600.0


class Tracker:
    """Files and series as the daemon has observed them."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.files: dict[Path, Observed] = {}
        self.series: dict[tuple[str, str], SeriesState] = {}
        self.markers: dict[Path, float] = {}  # folder -> when a marker was observed
        # folder -> {Series Instance UID: SOP Instance UIDs} as the folder's DICOMDIR lists them
        self.dicomdir_uids: dict[Path, dict[str, set[str]]] = {}

    # -- observations ---------------------------------------------------------------------------------
    def observe(self, path: Path, size: int, mtime_ns: int, now: float) -> bool:
        """Record a sighting; True when the file is new or changed (so it must be parsed again later)."""
        seen = self.files.get(path)
        if seen is not None and seen.size == size and seen.mtime_ns == mtime_ns:
            return False
        self.files[path] = Observed(size, mtime_ns, now)
        if seen is not None and seen.info is not None:
            self._detach(path, seen.info, now)
        return True

    def vanished(self, path: Path, now: float) -> None:
        seen = self.files.pop(path, None)
        if seen is not None and seen.info is not None:
            self._detach(path, seen.info, now)

    def _detach(self, path: Path, info: FileInfo, now: float) -> None:
        state = self.series.get(info.series_key)
        if state is not None:
            state.files.pop(path, None)
            state.last_change = now
            if not state.files and not state.in_flight:
                del self.series[info.series_key]

    def stable(self, now: float) -> list[Path]:
        """Files unchanged for stable_seconds and not parsed yet: ready to have their header read."""
        wait = self.rules.stable_seconds
        return [p for p, o in self.files.items() if o.info is None and not o.bad and now - o.changed_at >= wait]

    def parsed(self, path: Path, info: FileInfo | None, now: float, expected: int | None = None) -> None:
        """A stable file's header was read: attach it to its series (None: it was bad, and handled)."""
        seen = self.files.get(path)
        if seen is None:
            return
        if info is None:
            seen.bad = True
            return
        seen.info = info
        state = self.series.get(info.series_key)
        if state is None:
            state = self.series[info.series_key] = SeriesState(info.series_key, first_seen=seen.changed_at)
        state.files[path] = info
        state.last_change = max(state.last_change, seen.changed_at)
        if expected:
            state.expected = max(state.expected or 0, expected)

    def marker(self, folder: Path, now: float) -> None:
        self.markers[folder] = now

    def dicomdir(self, folder: Path, listing: dict[str, set[str]]) -> None:
        self.dicomdir_uids[folder] = listing

    # -- decisions ------------------------------------------------------------------------------------
    def _pending_folders(self) -> set[Path]:
        """Folders holding a file not yet stable and parsed (it may still belong to a series there)."""
        return {path.parent for path, seen in self.files.items() if seen.info is None and not seen.bad}

    def complete(self, now: float) -> list[tuple[SeriesState, str]]:
        """Series ready to process, each with the evidence (for the log)."""
        ready = []
        pending = self._pending_folders()  # one pass over all files, not one per series
        for state in self.series.values():
            if state.in_flight or not state.files:
                continue
            if state.processed_at is not None and state.last_change <= state.processed_at:
                continue  # nothing new since it was processed
            folders = {p.parent for p in state.files}
            if folders & pending:
                if now - state.first_seen >= self.rules.max_wait_seconds:
                    ready.append((state, "max_wait_seconds reached while files were still changing"))
                continue
            why = self._evidence(state, folders, now)
            if why:
                ready.append((state, why))
        return ready

    def _evidence(self, state: SeriesState, folders: set[Path], now: float) -> str | None:
        for folder in folders:
            at = self.markers.get(folder)
            if at is not None and at >= state.last_change:
                return f"marker file in {folder.name or '.'}"
        uids = {f.sop_uid for f in state.files.values()}
        for folder in folders:
            listed = self.dicomdir_uids.get(folder, {}).get(state.key[1])
            if listed and listed <= uids:
                return f"DICOMDIR lists all {len(listed)} instances"
        if state.expected and len(uids) >= state.expected:
            return f"all {state.expected} instances the data announces are here"
        if now - state.last_change >= self.rules.settle_seconds:
            return f"no change for {self.rules.settle_seconds:g} s"
        if now - state.first_seen >= self.rules.max_wait_seconds:
            return "max_wait_seconds reached"
        return None

    def take(self, state: SeriesState) -> list[FileInfo]:
        state.in_flight = True
        return list(state.files.values())

    def done(self, key: tuple[str, str], delivered: Iterable[Path], now: float) -> None:
        """Processing finished: forget files that left the inbox; the series may collect a late file."""
        state = self.series.get(key)
        if state is None:
            return
        state.in_flight = False
        state.processed_at = now
        for path in delivered:
            if not path.exists():
                state.files.pop(path, None)
                self.files.pop(path, None)
        if not state.files:
            del self.series[key]
