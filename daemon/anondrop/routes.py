"""Routes: which policy, naming and destinations a series gets, by inbox subfolder and by DICOM attributes.

``[[routes]]`` are tried in order and the first that matches wins: a route matches when the series lies in
its folder (if it names one) and the series' first instance matches every ``match`` pattern (if it has
any; shell-style globs, case-insensitive, any value of a multi-valued attribute). A route with neither is a
catch-all and must come last; without one, the top-level settings form the route named "default".

A route's policy is [deidentify] with the route's own keys in place (its rules merged over the global
rules); the site key is shared, so one patient gets one pseudonym whatever route their series took.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anondrop import naming as naming_mod
from anondrop.deid.policy import Policy, build_policy
from anondrop.dicomdict import tag_for_keyword
from anondrop.ingest.scan import FileInfo

if TYPE_CHECKING:
    from anondrop.config import Config, Naming, Route

DEFAULT = "default"
# Output values every report carries besides the templates' fields (the crosswalk's accession pairs).
_ALWAYS_REPORTED = ("AccessionNumber",)


@dataclass(frozen=True)
class Lane:
    """One route, resolved: everything a series needs that depends on where it came from and what it is."""

    name: str
    folder: tuple[str, ...]  # inbox subfolder levels; () for none
    match: tuple[tuple[int, str, tuple[str, ...]], ...]  # (tag, keyword, upper-case patterns)
    policy: Policy
    naming: Naming
    destinations: tuple[str, ...]  # destination names; () means the outbox alone
    allow_folder_identifiers: bool = False

    @property
    def namer(self) -> naming_mod.Namer:
        return naming_mod.Namer(self.naming)

    def matches(self, folder: tuple[str, ...], attrs: dict[int, str]) -> bool:
        if self.folder and folder[: len(self.folder)] != self.folder:
            return False
        for tag, _kw, patterns in self.match:
            value = attrs.get(tag, "").upper()
            values = [value, *value.split("\\")] if "\\" in value else [value]
            if not any(fnmatch.fnmatchcase(v.strip(), p) for v in values for p in patterns):
                return False
        return True

    def describe(self) -> tuple[str, str, str, str, str]:
        """(name, folder, match, options, destinations) for check-config."""
        folder = "/".join(self.folder) + "/" if self.folder else "*"
        match = ", ".join(f"{kw} ~ {'|'.join(p)}" for _t, kw, p in self.match) or "*"
        options = ", ".join(sorted(self.policy.options)) or "(basic profile only)"
        dests = ", ".join(self.destinations) or "outbox"
        return self.name, folder, match, options, dests


class RouteTable:
    def __init__(self, lanes: Sequence[Lane]) -> None:
        self.lanes = tuple(lanes)

    @property
    def match_tags(self) -> tuple[int, ...]:
        """Tags the inbox scan must read from each file so that routes can match on them."""
        return tuple(sorted({t for lane in self.lanes for t, _kw, _p in lane.match}))

    @property
    def policies(self) -> dict[str, Policy]:
        return {lane.name: lane.policy for lane in self.lanes}

    def choose(self, files: Iterable[FileInfo]) -> tuple[Lane, tuple[str, ...]]:
        """The series' lane, and its folder relative to the inbox (the deepest folder holding all its files)."""
        files = list(files)
        folder = naming_mod.common_folder(naming_mod.source_folder(f.rel) for f in files)
        attrs = dict(files[0].attrs) if files else {}
        for lane in self.lanes:
            if lane.matches(folder, attrs):
                return lane, folder
        return self.lanes[-1], folder  # unreachable: the last lane is a catch-all


def _patterns(value: str | list[str]) -> tuple[str, ...]:
    return tuple(v.upper() for v in ([value] if isinstance(value, str) else value))


def _lane(cfg: Config, route: Route | None) -> Lane:
    d = cfg.deidentify
    rd = route.deidentify if route is not None else None
    options = rd.options if rd is not None and rd.options is not None else d.options
    burned = rd.burned_in_suspect if rd is not None and rd.burned_in_suspect is not None else d.burned_in_suspect
    rules = {**d.rules, **(rd.rules if rd is not None else {})}
    naming = route.naming if route is not None and route.naming is not None else cfg.naming
    if naming.path == naming_mod.DEFAULT_PATH_TEMPLATE and "retain_uids" in options:
        naming = naming.model_copy(update={"path": naming_mod.RETAINED_UIDS_PATH_TEMPLATE})
    reported = naming_mod.keywords(naming) | set(_ALWAYS_REPORTED)
    policy = build_policy(options, rules, burned, reported)
    all_dests = tuple(dest.name for dest in cfg.destinations)
    if route is None:
        return Lane(DEFAULT, (), (), policy, naming, all_dests)
    match = []
    for kw, value in route.match.items():
        tag = tag_for_keyword(kw)
        assert tag is not None  # checked by the config model
        match.append((int(tag), kw, _patterns(value)))
    return Lane(
        name=route.name,
        folder=tuple(route.folder.split("/")) if route.folder else (),
        match=tuple(match),
        policy=policy,
        naming=naming,
        destinations=all_dests if route.destinations is None else tuple(route.destinations),
        allow_folder_identifiers=route.allow_folder_identifiers,
    )


def build_routes(cfg: Config) -> RouteTable:
    lanes = [_lane(cfg, route) for route in cfg.routes]
    if not lanes or lanes[-1].folder or lanes[-1].match:
        lanes.append(_lane(cfg, None))
    return RouteTable(lanes)


def check_route_naming(cfg: Config) -> None:
    """Refuse template fields that would carry an original identifier under some route's policy."""
    for route in cfg.routes:
        if route.name == DEFAULT and (route.folder or route.match):
            raise ValueError(f"the route name {DEFAULT!r} is kept for the catch-all route; rename this route")
    for lane in build_routes(cfg).lanes:
        where = "naming.path/entry" if lane.naming.path == cfg.naming.path else f"route {lane.name!r} naming"
        for kw in sorted(naming_mod.keywords(lane.naming)):
            reason = naming_mod.identity_reason(kw, lane.policy)
            if reason is not None:
                raise ValueError(
                    f"{where}: the field {{{kw}}} would put an original identifier into output names "
                    f"under route {lane.name!r}: {reason}. Set naming.path and naming.entry to templates "
                    "without it (see README, Output naming)"
                )
