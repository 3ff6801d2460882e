"""The delivery queue in the journal: backoff, dead letters, retries, held sources, restarts; the
`[[destinations]]` config; and the outbox as a destination, end to end through `anondrop once`."""

from __future__ import annotations

import random
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from anondrop import config
from anondrop.deliver.queue import (
    BACKOFF_CAP_SECONDS,
    DEAD,
    DELIVERED,
    PENDING,
    DeliveryQueue,
    backoff_delay,
)
from anondrop.journal import Journal
from tests.conftest import Site, run_cli
from tests.deliver_servers import drop, make_series, once, status


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


def test_backoff_doubles_each_failure_with_bounded_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    for failures in range(1, 8):
        nominal = 10.0 * 2 ** (failures - 1)
        for _ in range(50):
            assert 0.75 * nominal <= backoff_delay(failures, 10.0, rng) <= 1.25 * nominal
    assert len({round(backoff_delay(3, 10.0, rng), 6) for _ in range(20)}) > 1, "the delays must be jittered"
    assert backoff_delay(40, 30.0, rng) <= 1.25 * BACKOFF_CAP_SECONDS


def test_failures_are_dead_lettered_after_max_attempts_and_retry_keeps_what_was_confirmed(journal: Journal) -> None:
    queue = DeliveryQueue(journal)
    queue.enqueue("2.25.1", "P/S/CT_1_2.25.1.zip", ["pacs"], ["a/IM1.dcm"])
    [row] = queue.due(1e12, {"pacs"})
    row = queue.fail(row, "peer down", frozenset({"IM00001.dcm"}), max_attempts=2, backoff_seconds=60)
    assert (row.state, row.attempts, row.confirmed) == (PENDING, 1, frozenset({"IM00001.dcm"}))
    assert queue.due(row.updated + 1, {"pacs"}) == [], "not due again before its backoff"
    row = queue.fail(row, "peer down", row.confirmed, max_attempts=2, backoff_seconds=60)
    assert row.state == DEAD and queue.dead() == [row]
    assert queue.due(1e12, {"pacs"}) == [], "a dead letter is not retried by itself"
    assert not queue.settled("2.25.1")

    assert queue.retry() == 1
    [again] = queue.due(1e12, {"pacs"})
    assert (again.state, again.attempts, again.confirmed) == (PENDING, 0, frozenset({"IM00001.dcm"}))
    assert queue.retry() == 0, "only dead letters are retried"


def test_sources_are_released_when_every_destination_confirmed_shared_ones_with_the_last_output(
    journal: Journal,
) -> None:
    queue = DeliveryQueue(journal)
    queue.enqueue("2.25.1", "one.zip", ["web", "scp"], ["x/1.dcm", "x/2.dcm"])
    queue.enqueue("2.25.2", "two.zip", ["web", "scp"], ["y/1.dcm"])
    queue.hold(["one.zip", "two.zip"], "export.zip")  # an inbox ZIP with members in both series
    rows = {(d.output, d.destination): d for d in queue.due(1e12, {"web", "scp"})}

    assert queue.confirm(rows["one.zip", "web"], frozenset({"one.zip"})) == (False, [])
    everywhere, released = queue.confirm(rows["one.zip", "scp"], frozenset({"one.zip"}))
    assert everywhere and sorted(released) == ["x/1.dcm", "x/2.dcm"], "export.zip is still held by two.zip"
    assert queue.settled("2.25.1") and not queue.settled("2.25.2")
    queue.confirm(rows["two.zip", "web"], frozenset())
    everywhere, released = queue.confirm(rows["two.zip", "scp"], frozenset())
    assert everywhere and sorted(released) == ["export.zip", "y/1.dcm"]
    assert not queue.is_held("export.zip")


def test_the_queue_is_where_it_was_after_a_restart(tmp_path: Path) -> None:
    first = Journal(tmp_path / "journal.sqlite")
    queue = DeliveryQueue(first)
    queue.enqueue("2.25.9", "nine.zip", ["web", "scp"], ["n.dcm"])
    [web, _scp] = sorted(queue.due(1e12, {"web", "scp"}), key=lambda d: d.destination, reverse=True)
    queue.confirm(web, frozenset({"nine.zip"}))
    first.close()

    again = DeliveryQueue(Journal(tmp_path / "journal.sqlite"))
    states = {d.destination: d.state for d in again.for_series("2.25.9")}
    assert states == {"web": DELIVERED, "scp": PENDING}
    [left] = again.due(1e12, {"web", "scp"})
    assert left.destination == "scp"
    assert again.confirm(left, frozenset()) == (True, ["n.dcm"])
    again.journal.close()


@pytest.mark.parametrize(
    ("destinations", "needle"),
    [
        ('name = "a"\nkind = "ftp"', r"destinations[0].kind: kind must be one of 'dicomweb', 'dimse'"),
        ('name = "a"', "destinations[0].kind: kind must be one of"),
        ('name = "a"\nkind = "dicomweb"', "destinations[0].url: required key is missing"),
        ('name = "a"\nkind = "dicomweb"\nurl = "http://u:p@h/dicom-web"', "no user or password"),
        ('name = "a"\nkind = "dicomweb"\nurl = "http://h/dicom-web?token=x"', "and no query in it"),
        ('name = "a"\nkind = "dicomweb"\nurl = "http://h"\nauth = "basic"\nsecret_env = "X"', "needs username"),
        ('name = "a"\nkind = "dicomweb"\nurl = "http://h"\nauth = "bearer"', "the token is missing"),
        ('name = "a"\nkind = "dicomweb"\nurl = "http://h"\nauth = "bearer"\nsecret_env = "X"\nsecret_file = "f"',
         "either by secret_env or by secret_file"),
        ('name = "a"\nkind = "dimse"\nhost = "h"\nport = 104\ncalled_aet = "A_TITLE_LONGER_THAN_16"',
         "destinations[0].called_aet: an AE title is 1 to 16"),
        ('name = "a"\nkind = "dimse"\nhost = "h"\nport = 104\ncalled_aet = "P"\ncolour = 1',
         "destinations[0].colour: unknown key"),
        ('name = "a"\nkind = "s3"\nbucket = "b-1"\nsecret_env = "X"', "without access_key_id"),
        ('name = "a"\nkind = "sftp"\nhost = "h"\nuser = "u"\nremote_dir = "/in"', "destinations[0].key_file"),
        ('name = "a"\nkind = "outbox"\nmax_attempts = 0', "destinations[0].max_attempts"),
        ('name = "a b"\nkind = "outbox"', "destinations[0].name"),
    ],
)
def test_destination_mistakes_are_refused_with_their_key_path(site: Site, destinations: str, needle: str) -> None:
    site.write_config(extra="[[destinations]]\n" + destinations + "\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(site.config)
    assert needle in str(exc.value)


def test_destination_names_must_differ_and_relative_files_resolve(site: Site) -> None:
    twice = '[[destinations]]\nname = "a"\nkind = "outbox"\n'
    site.write_config(extra=twice + twice.replace('"outbox"', '"dicomweb"\nurl = "http://h"'))
    with pytest.raises(config.ConfigError, match="destination name 'a' is used twice"):
        config.load(site.config)
    site.write_config(extra=textwrap.dedent("""\
        [[destinations]]
        name = "web"
        kind = "dicomweb"
        url = "https://pacs.example/dicom-web/"
        auth = "bearer"
        secret_file = "secrets/token"
        ca_file = "secrets/ca.pem"
        """))
    [web] = config.load(site.config).destinations
    assert isinstance(web, config.DicomWebDestination)
    assert web.secret_file == site.root / "secrets" / "token" and web.ca_file == site.root / "secrets" / "ca.pem"
    assert web.url == "https://pacs.example/dicom-web" and web.max_attempts == 8 and web.backoff_seconds == 30


def test_outbox_destination_confirms_then_sources_go_and_a_second_run_sends_nothing(site: Site, tmp_path: Path) -> None:
    site.write_config(extra=textwrap.dedent("""\
        [input]
        on_success = "move"

        [processing]
        workers = 1

        [[destinations]]
        name = "local"
        kind = "outbox"
        """))
    sources = drop(make_series(tmp_path / "stage", 3), site.inbox / "exam")

    code, text = once(site.config)

    assert code == 0, text
    assert "confirmed by local" in text
    assert len(site.outputs()) == 1
    assert not any(p.exists() for p in sources) and len(list(site.done.rglob("*.dcm"))) == 3
    info = status(site.config)["deliveries"]
    assert info["by_destination"] == {"local": {"delivered": 1}} and info["dead_letters"] == []

    code, text = once(site.config)
    assert code == 0 and "confirmed by" not in text
    assert len(site.outputs()) == 1


def test_retry_needs_an_id_or_all_and_refuses_a_delivery_that_is_not_dead(site: Site) -> None:
    result = run_cli("deliveries", "retry", "--config", site.config)
    assert result.returncode == 2 and "give a delivery ID" in result.stderr
    result = run_cli("deliveries", "retry", "42", "--config", site.config)
    assert result.returncode == 2 and "delivery 42: no such delivery" in result.stderr


def test_check_config_lists_destinations_and_warns_of_what_would_fail(site: Site) -> None:
    site.write_config(extra=textwrap.dedent("""\
        [[destinations]]
        name = "web"
        kind = "dicomweb"
        url = "https://pacs.example/dicom-web"
        auth = "bearer"
        secret_env = "ANONDROP_TEST_UNSET_TOKEN"
        ca_file = "missing-ca.pem"
        """))
    result = run_cli("check-config", "--config", site.config, env={"ANONDROP_TEST_UNSET_TOKEN": ""})
    assert result.returncode == 0, result.stderr
    assert "destinations: web (dicomweb)" in result.stdout
    assert "destinations[0] (web): secret_env: the environment variable ANONDROP_TEST_UNSET_TOKEN" in result.stderr
    assert "ca_file:" in result.stderr and "does not exist" in result.stderr
