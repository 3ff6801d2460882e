"""Uploads by SFTP to a real OpenSSH sshd on a loopback port: the ZIP under a temporary name, renamed into
place, confirmed by its size; a refused key and an unknown host key are refused with a sentence."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

from tests.conftest import Site, require_tool
from tests.deliver_servers import Sshd, drop, make_series, once, sshd, status


def sftp_destination(name: str, server: Sshd, *, key_file: Path, known_hosts: Path, attempts: int = 3) -> str:
    return textwrap.dedent(f"""
        [[destinations]]
        name = "{name}"
        kind = "sftp"
        host = "127.0.0.1"
        port = {server.port}
        user = "{server.user}"
        key_file = "{key_file}"
        known_hosts = "{known_hosts}"
        remote_dir = "{server.remote_dir}/incoming"
        max_attempts = {attempts}
        backoff_seconds = 0.2
        """)


def write_config(site: Site, destinations: str) -> None:
    site.write_config(extra=textwrap.dedent("""\
        [input]
        on_success = "delete"

        [processing]
        workers = 1
        """) + destinations)


def test_zip_is_renamed_into_place_whole_and_sources_go(site: Site, tmp_path: Path) -> None:
    with sshd(tmp_path / "sshd") as server:
        write_config(site, sftp_destination("remote", server, key_file=server.key_file,
                                            known_hosts=server.known_hosts))
        sources = drop(make_series(tmp_path / "stage", 3), site.inbox / "exam")

        code, text = once(site.config)

        assert code == 0, text
        [zip_path] = site.outputs()
        remote = server.remote_dir / "incoming" / zip_path.relative_to(site.outbox)
        assert remote.read_bytes() == zip_path.read_bytes()
        leftovers = [p for p in (server.remote_dir / "incoming").rglob(".*")]
        assert leftovers == [], "no temporary file may stay behind"
        assert not any(p.exists() for p in sources)
        assert "confirmed by remote" in text


def test_refused_key_and_unknown_host_key_are_dead_lettered_with_a_reason(site: Site, tmp_path: Path) -> None:
    keygen = require_tool("ssh-keygen")
    with sshd(tmp_path / "sshd") as server:
        stranger = tmp_path / "stranger_ed25519"
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
        empty = tmp_path / "empty_known_hosts"
        empty.write_text("", encoding="utf-8")
        write_config(site, sftp_destination("badkey", server, key_file=stranger, known_hosts=server.known_hosts,
                                            attempts=1)
                     + sftp_destination("newhost", server, key_file=server.key_file, known_hosts=empty, attempts=1)
                     + '\n[[destinations]]\nname = "local"\nkind = "outbox"\n')
        sources = drop(make_series(tmp_path / "stage", 2), site.inbox)

        code, text = once(site.config)

        assert code == 3, text
        assert "refused the key" in text and "is not in known_hosts" in text
        assert "confirmed by local" in text
        assert all(p.exists() for p in sources)
        dead = {d["destination"]: d["error"] for d in status(site.config)["deliveries"]["dead_letters"]}
        assert set(dead) == {"badkey", "newhost"}
        assert not (server.remote_dir / "incoming").exists() or not any((server.remote_dir / "incoming").rglob("*.zip"))
