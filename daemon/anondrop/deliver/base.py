"""What every destination is, and what the instance-wise ones share.

A destination gets a `Parcel` (one series ZIP from the outbox and what this destination has already
confirmed of it) and returns the set of what it confirmed, only on positive confirmation: a stored-SOP list
from a STOW-RS response, a C-STORE success status per instance, an object checksum, a file size after the
rename. Anything short of that raises `DeliveryError`, a sentence for the operator, carrying what *was*
confirmed so that the next attempt resends only the rest.
"""

from __future__ import annotations

import os
import ssl
import stat
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pydicom import dcmread

_T = TypeVar("_T")
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
CHUNK = 1 << 20


@dataclass(frozen=True)
class Parcel:
    """One (series ZIP, destination) delivery as an attempt sees it."""

    series: str  # de-identified Series Instance UID
    zip_path: Path  # the series ZIP in the outbox
    rel: str  # the ZIP relative to the outbox ('/' separators): the object key or remote path below the base
    confirmed: frozenset[str] = frozenset()  # ZIP entries (or the object) confirmed by an earlier attempt


class DeliveryError(Exception):
    """A delivery attempt that did not end in positive confirmation.

    `message` is a sentence naming what went wrong and, where the operator can fix it, what to do. It never
    holds a secret or an identifier. `confirmed` is everything the destination did confirm (earlier attempts
    included). `reachable` is False when the destination could not be reached at all, so its other
    deliveries wait too instead of each spending an attempt.
    """

    def __init__(
        self, message: str, *, confirmed: frozenset[str] = frozenset(), reachable: bool = True, series: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.confirmed = confirmed
        self.reachable = reachable
        self.series = series

    def __str__(self) -> str:
        return self.message


class Destination(Protocol):
    name: str

    def deliver(self, parcel: Parcel, cancel: threading.Event) -> frozenset[str]:
        """Send what is not confirmed yet; return every confirmed entry, or raise DeliveryError."""
        ...


class Stopped(Exception):
    """The courier is closing: an attempt gives up between two sends and is not counted."""


# -- secrets ----------------------------------------------------------------------------------------------
def read_secret(env: str | None, file: Path | None, what: str) -> str | None:
    """The secret named by secret_env or secret_file (its first line), read at each attempt so that a
    rotated token is picked up. None when neither is configured."""
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise DeliveryError(f"the {what} is to come from the environment variable {env}, which is not set "
                                "for the anondrop process")
        return value
    if file is None:
        return None
    try:
        st = file.stat()
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DeliveryError(f"cannot read the {what} from {file}: {exc.strerror}") from None
    if st.st_mode & stat.S_IROTH:
        raise DeliveryError(f"{file} holds the {what} but every user can read it; run: chmod 600 {file}")
    value = text.splitlines()[0].strip() if text.strip() else ""
    if not value:
        raise DeliveryError(f"{file} should hold the {what} on its first line, but it is empty")
    return value


def tls_context(verify: bool, ca_file: Path | None, cert_file: Path | None = None,
                key_file: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


# -- instances in a series ZIP ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Instance:
    entry: str  # name inside the ZIP, e.g. IM00001.dcm
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    size: int


def list_instances(zf: zipfile.ZipFile) -> list[Instance]:
    """The DICOM entries of a series ZIP with what a sender needs from their headers (pixels are not read)."""
    out = []
    for info in zf.infolist():
        if not info.filename.endswith(".dcm"):
            continue
        with zf.open(info) as fh:
            ds = dcmread(fh, stop_before_pixels=True, specific_tags=[_SOP_CLASS, _SOP_INSTANCE])
        meta = ds.file_meta
        out.append(
            Instance(
                info.filename,
                str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "")),
                str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "")),
                str(meta.get("TransferSyntaxUID", "")),
                info.file_size,
            )
        )
    return out


def open_zip(parcel: Parcel) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(parcel.zip_path)
    except FileNotFoundError:
        raise DeliveryError(
            f"the series ZIP {parcel.rel} is no longer in the outbox; it is the source of every upload, so "
            "restore it (or leave the delivery dead-lettered)"
        ) from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise DeliveryError(f"cannot read the series ZIP {parcel.rel}: {exc}") from None


def entry_chunks(zf: zipfile.ZipFile, name: str) -> Iterator[bytes]:
    with zf.open(name) as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def batched(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def failure_sentence(failures: list[str], total: int, confirmed: int) -> str:
    """'2 of 5 instances were not stored (...); 3 are confirmed and will not be sent again'."""
    shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
    return (f"{len(failures)} of {total} instance(s) were not stored ({shown}); {confirmed} are confirmed and "
            "are not sent again")
