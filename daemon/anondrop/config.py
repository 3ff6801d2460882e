"""The TOML configuration: pydantic models, loading, path resolution and readable errors.

Relative paths resolve against the folder of the config file, so a config and its ``var/`` tree can move
together. Every error names the key path (``deidentify.options[1]``) and says what to do.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anondrop.deid import _ps315
from anondrop.naming import DEFAULT_ENTRY_TEMPLATE, DEFAULT_PATH_TEMPLATE

DEFAULT_CONFIG = Path("/etc/anondrop/config.toml")
ENV_CONFIG = "ANONDROP_CONFIG"

Option = Literal[
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]
Action = Literal["X", "Z", "D", "K", "C", "U"]
_TAG_RE = re.compile(r"^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-fxX]{4})\)?$")
_DEST_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DESTINATION_KINDS = ("dicomweb", "dimse", "s3", "sftp", "outbox")


def _repeated(items: list[object]) -> object | None:
    """The first item listed a second time, or None."""
    return next((x for i, x in enumerate(items) if x in items[:i]), None)


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file, the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    inbox: Path
    outbox: Path
    quarantine: Path
    state: Path
    done: Path | None = Field(
        default=None, description="where sources go after success when input.on_success = 'move'"
    )


class Deidentify(_Section):
    profile: Literal["basic"] = "basic"
    options: list[Option] = Field(default_factory=list)
    burned_in_suspect: Literal["quarantine", "deliver"] = "quarantine"
    key_file: Path | None = None
    patient_id_format: str = "ANON{digest}"
    patient_name_format: str = "ANON^{digest}"
    digest_length: Annotated[int, Field(ge=6, le=32)] = 10
    date_shift_days: tuple[int, int] = (-3650, -365)
    rules: dict[str, Action] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        twice = _repeated(list(v))
        if twice is not None:
            raise ValueError(f"option {twice!r} is listed twice; list each option once")
        return v

    @field_validator("patient_id_format", "patient_name_format")
    @classmethod
    def _has_digest(cls, v: str) -> str:
        if "{digest}" not in v:
            raise ValueError(
                "the format must contain {digest}, or every patient would get the same pseudonym"
            )
        try:
            v.format(digest="X")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only the field {{digest}} is known here ({exc})") from None
        return v

    @field_validator("date_shift_days")
    @classmethod
    def _shift_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if lo > hi:
            raise ValueError("give [smallest, largest] number of days, e.g. [-3650, -365]")
        if lo <= 0 <= hi:
            raise ValueError("the range must not contain 0, or some patients would keep their real dates")
        return v

    @field_validator("rules")
    @classmethod
    def _rule_keys(cls, v: dict[str, str]) -> dict[str, str]:
        from anondrop.dicomdict import tag_for_keyword

        for key in v:
            if _TAG_RE.match(key) or tag_for_keyword(key) is not None:
                continue
            raise ValueError(
                f"{key!r} is neither a DICOM keyword (e.g. SeriesDescription) nor a tag like '(0008,103E)'"
            )
        return v

    @model_validator(mode="after")
    def _dates_exclusive(self) -> Deidentify:
        if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(self.options):
            raise ValueError(
                "options retain_longitudinal_full_dates and retain_longitudinal_modified_dates contradict "
                "each other (keep dates as they are, or shift them): choose one"
            )
        return self


class Input(_Section):
    on_success: Literal["delete", "move", "keep"] = "keep"
    overrides: bool = True  # read per-drop anondrop.toml files (see README, "Per-drop overrides")
    max_zip_entries: Annotated[int, Field(ge=1)] = 100_000
    max_zip_bytes: Annotated[int, Field(ge=1)] = 64 * 1024**3
    max_zip_ratio: Annotated[float, Field(gt=1)] = 200.0
    ignore: list[str] = Field(default_factory=lambda: ["*.part", "*.tmp", "*.crdownload", "*.partial"])


class Output(_Section):
    compression: Literal["stored", "deflate"] = "stored"
    compresslevel: Annotated[int, Field(ge=0, le=9)] = 6


class Processing(_Section):
    workers: Annotated[int, Field(ge=0)] = 0  # 0: one per CPU
    disk_full_pause_seconds: Annotated[float, Field(gt=0)] = 30.0  # daemon: wait after "no space left"

    def worker_count(self) -> int:
        return self.workers or max(1, os.cpu_count() or 1)


class Watch(_Section):
    mode: Literal["auto", "inotify", "poll"] = "auto"
    poll_seconds: Annotated[float, Field(gt=0)] = 5.0
    rescan_seconds: Annotated[float, Field(gt=0)] = 300.0
    stable_seconds: Annotated[float, Field(ge=0)] = 2.0


class Completion(_Section):
    settle_seconds: Annotated[float, Field(ge=0)] = 30.0
    max_wait_seconds: Annotated[float, Field(gt=0)] = 3600.0
    markers: list[str] = Field(default_factory=lambda: ["DONE", ".complete"])

    @model_validator(mode="after")
    def _wait_after_settle(self) -> Completion:
        if self.max_wait_seconds < self.settle_seconds:
            raise ValueError("max_wait_seconds must not be shorter than settle_seconds")
        return self


# -- naming, routes, crosswalk ----------------------------------------------------------------------------
class FolderRule(_Section):
    """What one level of a series' source folder path becomes in the output (level 1 = the first folder
    below the inbox, or below the route's folder)."""

    level: Annotated[int, Field(ge=1, le=64)]
    action: Literal["keep", "pseudonym", "regex", "drop"]
    pattern: str | None = None
    replace: str = ""

    @model_validator(mode="after")
    def _regex(self) -> FolderRule:
        if self.action == "regex":
            if not self.pattern:
                raise ValueError("action = 'regex' needs pattern (and replace, '' by default)")
            try:
                re.compile(self.pattern).sub(self.replace, "")
            except (re.error, IndexError) as exc:
                raise ValueError(f"the pattern or its replacement is not a valid regular expression: {exc}") from None
        elif self.pattern is not None:
            raise ValueError("pattern is used only with action = 'regex'")
        return self


class Naming(_Section):
    preserve_folders: bool = False
    path: Annotated[str, Field(min_length=1)] = DEFAULT_PATH_TEMPLATE
    entry: Annotated[str, Field(min_length=1)] = DEFAULT_ENTRY_TEMPLATE
    folders: list[FolderRule] = Field(default_factory=list)

    @field_validator("folders")
    @classmethod
    def _one_rule_per_level(cls, v: list[FolderRule]) -> list[FolderRule]:
        twice = _repeated([r.level for r in v])
        if twice is not None:
            raise ValueError(f"level {twice} has two rules; give each level one rule")
        return v

    @model_validator(mode="after")
    def _templates(self) -> Naming:
        from anondrop.naming import TemplateError, check_templates

        try:
            check_templates(self)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        return self


class RouteDeidentify(_Section):
    """A route's own policy: keys given here replace [deidentify]'s (rules are merged, the route's winning)."""

    profile: Literal["basic"] | None = None
    options: list[Option] | None = None
    burned_in_suspect: Literal["quarantine", "deliver"] | None = None
    rules: dict[str, Action] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _no_repeats(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else Deidentify._no_repeats(v)

    @field_validator("rules")
    @classmethod
    def _rule_keys(cls, v: dict[str, str]) -> dict[str, str]:
        return Deidentify._rule_keys(v)


MatchValue = str | list[str]


class Route(_Section):
    name: Annotated[str, Field(pattern=_DEST_NAME_RE)]
    folder: str | None = None  # an inbox subfolder, e.g. "projectA" or "site1/projectA"
    match: dict[str, MatchValue] = Field(default_factory=dict)  # DICOM keyword -> glob pattern(s)
    destinations: list[str] | None = None  # names of [[destinations]]; unset: all of them
    deidentify: RouteDeidentify | None = None
    naming: Naming | None = None
    allow_folder_identifiers: bool = False

    @field_validator("folder")
    @classmethod
    def _folder(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip("/")
        parts = v.split("/")
        if not v or any(p in ("", ".", "..") for p in parts):
            raise ValueError("give a folder below the inbox, like 'projectA' or 'site1/projectA'")
        return v

    @field_validator("match")
    @classmethod
    def _match_keys(cls, v: dict[str, MatchValue]) -> dict[str, MatchValue]:
        from anondrop.dicomdict import dictionary_VR, tag_for_keyword

        for key, value in v.items():
            tag = tag_for_keyword(key)
            if tag is None:
                raise ValueError(f"{key!r} is not a DICOM keyword (e.g. Modality, StationName, SOPClassUID)")
            if dictionary_VR(tag) in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"):
                raise ValueError(f"{key} is not a text attribute; routes match text values only")
            if isinstance(value, list) and not value:
                raise ValueError(f"match.{key}: give at least one pattern")
        return v


class Crosswalk(_Section):
    enabled: bool = False
    key_file: Path | None = None  # 32 random bytes (or more), kept outside paths.state
    key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None

    @model_validator(mode="after")
    def _key(self) -> Crosswalk:
        if self.key_file is not None and self.key_env is not None:
            raise ValueError("give the crosswalk key either by key_file or by key_env, not both")
        if self.enabled and self.key_file is None and self.key_env is None:
            raise ValueError(
                "enabled = true needs a key: key_file (e.g. head -c 32 /dev/urandom > FILE; chmod 600 FILE) "
                "or key_env, outside the state folder"
            )
        return self


# -- destinations -----------------------------------------------------------------------------------------
class _Destination(_Section):
    """Keys every destination has: its name in the journal, logs and `anondrop status`, and its retry policy."""

    name: Annotated[str, Field(pattern=_DEST_NAME_RE)]
    # Attempts before a delivery is dead-lettered; the wait after attempt n is about backoff_seconds * 2^(n-1)
    # (with +-25 % jitter, capped at an hour).
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 8
    backoff_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0


class _Secret(_Section):
    """A secret is named, never written in the config: an environment variable or a file (first line)."""

    secret_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    secret_file: Path | None = None

    def _one_secret(self, what: str, required: bool) -> None:
        given = [k for k in ("secret_env", "secret_file") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give the {what} either by secret_env or by secret_file, not both")
        if required and not given:
            raise ValueError(f"the {what} is missing: set secret_env (an environment variable) or secret_file")


class _Tls(_Section):
    verify_tls: bool = True
    ca_file: Path | None = None


class DicomWebDestination(_Destination, _Secret, _Tls):
    kind: Literal["dicomweb"]
    url: str
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    batch_size: Annotated[int, Field(ge=1, le=1000)] = 20

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/@\s?#]+(/[^\s?#]*)?$", v):
            raise ValueError(
                "give the DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web, with no user or password "
                "and no query in it (credentials go in auth, username and secret_env or secret_file)"
            )
        return v.rstrip("/")

    @model_validator(mode="after")
    def _auth_keys(self) -> DicomWebDestination:
        if self.auth == "basic" and not self.username:
            raise ValueError("auth = 'basic' needs username")
        if self.auth != "basic" and self.username is not None:
            raise ValueError("username is used only with auth = 'basic'")
        if self.auth == "none" and (self.secret_env or self.secret_file):
            raise ValueError("a secret is given but auth = 'none': set auth = 'basic' or 'bearer'")
        self._one_secret("password" if self.auth == "basic" else "token", self.auth != "none")
        return self


class DimseDestination(_Destination, _Tls):
    kind: Literal["dimse"]
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)]
    called_aet: str
    calling_aet: str = "ANONDROP"
    tls: bool = False
    cert_file: Path | None = None  # client certificate, for peers that require one
    key_file: Path | None = None

    @field_validator("called_aet", "calling_aet")
    @classmethod
    def _aet(cls, v: str) -> str:
        # PS3.8 9.3.2: up to 16 characters of the default repertoire, no backslash, not only spaces.
        if not v.strip() or len(v) > 16 or not all(32 <= ord(c) < 127 and c != "\\" for c in v):
            raise ValueError("an AE title is 1 to 16 printable ASCII characters, without backslash")
        return v

    @model_validator(mode="after")
    def _client_cert(self) -> DimseDestination:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (the client certificate and its key)")
        if self.cert_file is not None and not self.tls:
            raise ValueError("cert_file is used only with tls = true")
        return self


class S3Destination(_Destination, _Secret, _Tls):
    kind: Literal["s3"]
    bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    multipart_threshold_mb: Annotated[int, Field(ge=5, le=5 * 1024)] = 64
    part_size_mb: Annotated[int, Field(ge=5, le=5 * 1024)] = 16

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError("the prefix is a key prefix like 'anondrop/' with no leading '/' and no '..'")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/@\s]+/?$", v):
            raise ValueError("give the endpoint as http(s)://host[:port], with no path and no credentials")
        return v

    @model_validator(mode="after")
    def _keys(self) -> S3Destination:
        # Without access_key_id, boto3's own chain applies (AWS_* variables, ~/.aws/credentials, a role).
        if self.access_key_id is None and (self.secret_env or self.secret_file):
            raise ValueError("a secret is given without access_key_id: set both, or neither")
        self._one_secret("secret access key", self.access_key_id is not None)
        return self


class SftpDestination(_Destination, _Secret):
    kind: Literal["sftp"]
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: Annotated[str, Field(min_length=1)]
    key_file: Path
    remote_dir: Annotated[str, Field(min_length=1)]
    known_hosts: Path | None = None  # unset: /etc/ssh/ssh_known_hosts and ~/.ssh/known_hosts

    @model_validator(mode="after")
    def _passphrase(self) -> SftpDestination:
        self._one_secret("key passphrase", False)
        return self


class OutboxDestination(_Destination):
    kind: Literal["outbox"]


Destination = Annotated[
    DicomWebDestination | DimseDestination | S3Destination | SftpDestination | OutboxDestination,
    Field(discriminator="kind"),
]


class Config(_Section):
    paths: Paths
    deidentify: Deidentify = Field(default_factory=Deidentify)
    input: Input = Field(default_factory=Input)
    output: Output = Field(default_factory=Output)
    processing: Processing = Field(default_factory=Processing)
    watch: Watch = Field(default_factory=Watch)
    completion: Completion = Field(default_factory=Completion)
    destinations: list[Destination] = Field(default_factory=list)
    naming: Naming = Field(default_factory=Naming)
    routes: list[Route] = Field(default_factory=list)
    crosswalk: Crosswalk = Field(default_factory=Crosswalk)
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _move_needs_done(self) -> Config:
        if self.input.on_success == "move" and self.paths.done is None:
            raise ValueError("input.on_success = 'move' needs paths.done, the folder to move sources to")
        return self

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, v: list[_Destination]) -> list[_Destination]:
        twice = _repeated([d.name for d in v])
        if twice is not None:
            raise ValueError(f"destination name {twice!r} is used twice; give each destination its own name")
        if sum(isinstance(d, OutboxDestination) for d in v) > 1:
            raise ValueError("list the outbox as a destination at most once")
        return v

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, v: list[Route]) -> list[Route]:
        twice = _repeated([r.name for r in v])
        if twice is not None:
            raise ValueError(f"route name {twice!r} is used twice; give each route its own name")
        for route in v[:-1]:
            if route.folder is None and not route.match:
                raise ValueError(
                    f"route {route.name!r} matches everything, so the routes after it would never be used: "
                    "put the catch-all route last"
                )
        return v

    @model_validator(mode="after")
    def _route_references(self) -> Config:
        known = {d.name for d in self.destinations}
        for route in self.routes:
            for name in route.destinations or []:
                if name not in known:
                    raise ValueError(
                        f"route {route.name!r} names destination {name!r}, which no [[destinations]] entry has"
                        + (" (without [[destinations]], every series goes to the outbox)" if not known else "")
                    )
        from anondrop.routes import check_route_naming

        check_route_naming(self)
        return self


def _known_options() -> None:
    # The Literal above must list exactly the table's options; a new edition with a new option fails here.
    from typing import get_args

    if set(get_args(Option)) != set(_ps315.OPTIONS):
        raise RuntimeError("config.Option is out of step with the generated PS3.15 table")


_known_options()


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if i >= 2 and loc[0] == "destinations" and isinstance(loc[i - 1], int) and part in DESTINATION_KINDS:
            continue  # pydantic's union tag: the kind is already named by the key path's entry
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(exc: ValidationError, source: Path) -> str:
    lines = [f"{source}: the configuration is not valid:"]
    for err in exc.errors():
        where = _loc(tuple(p for p in err["loc"] if p not in ("function-after",)))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling against config.example.toml"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            where += ".kind"
            kinds = ", ".join(repr(k) for k in DESTINATION_KINDS)
            msg = f"kind must be one of {kinds}" + (
                " (it is missing)" if err["type"] == "union_tag_not_found" else ""
            )
        lines.append(f"  {where or '(top level)'}: {msg}")
    return "\n".join(lines)


def resolve_config_path(path: Path | None) -> Path:
    if path is not None:
        return path
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else DEFAULT_CONFIG


def load(path: Path, *, check_folders: bool = True) -> Config:
    """Read, validate and resolve a config file; raise ConfigError with a readable sentence."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file; pass --config PATH or set ${ENV_CONFIG}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path)) from None
    cfg = _resolve(cfg, path.resolve().parent)
    cfg = cfg.model_copy(update={"source": path.resolve()})
    if check_folders:
        check_paths(cfg)
    return cfg


def _resolve(cfg: Config, base: Path) -> Config:
    def r(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else (base / p)

    paths = cfg.paths.model_copy(
        update={k: r(getattr(cfg.paths, k)) for k in ("inbox", "outbox", "quarantine", "state", "done")}
    )
    deid = cfg.deidentify.model_copy(update={"key_file": r(cfg.deidentify.key_file)})
    crosswalk = cfg.crosswalk.model_copy(update={"key_file": r(cfg.crosswalk.key_file)})
    dests = [
        d.model_copy(update={k: r(getattr(d, k)) for k in _PATH_KEYS if isinstance(getattr(d, k, None), Path)})
        for d in cfg.destinations
    ]
    return cfg.model_copy(
        update={"paths": paths, "deidentify": deid, "destinations": dests, "crosswalk": crosswalk}
    )


_PATH_KEYS = ("ca_file", "cert_file", "key_file", "secret_file", "known_hosts")


def check_paths(cfg: Config) -> None:
    """The inbox must exist (a typo there would silently watch nothing); the others are created."""
    src = cfg.source or Path("config")
    p = cfg.paths
    if not p.inbox.is_dir():
        raise ConfigError(f"{src}: paths.inbox: {p.inbox} is not a folder; create it or fix the path")
    named = {"outbox": p.outbox, "quarantine": p.quarantine, "state": p.state}
    if p.done is not None:
        named["done"] = p.done
    for key, folder in named.items():
        if folder.resolve() == p.inbox.resolve() or p.inbox.resolve() in folder.resolve().parents:
            raise ConfigError(
                f"{src}: paths.{key}: {folder} is inside the inbox; output would be read back as input. "
                "Put it outside paths.inbox"
            )
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{src}: paths.{key}: cannot create {folder}: {exc.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"{src}: paths.{key}: {folder} is not writable by this user")
    _check_crosswalk_key(cfg)
    if cfg.deidentify.key_file is not None and not cfg.deidentify.key_file.is_file():
        raise ConfigError(
            f"{src}: deidentify.key_file: {cfg.deidentify.key_file} does not exist; create it "
            "(e.g. head -c 32 /dev/urandom > FILE; chmod 600 FILE) or remove the key to use state/site.key"
        )


def _check_crosswalk_key(cfg: Config) -> None:
    cw, src = cfg.crosswalk, cfg.source or Path("config")
    if not cw.enabled or cw.key_file is None:
        return
    state = cfg.paths.state.resolve()
    if cw.key_file.resolve() == state or state in cw.key_file.resolve().parents:
        raise ConfigError(
            f"{src}: crosswalk.key_file: {cw.key_file} is inside paths.state; the state folder must reveal "
            "nothing without the key, so keep the key elsewhere (e.g. /etc/anondrop/crosswalk.key)"
        )
    if not cw.key_file.is_file():
        raise ConfigError(
            f"{src}: crosswalk.key_file: {cw.key_file} does not exist; create it "
            "(head -c 32 /dev/urandom > FILE; chmod 600 FILE) and keep a copy: without it the crosswalk is lost"
        )
