"""Uploads to S3, against a real SeaweedFS S3 gateway on loopback ports: whole ZIPs, multipart ZIPs, checksums
confirmed by the store, and credentials the store refuses."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Site
from tests.deliver_servers import (
    S3Server,
    assert_no_phi,
    drop,
    make_series,
    once,
    s3_client,
    seaweedfs,
    status,
)

SECRET_ENV = "ANONDROP_TEST_S3_SECRET"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def write_config(site: Site, server: S3Server, *, attempts: int = 3) -> None:
    site.write_config(extra=textwrap.dedent(f"""\
        [input]
        on_success = "delete"

        [processing]
        workers = 1

        [[destinations]]
        name = "archive"
        kind = "s3"
        bucket = "{server.bucket}"
        prefix = "{site.root.name}-{site.root.parent.name}/"
        endpoint_url = "{server.endpoint}"
        access_key_id = "{server.access_key}"
        secret_env = "{SECRET_ENV}"
        multipart_threshold_mb = 5
        part_size_mb = 5
        max_attempts = {attempts}
        backoff_seconds = 0.2

        [[destinations]]
        name = "local"
        kind = "outbox"
        """))


def test_small_and_multipart_zips_arrive_whole_with_their_checksums(site: Site, tmp_path: Path, s3: S3Server) -> None:
    write_config(site, s3)
    small = drop(make_series(tmp_path / "small", 2), site.inbox / "a")
    large = drop(make_series(tmp_path / "large", 3, pixels=3 * 1024 * 1024), site.inbox / "b")  # ~9 MiB: 2 parts

    code, text = once(site.config, env={SECRET_ENV: s3.secret_key})

    assert code == 0, text
    outputs = site.outputs()
    assert len(outputs) == 2
    client = s3_client(s3)
    prefix = f"{site.root.name}-{site.root.parent.name}/"
    etags = []
    for zip_path in outputs:
        key = prefix + str(zip_path.relative_to(site.outbox))
        head = client.head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"], "the object must carry the checksum it was confirmed by"
        etags.append(head["ETag"])
        body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        assert body == zip_path.read_bytes()
        assert_no_phi(key, "an object key")
    assert sum(e.strip('"').endswith("-2") for e in etags) == 1, f"one ZIP goes as two parts: {etags}"
    assert not any(p.exists() for p in small + large)
    assert status(site.config)["deliveries"]["by_destination"]["archive"] == {"delivered": 2}
    assert s3.secret_key not in text


def test_refused_credentials_are_dead_lettered_and_the_outbox_still_confirms(
    site: Site, tmp_path: Path, s3: S3Server
) -> None:
    write_config(site, s3, attempts=2)
    sources = drop(make_series(tmp_path / "stage", 2), site.inbox)

    code, text = once(site.config, env={SECRET_ENV: "wrong-secret-key"})

    assert code == 3, text
    assert "refused the credentials" in text and "dead-lettered: archive" in text
    assert "confirmed by local" in text
    assert all(p.exists() for p in sources)
    [dead] = status(site.config)["deliveries"]["dead_letters"]
    assert dead["destination"] == "archive" and dead["attempts"] == 2

    code, text = once(site.config, env={SECRET_ENV: "wrong-secret-key"})
    assert code == 0 and "archive" not in text, "a dead letter waits for `deliveries retry`, not the next run"
