"""Config loading: every mistake is refused with the key path and what to do."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from anondrop import config
from tests.conftest import CliResult, Site


def test_example_config_is_valid(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import REPO

    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    (tmp_path / "var" / "inbox").mkdir(parents=True)
    (tmp_path / "config.toml").write_text(text, encoding="utf-8")
    cfg = config.load(tmp_path / "config.toml")
    assert cfg.paths.inbox == tmp_path / "var" / "inbox"  # relative to the config file's folder


def test_relative_paths_resolve_against_the_config_folder(site: Site) -> None:
    cfg = config.load(site.config)
    assert cfg.paths.outbox == site.outbox and site.outbox.is_dir() and site.state.is_dir()


@pytest.mark.parametrize(
    ("extra", "profile_extra", "needle"),
    [
        ("[paths2]\nx = 1\n", "", "paths2: unknown key"),
        ("", "colour = 'blue'", "deidentify.colour: unknown key"),
        ("", "options = 3", "deidentify.options"),
        ("", "", None),
    ],
)
def test_unknown_keys_and_wrong_types(site: Site, extra: str, profile_extra: str, needle: str | None) -> None:
    site.write_config(extra=extra)
    if profile_extra.startswith("options"):
        site.config.write_text(site.config.read_text().replace("options = []", profile_extra))
    elif profile_extra:
        site.write_config(extra=extra, profile_extra=profile_extra)
    if needle is None:
        config.load(site.config)
        return
    with pytest.raises(config.ConfigError) as exc:
        config.load(site.config)
    assert needle in str(exc.value) and str(site.config) in str(exc.value)


def test_unknown_option_and_contradictory_dates(site: Site) -> None:
    site.write_config(options=["retain_everything"])
    with pytest.raises(config.ConfigError, match=r"deidentify\.options\[0\]"):
        config.load(site.config)
    site.write_config(options=["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"])
    with pytest.raises(config.ConfigError, match="contradict"):
        config.load(site.config)


def test_missing_inbox_and_output_inside_inbox(site: Site) -> None:
    site.inbox.rmdir()
    with pytest.raises(config.ConfigError, match=r"paths\.inbox: .* is not a folder"):
        config.load(site.config)
    site.inbox.mkdir()
    site.config.write_text(site.config.read_text().replace('outbox = "outbox"', 'outbox = "inbox/out"'))
    with pytest.raises(config.ConfigError, match=r"paths\.outbox: .* inside the inbox"):
        config.load(site.config)


def test_move_needs_done_and_bad_formats(site: Site) -> None:
    site.config.write_text(site.config.read_text().replace('done = "done"\n', ""))
    text = site.config.read_text() + "\n[input]\non_success = \"move\"\n"
    site.config.write_text(text)
    with pytest.raises(config.ConfigError, match=r"paths\.done"):
        config.load(site.config)
    site.write_config(profile_extra='patient_id_format = "ANON"')
    with pytest.raises(config.ConfigError, match=r"\{digest\}"):
        config.load(site.config)
    site.write_config(profile_extra="date_shift_days = [-10, 10]")
    with pytest.raises(config.ConfigError, match="must not contain 0"):
        config.load(site.config)
    site.write_config(profile_extra='rules = { NotAKeyword = "K" }')
    with pytest.raises(config.ConfigError, match="NotAKeyword"):
        config.load(site.config)


def test_check_config_cli(site: Site, cli: Callable[..., CliResult]) -> None:
    site.write_config(options=["retain_uids"], profile_extra='rules = { SeriesDescription = "K" }')
    res = cli("check-config", "--config", site.config)
    assert res.returncode == 0, res.stderr
    assert "retain_uids" in res.stdout and "2026d" in res.stdout and "SeriesDescription=K" in res.stdout
    site.write_config(options=["nonsense"])
    res = cli("check-config", "--config", site.config)
    assert res.returncode == 2 and "deidentify.options[0]" in res.stderr


def test_config_from_environment(site: Site, cli: Callable[..., CliResult]) -> None:
    res = cli("check-config", env={"ANONDROP_CONFIG": str(site.config)})
    assert res.returncode == 0 and str(site.config) in res.stdout
    res = cli("check-config", env={"ANONDROP_CONFIG": str(site.root / "missing.toml")})
    assert res.returncode == 2 and "no such config file" in res.stderr
