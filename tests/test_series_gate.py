"""The release gate across a series: one file's output that carries an identifier only another file of the
series holds (an instance's original UID quoted in a neighbour's comments) stops the whole series."""

from __future__ import annotations

import json

import pytest
from pydicom import dcmread

from anondrop import config as config_mod
from anondrop import pipeline
from anondrop.batch import run_once
from tests.conftest import Site, sample, write_instances


@pytest.mark.parametrize("headers", ["kept as they are", "compressed"])
def test_another_files_uid_in_a_kept_comment_stops_the_series(
    site: Site, monkeypatch: pytest.MonkeyPatch, headers: str
) -> None:
    if headers == "compressed":  # a series whose headers outgrow the budget for keeping them uncompressed
        monkeypatch.setattr(pipeline, "_HEADERS_PLAIN", 0)
    files = write_instances(site.inbox / "ct", dcmread(sample("CT_small.dcm")), 4)
    neighbour = dcmread(files[0]).SOPInstanceUID
    ds = dcmread(files[2])
    ds.ImageComments = f"compare with {neighbour}"
    ds.save_as(files[2])
    site.write_config(extra='[processing]\nworkers = 1\n', profile_extra='rules = { ImageComments = "K" }\n')

    summary = run_once(config_mod.load(site.config))

    assert summary.exit_code == 3
    assert site.outputs() == []
    reasons = [json.loads(p.read_text()) for p in sorted(site.quarantine.glob("*/reason.json"))]
    assert [r["code"] for r in reasons] == ["gate-hit"]
    assert "instance 3" in json.dumps(reasons[0])
    assert neighbour not in json.dumps(reasons[0])  # the reason names where, never the value


def test_the_same_comment_without_the_neighbours_uid_goes_out(site: Site) -> None:
    files = write_instances(site.inbox / "ct", dcmread(sample("CT_small.dcm")), 4)
    ds = dcmread(files[2])
    ds.ImageComments = "compare with the previous slice"
    ds.save_as(files[2])
    site.write_config(extra='[processing]\nworkers = 1\n', profile_extra='rules = { ImageComments = "K" }\n')

    summary = run_once(config_mod.load(site.config))

    assert summary.exit_code == 0
    assert len(site.outputs()) == 1
