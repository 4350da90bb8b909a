"""Is the ``[train]`` extra installed? Answered with ``importlib.util.find_spec``, importing nothing heavy."""

from __future__ import annotations

import importlib.util

from ..errors import MissingExtraError

#: import name -> distribution name, for every package the ``[train]`` extra brings.
TRAIN_MODULES = {
    "diffusers": "diffusers",
    "peft": "peft",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "PIL": "pillow",
}
PIP_COMMAND = "pip install 'modelkit[train]'"


def missing_extras() -> list[str]:
    """The distributions of the ``[train]`` extra that cannot be imported, in a stable order."""
    missing = []
    for module, dist in TRAIN_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or half-removed install
            found = False
        if not found:
            missing.append(dist)
    return missing


def require_extras() -> None:
    """Raise unless every package of the ``[train]`` extra can be imported.

    Raises:
        MissingExtraError: names the missing packages and the pip command that installs them.
    """
    missing = missing_extras()
    if missing:
        raise MissingExtraError(None, f"modelkit train needs the [train] extra ({', '.join(missing)} not installed)",
                                f"Run: {PIP_COMMAND}")
