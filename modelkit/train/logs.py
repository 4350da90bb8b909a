"""Optional TensorBoard logs (``output.tensorboard``): loss, learning rate, steps/s and sample images.

Written by ``torch.utils.tensorboard.SummaryWriter`` to ``output.log_dir`` (default
``<output.dir>/logs``); view them with ``tensorboard --logdir out/logs``. The ``tensorboard``
package comes with the ``[train]`` extra; when it is missing, a run that asks for logs stops
before any work with the pip command.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

from ..errors import ConfigError

PIP_COMMAND = "pip install tensorboard"


def log_dir(config: Any) -> str:
    """``output.log_dir``, or ``<output.dir>/logs``."""
    return str(config.output.log_dir or os.path.join(config.output.dir, "logs"))


def require_tensorboard() -> None:
    """Raise unless ``tensorboard`` can be imported.

    Raises:
        ConfigError: names ``output.tensorboard`` and the pip command.
    """
    try:
        found = importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        found = False
    if not found:
        raise ConfigError(None, "key output.tensorboard: the tensorboard package is not installed",
                          f"Run: {PIP_COMMAND}, or set output.tensorboard = false")


class TensorBoard:
    """One run's scalars under ``train/``: ``loss``, ``lr`` (``lr_group<i>`` for more groups),
    ``steps_per_s`` (over the last optimizer step) and ``epoch``.

    Raises:
        ConfigError: tensorboard is not installed.
    """

    def __init__(self, folder: str):
        require_tensorboard()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(None, f"key output.tensorboard: tensorboard cannot be imported ({exc})",
                              f"Run: {PIP_COMMAND}") from None
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.writer = SummaryWriter(log_dir=folder)
        self.last = time.perf_counter()

    def step(self, step: int, loss: float, lrs: list[float], epoch: float) -> None:
        """Log one optimizer step."""
        now = time.perf_counter()
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        for i, lr in enumerate(lrs):
            w.add_scalar("train/lr" if i == 0 else f"train/lr_group{i}", lr, step)
        w.add_scalar("train/steps_per_s", 1.0 / max(now - self.last, 1e-9), step)
        w.add_scalar("train/epoch", epoch, step)

    def resume_clock(self) -> None:
        """Start the steps/s clock again, after a step's saves and samples (they are not training speed)."""
        self.last = time.perf_counter()

    def close(self) -> None:
        self.writer.close()


__all__ = ["PIP_COMMAND", "TensorBoard", "log_dir", "require_tensorboard"]
