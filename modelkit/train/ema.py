"""An exponential moving average of the trained weights (``train.ema``).

After every optimizer step each tracked tensor moves toward the weights:
``ema <- ema + (1 - d) * (weights - ema)`` (``torch.lerp``), in fp32 on the weights' device. With
``train.ema_warmup`` (the default, as diffusers' ``EMAModel`` and OneTrainer do) ``d`` is
``min(decay, (1 + t) / (10 + t))`` at optimizer step ``t`` (0 for the first): the average follows the
weights closely at first, instead of keeping its starting values (zero for a LoRA's ``up``) for
thousands of steps; without it ``d`` is ``decay`` from the start.
The average is written as its own output, ``<name>-ema.safetensors`` (``-stepNNNNNN-ema`` for the
saves along the way), by the method's own exporter, so its layout is the main output's: the
averaged values are put in place of the weights for the export and the weights are put back
bit for bit. The resume state keeps the average as ``ema.<name>`` tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class EMA:
    """The moving average of ``params`` (the method's ``trainable()``), starting at their values."""

    def __init__(self, params: dict[str, Any], decay: float, warmup: bool = True):
        import torch

        self.decay = decay
        self.warmup = warmup
        self.params = params
        with torch.no_grad():
            self.shadow = {k: p.detach().to(torch.float32).clone() for k, p in params.items()}

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step ``step`` (0 for the first)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def update(self, step: int) -> None:
        """One step toward the current weights, after optimizer step ``step`` (0 for the first)."""
        import torch

        weight = 1.0 - self.decay_at(step)
        with torch.no_grad():
            for k, p in self.params.items():
                self.shadow[k].lerp_(p.detach().to(torch.float32), weight)

    def swapped(self, action: Callable[[], T]) -> T:
        """Run ``action`` with the average in place of the weights; the weights are restored exactly."""
        import torch

        with torch.no_grad():
            kept = {k: p.detach().clone() for k, p in self.params.items()}
            try:
                for k, p in self.params.items():
                    p.copy_(self.shadow[k].to(p.dtype))
                return action()
            finally:
                for k, p in self.params.items():
                    p.copy_(kept[k])

    def state(self) -> dict[str, Any]:
        """The average as ``ema.<name>`` tensors for the resume state."""
        return {f"ema.{k}": v for k, v in self.shadow.items()}

    def load(self, tensors: dict[str, Any]) -> None:
        """Restore from ``state()``'s tensors (missing names keep the current weights)."""
        import torch

        for k in self.shadow:
            saved = tensors.get(f"ema.{k}")
            if saved is not None:
                self.shadow[k] = saved.to(device=self.shadow[k].device, dtype=torch.float32).clone()


def ema_path(path: str) -> str:
    """``out/lora.safetensors`` -> ``out/lora-ema.safetensors``."""
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    return stem + "-ema.safetensors"


__all__ = ["EMA", "ema_path"]
