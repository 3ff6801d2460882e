"""pydicom without its optional pixel stack.

pydicom imports numpy, Pillow and requests when they are installed (for decoding pixel data and downloading
its test files), which costs more than pydicom itself: about 0.2 s per process. anondrop never decodes pixel
data and never downloads, so its own processes (the CLI and the workers) import pydicom with those hidden.
pydicom then works as it does where they are not installed, a configuration it supports.
"""

from __future__ import annotations

import sys

OPTIONAL = ("numpy", "PIL", "requests")


def import_pydicom() -> None:
    """Import pydicom with numpy, Pillow and requests hidden from it, unless something imported them already
    (then pydicom may be imported as usual). Only for processes that never ask pydicom for pixel values."""
    if "pydicom" in sys.modules:
        return
    hidden = [name for name in OPTIONAL if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        import pydicom  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
