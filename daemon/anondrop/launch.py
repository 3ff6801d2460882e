"""The `anondrop` command's entry point: starts what the command will need before the CLI is imported.

`once` and `anonymize` de-identify in worker processes that come from a fork server (anondrop.forkserver),
which imports pydicom and the engine. Starting it and the workers' pool here, before the CLI's own imports
(typer, rich, the config's models), lets both run at the same time on two cores, and the workers are up
when the main process has read its config; the main process never imports pydicom.
"""

from __future__ import annotations

import sys

_EARLY_WORKERS = frozenset({"once", "anonymize"})


def _command(argv: list[str]) -> str | None:
    """The subcommand: the first argument that is not an option (the CLI has no options before it)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main() -> None:
    if _command(sys.argv[1:]) in _EARLY_WORKERS:
        from anondrop.forkserver import start_early

        start_early()  # a wrong guess (a typo, --help) costs idle processes that end with this one
    from anondrop.cli import main as cli_main

    cli_main()
