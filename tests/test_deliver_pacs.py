"""Uploads to PACS: STOW-RS and C-STORE to real Orthanc servers and dcmtk's storescp, by `once` and `run`.

What is checked is what the receiving side holds (through Orthanc's REST API, or the files storescp wrote
bit for bit), what is left in the inbox, and what `anondrop status` says. Faults are real: a wrong password,
a peer that is not listening yet, a peer that accepts only some transfer syntaxes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Site, run_cli
from tests.deliver_servers import (
    LOOPBACK,
    PATIENT_ID,
    Orthanc,
    Pki,
    StoreScp,
    TlsProxy,
    assert_no_phi,
    drop,
    free_port,
    make_pki,
    make_series,
    once,
    orthanc,
    read_output,
    status,
    stop,
    storescp,
    tls_proxy,
    wait_for,
)

FAST = "max_attempts = {attempts}\nbackoff_seconds = {backoff}\ntimeout_seconds = 20\n"


def write_config(site: Site, destinations: str, *, on_success: str = "delete", extra: str = "") -> None:
    site.write_config(extra=textwrap.dedent(f"""\
        [input]
        on_success = "{on_success}"

        [processing]
        workers = 1
        """) + textwrap.dedent(extra) + "\n" + textwrap.dedent(destinations))


def dicomweb(name: str, server: Orthanc, *, secret_file: Path, attempts: int = 3, backoff: float = 0.2) -> str:
    return f"""
[[destinations]]
name = "{name}"
kind = "dicomweb"
url = "{server.dicomweb}"
auth = "basic"
username = "{server.user}"
secret_file = "{secret_file}"
batch_size = 2
{FAST.format(attempts=attempts, backoff=backoff)}"""


def dimse(name: str, port: int, aet: str, *, attempts: int = 3, backoff: float = 0.2) -> str:
    return f"""
[[destinations]]
name = "{name}"
kind = "dimse"
host = "{LOOPBACK}"
port = {port}
called_aet = "{aet}"
calling_aet = "ANONDROPTEST"
{FAST.format(attempts=attempts, backoff=backoff)}"""


def secret(site: Site, value: str) -> Path:
    path = site.root / "pacs.secret"
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def check_orthanc(server: Orthanc, out_zip: Path) -> None:
    """Every instance of the ZIP is in Orthanc, with the de-identified values and none of the planted ones."""
    out = read_output(out_zip)
    stored = server.series_instances(str(out.manifest["series_instance_uid"]))
    assert {t["SOPInstanceUID"] for t in stored} == set(out.sop_uids.values())
    for tags in stored:
        assert tags["PatientID"] == out.manifest["patient_id"] != PATIENT_ID
        assert tags["PatientName"].startswith("ANON")
        assert tags["StudyInstanceUID"] == out.manifest["study_instance_uid"]
        assert tags.get("PatientIdentityRemoved") == "YES"
        assert_no_phi(repr(tags), "an instance stored in Orthanc")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Orthanc, Orthanc, StoreScp]]:
    with orthanc(tmp_path / "orthanc-web") as web, orthanc(tmp_path / "orthanc-dimse") as pacs, \
            storescp(tmp_path / "storescp") as scp:
        yield web, pacs, scp


def test_once_sends_every_instance_to_every_destination_then_disposes_the_sources(
    site: Site, tmp_path: Path, servers: tuple[Orthanc, Orthanc, StoreScp]
) -> None:
    web, pacs, scp = servers
    write_config(site, dicomweb("web", web, secret_file=secret(site, web.password))
                 + dimse("pacs", pacs.dicom_port, pacs.aet) + dimse("scp", scp.port, scp.aet)
                 + '\n[[destinations]]\nname = "local"\nkind = "outbox"\n')
    sources = drop(make_series(tmp_path / "stage", 5, implicit={2}), site.inbox / "exam")

    code, text = once(site.config)

    assert code == 0, text
    [zip_path] = site.outputs()
    check_orthanc(web, zip_path)
    check_orthanc(pacs, zip_path)
    out = read_output(zip_path)
    received = scp.received()
    assert set(received) == set(out.sop_uids.values())
    for entry, uid in out.sop_uids.items():  # C-STORE carries the data set; the ZIP entry is meta + data set
        assert out.entries[entry].endswith(received[uid][-4096:])
    assert not any(p.exists() for p in sources), "sources must go once every destination has confirmed"
    for name in ("web", "pacs", "scp", "local"):
        assert f"confirmed by {name}" in text
    info = status(site.config)["deliveries"]
    assert info["by_destination"] == {n: {"delivered": 1} for n in ("web", "pacs", "scp", "local")}
    assert_no_phi(text, "the output of once")
    assert web.password not in text


def test_wrong_password_is_dead_lettered_others_deliver_and_retry_sends_it(
    site: Site, tmp_path: Path, servers: tuple[Orthanc, Orthanc, StoreScp]
) -> None:
    web, _pacs, scp = servers
    secret_file = secret(site, "not-the-password")
    write_config(site, dicomweb("web", web, secret_file=secret_file, attempts=2) + dimse("scp", scp.port, scp.aet))
    sources = drop(make_series(tmp_path / "stage", 3), site.inbox)

    code, text = once(site.config)

    assert code == 3, text  # finished, but a delivery was dead-lettered
    assert "refused the credentials (HTTP 401)" in text and "dead-lettered: web" in text
    assert "not-the-password" not in text
    [zip_path] = site.outputs()
    assert set(scp.received()) == set(read_output(zip_path).sop_uids.values()), "the other destination delivers"
    assert all(p.exists() for p in sources), "sources stay until every destination has confirmed"
    [dead] = status(site.config)["deliveries"]["dead_letters"]
    assert dead["destination"] == "web" and dead["attempts"] == 2 and "HTTP 401" in dead["error"]

    secret_file.write_text(web.password + "\n", encoding="utf-8")
    retried = subprocess.run([sys.executable, "-m", "anondrop", "deliveries", "retry", str(dead["id"]),
                              "--config", str(site.config)], capture_output=True, text=True, cwd=REPO)
    assert retried.returncode == 0, retried.stderr
    code, text = once(site.config)

    assert code == 0, text
    check_orthanc(web, zip_path)
    assert not any(p.exists() for p in sources)
    assert status(site.config)["deliveries"]["dead_letters"] == []


def test_only_the_instances_that_failed_are_sent_again(site: Site, tmp_path: Path) -> None:
    # A peer that accepts only Implicit VR Little Endian stores those instances and refuses the others.
    series = make_series(tmp_path / "stage", 4, implicit={1, 3})
    port = free_port()
    write_config(site, dimse("scp", port, "STORESCP", attempts=1))
    drop(series, site.inbox)
    with storescp(tmp_path / "scp-1", port, implicit_only=True) as first:
        code, text = once(site.config)
        got_first = set(first.received())
    assert code == 3, text
    assert "2 of 4 instance(s) were not stored" in text and "does not accept CT Image Storage in Explicit" in text
    [zip_path] = site.outputs()
    out = read_output(zip_path)
    implicit_uids = {out.sop_uids["IM00001.dcm"], out.sop_uids["IM00003.dcm"]}
    assert got_first == implicit_uids

    retried = subprocess.run([sys.executable, "-m", "anondrop", "deliveries", "retry", "--all",
                              "--config", str(site.config)], capture_output=True, text=True, cwd=REPO)
    assert retried.returncode == 0, retried.stderr
    with storescp(tmp_path / "scp-2", port) as second:
        code, text = once(site.config)
        got_second = set(second.received())
    assert code == 0, text
    assert got_second == set(out.sop_uids.values()) - implicit_uids, "confirmed instances must not be resent"


def test_daemon_delivers_to_a_peer_that_was_down_at_start_without_holding_up_the_other(
    site: Site, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet
    with orthanc(tmp_path / "orthanc") as web:
        write_config(site, dicomweb("web", web, secret_file=secret(site, web.password))
                     + dimse("late", port, "STORESCP", attempts=30, backoff=0.3),
                     extra="""
                     [watch]
                     stable_seconds = 0.3
                     rescan_seconds = 2

                     [completion]
                     settle_seconds = 1.0
                     """)
        log_path = site.root / "daemon.log"
        with log_path.open("wb") as log_file:
            daemon = subprocess.Popen([sys.executable, "-m", "anondrop", "run", "--config", str(site.config)],
                                      stdout=subprocess.DEVNULL, stderr=log_file, cwd=REPO,
                                      env={**os.environ, "COLUMNS": "200"}, start_new_session=True)
        try:
            def log() -> str:
                return log_path.read_text(errors="replace")

            wait_for(lambda: "daemon_ready" in log(), 30, "the daemon to start")
            sources = drop(make_series(tmp_path / "stage", 3), site.inbox / "exam")
            wait_for(lambda: "delivery_failed: series" in log() and "-> late" in log(), 60,
                     "a failed attempt to the peer that is down")
            wait_for(lambda: "-> web (" in log(), 30, "the other destination to confirm meanwhile")
            assert "cannot connect to 127.0.0.1" in log()
            # A new series is processed and reaches the destination that is up while the other is still down.
            second = drop(make_series(tmp_path / "stage2", 2), site.inbox / "exam2")
            wait_for(lambda: log().count("-> web (") == 2, 60, "the second series at the destination that is up")
            assert "series_confirmed_everywhere" not in log()
            assert all(p.exists() for p in sources + second), "sources stay while a destination has not confirmed"
            zips = site.outputs()
            assert len(zips) == 2
            for zip_path in zips:
                check_orthanc(web, zip_path)

            with storescp(tmp_path / "scp", port) as scp:
                wait_for(lambda: log().count("series_confirmed_everywhere") == 2, 60,
                         "delivery after the peer came up")
                assert set(scp.received()) == {u for z in zips for u in read_output(z).sop_uids.values()}
            wait_for(lambda: not any(p.exists() for p in sources + second), 10, "the sources to be disposed")
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            try:
                assert daemon.wait(30) == 0
            finally:
                stop(daemon)
                print(log_path.read_text(errors="replace")[-5000:])
        assert_no_phi(log_path.read_text(errors="replace"), "the daemon's log")
        assert web.password not in log_path.read_text(errors="replace")


def test_an_inbox_zip_stays_until_its_series_are_confirmed_everywhere(site: Site, tmp_path: Path) -> None:
    port = free_port()  # the peer is down for the first run
    write_config(site, dimse("scp", port, "STORESCP", attempts=1)
                 + '\n[[destinations]]\nname = "local"\nkind = "outbox"\n')
    export = site.inbox / "export.zip"
    with zipfile.ZipFile(export, "w") as zf:
        for i, path in enumerate(make_series(tmp_path / "zipped", 2).files):
            zf.write(path, f"DICOM/IM{i}")
    plain = drop(make_series(tmp_path / "plain", 2), site.inbox / "exam")

    code, text = once(site.config)

    assert code == 3, text
    assert len(site.outputs()) == 2 and "confirmed by local" in text
    assert export.exists() and all(p.exists() for p in plain), "nothing goes before every destination confirmed"
    assert not any((site.state / "unpacked").iterdir()), "unpacked members are not kept between runs"

    assert run_cli("deliveries", "retry", "--all", "--config", site.config).returncode == 0
    with storescp(tmp_path / "scp", port) as scp:
        code, text = once(site.config)
        received = set(scp.received())
    assert code == 0, text
    assert received == {uid for z in site.outputs() for uid in read_output(z).sop_uids.values()}
    assert not export.exists() and not any(p.exists() for p in plain)
    assert not any((site.state / "unpacked").iterdir())


def test_dicom_tls_with_a_private_ca_and_an_untrusted_certificate_is_refused(site: Site, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with storescp(tmp_path / "scp", pki=pki) as scp:
        write_config(site, dimse("trusted", scp.port, scp.aet) + f'tls = true\nca_file = "{pki.ca}"\n'
                     + dimse("untrusted", scp.port, scp.aet, attempts=1) + "tls = true\n")
        drop(make_series(tmp_path / "stage", 2), site.inbox)

        code, text = once(site.config)

        assert code == 3, text
        [zip_path] = site.outputs()
        assert set(scp.received()) == set(read_output(zip_path).sop_uids.values())
        [dead] = status(site.config)["deliveries"]["dead_letters"]
        assert dead["destination"] == "untrusted" and "TLS handshake" in dead["error"], dead
        assert "CERTIFICATE_VERIFY_FAILED" in dead["error"], dead


# -- DICOMweb over HTTPS (nginx terminating TLS in front of Orthanc) and bearer tokens ----------------------
TOKEN = "bearer-test-token-5f1c9a"


@pytest.fixture
def https_orthanc(tmp_path: Path) -> Iterator[tuple[Orthanc, TlsProxy, Pki]]:
    pki = make_pki(tmp_path / "pki")
    with orthanc(tmp_path / "orthanc") as server, tls_proxy(tmp_path / "nginx", server, pki, token=TOKEN) as px:
        yield server, px, pki


def https_dicomweb(name: str, url: str, *, attempts: int = 2, keys: str = "") -> str:
    return f"""
[[destinations]]
name = "{name}"
kind = "dicomweb"
url = "{url}"
batch_size = 2
{FAST.format(attempts=attempts, backoff=0.2)}{textwrap.dedent(keys)}"""


def test_https_with_a_private_ca_is_refused_without_ca_file_and_delivers_with_it(
    site: Site, tmp_path: Path, https_orthanc: tuple[Orthanc, TlsProxy, Pki]
) -> None:
    server, px, pki = https_orthanc
    write_config(site, https_dicomweb("web", px.dicomweb))  # verify_tls defaults to true; no ca_file
    sources = drop(make_series(tmp_path / "stage", 3), site.inbox)

    code, text = once(site.config)

    assert code == 3, text
    [dead] = status(site.config)["deliveries"]["dead_letters"]
    assert dead["destination"] == "web" and dead["attempts"] == 2, dead
    for words in ("TLS handshake with 127.0.0.1", "CERTIFICATE_VERIFY_FAILED", "set ca_file"):
        assert words in dead["error"], dead["error"]
    assert "dead-lettered: web" in text
    assert server.get("/instances") == [], "nothing may arrive over a connection that was not verified"
    assert all(p.exists() for p in sources)

    write_config(site, https_dicomweb("web", px.dicomweb, keys=f'ca_file = "{pki.ca}"\n'))
    assert run_cli("deliveries", "retry", "--all", "--config", site.config).returncode == 0
    code, text = once(site.config)

    assert code == 0, text
    [zip_path] = site.outputs()
    check_orthanc(server, zip_path)
    assert not any(p.exists() for p in sources)
    assert status(site.config)["deliveries"]["by_destination"] == {"web": {"delivered": 1}}


def test_https_with_verify_tls_off_delivers(
    site: Site, tmp_path: Path, https_orthanc: tuple[Orthanc, TlsProxy, Pki]
) -> None:
    server, px, _pki = https_orthanc
    write_config(site, https_dicomweb("web", px.dicomweb, keys="verify_tls = false\n"))
    drop(make_series(tmp_path / "stage", 3), site.inbox)

    code, text = once(site.config)

    assert code == 0, text
    [zip_path] = site.outputs()
    check_orthanc(server, zip_path)


def test_bearer_token_a_wrong_one_is_dead_lettered_the_right_one_arrives_and_neither_is_shown(
    site: Site, tmp_path: Path, https_orthanc: tuple[Orthanc, TlsProxy, Pki]
) -> None:
    server, px, pki = https_orthanc
    wrong = "wrong-token-77e0d2"
    bearer = f'auth = "bearer"\nca_file = "{pki.ca}"\n'
    write_config(site, https_dicomweb("web", px.bearer_dicomweb, keys=bearer + 'secret_env = "PACS_TOKEN"\n'))
    sources = drop(make_series(tmp_path / "stage", 3), site.inbox)

    code, text = once(site.config, env={"PACS_TOKEN": wrong})

    assert code == 3, text
    assert "refused the credentials (HTTP 401)" in text and "check the token" in text
    [dead] = status(site.config)["deliveries"]["dead_letters"]
    assert dead["attempts"] == 2 and "HTTP 401" in dead["error"], dead
    assert server.get("/instances") == []
    assert all(p.exists() for p in sources)

    write_config(site, https_dicomweb("web", px.bearer_dicomweb,
                                      keys=bearer + f'secret_file = "{secret(site, TOKEN)}"\n'))
    assert run_cli("deliveries", "retry", "--all", "--config", site.config).returncode == 0
    code, second = once(site.config, env={"PACS_TOKEN": wrong})

    assert code == 0, second
    [zip_path] = site.outputs()
    check_orthanc(server, zip_path)
    assert not any(p.exists() for p in sources)
    shown = text + second + run_cli("status", "--config", site.config).stdout
    shown += run_cli("status", "--json", "--config", site.config).stdout
    shown += run_cli("deliveries", "list", "--config", site.config).stdout
    for token in (wrong, TOKEN):
        assert token not in shown, "a token was shown in the output, the log or the status"
        assert token.encode() not in b"".join(p.read_bytes() for p in site.state.glob("journal.sqlite*"))
