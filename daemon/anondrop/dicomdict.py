"""The DICOM data dictionary (keyword <-> tag, VR), without importing all of pydicom.

The dictionary is pydicom's own table (the module `pydicom._dicom_dict`, generated from PS3.6), so the engine,
which runs on pydicom, and the code that only looks keywords up agree on every keyword and VR. Importing that
module the usual way runs pydicom's package init, which loads the whole of pydicom (about 0.08 s); the main
process of `anondrop once` reads no DICOM itself, so it loads just that table, from its file. Where pydicom
is imported already, or the table is not where it used to be, pydicom.datadict answers.

Only the standard elements are in the table; anything else (repeating groups such as 60xx, private tags)
is asked of pydicom.datadict.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

Entry = tuple[str, str, str, str, str]  # (VR, VM, name, retired, keyword)


@cache
def _table_module() -> ModuleType | None:
    spec = importlib.util.find_spec("pydicom")  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "_dicom_dict.py"
    if not path.is_file():
        return None
    # Its own name, so that pydicom, if imported later, loads the module as usual; the compiled file in
    # pydicom's __pycache__ is shared (it is named after the source path).
    loader = importlib.machinery.SourceFileLoader("anondrop._pydicom_dictionary", str(path))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))  # type: ignore[arg-type]
    loader.exec_module(mod)
    return mod


@cache
def _datadict() -> ModuleType:
    from anondrop.lean import install

    install()
    import pydicom.datadict

    return pydicom.datadict


@cache
def _entries() -> dict[int, Entry] | None:
    if "pydicom.datadict" in sys.modules:
        return None
    mod = _table_module()
    table = getattr(mod, "DicomDictionary", None)
    return table if isinstance(table, dict) else None


@cache
def _keywords() -> dict[str, int] | None:
    entries = _entries()
    if entries is None:
        return None
    return {entry[4]: tag for tag, entry in entries.items()}


def tag_for_keyword(keyword: str) -> int | None:
    """The tag of a standard element's keyword (None for anything else), as pydicom.datadict says."""
    keywords = _keywords()
    if keywords is None:
        return _datadict().tag_for_keyword(keyword)  # type: ignore[no-any-return]
    return keywords.get(keyword)


def keyword_for_tag(tag: int) -> str:
    """The keyword of a tag ('' when it has none), as pydicom.datadict says."""
    entries = _entries()
    if entries is not None and tag in entries:
        return entries[tag][4]
    return str(_datadict().keyword_for_tag(tag))


def dictionary_VR(tag: int) -> str:
    """The VR of a tag in the dictionary; KeyError for a tag it does not know, as pydicom.datadict."""
    entries = _entries()
    if entries is not None and tag in entries:
        return entries[tag][0]
    return str(_datadict().dictionary_VR(tag))
