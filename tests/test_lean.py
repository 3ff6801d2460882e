"""pydicom in anondrop's own processes: imported without its pixel stack and quiet, whoever imports it; and
the data dictionary read without importing pydicom at all (the main process of `once` does not)."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_pydicom_imported_by_anything_after_install_is_lean_and_quiet() -> None:
    # A sender or a rare fallback path imports pydicom long after start-up, by a plain `import`: it still
    # comes without numpy, Pillow and requests, and never warns with a value in the message.
    code = (
        "import sys, warnings\n"
        "from anondrop.lean import install\n"
        "install()\n"
        "assert 'pydicom' not in sys.modules\n"
        "from pydicom import config\n"
        "from pydicom.dataelem import DataElement\n"
        "assert not {'numpy', 'PIL', 'requests'} & sys.modules.keys(), sorted(sys.modules)\n"
        "assert config.settings.reading_validation_mode == config.IGNORE\n"
        "assert config.settings.writing_validation_mode == config.IGNORE\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    DataElement(0x00100030, 'DA', '19610315-but-not-a-date').value\n"
        "assert not caught, [str(w.message) for w in caught]\n"
        "import numpy\n"  # hidden from pydicom's import only, not from the program
        "print('ok')\n"
    )
    assert _run(code) == "ok"


def test_the_dictionary_answers_as_pydicom_without_importing_it() -> None:
    code = (
        "import sys\n"
        "from anondrop import dicomdict as d\n"
        "keywords = ['PatientName', 'PatientID', 'StudyInstanceUID', 'ReferencedImageSequence', 'PixelData',\n"
        "            'NoSuchKeyword', 'AcquisitionDateTime']\n"
        "mine = [(d.tag_for_keyword(k), d.dictionary_VR(d.tag_for_keyword(k) or 0x00100010)) for k in keywords]\n"
        "names = [d.keyword_for_tag(t) for t in (0x00100010, 0x0020000D, 0x7FE00010)]\n"
        "assert 'pydicom' not in sys.modules, 'the dictionary imported pydicom'\n"
        "from pydicom import datadict as p\n"
        "theirs = [(p.tag_for_keyword(k), p.dictionary_VR(p.tag_for_keyword(k) or 0x00100010)) for k in keywords]\n"
        "assert mine == theirs, (mine, theirs)\n"
        "assert names == [p.keyword_for_tag(t) for t in (0x00100010, 0x0020000D, 0x7FE00010)], names\n"
        "assert d.dictionary_VR(0x60003000) == p.dictionary_VR(0x60003000)\n"  # a repeating group: pydicom's
        "try:\n"
        "    d.dictionary_VR(0x00091001)\n"
        "except KeyError:\n"
        "    print('ok')\n"
    )
    assert _run(code) == "ok"
