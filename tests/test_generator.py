"""The PS3.15 profile module is generated from the standard's tables, never typed by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anondrop.deid import _ps315
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "daemon" / "tools"))
import gen_ps315

SOURCE = gen_ps315.DEFAULT_SOURCE


def test_committed_module_matches_the_tables() -> None:
    """Regenerate from ../shared/dicom-standard and compare: any drift fails."""
    assert gen_ps315.generate(SOURCE) == gen_ps315.DEFAULT_OUT.read_text(encoding="utf-8")


def test_check_mode_reports_drift(tmp_path: Path) -> None:
    stale = tmp_path / "_ps315.py"
    stale.write_text(gen_ps315.DEFAULT_OUT.read_text(encoding="utf-8").replace("'X'", "'K'", 1))
    proc = subprocess.run(
        [sys.executable, str(REPO / "daemon/tools/gen_ps315.py"), "--check", "--out", str(stale)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1 and "differs" in proc.stdout


def test_a_damaged_table_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "tables"
    shutil.copytree(SOURCE, src)
    doc = json.loads((src / "e1_1.json").read_text(encoding="utf-8"))
    doc["rows"][0]["basic_profile"] = "K"  # e.g. a hand edit that keeps Accession Number
    (src / "e1_1.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(SystemExit, match="content_sha256"):
        gen_ps315.generate(src)


def test_every_row_is_there_with_its_edition() -> None:
    rows = json.loads((SOURCE / "e1_1.json").read_text(encoding="utf-8"))["rows"]
    assert _ps315.EDITION == "2026d"
    assert len(_ps315.ATTRIBUTES) + len(_ps315.REPEATING) + 1 == len(rows) == 657
    assert _ps315.ATTRIBUTES[0x00100010][1] == "Z"  # Patient's Name
    assert _ps315.ATTRIBUTES[0x00080018][2] == (("retain_uids", "K"),)
    assert len(_ps315.SAFE_PRIVATE) == 479
    assert _ps315.METHOD_CODES["basic"][0] == "113100"
    assert "2026d" in gen_ps315.DEFAULT_OUT.read_text(encoding="utf-8").splitlines()[2]
