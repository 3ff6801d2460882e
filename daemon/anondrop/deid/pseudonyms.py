"""Keyed pseudonyms: every replacement value is an HMAC-SHA256 of the original under the site secret.

The same input gives the same output across runs and machines that share the secret; without the
secret nobody can confirm a guess ("is this Jane Doe's scan?") by recomputing a hash. Each kind of value
is derived under its own label, so a UID and a patient ID that happen to be equal map to unrelated values.
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass, field
from functools import lru_cache
from hashlib import sha256

from anondrop.deid.actions import is_well_known_uid

# PS3.5 B.2: a UUID-derived UID under the 2.25 root needs no registered org root; 128 bits of HMAC
# give at most 39 decimal digits, so "2.25." + digits stays within the 64-character UI limit.
UUID_ROOT = "2.25."


@dataclass(frozen=True)
class Keys:
    """The site secret and the pseudonym formats it is used with."""

    secret: bytes = field(repr=False)
    patient_id_format: str = "ANON{digest}"
    patient_name_format: str = "ANON^{digest}"
    digest_length: int = 10
    date_shift_days: tuple[int, int] = (-3650, -365)

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("the site secret must be at least 16 bytes")

    def _mac(self, label: str, value: str) -> bytes:
        return _hmac(self.secret, label, value)

    def uid(self, original: str) -> str:
        """The replacement for a UID, stable for a given secret."""
        digest = self._mac("uid", original.strip("\0 "))
        return UUID_ROOT + str(int.from_bytes(digest[:16], "big"))

    def uids(self, text: str) -> str:
        """A UI value's replacement, value by value: well-known UIDs (SOP classes, transfer syntaxes, ...)
        stay, every other one becomes its keyed 2.25 UID."""

        def one(v: str) -> str:
            v = v.strip("\0 ")
            return v if not v or is_well_known_uid(v) else self.uid(v)

        return "\\".join(one(v) for v in text.split("\\")) if text else ""

    def patient_digest(self, patient_id: str, issuer: str = "") -> str:
        """Upper-case base32 digest of the patient's identity (ID + issuer), `digest_length` long."""
        raw = self._mac("patient", f"{issuer.strip()}\0{patient_id.strip()}")
        return base64.b32encode(raw).decode("ascii").rstrip("=")[: self.digest_length]

    def patient_id(self, patient_id: str, issuer: str = "") -> str:
        return self.patient_id_format.format(digest=self.patient_digest(patient_id, issuer))[:64]

    def patient_name(self, patient_id: str, issuer: str = "") -> str:
        return self.patient_name_format.format(digest=self.patient_digest(patient_id, issuer))[:64]

    def name_key(self, value: str) -> str:
        """A short keyed digest for output names (study_key, series_key): safe whatever the UIDs are."""
        raw = self._mac("name", value.strip("\0 "))
        return base64.b32encode(raw).decode("ascii").rstrip("=")[: max(self.digest_length, 12)]

    def date_offset_days(self, patient_id: str, issuer: str = "") -> int:
        """Per-patient shift in days: every date of one patient moves by the same amount (intervals kept)."""
        lo, hi = self.date_shift_days
        raw = self._mac("date-offset", f"{issuer.strip()}\0{patient_id.strip()}")
        return lo + int.from_bytes(raw[:8], "big") % (hi - lo + 1)


@lru_cache(maxsize=65536)
def _hmac(secret: bytes, label: str, value: str) -> bytes:
    # Cached: a 600-slice series asks for the same study/series/frame-of-reference UIDs 600 times.
    return hmac.new(secret, f"anondrop/{label}\0{value}".encode(), sha256).digest()
