"""``modelkit[train]``: LoRA/LoCon, textual inversion, hypernetworks and DreamBooth on diffusers + peft.

Importing this package is cheap: diffusers, peft, transformers and accelerate are imported only by
the modules that train (``base``, ``loop``, ``methods``), never by ``config``, ``extra`` or the core.
Every output goes through the core's atomic ``.safetensors`` writer.

Example:
    >>> from modelkit.train import load_config, train  # doctest: +SKIP
    >>> result = train(load_config("train.toml", "lora", ["optimizer.lr=1e-4"]))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import METHODS, Config, load_config, render_toml
from .extra import missing_extras, require_extras

if TYPE_CHECKING:
    from .loop import TrainResult


def train(config: Config, progress: Any = None, on_skip: Any = None, on_start: Any = None) -> TrainResult:
    """Train with ``config`` and write the outputs; see ``modelkit.train.loop.train``.

    Raises:
        MissingExtraError: the ``[train]`` extra is not installed.
    """
    require_extras()
    from .loop import train as _train

    return _train(config, progress=progress, on_skip=on_skip, on_start=on_start)


__all__ = ["METHODS", "Config", "load_config", "missing_extras", "render_toml", "require_extras", "train"]
