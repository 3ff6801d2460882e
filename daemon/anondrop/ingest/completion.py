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
from dataclasses import dataclass, field, replace
from pathlib import Path

from anondrop.ingest.scan import FileInfo


# One Observed per file in the inbox, and a backlog can be 100,000 files: slots keep each small.
@dataclass(slots=True)
class Observed:
    size: int
    mtime_ns: int
    changed_at: float  # when the daemon last saw size or mtime differ (or first saw the file)
    info: FileInfo | None = None  # set once parsed
    bad: bool = False  # parsed and found bad (already quarantined)


@dataclass(slots=True)
class SeriesState:
    key: tuple[str, str]
    files: dict[Path, FileInfo] = field(default_factory=dict)
    first_seen: float = 0.0
    last_change: float = 0.0
    expected: int | None = None
    in_flight: bool = False
    processed_at: float | None = None  # last time it went through the pipeline
    # Files not yet handled by the pipeline, and those the pass in flight took. Whether a series needs
    # another pass is decided by these sets, not by clocks: a file that lands while the series is in flight
    # was observed before the pass ends, yet is not in it.
    fresh: set[Path] = field(default_factory=set)
    taken: set[Path] = field(default_factory=set)
    folders: dict[Path, int] = field(default_factory=dict)  # folder -> files of the series in it

    def has_new_files(self) -> bool:
        return bool(self.fresh)


@dataclass(frozen=True)
class Rules:
    stable_seconds: float = 2.0
    settle_seconds: float = 30.0
    max_wait_seconds: float = 3600.0


class Tracker:
    """Files and series as the daemon has observed them.

    Every decision is asked for several times a second, and the inbox may hold a backlog of 100,000 files
    (or, with on_success = keep, every file ever delivered): the indexes below keep each question's cost to
    the files it is about, never a pass over all of them.
    """

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.files: dict[Path, Observed] = {}
        self.series: dict[tuple[str, str], SeriesState] = {}
        self.markers: dict[Path, float] = {}  # folder -> when a marker was observed to appear or change
        self._marker_mtimes: dict[Path, int] = {}  # marker file -> its mtime when last observed
        self._override_mtimes: dict[Path, int] = {}  # override file -> its mtime when last observed
        # folder -> {Series Instance UID: SOP Instance UIDs} as the folder's DICOMDIR lists them
        self.dicomdir_uids: dict[Path, dict[str, set[str]]] = {}
        self._unparsed: dict[Path, None] = {}  # files not yet stable and parsed, oldest sighting first
        self._unparsed_folders: dict[Path, int] = {}  # folder -> how many of those it holds

    # -- observations ---------------------------------------------------------------------------------
    def observe(self, path: Path, size: int, mtime_ns: int, now: float) -> bool:
        """Record a sighting; True when the file is new or changed (so it must be parsed again later)."""
        seen = self.files.get(path)
        if seen is not None and seen.size == size and seen.mtime_ns == mtime_ns:
            return False
        self.files[path] = Observed(size, mtime_ns, now)
        if seen is not None and seen.info is not None:
            self._detach(path, seen.info, now)
        self._unparsed.pop(path, None)  # re-inserted: the order is by last change
        self._unparsed[path] = None
        if seen is None or seen.info is not None or seen.bad:
            self._unparsed_folders[path.parent] = self._unparsed_folders.get(path.parent, 0) + 1
        return True

    def vanished(self, path: Path, now: float) -> None:
        seen = self.files.pop(path, None)
        self._parsed_now(path)
        if seen is not None and seen.info is not None:
            self._detach(path, seen.info, now)

    def _parsed_now(self, path: Path) -> None:
        if path in self._unparsed:
            del self._unparsed[path]
            _decrement(self._unparsed_folders, path.parent)

    def _detach(self, path: Path, info: FileInfo, now: float) -> None:
        state = self.series.get(info.series_key)
        if state is None or state.files.pop(path, None) is None:
            return
        _decrement(state.folders, path.parent)
        state.fresh.discard(path)  # if it comes back changed, it is fresh again
        state.taken.discard(path)  # ... even if the pass in flight took its old content
        state.last_change = now
        if not state.files and not state.in_flight:
            del self.series[info.series_key]

    def stable(self, now: float) -> list[Path]:
        """Files unchanged for stable_seconds and not parsed yet: ready to have their header read."""
        wait = self.rules.stable_seconds
        ready = []
        for path in self._unparsed:  # oldest change first: stop at the first one still changing
            if now - self.files[path].changed_at < wait:
                break
            ready.append(path)
        return ready

    def parsed(
        self, path: Path, info: FileInfo | None, now: float, expected: int | None = None, delivered: bool = False
    ) -> None:
        """A stable file's header was read: attach it to its series (None: it was bad, and handled).

        `delivered`: an earlier run already delivered this very file (on_success = keep). It belongs to its
        series, so that a late file makes a complete new version, but alone it triggers nothing.
        """
        seen = self.files.get(path)
        if seen is None:
            return
        self._parsed_now(path)
        if info is None:
            seen.bad = True
            return
        state = self.series.get(info.series_key)
        if state is None:
            state = self.series[info.series_key] = SeriesState(info.series_key, first_seen=seen.changed_at)
        else:
            # Every file read its own copy of the study and series UIDs: share the series' copy instead.
            info = replace(info, study_uid=state.key[0], series_uid=state.key[1])
        seen.info = info
        if path not in state.files:
            state.folders[path.parent] = state.folders.get(path.parent, 0) + 1
        state.files[path] = info
        if delivered:
            return
        state.fresh.add(path)
        state.last_change = max(state.last_change, seen.changed_at)
        if expected:
            state.expected = max(state.expected or 0, expected)

    def marker(self, path: Path, mtime_ns: int | None, now: float) -> None:
        """A marker file was observed (mtime_ns None: it is gone).

        Like any file, a marker counts from when it was seen to appear or change, not each time a rescan
        sees it again: a DONE left over from the last series must not complete the next one while its files
        are still arriving. Touching the marker again is a new signal.
        """
        if mtime_ns is None:
            if self._marker_mtimes.pop(path, None) is not None:
                self.markers.pop(path.parent, None)
            return
        if self._marker_mtimes.get(path) == mtime_ns:
            return
        self._marker_mtimes[path] = mtime_ns
        self.markers[path.parent] = now

    def override(self, path: Path, mtime_ns: int | None, now: float) -> None:
        """An override file (anondrop.toml) was observed. Written or changed, it restarts the settle time of
        the waiting series at and below its folder, so that an edit made while files arrive is read."""
        if mtime_ns is None:
            self._override_mtimes.pop(path, None)
            return
        if self._override_mtimes.get(path) == mtime_ns:
            return
        self._override_mtimes[path] = mtime_ns
        folder = path.parent
        for state in self.series.values():
            if state.fresh and not state.in_flight and any(
                f == folder or folder in f.parents for f in state.folders
            ):
                state.last_change = max(state.last_change, now)

    def dicomdir(self, folder: Path, listing: dict[str, set[str]]) -> None:
        self.dicomdir_uids[folder] = listing

    # -- decisions ------------------------------------------------------------------------------------
    def complete(self, now: float) -> list[tuple[SeriesState, str]]:
        """Series ready to process, each with the evidence (for the log)."""
        ready = []
        # A folder holding a file not yet stable and parsed may still be receiving files of a series there.
        pending = self._unparsed_folders
        for state in self.series.values():
            if state.in_flight or not state.fresh:
                continue  # busy, or nothing new since it was processed
            folders = state.folders.keys()
            if any(folder in pending for folder in folders):
                if now - state.first_seen >= self.rules.max_wait_seconds:
                    ready.append((state, "max_wait_seconds reached while files were still changing"))
                continue
            why = self._evidence(state, folders, now)
            if why:
                ready.append((state, why))
        return ready

    def _evidence(self, state: SeriesState, folders: Iterable[Path], now: float) -> str | None:
        for folder in folders:
            at = self.markers.get(folder)
            if at is not None and at >= state.last_change:
                return f"marker file in {folder.name or '.'}"
        listings = [listed for folder in folders if (listed := self.dicomdir_uids.get(folder, {}).get(state.key[1]))]
        if listings or state.expected:
            uids = {f.sop_uid for f in state.files.values()}
            for listed in listings:
                if listed <= uids:
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
        state.taken = set(state.files)
        return list(state.files.values())

    def release(self, state: SeriesState) -> None:
        """The pass was abandoned (cancelled, failed): its files still need processing."""
        state.in_flight = False
        state.taken = set()

    def done(self, key: tuple[str, str], delivered: Iterable[Path], now: float) -> None:
        """Processing finished: forget files that left the inbox; the series may collect a late file."""
        state = self.series.get(key)
        if state is None:
            return
        state.in_flight = False
        state.processed_at = now
        # Only what this pass took is handled (a file changed meanwhile was dropped from `taken`).
        state.fresh -= state.taken
        state.taken = set()
        for path in delivered:
            if not path.exists() and state.files.pop(path, None) is not None:
                _decrement(state.folders, path.parent)
                state.fresh.discard(path)
                self.files.pop(path, None)
                self._parsed_now(path)
        if not state.files:
            del self.series[key]


def _decrement(counts: dict[Path, int], key: Path) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
