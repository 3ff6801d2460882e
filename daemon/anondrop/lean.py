"""pydicom without its optional pixel stack, and never quoting values in warnings.

pydicom imports numpy, Pillow and requests when they are installed (for decoding pixel data and downloading
its test files), which costs more than pydicom itself: about 0.2 s per process. anondrop never decodes pixel
data and never downloads, so its own processes (the CLI and the workers) import pydicom with those hidden.
pydicom then works as it does where they are not installed, a configuration it supports.

pydicom's validation warnings quote the offending value, which may be a patient's name or date: such a line
must never reach a log. Its validation is switched off as soon as it is imported (values are checked by the
engine and the release gate instead).

`install()` arranges both for whatever imports pydicom later in the process (the engine, a sender, a rare
fallback path), without importing it now: the main process of `anondrop once` never needs pydicom, and its
workers import it meanwhile (see pipeline.Workers).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (importlib.abc itself imports importlib.resources: a tenth of the CLI's start-up)
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

OPTIONAL = ("numpy", "PIL", "requests")


def _quiet() -> None:
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE


def _lean_exec(loader: Loader, module: ModuleType) -> None:
    """Run pydicom's package init with numpy, Pillow and requests hidden (unless something imported them
    already), then switch its validation off."""
    hidden = [name for name in OPTIONAL if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        loader.exec_module(module)
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    _quiet()


class _LeanLoader:
    """pydicom's own loader, run by _lean_exec (a loader in the sense of importlib.abc.Loader)."""

    def __init__(self, real: Loader) -> None:
        self.real = real

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        _lean_exec(self.real, module)


class _Hook:
    """Finds pydicom as the other finders do, and has it loaded the lean way (once: then it steps aside).
    A meta path finder in the sense of importlib.abc.MetaPathFinder."""

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != "pydicom":
            return None
        _remove_hook()
        spec = importlib.util.find_spec("pydicom")
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _LeanLoader(spec.loader)  # type: ignore[assignment]
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Hook)]


def install() -> None:
    """From now on, pydicom is imported lean and quiet in this process, whoever imports it. (Where it is
    imported already, it is only made quiet: then something needed its pixel stack.)"""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    if "pydicom" in sys.modules:
        _quiet()
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


def import_pydicom() -> None:
    """Import pydicom now, lean and quiet (see install)."""
    install()
    import pydicom  # noqa: F401
