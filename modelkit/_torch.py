"""torch is optional: the core (scan, inspect, hash, convert, verify, diff) runs without it.

Code that needs torch asks for it here, and gets a one-line ``MissingExtraError`` (exit 2, the
pip command to run) where it is not installed, before anything is written.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import Any

from .errors import MissingExtraError

#: the command that installs what torch-backed features need
INSTALL = "pip install 'modelkit[torch]'"


@cache
def installed(package: str) -> bool:
    """Whether ``package`` can be imported (looked up without importing it; a broken install or
    an import hook that refuses it counts as not installed)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def have_torch() -> bool:
    """Whether torch is installed (looked up without importing it)."""
    return installed("torch")


def require_torch(what: str) -> Any:
    """The ``torch`` module, or a ``MissingExtraError`` saying that ``what`` needs it."""
    if have_torch():
        import torch

        return torch
    raise MissingExtraError(None, f"{what} needs torch, which is not installed",
                            f"Install it with: {INSTALL} (the CPU build is enough)")
