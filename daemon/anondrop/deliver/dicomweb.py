"""DICOMweb STOW-RS (PS3.18 10.5): the instances of the series ZIP, `batch_size` per request.

A request body is multipart/related; type="application/dicom", streamed from the ZIP entries with a known
Content-Length (some origin servers refuse chunked uploads). An instance counts as delivered only when the
response's ReferencedSOPSequence lists it and FailedSOPSequence does not: a 200 without that list confirms
nothing. Instances that failed are named with their failure reason and sent again at the next attempt; the
confirmed ones are not.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from anondrop.config import DicomWebDestination
from anondrop.deliver.base import (
    DeliveryError,
    Instance,
    Parcel,
    Stopped,
    batched,
    entry_chunks,
    failure_sentence,
    list_instances,
    open_zip,
    read_secret,
    tls_context,
)

log = logging.getLogger("anondrop")

_REFERENCED = "00081199"  # ReferencedSOPSequence
_FAILED = "00081198"  # FailedSOPSequence
_SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
# PS3.18 Table 10.5.3-2 and the C-STORE statuses it borrows (PS3.4 Annex B).
_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
    0xA770: "the instance already exists with other content",
}


def _reason(code: int) -> str:
    if code in _REASONS:
        return _REASONS[code]
    if code & 0xFF00 == 0xA700:
        return "out of resources"
    if code & 0xFF00 == 0xA900:
        return "data set does not match SOP class"
    if code & 0xF000 == 0xC000:
        return "cannot understand"
    return "failure"


class DicomWeb:
    def __init__(self, cfg: DicomWebDestination) -> None:
        self.cfg = cfg
        self.name = cfg.name

    def deliver(self, parcel: Parcel, cancel: threading.Event) -> frozenset[str]:
        confirmed = set(parcel.confirmed)
        with open_zip(parcel) as zf:
            instances = list_instances(zf)
            todo = [i for i in instances if i.entry not in confirmed]
            failures: list[str] = []
            with self._client() as client:
                for batch in batched(todo, self.cfg.batch_size):
                    if cancel.is_set():
                        raise Stopped()
                    try:
                        ok, failed = self._stow(client, zf, batch)
                    except DeliveryError as exc:
                        exc.confirmed = frozenset(confirmed)
                        raise
                    confirmed |= ok
                    failures += failed
        if failures:
            raise DeliveryError(failure_sentence(failures, len(instances), len(confirmed)),
                                confirmed=frozenset(confirmed))
        return frozenset(confirmed)

    # -- one request ----------------------------------------------------------------------------------
    def _client(self) -> httpx.Client:
        cfg = self.cfg
        secret = read_secret(cfg.secret_env, cfg.secret_file, "password" if cfg.auth == "basic" else "token")
        auth: httpx.Auth | None = None
        headers = {"Accept": "application/dicom+json"}
        if cfg.auth == "basic":
            assert cfg.username is not None and secret is not None
            auth = httpx.BasicAuth(cfg.username, secret)
        elif cfg.auth == "bearer":
            headers["Authorization"] = f"Bearer {secret}"
        verify: ssl.SSLContext | bool = True
        if cfg.url.startswith("https:"):
            verify = tls_context(cfg.verify_tls, cfg.ca_file)
        return httpx.Client(auth=auth, headers=headers, verify=verify, timeout=httpx.Timeout(cfg.timeout_seconds),
                            follow_redirects=False)

    def _stow(self, client: httpx.Client, zf: zipfile.ZipFile, batch: Sequence[Instance]) -> tuple[set[str], list[str]]:
        url = f"{self.cfg.url}/studies"
        boundary = secrets.token_hex(16)
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        tail = f"--{boundary}--\r\n".encode("ascii")
        length = sum(len(head) + i.size + 2 for i in batch) + len(tail)

        def body() -> Iterator[bytes]:
            for inst in batch:
                yield head
                yield from entry_chunks(zf, inst.entry)
                yield b"\r\n"
            yield tail

        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),
        }
        try:
            response = client.post(url, content=body(), headers=headers)
        except httpx.ConnectError as exc:
            tls = _tls_failure(exc)
            if tls is not None:  # not "cannot connect": the fix is in the config (or the server's certificate)
                raise DeliveryError(self._tls_sentence(tls), reachable=False) from None
            raise DeliveryError(f"cannot connect to {url}: {exc}", reachable=False) from None
        except httpx.TimeoutException:
            raise DeliveryError(
                f"no answer from {url} within {self.cfg.timeout_seconds:g} s (timeout_seconds)"
            ) from None
        except httpx.HTTPError as exc:
            raise DeliveryError(f"the STOW-RS request to {url} failed: {exc}") from None
        return self._read_response(url, response, batch)

    def _tls_sentence(self, exc: ssl.SSLError) -> str:
        where = self.cfg.url.split("/")[2]
        if isinstance(exc, ssl.SSLCertVerificationError):
            # The server answered, but with a certificate this machine does not trust, or for another name.
            return (f"the TLS handshake with {where} failed: the server's certificate was refused "
                    f"({exc.reason}: {exc.verify_message}); set ca_file to the PEM of the CA that signs it, "
                    "and check that the certificate names the host in url (verify_tls = false only for a "
                    "test server)")
        return (f"the TLS handshake with {where} failed ({exc.reason or exc}); check that url is right and "
                "that the server speaks https on that port")

    def _read_response(
        self, url: str, response: httpx.Response, batch: Sequence[Instance]
    ) -> tuple[set[str], list[str]]:
        code = response.status_code
        if code in (401, 403):
            how = ("check username and the password (secret_env or secret_file)" if self.cfg.auth == "basic"
                   else "check the token (secret_env or secret_file)" if self.cfg.auth == "bearer"
                   else "the server wants credentials: set auth, and secret_env or secret_file")
            raise DeliveryError(f"{url} refused the credentials (HTTP {code}): {how}")
        doc = _json(response)
        if doc is None:
            if code in (200, 202):
                raise DeliveryError(f"{url} answered HTTP {code} without a DICOM JSON list of stored instances, "
                                    "so nothing counts as delivered")
            raise DeliveryError(f"{url} answered HTTP {code} {response.reason_phrase} to STOW-RS")
        stored = {_uid(item) for item in _items(doc, _REFERENCED)}
        failed = {_uid(item): _code(item, _FAILURE_REASON) for item in _items(doc, _FAILED)}
        warnings = [_code(doc, _WARNING_REASON)] + [_code(i, _WARNING_REASON) for i in _items(doc, _REFERENCED)]
        for warning in {w for w in warnings if w is not None}:
            log.warning("delivery_warning: %s: STOW-RS warning 0x%04X for a stored instance", self.name, warning)
        ok: set[str] = set()
        failures: list[str] = []
        for inst in batch:
            if inst.sop_instance in failed:
                reason = failed[inst.sop_instance]
                text = f"0x{reason:04X} {_reason(reason)}" if reason is not None else "no reason given"
                failures.append(f"{inst.entry}: {text}")
            elif inst.sop_instance in stored:
                ok.add(inst.entry)
            else:
                failures.append(f"{inst.entry}: not listed as stored (HTTP {code})")
        return ok, failures


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error behind an httpx ConnectError, if the handshake is what failed (httpx wraps httpcore's
    error, which holds the ssl one as its argument)."""
    todo: list[BaseException] = [exc]
    for _ in range(8):
        if not todo:
            break
        err = todo.pop()
        if isinstance(err, ssl.SSLError):
            return err
        todo += [e for e in (err.__cause__, err.__context__, *err.args) if isinstance(e, BaseException)]
    return None


def _json(response: httpx.Response) -> dict[str, Any] | None:
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        doc = response.json()
    except ValueError:
        return None
    if isinstance(doc, list) and doc and isinstance(doc[0], dict):
        doc = doc[0]
    return doc if isinstance(doc, dict) else None


def _items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    value = doc.get(tag, {}).get("Value", []) if isinstance(doc.get(tag), dict) else []
    return [v for v in value if isinstance(v, dict)]


def _uid(item: dict[str, Any]) -> str:
    values = item.get(_SOP_INSTANCE, {}).get("Value", [])
    return str(values[0]) if values else ""


def _code(item: dict[str, Any], tag: str) -> int | None:
    values = item.get(tag, {}).get("Value", []) if isinstance(item.get(tag), dict) else []
    try:
        return int(values[0]) if values else None
    except (TypeError, ValueError):
        return None
