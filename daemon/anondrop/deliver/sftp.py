"""SFTP: the series ZIP as `<remote_dir>/<patient>/<study>/<name>.zip`, written under a hidden temporary
name in its final folder and renamed into place, so a reader of the remote folder never sees a partial ZIP.

The server is known by its host key only (known_hosts; an unknown or changed key is refused, never
accepted on first use), and anondrop logs in with `key_file` alone: no agent, no password. Confirmation is
the size of the renamed file read back from the server.
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets
import threading
from pathlib import Path

import paramiko

from anondrop.config import SftpDestination
from anondrop.deliver.base import DeliveryError, Parcel, Stopped, read_secret

_SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")


class Sftp:
    def __init__(self, cfg: SftpDestination) -> None:
        self.cfg = cfg
        self.name = cfg.name

    def deliver(self, parcel: Parcel, cancel: threading.Event) -> frozenset[str]:
        cfg = self.cfg
        try:
            size = parcel.zip_path.stat().st_size
        except FileNotFoundError:
            raise DeliveryError(f"the series ZIP {parcel.rel} is no longer in the outbox; restore it") from None
        remote = posixpath.join(cfg.remote_dir, parcel.rel)
        with self._connect() as client:
            sftp = client.open_sftp()
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(cfg.timeout_seconds)
            folder, name = posixpath.split(remote)
            temp = posixpath.join(folder, f".{name[:200]}.tmp-{secrets.token_hex(4)}")
            try:
                self._makedirs(sftp, folder)
                self._upload(sftp, parcel, temp, size, cancel)
                try:
                    sftp.posix_rename(temp, remote)  # replaces atomically (a retry after a lost answer)
                except OSError:
                    sftp.rename(temp, remote)  # servers without the OpenSSH extension
                got = sftp.stat(remote).st_size
            except OSError as exc:
                raise DeliveryError(f"cannot write {remote} on {cfg.host}: {exc.strerror or exc}") from None
            finally:
                with contextlib.suppress(OSError):
                    sftp.remove(temp)  # gone after the rename; a leftover of a failed attempt otherwise
                sftp.close()
        if got != size:
            raise DeliveryError(f"{remote} on {cfg.host} holds {got} bytes after the rename, not {size}")
        return frozenset({parcel.rel})

    def _connect(self) -> paramiko.SSHClient:
        cfg = self.cfg
        client = paramiko.SSHClient()
        try:
            if cfg.known_hosts is not None:
                client.load_host_keys(str(cfg.known_hosts))
            else:
                client.load_system_host_keys()  # ~/.ssh/known_hosts
                if _SYSTEM_KNOWN_HOSTS.is_file():
                    client.load_system_host_keys(str(_SYSTEM_KNOWN_HOSTS))
        except OSError as exc:
            raise DeliveryError(f"cannot read known_hosts {cfg.known_hosts}: {exc.strerror}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        passphrase = read_secret(cfg.secret_env, cfg.secret_file, "key passphrase")
        try:
            key = paramiko.PKey.from_path(cfg.key_file, passphrase)
        except paramiko.PasswordRequiredException:
            raise DeliveryError(
                f"{cfg.key_file} is encrypted: give its passphrase by secret_env or secret_file"
            ) from None
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise DeliveryError(f"cannot load the private key {cfg.key_file}: {exc}") from None
        where = f"{cfg.host}:{cfg.port}"
        try:
            client.connect(cfg.host, cfg.port, username=cfg.user, pkey=key, timeout=cfg.timeout_seconds,
                           banner_timeout=cfg.timeout_seconds, auth_timeout=cfg.timeout_seconds,
                           allow_agent=False, look_for_keys=False)
        except paramiko.BadHostKeyException:
            raise DeliveryError(f"the host key of {where} differs from the one in known_hosts: another server may "
                                "be answering; check it before you update known_hosts") from None
        except paramiko.AuthenticationException:
            raise DeliveryError(f"{where} refused the key {cfg.key_file} for user {cfg.user!r}: check that its "
                                "public key is in the user's authorized_keys") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                hint = f"ssh-keyscan -p {cfg.port} {cfg.host}" if cfg.port != 22 else f"ssh-keyscan {cfg.host}"
                raise DeliveryError(f"the host key of {where} is not in known_hosts: check its fingerprint and add "
                                    f"it ({hint} >> {cfg.known_hosts or '~/.ssh/known_hosts'})") from None
            raise DeliveryError(f"the SSH session with {where} failed: {exc}") from None
        except OSError as exc:  # refused, unreachable, timed out
            raise DeliveryError(f"cannot connect to {where}: {exc}", reachable=False) from None
        return client

    def _makedirs(self, sftp: paramiko.SFTPClient, folder: str) -> None:
        missing = []
        while folder not in ("", "/", "."):
            try:
                sftp.stat(folder)
                break
            except FileNotFoundError:
                missing.append(folder)
                folder = posixpath.dirname(folder)
        for path in reversed(missing):
            with contextlib.suppress(OSError):  # made meanwhile by another writer; the upload will tell
                sftp.mkdir(path)

    def _upload(self, sftp: paramiko.SFTPClient, parcel: Parcel, temp: str, size: int,
                cancel: threading.Event) -> None:
        def progress(done: int, total: int) -> None:
            if cancel.is_set():
                raise Stopped()

        with parcel.zip_path.open("rb") as fh:
            sftp.putfo(fh, temp, file_size=size, callback=progress, confirm=True)
