"""The optimizer registry: ``optimizer.name`` -> the class, its package, its documented defaults.

=============  =====================================  ==============================================
name           class (package)                        defaults (from the optimizer's own docs)
=============  =====================================  ==============================================
``adamw``      ``torch.optim.AdamW``                  betas (0.9, 0.999), eps 1e-8, weight decay 1e-2
``adamw8bit``  ``bitsandbytes.optim.AdamW8bit``       the same as AdamW
``prodigy``    ``prodigyopt.Prodigy``                 lr 1.0 (LR-free), betas (0.9, 0.999), eps 1e-8,
                                                      weight decay 0
``lion``       ``lion_pytorch.Lion`` (lion-pytorch)   betas (0.9, 0.99), weight decay 0
``lion8bit``   ``bitsandbytes.optim.Lion8bit``        betas (0.9, 0.99), weight decay 0
``adafactor``  ``transformers.optimization.Adafactor``  no lr (LR-free: relative step, warm-up init
                                                      off, parameter scaling); with an lr: a fixed
                                                      lr without relative step or scaling
=============  =====================================  ==============================================

Only the keys a user leaves unset take these defaults (``resolved`` fills them in, so
``--print-config`` shows them). Per-component rates: ``optimizer.unet_lr`` and
``optimizer.text_encoder_lr`` (LoRA also reads ``network.unet_lr``/``network.text_encoder_lr``).
This module imports no optimizer package at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer.

    Attributes:
        module: the module that must be importable; pip: the package to install for it.
        betas, eps, weight_decay: the documented defaults (``None``: the optimizer has no such setting).
        lr_free: the optimizer finds its own step size; ``lr`` is then its documented value (1.0 for
            Prodigy, none for Adafactor's relative step), not the method's usual rate.
        free_lr: the ``lr`` an LR-free optimizer takes when none is given.
        kohya: the name kohya writes in ``ss_optimizer``.
    """

    module: str
    pip: str
    kohya: str
    betas: tuple[float, float] | None = (0.9, 0.999)
    eps: float | None = 1e-8
    weight_decay: float = 0.0
    lr_free: bool = False
    free_lr: float | None = None


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch", "torch", "torch.optim.AdamW", weight_decay=1e-2),
    "adamw8bit": OptimizerSpec("bitsandbytes", "bitsandbytes", "bitsandbytes.optim.AdamW8bit", weight_decay=1e-2),
    "prodigy": OptimizerSpec("prodigyopt", "prodigyopt", "prodigyopt.Prodigy", lr_free=True, free_lr=1.0),
    "lion": OptimizerSpec("lion_pytorch", "lion-pytorch", "lion_pytorch.Lion", betas=(0.9, 0.99), eps=None),
    "lion8bit": OptimizerSpec("bitsandbytes", "bitsandbytes", "bitsandbytes.optim.Lion8bit", betas=(0.9, 0.99), eps=None),
    "adafactor": OptimizerSpec("transformers", "transformers", "transformers.optimization.Adafactor", betas=None,
                               eps=None, lr_free=True, free_lr=None),
}


def require_optimizer(name: str) -> None:
    """Raise unless the package of optimizer ``name`` can be imported.

    Raises:
        ConfigError: one line naming ``optimizer.name`` and the pip command.
    """
    spec = OPTIMIZERS[name]
    try:
        found = importlib.util.find_spec(spec.module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        found = False
    if not found:
        raise ConfigError(None, f"key optimizer.name={name}: the {spec.pip} package is not installed",
                          f"Run: pip install {spec.pip}, or use adamw")


def relative_step(config: Any) -> bool:
    """Adafactor without any learning rate: it sets its own (relative step), and no LR schedule applies."""
    oc = config.optimizer
    return bool(oc.name == "adafactor" and oc.lr is None and oc.unet_lr is None and oc.text_encoder_lr is None)


def component_lr(config: Any, component: str) -> float | None:
    """The learning rate of a parameter group of ``component`` (``unet`` or ``text_encoder``):
    ``optimizer.<component>_lr``, else (LoRA/LoCon) ``network.<component>_lr``, else ``optimizer.lr``."""
    oc = config.optimizer
    own = getattr(oc, f"{component}_lr", None)
    if own is not None:
        return float(own)
    if config.method in ("lora", "locon"):
        net = getattr(config.network, f"{component}_lr", None)
        if net is not None:
            return float(net)
    return None if oc.lr is None else float(oc.lr)


def make_optimizer(config: Any, groups: list[dict[str, Any]]) -> Any:
    """The optimizer of a resolved config over parameter groups.

    A group with a ``component`` key (``unet`` or ``text_encoder``) takes that component's rate
    (``component_lr``); other groups keep their ``lr``.

    Raises:
        ConfigError: the optimizer's package is not installed.
    """
    import torch

    oc = config.optimizer
    name = oc.name
    require_optimizer(name)
    spec = OPTIMIZERS[name]
    lr: Any = oc.lr if oc.lr is not None else spec.free_lr
    rel = relative_step(config)
    for g in groups:
        if "component" in g:
            g["lr"] = None if rel else component_lr(config, g["component"])
        elif g.get("lr") is None and not rel:
            g["lr"] = lr
    betas: Any = tuple(oc.betas) if oc.betas is not None else spec.betas
    eps: Any = oc.eps if oc.eps is not None else spec.eps
    wd = oc.weight_decay if oc.weight_decay is not None else spec.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if name in ("adamw8bit", "lion8bit"):
        bnb_optim: Any = importlib.import_module("bitsandbytes.optim")
        if name == "lion8bit":
            return bnb_optim.Lion8bit(groups, lr=lr, betas=betas, weight_decay=wd)
        return bnb_optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if name == "prodigy":
        from prodigyopt import Prodigy

        if len({g["lr"] for g in groups} - {0.0}) > 1:
            raise ConfigError(None, "key optimizer.unet_lr: Prodigy takes one learning rate for every parameter "
                              "group (or 0 for a frozen one)", "Give the UNet and text encoders the same rate")

        return Prodigy(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, betas=betas, weight_decay=wd)
    from transformers.optimization import Adafactor

    if rel:  # the documented LR-free setting
        return Adafactor(groups, lr=None, relative_step=True, scale_parameter=True, warmup_init=False,
                         weight_decay=wd)
    return Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=wd)


def make_scheduler(config: Any, optimizer: Any, total: int) -> Any:
    """The LR schedule (diffusers' ``get_scheduler``); Adafactor's relative step gets transformers'
    ``AdafactorSchedule``, which only reports the rates Adafactor chooses."""
    if relative_step(config):
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler

    sc = config.scheduler
    return get_scheduler(sc.name, optimizer, num_warmup_steps=sc.warmup_steps, num_training_steps=total,
                         num_cycles=sc.cycles, power=sc.power)


__all__ = ["OPTIMIZERS", "OptimizerSpec", "component_lr", "make_optimizer", "make_scheduler", "relative_step",
           "require_optimizer"]
