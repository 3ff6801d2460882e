"""S3 (and S3-compatible stores): the series ZIP as one object, `<prefix><patient>/<study>/<name>.zip`.

Every request carries the SHA-256 (and MD5) of its bytes, so the store refuses a body that arrived damaged.
ZIPs from `multipart_threshold_mb` up go as a multipart upload of `part_size_mb` parts, each with its own
checksum; an interrupted upload is aborted so no parts linger. Confirmation is a HEAD of the object that
must report the same size and the same SHA-256 (the composite one for multipart uploads), or, from a store
that keeps no such checksum, the matching MD5 ETag.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
)

from anondrop.config import S3Destination
from anondrop.deliver.base import CHUNK, DeliveryError, Parcel, Stopped, read_secret

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
else:
    S3Client = Any

_MB = 1024 * 1024
_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
            "AuthorizationHeaderMalformed", "InvalidClientTokenId", "403"}
_DAMAGED = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"}


@dataclass(frozen=True)
class _Expected:
    sha256: str  # base64, as S3 reports it; "<b64>-<parts>" for a multipart upload
    etag: str  # hex MD5, or "<hex>-<parts>"


class S3:
    def __init__(self, cfg: S3Destination) -> None:
        self.cfg = cfg
        self.name = cfg.name

    def deliver(self, parcel: Parcel, cancel: threading.Event) -> frozenset[str]:
        cfg = self.cfg
        key = cfg.prefix + parcel.rel
        where = f"s3://{cfg.bucket}/{key}"
        try:
            size = parcel.zip_path.stat().st_size
        except FileNotFoundError:
            raise DeliveryError(f"the series ZIP {parcel.rel} is no longer in the outbox; restore it") from None
        try:
            client = self._client()
            if size < cfg.multipart_threshold_mb * _MB:
                expected = self._put(client, key, parcel.zip_path, size)
            else:
                expected = self._multipart(client, key, parcel.zip_path, cancel)
            self._verify(client, key, size, expected, where)
        except ClientError as exc:
            raise DeliveryError(self._explain(exc, where)) from None
        except (EndpointConnectionError, ConnectTimeoutError) as exc:
            raise DeliveryError(f"cannot connect to the S3 endpoint: {exc}", reachable=False) from None
        except NoCredentialsError:
            raise DeliveryError("no S3 credentials: set access_key_id and secret_env or secret_file (or the "
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY variables)") from None
        except BotoCoreError as exc:
            raise DeliveryError(f"the upload to {where} failed: {exc}") from None
        return frozenset({parcel.rel})

    def _client(self) -> S3Client:
        cfg = self.cfg
        secret = read_secret(cfg.secret_env, cfg.secret_file, "S3 secret access key")
        config = BotoConfig(
            connect_timeout=cfg.timeout_seconds,
            read_timeout=cfg.timeout_seconds,
            retries={"max_attempts": 1},  # the delivery queue does the retrying, with its backoff
            s3={"addressing_style": "path"} if cfg.endpoint_url else None,
        )
        verify: str | bool = str(cfg.ca_file) if cfg.ca_file is not None else cfg.verify_tls
        # A session per attempt: boto3's default session is not safe to share between threads.
        session = boto3.session.Session()
        client: S3Client = session.client(
            "s3", region_name=cfg.region, endpoint_url=cfg.endpoint_url, verify=verify, config=config,
            aws_access_key_id=cfg.access_key_id, aws_secret_access_key=secret,
        )
        return client

    def _put(self, client: S3Client, key: str, path: Path, size: int) -> _Expected:
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                sha.update(chunk)
                md5.update(chunk)
            fh.seek(0)
            client.put_object(
                Bucket=self.cfg.bucket, Key=key, Body=fh, ContentLength=size, ContentType="application/zip",
                ChecksumSHA256=_b64(sha.digest()), ContentMD5=_b64(md5.digest()),
                Metadata={"sha256": sha.hexdigest()},
            )
        return _Expected(_b64(sha.digest()), md5.hexdigest())

    def _multipart(self, client: S3Client, key: str, path: Path, cancel: threading.Event) -> _Expected:
        bucket, part_size = self.cfg.bucket, self.cfg.part_size_mb * _MB
        upload = client.create_multipart_upload(Bucket=bucket, Key=key, ContentType="application/zip",
                                                ChecksumAlgorithm="SHA256")
        upload_id = upload["UploadId"]
        parts: list[dict[str, Any]] = []
        shas: list[bytes] = []
        md5s: list[bytes] = []
        try:
            with path.open("rb") as fh:
                while body := fh.read(part_size):
                    if cancel.is_set():
                        raise Stopped()
                    sha, md5 = hashlib.sha256(body).digest(), hashlib.md5(body, usedforsecurity=False).digest()
                    number = len(parts) + 1
                    answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                                Body=body, ChecksumSHA256=_b64(sha), ContentMD5=_b64(md5))
                    parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": _b64(sha)})
                    shas.append(sha)
                    md5s.append(md5)
            client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                             MultipartUpload={"Parts": parts})  # type: ignore[typeddict-item]
        except BaseException:
            # If even the abort fails, the store's lifecycle rules expire the parts; the attempt failed anyway.
            with contextlib.suppress(BotoCoreError, ClientError):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        n = len(parts)
        return _Expected(f"{_b64(hashlib.sha256(b''.join(shas)).digest())}-{n}",
                         f"{hashlib.md5(b''.join(md5s), usedforsecurity=False).hexdigest()}-{n}")

    def _verify(self, client: S3Client, key: str, size: int, expected: _Expected, where: str) -> None:
        head = client.head_object(Bucket=self.cfg.bucket, Key=key, ChecksumMode="ENABLED")
        if head.get("ContentLength") != size:
            raise DeliveryError(f"{where} holds {head.get('ContentLength')} bytes after the upload, not {size}")
        sha = head.get("ChecksumSHA256")
        if sha:
            if _strip_parts(sha) != _strip_parts(expected.sha256):
                raise DeliveryError(f"{where}: the stored object's SHA-256 differs from the ZIP's; it is sent again")
            return
        etag = str(head.get("ETag", "")).strip('"')
        if etag != expected.etag:
            raise DeliveryError(f"{where}: the store reports neither a SHA-256 nor a matching MD5 ETag, so the "
                                "object cannot be confirmed")

    def _explain(self, exc: ClientError, where: str) -> str:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _REFUSED or status == 403:
            return (f"the S3 store refused the credentials or the permission for {where} ({code or status}): "
                    "check access_key_id, the secret (secret_env or secret_file) and the bucket policy")
        if code == "NoSuchBucket":
            return f"the bucket {self.cfg.bucket!r} does not exist at the S3 endpoint; create it or fix bucket"
        if code in _DAMAGED:
            return f"{where}: the store received damaged bytes ({code}); the ZIP is sent again"
        return f"the upload to {where} failed: {code or status}: {error.get('Message', '')}".rstrip(": ")


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _strip_parts(checksum: str) -> str:
    return checksum.rsplit("-", 1)[0] if "-" in checksum else checksum
