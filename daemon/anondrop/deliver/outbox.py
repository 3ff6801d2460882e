"""The local outbox as a destination: the series ZIP is already there, renamed into place and fsynced.

Listing it makes the outbox one of the places that must confirm before sources are disposed, for sites where
another program picks up the ZIPs. Confirmation is that the ZIP is in place and its central directory and
manifest read back.
"""

from __future__ import annotations

import threading
import zipfile

from anondrop.config import OutboxDestination
from anondrop.deliver.base import DeliveryError, Parcel, open_zip
from anondrop.package import MANIFEST_NAME


class Outbox:
    def __init__(self, cfg: OutboxDestination) -> None:
        self.name = cfg.name

    def deliver(self, parcel: Parcel, cancel: threading.Event) -> frozenset[str]:
        with open_zip(parcel) as zf:
            try:
                zf.getinfo(MANIFEST_NAME)
            except KeyError:
                raise DeliveryError(f"{parcel.rel} in the outbox has no {MANIFEST_NAME}; it is not a complete "
                                    "series ZIP") from None
            except zipfile.BadZipFile as exc:
                raise DeliveryError(f"{parcel.rel} in the outbox cannot be read: {exc}") from None
        return frozenset({parcel.rel})
