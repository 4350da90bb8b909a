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

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log one more scalar (``validation/loss``)."""
        self.writer.add_scalar(tag, value, step)

    def resume_clock(self) -> None:
        """Start the steps/s clock again, after a step's saves and samples (they are not training speed)."""
        self.last = time.perf_counter()

    def close(self) -> None:
        self.writer.close()


WANDB_PIP = "pip install 'modelkit[wandb]'"


def require_wandb() -> None:
    """Raise unless ``wandb`` can be imported.

    Raises:
        ConfigError: names ``output.wandb`` and the pip command.
    """
    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(None, "key output.wandb: the wandb package is not installed",
                          f"Run: {WANDB_PIP}, or set output.wandb = false")


class WandB:
    """The same scalars as ``TensorBoard`` (``train/loss``, ``train/lr``..., ``validation/loss``) in
    one Weights & Biases run: project ``output.wandb_project``, run name ``output.name``, the
    resolved config as the run's config, files under the log folder. ``WANDB_MODE=offline`` keeps
    everything local; ``disabled`` makes every call a no-op.
    """

    def __init__(self, config: Any, folder: str):
        require_wandb()
        import wandb

        os.makedirs(folder, exist_ok=True)
        try:
            self.run = wandb.init(project=config.output.wandb_project, name=config.output.name, dir=folder,
                                  config=config.to_dict())
        except Exception as exc:  # noqa: BLE001 - no key, no network, a bad project: one line, before training
            why = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ConfigError(None, f"key output.wandb: wandb could not start a run ({why})",
                              "Run `wandb login` or set WANDB_API_KEY; WANDB_MODE=offline logs locally; "
                              "or set output.wandb = false") from None
        self.last = time.perf_counter()

    def step(self, step: int, loss: float, lrs: list[float], epoch: float) -> None:
        """Log one optimizer step."""
        now = time.perf_counter()
        row = {"train/loss": loss, "train/epoch": epoch, "train/steps_per_s": 1.0 / max(now - self.last, 1e-9)}
        for i, lr in enumerate(lrs):
            row["train/lr" if i == 0 else f"train/lr_group{i}"] = lr
        self.run.log(row, step=step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def resume_clock(self) -> None:
        self.last = time.perf_counter()

    def close(self) -> None:
        self.run.finish()


__all__ = ["PIP_COMMAND", "WANDB_PIP", "TensorBoard", "WandB", "log_dir", "require_tensorboard", "require_wandb"]
