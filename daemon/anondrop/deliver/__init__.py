"""Uploads of series ZIPs to the configured destinations, through a persistent queue in the journal.

`build()` makes the sender for one `[[destinations]]` entry. Client libraries are imported only for the kinds
that are configured, so a site without S3 never loads boto3.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from anondrop import config as cfgmod

if TYPE_CHECKING:
    from anondrop.deliver.base import Destination


def build(dest: cfgmod.Destination, cfg: cfgmod.Config) -> Destination:
    if isinstance(dest, cfgmod.DicomWebDestination):
        from anondrop.deliver.dicomweb import DicomWeb

        return DicomWeb(dest)
    if isinstance(dest, cfgmod.DimseDestination):
        from anondrop.deliver.dimse import Dimse

        return Dimse(dest, cfg.paths.state / "outgoing")
    if isinstance(dest, cfgmod.S3Destination):
        from anondrop.deliver.s3 import S3

        return S3(dest)
    if isinstance(dest, cfgmod.SftpDestination):
        from anondrop.deliver.sftp import Sftp

        return Sftp(dest)
    if isinstance(dest, cfgmod.OutboxDestination):
        from anondrop.deliver.outbox import Outbox

        return Outbox(dest)
    raise AssertionError(f"unknown destination kind {dest.kind!r}")  # the config's union lists every kind


def preflight(dest: cfgmod.Destination) -> list[str]:
    """What would make every attempt of this destination fail, as this user sees it now: unset secret
    variables, missing or unreadable files. For `check-config`; the daemon may run with another environment."""
    problems = []
    env = getattr(dest, "secret_env", None)
    if env is not None and not os.environ.get(env):
        problems.append(f"secret_env: the environment variable {env} is not set here")
    for key in ("secret_file", "ca_file", "cert_file", "key_file", "known_hosts"):
        path = getattr(dest, key, None)
        if path is not None and not os.access(path, os.R_OK):
            problems.append(f"{key}: {path} {'is not readable by this user' if path.exists() else 'does not exist'}")
    return problems
