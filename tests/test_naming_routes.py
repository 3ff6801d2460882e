"""Folder names, output naming templates, routes, per-drop overrides and the crosswalk, end to end.

Each test writes a config, drops series into the inbox the way people organise them ("ProjectA/Case 12/..."),
runs `anondrop once` as a real process and looks at what a user sees: the ZIP paths in the outbox, the values
inside the DICOM entries, the quarantine, the exit code.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from anondrop import config as config_mod
from tests.conftest import CliResult, Site, sample, write_instances
from tests.test_daemon import SETTLE, TIMINGS, Daemon, start_daemon, wait_for, wait_outputs  # noqa: F401 (the fixture)

NAME = "Quillfeather^Ottoline"
PID = "QF-5521-77"
ACCESSION = "ACC88421"
STUDY_DATE = "20190314"


@dataclass(frozen=True)
class Dropped:
    folder: Path
    study_uid: str
    series_uid: str


def drop_series(folder: Path, n: int = 3, *, modality: str = "CT", name: str = NAME, pid: str = PID,
                study_uid: str | None = None, series_number: int = 7) -> Dropped:
    ds = dcmread(sample("CT_small.dcm"))
    ds.PatientName = name
    ds.PatientID = pid
    ds.AccessionNumber = ACCESSION
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = STUDY_DATE
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    write_instances(folder, ds, n)
    return Dropped(folder, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def entries(zip_path: Path) -> dict[str, object]:
    """Entry name -> dataset (manifest.json -> its dict)."""
    out: dict[str, object] = {}
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            data = zf.read(name)
            out[name] = json.loads(data) if name == "manifest.json" else dcmread(io.BytesIO(data))
    return out


def datasets(zip_path: Path) -> list:  # type: ignore[type-arg]
    return [v for k, v in entries(zip_path).items() if k != "manifest.json"]


def rel_outputs(site: Site) -> list[str]:
    return [str(p.relative_to(site.outbox)) for p in site.outputs()]


def quarantine_reasons(site: Site) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(site.quarantine.glob("*/reason.json"))]


def once(site: Site, cli: Callable[..., CliResult], env: dict[str, str] | None = None) -> CliResult:
    return cli("once", "--config", site.config, env=env)


def daemon_config(site: Site, extra: str) -> None:
    site.write_config(extra=TIMINGS + "\n" + extra)


def load_error(site: Site) -> str:
    with pytest.raises(config_mod.ConfigError) as exc:
        config_mod.load(site.config)
    return str(exc.value)


# ---------------------------------------------------------------------------------------------------------
# Templates: validated when the config loads
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("naming", "options", "expected"),
    [
        ('path = "{PatientID}/{Nonsense}.zip"', [], "unknown field {Nonsense}"),
        ('path = "{PatientID}/{StudyDate}.zip"', ["retain_longitudinal_full_dates"],
         "retain_longitudinal_full_dates keeps the original dates"),
        ('path = "{StudyInstanceUID}/{SeriesNumber}.zip"', ["retain_uids"], "retain_uids keeps the original UIDs"),
        ('path = "{PatientID}/{InstitutionName}.zip"', ["retain_institution_identity"],
         "keeps its original value"),
        ('path = "{PatientID}/{ProtocolName}_{SeriesDescription}.zip"\nentry = "{ConvolutionKernel}.dcm"', [],
         "{ConvolutionKernel} would put an original identifier into output names under route 'default': it is "
         "free text"),
        ('path = "{folders}/{PatientID}.zip"', [], "needs preserve_folders = true"),
        ('path = "../{PatientID}.zip"', [], "'..' levels are not allowed"),
        ('path = "{PatientID}/{SeriesNumber}"', [], "must end with '.zip'"),
        ('entry = "{index}/{SOPInstanceUID}.dcm"', [], "has no '/'"),
        ('path = "{PatientID}/{SeriesNumber:q}.zip"', [], "{SeriesNumber:q}"),
        ('path = "{index}.zip"', [], "{index} cannot be used here"),
    ],
)
def test_a_template_field_that_is_unknown_or_would_carry_an_original_is_refused(
    site: Site, naming: str, options: list[str], expected: str
) -> None:
    site.write_config(options=options, extra=f"[naming]\n{naming}\n")
    assert expected in load_error(site)


def test_a_rule_that_keeps_an_attribute_makes_its_field_unusable_in_names(site: Site) -> None:
    site.write_config(
        profile_extra='rules = { AccessionNumber = "K" }',
        extra='[naming]\npath = "{PatientID}/{AccessionNumber}.zip"\n',
    )
    assert "{AccessionNumber}" in load_error(site)


def test_templates_render_de_identified_values_with_format_specs(site: Site, cli: Callable[..., CliResult]) -> None:
    site.write_config(
        options=["retain_longitudinal_modified_dates"],
        extra='[naming]\npath = "{PatientID}/{StudyDate}/{SeriesNumber:03d}_{Modality}.zip"\n'
              'entry = "{Modality}_{InstanceNumber:04d}.dcm"\n',
    )
    drop_series(site.inbox / "export", n=3, series_number=7)
    res = once(site, cli)
    assert res.returncode == 0, res.stderr
    (out,) = site.outputs()
    ds = datasets(out)[0]
    assert ds.StudyDate != STUDY_DATE  # shifted
    assert out.relative_to(site.outbox).parts == (ds.PatientID, ds.StudyDate, "007_CT.zip")
    assert sorted(entries(out)) == ["CT_0001.dcm", "CT_0002.dcm", "CT_0003.dcm", "manifest.json"]


def test_with_retain_uids_the_default_names_use_keyed_digests_not_the_original_uids(
    site: Site, cli: Callable[..., CliResult]
) -> None:
    site.write_config(options=["retain_uids"])
    d = drop_series(site.inbox / "x")
    res = once(site, cli)
    assert res.returncode == 0, res.stderr
    (out,) = rel_outputs(site)
    assert d.study_uid not in out and d.series_uid not in out
    assert str(datasets(site.outputs()[0])[0].StudyInstanceUID) == d.study_uid  # the option itself works


# ---------------------------------------------------------------------------------------------------------
# Folder names
# ---------------------------------------------------------------------------------------------------------


def test_folder_names_are_left_out_by_default(site: Site, cli: Callable[..., CliResult]) -> None:
    drop_series(site.inbox / "ProjectA" / "Case 12")
    assert once(site, cli).returncode == 0
    (out,) = rel_outputs(site)
    assert "ProjectA" not in out and "Case" not in out


def test_preserve_folders_mirrors_the_source_path_into_the_outbox(site: Site, cli: Callable[..., CliResult]) -> None:
    site.write_config(extra="[naming]\npreserve_folders = true\n")
    drop_series(site.inbox / "ProjectA" / "Case 12" / "CT")
    res = once(site, cli)
    assert res.returncode == 0, res.stderr
    (out,) = site.outputs()
    ds = datasets(out)[0]
    assert out.relative_to(site.outbox).parts[:4] == ("ProjectA", "Case_12", "CT", ds.PatientID)


def test_folder_rules_keep_pseudonymise_substitute_and_drop_levels(site: Site, cli: Callable[..., CliResult]) -> None:
    site.write_config(extra="""
        [naming]
        preserve_folders = true
        path = "{folders}/{folders_flat}_{SeriesNumber}.zip"

        [[naming.folders]]
        level = 2
        action = "pseudonym"

        [[naming.folders]]
        level = 3
        action = "regex"
        pattern = '^Case (\\d+)$'
        replace = 'case-\\1'

        [[naming.folders]]
        level = 4
        action = "drop"
    """)
    drop_series(site.inbox / "ProjectA" / "Quillfeather Ottoline" / "Case 12" / "scanner-7" / "CT")
    res = once(site, cli)
    assert res.returncode == 0, res.stderr
    (out,) = site.outputs()
    pid = datasets(out)[0].PatientID
    assert out.relative_to(site.outbox).parts == (
        "ProjectA", pid, "case-12", "CT", f"ProjectA_{pid}_case-12_CT_7.zip"
    )


def test_the_gate_stops_a_kept_folder_name_holding_the_patients_name(
    site: Site, cli: Callable[..., CliResult]
) -> None:
    site.write_config(extra="[naming]\npreserve_folders = true\n")
    drop_series(site.inbox / "ProjectA" / "Ottoline Quillfeather 1961")
    res = once(site, cli)
    assert res.returncode == 3
    assert site.outputs() == []
    (reason,) = quarantine_reasons(site)
    assert reason["code"] == "gate-hit"
    assert "source folder name kept from level 2" in str(reason["message"])
    assert "Quillfeather" not in res.stdout + res.stderr


def test_a_route_can_allow_identifiers_in_kept_folder_names(site: Site, cli: Callable[..., CliResult]) -> None:
    site.write_config(extra="""
        [naming]
        preserve_folders = true

        [[routes]]
        name = "teaching"
        folder = "teaching"
        allow_folder_identifiers = true
    """)
    drop_series(site.inbox / "teaching" / "Quillfeather")
    res = once(site, cli)
    assert res.returncode == 0, res.stderr
    (out,) = rel_outputs(site)
    assert out.startswith("Quillfeather/")  # relative to the route's folder
    ds = datasets(site.outputs()[0])[0]
    assert "Quillfeather" not in str(ds.PatientName)  # the data itself is still de-identified


# ---------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------

ROUTES = """
[[destinations]]
name = "local"
kind = "outbox"

[[routes]]
name = "projectA"
folder = "projectA"
destinations = ["local"]
[routes.deidentify]
options = ["retain_longitudinal_full_dates"]

[[routes]]
name = "mr"
match = { Modality = ["MR", "MR*"] }
destinations = []
[routes.deidentify]
rules = { SeriesDescription = "K" }
"""


def test_routes_choose_policy_and_destinations_by_folder_then_attributes(
    site: Site, cli: Callable[..., CliResult]
) -> None:
    site.write_config(extra=ROUTES)
    drop_series(site.inbox / "projectA" / "s1", modality="CT")
    drop_series(site.inbox / "projectA" / "s2", modality="MR")  # folder first: first match wins
    drop_series(site.inbox / "other" / "s3", modality="MR")
    drop_series(site.inbox / "other" / "s4", modality="CT")
    res = once(site, cli)
    assert res.returncode == 0, res.stderr + res.stdout
    routes: dict[str, list[object]] = {}
    for out in site.outputs():
        manifest = entries(out)["manifest.json"]
        assert isinstance(manifest, dict)
        routes.setdefault(str(manifest["route"]), []).append(datasets(out)[0])
    assert {k: len(v) for k, v in routes.items()} == {"projectA": 2, "mr": 1, "default": 1}
    assert all(ds.StudyDate == STUDY_DATE for ds in routes["projectA"])  # full dates kept
    assert all(not ds.get("StudyDate") for ds in routes["mr"] + routes["default"])  # basic: dates emptied
    assert routes["mr"][0].Modality == "MR"
    # Destinations: projectA names "local", the default route sends to all (just "local"), mr to none.
    status = json.loads(cli("status", "--json", "--config", site.config).stdout)
    assert status["deliveries"]["by_destination"] == {"local": {"delivered": 3}}


def test_check_config_prints_the_route_table(site: Site, cli: Callable[..., CliResult]) -> None:
    site.write_config(extra=ROUTES)
    res = cli("check-config", "--config", site.config)
    assert res.returncode == 0, res.stderr
    for text in ("projectA/", "Modality ~ MR|MR*", "retain_longitudinal_full_dates", "default", "local"):
        assert text in res.stdout, text


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ('[[routes]]\nname = "all"\n[[routes]]\nname = "b"\nfolder = "b"\n', "put the catch-all route last"),
        ('[[routes]]\nname = "a"\nfolder = "a"\ndestinations = ["nowhere"]\n', "names destination 'nowhere'"),
        ('[[routes]]\nname = "a"\nmatch = { NotAKeyword = "x" }\n', "'NotAKeyword' is not a DICOM keyword"),
        ('[[routes]]\nname = "a"\nfolder = "../x"\n', "give a folder below the inbox"),
        ('[[routes]]\nname = "default"\nfolder = "x"\n', "kept for the catch-all route"),
        ('[[routes]]\nname = "a"\nfolder = "a"\n[routes.naming]\npath = "{StudyDate}.zip"\n'
         '[routes.deidentify]\noptions = ["retain_longitudinal_full_dates"]\n', "route 'a' naming"),
    ],
)
def test_invalid_routes_are_refused_with_the_reason(site: Site, routes: str, expected: str) -> None:
    site.write_config(extra=routes)
    assert expected in load_error(site)


# ---------------------------------------------------------------------------------------------------------
# Per-drop overrides
# ---------------------------------------------------------------------------------------------------------


def test_an_override_file_sets_the_values_that_go_out(site: Site, cli: Callable[..., CliResult]) -> None:
    site.write_config(extra='[input]\non_success = "delete"\n')
    course = site.inbox / "course"
    course.mkdir()
    (course / "anondrop.toml").write_text('StudyDescription = "Chest teaching set"\nPatientName = "Course^Default"\n')
    case = course / "case12"
    drop_series(case)
    (case / "anondrop.toml").write_text('PatientName = "Case 12"\nPatientID = "CASE12"\n')
    res = once(site, cli)
    assert res.returncode == 0, res.stderr
    (out,) = site.outputs()
    assert out.relative_to(site.outbox).parts[0] == "CASE12"
    found = entries(out)
    assert not [n for n in found if n.endswith(".toml")]
    for ds in datasets(out):
        assert str(ds.PatientName) == "Case 12"  # the nearer file wins
        assert ds.PatientID == "CASE12"
        assert ds.StudyDescription == "Chest teaching set"  # from the ancestor
    assert not course.exists()  # sources deleted: the override files went with the folder


def test_an_override_stays_while_its_folder_still_holds_something_else(
    site: Site, cli: Callable[..., CliResult]
) -> None:
    site.write_config(extra='[input]\non_success = "delete"\n')
    case = site.inbox / "case12"
    drop_series(case)
    (case / "anondrop.toml").write_text('PatientName = "Case 12"\n')
    (case / "IM0099.dcm.part").write_bytes(b"still being copied")  # ignored, not yet a source
    res = once(site, cli)
    assert res.returncode == 0, res.stderr
    assert {str(ds.PatientName) for ds in datasets(site.outputs()[0])} == {"Case 12"}
    assert sorted(p.name for p in case.iterdir()) == ["IM0099.dcm.part", "anondrop.toml"]


def test_an_invalid_override_sends_the_drop_to_quarantine(site: Site, cli: Callable[..., CliResult]) -> None:
    drop_series(site.inbox / "case1")
    (site.inbox / "case1" / "anondrop.toml").write_text('PatientName = "Case 1"\nPatientBirthDate = "19610314"\n')
    ok = drop_series(site.inbox / "case2")
    res = once(site, cli)
    assert res.returncode == 3
    (reason,) = quarantine_reasons(site)
    assert reason["code"] == "override-invalid"
    assert "'PatientBirthDate' cannot be set here" in str(reason["message"])
    assert len(site.outputs()) == 1  # the other drop went out
    assert ok.folder.exists()


def test_an_override_holding_the_real_name_is_stopped_by_the_gate(site: Site, cli: Callable[..., CliResult]) -> None:
    drop_series(site.inbox / "case1")
    (site.inbox / "case1" / "anondrop.toml").write_text('StudyDescription = "Ottoline Quillfeather, follow-up"\n')
    res = once(site, cli)
    assert res.returncode == 3
    assert site.outputs() == []
    assert quarantine_reasons(site)[0]["code"] == "gate-hit"


def test_an_override_inside_an_inbox_zip_applies_to_its_series(
    site: Site, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    d = drop_series(tmp_path / "stage" / "case7")
    (d.folder / "anondrop.toml").write_text('PatientName = "Case 7"\n')
    with zipfile.ZipFile(site.inbox / "upload.zip", "w") as zf:
        for f in sorted(d.folder.iterdir()):
            zf.write(f, f"case7/{f.name}")
    res = once(site, cli)
    assert res.returncode == 0, res.stderr + res.stdout
    (out,) = site.outputs()
    assert {str(ds.PatientName) for ds in datasets(out)} == {"Case 7"}
    assert site.quarantine.exists() is False or not list(site.quarantine.iterdir())


# ---------------------------------------------------------------------------------------------------------
# Crosswalk
# ---------------------------------------------------------------------------------------------------------

CROSSWALK = """
[crosswalk]
enabled = true
key_file = "{key}"
"""


def test_crosswalk_keeps_pairs_encrypted_and_exports_them_with_the_key(
    site: Site, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    key = tmp_path / "keys" / "crosswalk.key"
    key.parent.mkdir()
    key.write_bytes(os.urandom(32))
    site.write_config(extra=CROSSWALK.format(key=key))
    d = drop_series(site.inbox / "a")
    res = once(site, cli)
    assert res.returncode == 0, res.stderr
    ds = datasets(site.outputs()[0])[0]
    # At rest: no original anywhere in the state folder, and neither side of a pair in the crosswalk file.
    state = b"".join(p.read_bytes() for p in site.state.rglob("*") if p.is_file())
    store = b"".join(p.read_bytes() for p in site.state.glob("crosswalk.sqlite*"))
    assert store
    for text in (PID, ACCESSION, d.study_uid):
        assert text.encode() not in state, text
    for text in (str(ds.PatientID), str(ds.StudyInstanceUID)):
        assert text.encode() not in store, text
    out = tmp_path / "pairs.csv"
    res = cli("crosswalk", "export", "--out", out, "--config", site.config)
    assert res.returncode == 0, res.stderr
    assert (out.stat().st_mode & 0o777) == 0o600
    rows = {(r["kind"], r["original"]): r for r in csv.DictReader(out.open())}
    assert rows[("PatientID", PID)]["pseudonym"] == ds.PatientID
    assert rows[("StudyInstanceUID", d.study_uid)]["pseudonym"] == ds.StudyInstanceUID
    assert rows[("AccessionNumber", ACCESSION)]["study_pseudonym"] == ds.StudyInstanceUID
    assert len(rows) == 3
    # A second run over the same input adds no duplicate pairs.
    site.write_config(extra=CROSSWALK.format(key=key) + '\n[input]\non_success = "keep"\n')
    drop_series(site.inbox / "b", study_uid=d.study_uid)
    assert once(site, cli).returncode == 0
    assert cli("crosswalk", "export", "--out", out, "--force", "--config", site.config).returncode == 0
    assert len(list(csv.DictReader(out.open()))) == 3


def test_crosswalk_refuses_a_wrong_key_and_a_key_inside_the_state_folder(
    site: Site, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    key = tmp_path / "crosswalk.key"
    key.write_bytes(os.urandom(32))
    site.write_config(extra=CROSSWALK.format(key=key))
    drop_series(site.inbox / "a")
    assert once(site, cli).returncode == 0
    key.write_bytes(os.urandom(32))
    res = cli("crosswalk", "export", "--out", tmp_path / "x.csv", "--config", site.config)
    assert res.returncode == 1
    assert "written with another key" in res.stderr
    assert not (tmp_path / "x.csv").exists()
    site.state.mkdir(exist_ok=True)
    inside = site.state / "cw.key"
    inside.write_bytes(os.urandom(32))
    site.write_config(extra=CROSSWALK.format(key=inside))
    assert "is inside paths.state" in load_error(site)


def test_crosswalk_export_needs_the_crosswalk_on(site: Site, cli: Callable[..., CliResult], tmp_path: Path) -> None:
    res = cli("crosswalk", "export", "--out", tmp_path / "x.csv", "--config", site.config)
    assert res.returncode == 2
    assert "the crosswalk is off" in res.stderr


# ---------------------------------------------------------------------------------------------------------
# The daemon: the same rules while files arrive
# ---------------------------------------------------------------------------------------------------------


def test_daemon_reads_an_override_edited_while_the_series_is_still_arriving(
    site: Site, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    launch: Callable[[], Daemon] = request.getfixturevalue("start_daemon")
    daemon_config(site, extra='[naming]\npreserve_folders = true\n\n[input]\non_success = "delete"\n')
    stage = drop_series(tmp_path / "stage", n=6)
    case = site.inbox / "course" / "case12"
    case.mkdir(parents=True)
    (case / "anondrop.toml").write_text('PatientName = "Case 11"\n')
    launch()
    files = sorted(stage.folder.iterdir())
    for f in files[:3]:
        (case / f.name).write_bytes(f.read_bytes())
    time.sleep(SETTLE / 2)
    (case / "anondrop.toml").write_text('PatientName = "Case 12"\nStudyDescription = "Teaching"\n')
    time.sleep(SETTLE / 2)
    for f in files[3:]:
        (case / f.name).write_bytes(f.read_bytes())
    (out,) = wait_outputs(site, 1, timeout=30)
    found = datasets(out)
    assert len(found) == 6
    assert {str(ds.PatientName) for ds in found} == {"Case 12"}
    assert {ds.StudyDescription for ds in found} == {"Teaching"}
    assert out.relative_to(site.outbox).parts[:2] == ("course", "case12")
    wait_for(lambda: not (site.inbox / "course").exists(), 10, "the drop's folder (override included) to go")


def test_daemon_routes_by_folder_and_attribute(site: Site, request: pytest.FixtureRequest) -> None:
    launch: Callable[[], Daemon] = request.getfixturevalue("start_daemon")
    daemon_config(site, extra=ROUTES.replace('[[destinations]]\nname = "local"\nkind = "outbox"\n', "")
                  .replace('destinations = ["local"]\n', ""))
    launch()
    drop_series(site.inbox / "projectA" / "s1", modality="CT")
    drop_series(site.inbox / "elsewhere", modality="MR")
    outs = wait_outputs(site, 2, timeout=30)
    routes = {}
    for out in outs:
        manifest = entries(out)["manifest.json"]
        assert isinstance(manifest, dict)
        routes[manifest["route"]] = datasets(out)[0]
    assert set(routes) == {"projectA", "mr"}
    assert routes["projectA"].StudyDate == STUDY_DATE
    assert not routes["mr"].get("StudyDate")
