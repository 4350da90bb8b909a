"""Static scanning of model files (imports ``modelkit.formats`` only, never torch).

``modelkit.scan`` is both this package and the API function: calling the module scans paths
(``modelkit.scan("model.ckpt")``), so the public name and the package can share one spelling.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterable

from .engine import scan, scan_file
from .report import FileReport, Finding, ScanReport


class _CallableModule(types.ModuleType):
    def __call__(self, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> ScanReport:
        """Scan a path or paths; see ``modelkit.scan.engine.scan``."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        return scan(paths)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["FileReport", "Finding", "ScanReport", "scan", "scan_file"]
