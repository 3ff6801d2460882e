"""The command line: parse, load the config, call one service function, print.

Exit codes: 0 success; 1 an unexpected error (a bug or the machine: see the message); 2 the command line
or the config is wrong; 3 the run finished but something went to quarantine or was stopped by the gate; 4
another anondrop process (the daemon or a `once`) is working on the same state folder, and nothing was done.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from anondrop import __version__

# The rest of anondrop (the config's models, pydicom) is imported where used: commands that read no DICOM stay
# light. `once` and `anonymize` never import pydicom in this process (their workers do); the daemon imports
# it without its pixel stack before anything else can (anondrop.lean).
if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from anondrop.config import Config
    from anondrop.pipeline import Summary
    from anondrop.routes import RouteTable

app = typer.Typer(
    name="anondrop",
    help="De-identify DICOM series dropped into a folder (DICOM PS3.15 Annex E) and deliver them as ZIPs.",
    no_args_is_help=True,
    add_completion=False,
    # Tracebacks with local variables could print patient data from a dataset being processed.
    pretty_exceptions_show_locals=False,
)


class _Console:
    """rich's Console, made at first use: `once` and `anonymize` print to a terminal through rich, but not to
    a log or a pipe (see _print_summary), and those runs need not import it."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return getattr(self._console, name)


out: Console = _Console()  # type: ignore[assignment]
err: Console = _Console(stderr=True)  # type: ignore[assignment]


def _table(*headers: str, **kw: Any) -> Table:
    from rich.table import Table

    return Table(*headers, **kw)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $ANONDROP_CONFIG, then /etc/anondrop/config.toml).",
        show_default=False,
    ),
]
EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_QUARANTINED, EXIT_BUSY = 0, 1, 2, 3, 4


def _load(path: Path | None) -> Config:
    from anondrop import config as config_mod

    try:
        return config_mod.load(config_mod.resolve_config_path(path))
    except config_mod.ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None


def _lean_pydicom() -> None:
    """pydicom for a command that de-identifies: without numpy, Pillow and requests (see anondrop.lean)."""
    from anondrop.lean import import_pydicom

    import_pydicom()


@contextmanager
def _early_workers() -> Iterator[None]:
    """For `once` and `anonymize`, whose main process never imports pydicom: the workers' fork server and
    pool start now, if the entry point has not started them yet (anondrop.launch), and import the engine on
    another core while this process loads the config. A pool the command did not take (it stopped before
    it had work) is shut down at its end."""
    from anondrop import forkserver

    forkserver.start_early()
    try:
        yield
    finally:
        forkserver.discard_early()


def _logging(verbose: bool) -> None:
    from anondrop.logs import quiet_pydicom

    quiet_pydicom()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _progress_factory(progress: Progress) -> Callable[[int], Callable[[int], None]]:
    def factory(total: int) -> Callable[[int], None]:
        progress.start()  # at the first series, not before: its refresh thread must not exist when the
        # worker processes are forked (see pipeline.Workers); a second start() is a no-op
        task = progress.add_task("de-identifying", total=total)
        return lambda n: progress.advance(task, n)

    return factory


def _summary_rows(summary: Summary) -> list[tuple[str, str, str]]:
    files_out = sum(n for _, n in summary.delivered)
    rows = [("series delivered", str(len(summary.delivered)), f"{files_out} files")]
    if summary.skipped:
        rows.append(("already delivered", str(summary.skipped), "files skipped (recorded in the journal)"))
    for code, count in sorted(summary.quarantined.items()):
        rows.append((f"quarantined: {code}", str(count), summary.reasons.get(code, "")))
    rows.append(("stopped by the gate", str(len(summary.gated)), "; ".join(s for s, _ in summary.gated[:3])))
    for name, count in sorted(summary.sent.items()):
        rows.append((f"confirmed by {name}", str(count), "series ZIPs"))
    for series, name, why in summary.dead:
        rows.append((f"dead-lettered: {name}", "1", f"series {series}: {why}"))
    return rows


def _print_summary(summary: Summary, title: str) -> None:
    """A table on a terminal; plain aligned lines, one per row, for a log, a pipe or a cron mail."""
    rows = _summary_rows(summary)
    if sys.stdout.isatty():
        table = _table(title=title, show_header=True, header_style="bold")
        table.add_column("result")
        table.add_column("count", justify="right")
        table.add_column("detail")
        for row in rows:
            table.add_row(*row)
        out.print(table)
        for rel, n in summary.delivered:
            out.print(f"  {rel}  ({n} files)", highlight=False)
        return
    width = max(len(r[0]) for r in rows)
    lines = [title] + [f"  {what:<{width}}  {count:>6}  {detail}".rstrip() for what, count, detail in rows]
    lines += [f"  {rel}  ({n} files)" for rel, n in summary.delivered]
    sys.stdout.write("\n".join(lines) + "\n")


def _run_with_progress(fn: Callable[[Callable[[int], Callable[[int], None]] | None], Summary]) -> Summary:
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        try:
            return fn(_progress_factory(progress))  # started by the factory
        finally:
            progress.stop()
    return fn(None)


@app.command()
def once(config: ConfigOpt = None, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Process every series now in the inbox once, then exit."""
    with _early_workers():
        from anondrop.batch import run_once
        from anondrop.lease import LeaseHeld

        _logging(verbose)
        cfg = _load(config)
        try:
            summary = _run_with_progress(lambda p: run_once(cfg, p))
        except LeaseHeld as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(EXIT_BUSY) from None
    _print_summary(summary, "anondrop once")
    _may_exit_quickly()
    raise typer.Exit(summary.exit_code)


@app.command()
def anonymize(
    path: Annotated[Path, typer.Argument(help="A DICOM file, a folder or a ZIP to de-identify.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the de-identified series ZIPs.")],
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """De-identify PATH into ZIPs under --out, by the config's rules; PATH and the inbox are left untouched."""
    with _early_workers():
        from anondrop.batch import run_anonymize

        _logging(verbose)
        cfg = _load(config)
        if not path.exists():
            err.print(f"[red]error:[/red] {path}: no such file or folder")
            raise typer.Exit(EXIT_CONFIG)
        summary = _run_with_progress(lambda p: run_anonymize(cfg, path, out_dir, p))
    _print_summary(summary, "anondrop anonymize")
    _may_exit_quickly()
    raise typer.Exit(summary.exit_code)


@app.command("check-config")
def check_config(
    config: ConfigOpt = None,
    all_rows: Annotated[bool, typer.Option("--all", help="List every attribute's action.")] = False,
) -> None:
    """Validate the config and print the effective policy."""
    from anondrop.routes import build_routes

    cfg = _load(config)
    routes = build_routes(cfg)
    policy = routes.lanes[-1].policy
    out.print(f"config: {cfg.source}", highlight=False)
    for key in ("inbox", "outbox", "quarantine", "state", "done"):
        out.print(f"  paths.{key} = {getattr(cfg.paths, key)}", highlight=False)
    out.print(f"profile: PS3.15 {policy.edition} Basic Application Level Confidentiality Profile")
    out.print(f"options: {', '.join(sorted(policy.options)) or '(none)'}")
    out.print(
        f"dates: {policy.date_mode}; private attributes: "
        f"{'safe ones kept (Table E.3.10-1)' if policy.private_keep_safe else 'removed'}; "
        f"burned-in suspects: {cfg.deidentify.burned_in_suspect}"
    )
    rows = policy.describe()
    counts: dict[str, int] = {}
    for _tag, _kw, act in rows:
        counts[act] = counts.get(act, 0) + 1
    names = {
        "X": "remove",
        "Z": "empty",
        "D": "dummy",
        "K": "keep",
        "C": "clean",
        "U": "new UID",
        "P": "pseudonym",
    }
    out.print("actions: " + ", ".join(f"{names.get(a, a)} {n}" for a, n in sorted(counts.items())))
    if cfg.deidentify.rules:
        out.print("site rules: " + ", ".join(f"{k}={v}" for k, v in cfg.deidentify.rules.items()))
    if cfg.destinations:
        from anondrop.deliver import preflight

        out.print("destinations: " + ", ".join(f"{d.name} ({d.kind})" for d in cfg.destinations))
        for i, dest in enumerate(cfg.destinations):
            for problem in preflight(dest):
                err.print(f"[yellow]warning:[/yellow] destinations[{i}] ({dest.name}): {problem}", highlight=False)
    else:
        out.print("destinations: none (the outbox is the destination)")
    _print_routes(cfg, routes)
    if all_rows:
        table = _table("tag", "keyword", "action")
        for tag, kw, act in rows:
            table.add_row(tag, kw, f"{act} ({names.get(act, act)})")
        out.print(table)
    out.print("[green]config OK[/green]")


def _print_routes(cfg: Config, routes: RouteTable) -> None:
    from anondrop.naming import Namer

    if cfg.routes:
        table = _table("route", "folder", "match", "options", "destinations", title="routes (first match wins)")
        for lane in routes.lanes:
            table.add_row(*lane.describe())
        out.print(table)
    naming = cfg.naming
    example = Namer(naming).zip_path({}, ["Folder1", "Folder2"] if naming.preserve_folders else [])
    out.print(f"naming: {naming.path} (e.g. {example}); entries: {naming.entry}", highlight=False)
    if naming.preserve_folders:
        rules = ", ".join(f"level {r.level}: {r.action}" for r in naming.folders) or "keep every level"
        out.print(f"  source folder names are kept ({rules}); they travel with the data", highlight=False)
    if cfg.crosswalk.enabled:
        out.print("crosswalk: on (original <-> pseudonym pairs kept encrypted in the state folder)")


@app.command()
def run(config: ConfigOpt = None, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = True) -> None:
    """Run the watched-folder daemon (under systemd: Type=notify)."""
    _lean_pydicom()
    from anondrop import config as config_mod
    from anondrop.lease import LeaseHeld
    from anondrop.logs import setup_daemon_logging
    from anondrop.service import Service

    setup_daemon_logging(verbose)
    path = config_mod.resolve_config_path(config)
    try:
        service = Service(path)
    except config_mod.ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None
    except LeaseHeld as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_BUSY) from None
    raise typer.Exit(service.run())


@app.command()
def status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Counts per state, series in progress, recent deliveries and the quarantine, from the journal."""
    import json as json_mod

    from anondrop.status import gather

    cfg = _load(config)
    info = gather(cfg)
    if as_json:
        out.print_json(json_mod.dumps(info))
        return
    table = _table("state", "series", title="series by state")
    for state, count in sorted(info["series_by_state"].items()):
        table.add_row(state, str(count))
    out.print(table)
    if info["in_progress"]:
        prog = _table("series", "state", "age", title="in progress")
        for row in info["in_progress"]:
            prog.add_row(row["series"], row["state"], f"{row['age_seconds']:.0f} s")
        out.print(prog)
    recent = _table("when (UTC)", "event", "series", "detail", title="recent events")
    for ev in info["recent_events"]:
        recent.add_row(ev["at"], ev["event"], ev["series"] or "", ev["detail"])
    out.print(recent)
    q = info["quarantine"]
    out.print(f"quarantine: {q['entries']} entries, {q['files']} files"
              + (f" ({', '.join(f'{k}: {v}' for k, v in q['by_reason'].items())})" if q["by_reason"] else ""))
    _print_deliveries(info["deliveries"])


def _print_deliveries(info: dict[str, Any]) -> None:
    if not info["by_destination"]:
        return
    table = _table("destination", "pending", "delivered", "dead", title="deliveries")
    for name, states in sorted(info["by_destination"].items()):
        table.add_row(name, *(str(states.get(s, 0)) for s in ("pending", "delivered", "dead")))
    out.print(table)
    if info["dead_letters"]:
        dead = _table("id", "destination", "series", "attempts", "last error", title="dead letters")
        for d in info["dead_letters"]:
            dead.add_row(str(d["id"]), d["destination"], d["series"], str(d["attempts"]), d["error"])
        out.print(dead)
        out.print("retry with: anondrop deliveries retry ID (or --all), once the cause is fixed", highlight=False)


deliveries_app = typer.Typer(help="Inspect and retry uploads to the destinations.", no_args_is_help=True)
app.add_typer(deliveries_app, name="deliveries")


@deliveries_app.command("list")
def deliveries_list(
    config: ConfigOpt = None,
    state: Annotated[
        Literal["pending", "delivered", "dead"] | None, typer.Option(help="Only deliveries in this state.")
    ] = None,
) -> None:
    """List deliveries (one per series ZIP and destination) with their state, attempts and last error."""
    from anondrop.deliver.queue import DeliveryQueue
    from anondrop.journal import Journal

    cfg = _load(config)
    journal = Journal(cfg.paths.state / "journal.sqlite")
    try:
        table = _table("id", "destination", "state", "attempts", "series ZIP", "last error")
        for d in DeliveryQueue(journal).listing(state):
            table.add_row(str(d.id), d.destination, d.state, str(d.attempts), d.output, d.error or "")
    finally:
        journal.close()
    out.print(table)


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: Annotated[int | None, typer.Argument(help="Delivery id from `anondrop status`.")] = None,
    all_dead: Annotated[bool, typer.Option("--all", help="Retry every dead-lettered delivery.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Queue dead-lettered deliveries again, now, with a fresh attempt count (the daemon or `once` sends them)."""
    from anondrop.deliver.queue import DEAD, DeliveryQueue
    from anondrop.journal import Journal

    if (delivery_id is None) == (not all_dead):
        err.print("[red]error:[/red] give a delivery ID (see `anondrop status`) or --all, not both")
        raise typer.Exit(EXIT_CONFIG)
    cfg = _load(config)
    journal = Journal(cfg.paths.state / "journal.sqlite")
    try:
        queue = DeliveryQueue(journal)
        if delivery_id is not None:
            row = queue.get(delivery_id)
            if row is None or row.state != DEAD:
                what = "no such delivery" if row is None else f"it is {row.state}, not dead-lettered"
                err.print(f"[red]error:[/red] delivery {delivery_id}: {what}", highlight=False)
                raise typer.Exit(EXIT_CONFIG)
        count = queue.retry(delivery_id)
    finally:
        journal.close()
    out.print(f"{count} deliver(y/ies) queued again; `anondrop run` sends them now, or run `anondrop once`")


crosswalk_app = typer.Typer(help="The re-identification crosswalk (with [crosswalk] enabled).", no_args_is_help=True)
app.add_typer(crosswalk_app, name="crosswalk")


@crosswalk_app.command("export")
def crosswalk_export(
    out_file: Annotated[Path, typer.Option("--out", help="CSV file to write (mode 0600).")],
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
) -> None:
    """Write every original <-> pseudonym pair (PatientID, Study Instance UID, Accession Number) as CSV."""
    from anondrop.crosswalk import FILE_NAME, CrosswalkError, open_from_config

    cfg = _load(config)
    cw = cfg.crosswalk
    if not cw.enabled:
        err.print("[red]error:[/red] the crosswalk is off: set [crosswalk] enabled = true and a key first")
        raise typer.Exit(EXIT_CONFIG)
    if not (cfg.paths.state / FILE_NAME).is_file():
        err.print(f"[red]error:[/red] no crosswalk yet in {cfg.paths.state}: no series has been delivered with it on")
        raise typer.Exit(EXIT_ERROR)
    if out_file.exists() and not force:
        err.print(f"[red]error:[/red] {out_file} exists; choose another file or pass --force")
        raise typer.Exit(EXIT_CONFIG)
    try:
        store = open_from_config(cfg.paths.state, cw.key_file, cw.key_env)
        try:
            count = store.export(out_file)
        finally:
            store.close()
    except CrosswalkError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot write {out_file}: {exc.strerror}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    out.print(f"{count} pair(s) written to {out_file}; it re-identifies patients: keep it as such", highlight=False)


quarantine_app = typer.Typer(help="Inspect, retry or purge quarantined input.", no_args_is_help=True)
app.add_typer(quarantine_app, name="quarantine")


@quarantine_app.command("list")
def quarantine_list(config: ConfigOpt = None) -> None:
    """List quarantine entries, oldest first, with their reason."""
    from anondrop.quarantine import list_entries

    cfg = _load(config)
    table = _table("id", "reason", "files", "created", "message")
    for entry in list_entries(cfg.paths.quarantine):
        table.add_row(entry.id, entry.reason.code, str(entry.file_count), str(entry.created),
                      entry.reason.message)
    out.print(table)


@quarantine_app.command("retry")
def quarantine_retry(entry_id: Annotated[str, typer.Argument(help="Entry id from `quarantine list`.")],
                     config: ConfigOpt = None) -> None:
    """Move an entry's files back into the inbox, where they are processed again."""
    from anondrop.quarantine import restore

    cfg = _load(config)
    try:
        files = restore(cfg.paths.quarantine, entry_id, cfg.paths.inbox)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None
    out.print(f"{len(files)} file(s) moved back to the inbox")


@quarantine_app.command("purge")
def quarantine_purge(
    older_than: Annotated[str, typer.Option("--older-than", help="Age, e.g. 30d, 12h, 90m.")],
    config: ConfigOpt = None,
) -> None:
    """Delete quarantine entries older than the given age."""
    from anondrop.quarantine import purge

    cfg = _load(config)
    try:
        age = _parse_age(older_than)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    out.print(f"{purge(cfg.paths.quarantine, age)} entr(y/ies) purged")


def _parse_age(text: str) -> timedelta:
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds", "w": "weeks"}
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise ValueError(f"--older-than {text!r}: give a number and a unit, e.g. 30d, 12h, 90m")
    return timedelta(**{units[text[-1]]: int(text[:-1])})


@app.command()
def version() -> None:
    """Print the version and the DICOM edition of the profile tables."""
    from anondrop.deid.policy import EDITION

    out.print(f"anondrop {__version__} (DICOM PS3.15 {EDITION})")


_quick_exit = False


def _may_exit_quickly() -> None:
    """Called by a command that has closed, synced and released all it opened (once, anonymize): the
    program may then end without tearing the interpreter down, which takes a tenth of a second after a run
    (module dictionaries, pydicom's data dictionary, the engine's caches) and achieves nothing."""
    global _quick_exit
    _quick_exit = True


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except SystemExit as exc:
        if not _quick_exit or not (exc.code is None or isinstance(exc.code, int)):
            raise
        logging.shutdown()  # flushes the log handlers
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code or 0)


if __name__ == "__main__":
    main()
