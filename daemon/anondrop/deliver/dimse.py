"""DIMSE C-STORE (PS3.4 Annex B, PS3.7 9.1.1) of the instances of the series ZIP.

One requested presentation context per (SOP class, transfer syntax) found in the series: a peer may accept a
class in one syntax and not another, and anondrop never transcodes (that would decode pixel data). An
instance whose context the peer rejected is a failure naming the class and syntax. Each instance is sent from
a temporary copy in `state/outgoing/`, so pynetdicom streams its bytes unchanged. Status 0000 is success;
B000, B006 and B007 (coercion, elements discarded, data set does not match the SOP class) are stored with a
warning, which is logged; anything else, or no response, is a failure for that instance only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association

from anondrop.config import DimseDestination
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
    tls_context,
)

log = logging.getLogger("anondrop")

_STALE_SECONDS = 2 * 3600.0
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255
_WARNINGS = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
             0xB007: "data set does not match SOP class"}


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


class Dimse:
    def __init__(self, cfg: DimseDestination, scratch: Path) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.scratch = scratch
        self._clean_scratch()

    def _clean_scratch(self) -> None:
        """Remove copies left by a process that died while sending. A copy lives for one C-STORE (bounded by
        timeout_seconds, at most an hour), so one older than two hours belongs to nobody."""
        if not self.scratch.is_dir():
            return
        for path in self.scratch.glob(".send-*.dcm"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > _STALE_SECONDS:
                    path.unlink()

    def deliver(self, parcel: Parcel, cancel: threading.Event) -> frozenset[str]:
        confirmed = set(parcel.confirmed)
        with open_zip(parcel) as zf:
            instances = list_instances(zf)
            todo = [i for i in instances if i.entry not in confirmed]
            contexts = sorted({(i.sop_class, i.transfer_syntax) for i in todo})
            failures: list[str] = []
            for group in batched(contexts, _MAX_CONTEXTS):
                wanted = set(group)
                ok, failed = self._association(zf, [i for i in todo if (i.sop_class, i.transfer_syntax) in wanted],
                                               group, cancel, frozenset(confirmed))
                confirmed |= ok
                failures += failed
        if failures:
            raise DeliveryError(failure_sentence(failures, len(instances), len(confirmed)),
                                confirmed=frozenset(confirmed))
        return frozenset(confirmed)

    def _association(self, zf: zipfile.ZipFile, todo: list[Instance], contexts: Sequence[tuple[str, str]],
                     cancel: threading.Event, confirmed: frozenset[str]) -> tuple[set[str], list[str]]:
        cfg = self.cfg
        ae = AE(ae_title=cfg.calling_aet)
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, [syntax])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.timeout_seconds
        ae.connection_timeout = cfg.timeout_seconds
        tls = None
        if cfg.tls:
            tls = (tls_context(cfg.verify_tls, cfg.ca_file, cfg.cert_file, cfg.key_file), cfg.host)
        opened: list[bool] = []

        def on_open(event: Any) -> None:
            opened.append(True)
            # C-STORE waits for each response before the next request: with Nagle's algorithm on, the last
            # short PDU of an instance can wait for the peer's delayed ACK (up to 40 ms) before it leaves.
            with contextlib.suppress(OSError, AttributeError):
                event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        where = f"{cfg.host}:{cfg.port} ({cfg.called_aet})"
        assoc = ae.associate(cfg.host, cfg.port, ae_title=cfg.called_aet, tls_args=tls,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
        if not assoc.is_established:
            if assoc.is_rejected:
                raise DeliveryError(f"{where} rejected the association: check called_aet {cfg.called_aet!r} and "
                                    f"that the peer accepts calling_aet {cfg.calling_aet!r}", confirmed=confirmed)
            if not opened:
                raise self._unopened(tls, confirmed)
            raise DeliveryError(f"{where} ended the association before it was established"
                                + (" (check tls, ca_file and the certificates)" if cfg.tls else ""),
                                confirmed=confirmed)
        try:
            return self._send_all(zf, assoc, todo, cancel)
        finally:
            with contextlib.suppress(Exception):  # the peer may already have gone; the results are known
                if assoc.is_established:
                    assoc.release()

    def _unopened(self, tls: tuple[ssl.SSLContext, str] | None, confirmed: frozenset[str]) -> DeliveryError:
        """Why no connection came up. pynetdicom only says that it failed; with TLS a handshake of our own
        tells a refused certificate (fix ca_file) from a peer that is down (wait)."""
        cfg = self.cfg
        where = f"{cfg.host}:{cfg.port}"
        try:
            with socket.create_connection((cfg.host, cfg.port), timeout=cfg.timeout_seconds) as sock:
                if tls is not None:
                    with tls[0].wrap_socket(sock, server_hostname=tls[1]):
                        pass
        except ssl.SSLError as exc:
            return DeliveryError(f"the TLS handshake with {where} failed: {exc.reason or exc}; check tls, ca_file, "
                                 "verify_tls and the certificates", confirmed=confirmed)
        except OSError as exc:
            return DeliveryError(f"cannot connect to {where}: {exc.strerror or exc}", confirmed=confirmed,
                                 reachable=False)
        return DeliveryError(f"cannot open an association with {where}", confirmed=confirmed)

    def _send_all(self, zf: zipfile.ZipFile, assoc: Association, todo: list[Instance],
                  cancel: threading.Event) -> tuple[set[str], list[str]]:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        ok: set[str] = set()
        failures: list[str] = []
        for inst in todo:
            if cancel.is_set():
                raise Stopped()
            if (inst.sop_class, inst.transfer_syntax) not in accepted:
                failures.append(f"{inst.entry}: the peer does not accept {_uid_name(inst.sop_class)} in "
                                f"{_uid_name(inst.transfer_syntax)}")
                continue
            if not assoc.is_established:
                failures.append(f"{inst.entry}: not sent, the association was aborted")
                continue
            status = self._store(zf, assoc, inst)
            code = int(status.Status) if status is not None and "Status" in status else None
            if code == 0x0000:
                ok.add(inst.entry)
            elif code in _WARNINGS:
                log.warning("delivery_warning: %s: C-STORE warning 0x%04X (%s) for %s; stored", self.name, code,
                            _WARNINGS[code], inst.entry)
                ok.add(inst.entry)
            elif code is None:
                failures.append(f"{inst.entry}: no C-STORE response (timeout or connection lost)")
            else:
                failures.append(f"{inst.entry}: C-STORE status 0x{code:04X}")
        return ok, failures

    def _store(self, zf: zipfile.ZipFile, assoc: Association, inst: Instance) -> Any:
        self.scratch.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".send-", suffix=".dcm", dir=self.scratch)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in entry_chunks(zf, inst.entry):
                    fh.write(chunk)
            return assoc.send_c_store(Path(name))
        finally:
            Path(name).unlink(missing_ok=True)
