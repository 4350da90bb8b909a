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
import inspect
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


def _own_key(name: str, arg: str) -> str | None:
    """Why constructor argument ``arg`` of optimizer ``name`` is not an ``optimizer.args`` key (it has
    a key of its own, or modelkit gives it); None where it may be one."""
    spec = OPTIMIZERS[name]
    if arg == "params":
        return "modelkit gives the parameters"
    if arg in ("lr", "weight_decay") or (arg == "betas" and spec.betas is not None) or \
            (arg == "eps" and spec.eps is not None):
        return f"set it with optimizer.{arg}"
    if arg == "args" and name.endswith("8bit"):
        return "bitsandbytes' own settings object; give its fields as optimizer.args keys"
    if name == "adafactor" and arg == "relative_step":
        return "Adafactor's relative step is on exactly when no optimizer.lr is given: set or unset optimizer.lr"
    return None


def optimizer_class(name: str) -> Any:
    """The class of optimizer ``name`` (its package imported now)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW
    if name in ("adamw8bit", "lion8bit"):
        bnb_optim: Any = importlib.import_module("bitsandbytes.optim")
        return bnb_optim.Lion8bit if name == "lion8bit" else bnb_optim.AdamW8bit
    if name == "prodigy":
        return importlib.import_module("prodigyopt").Prodigy
    if name == "lion":
        return importlib.import_module("lion_pytorch").Lion
    return importlib.import_module("transformers.optimization").Adafactor


def check_optimizer(config: Any) -> None:
    """Before anything loads: the optimizer's package is installed and every ``optimizer.args`` key
    is a parameter of its constructor that has no key of its own.

    Raises:
        ConfigError: one line naming the key.
    """
    oc = config.optimizer
    require_optimizer(oc.name)
    if not oc.args:
        return
    cls = optimizer_class(oc.name)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if n not in ("self", "params") and p.kind in
             (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key, value in oc.args.items():
        why = _own_key(oc.name, key)
        if why is not None:
            raise ConfigError(None, f"key optimizer.args.{key}: {why}")
        if key not in named and not takes_any:
            raise ConfigError(None, f"key optimizer.args.{key}: {cls.__name__} takes no argument {key!r}",
                              f"It takes: {', '.join(n for n in named if _own_key(oc.name, n) is None)}")
        default = params[key].default if key in params else None
        kind = _kind(default)
        if kind is not None and _kind(value) != kind and not (kind == "a number" and _kind(value) == "an integer"):
            raise ConfigError(None, f"key optimizer.args.{key}: {cls.__name__} expects {kind} (its default is "
                                    f"{default!r}), got {value!r}")
    _probe(config, cls)


def _probe(config: Any, cls: Any) -> None:
    """Build the optimizer over one dummy parameter on the training device and take one step, so that
    values it refuses (when built or at its first step) stop the run before anything loads."""
    import torch

    tc = config.train
    mps = getattr(torch.backends, "mps", None)
    device = "cpu" if tc.device == "cpu" else "cuda" if torch.cuda.is_available() else \
        "mps" if mps is not None and mps.is_available() else "cpu"
    p = torch.nn.Parameter(torch.zeros(8, 8, device=device))  # a matrix: Adafactor factors its state
    try:
        opt = make_optimizer(config, [{"params": [p]}])
        p.grad = torch.full_like(p, 1e-3)
        opt.step()
    except (ConfigError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: lion-pytorch exits when triton is missing
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ConfigError(None, f"key optimizer.args: {cls.__name__} refuses them ({why})",
                          "Fix or remove the optimizer.args the message names") from None


def _kind(value: Any) -> str | None:
    """What sort of value a default is (None: anything goes)."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (tuple, list)):
        return "an array"
    return None


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
        ConfigError: the optimizer's package is not installed, or it refuses ``optimizer.args``.
    """
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
    if name == "prodigy" and len({g["lr"] for g in groups} - {0.0}) > 1:
        raise ConfigError(None, "key optimizer.unet_lr: Prodigy takes one learning rate for every parameter "
                          "group (or 0 for a frozen one)", "Give the UNet and text encoders the same rate")
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": wd}
    if spec.betas is not None:
        kwargs["betas"] = betas
    if spec.eps is not None:
        kwargs["eps"] = eps
    if name == "adafactor":  # the documented LR-free setting, or a fixed lr without relative step or scaling
        kwargs.update(lr=None if rel else lr, relative_step=rel, scale_parameter=rel, warmup_init=False)
    kwargs.update(oc.args)  # [optimizer.args]: checked by check_optimizer; they win over modelkit's choices
    return optimizer_class(name)(groups, **kwargs)


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


__all__ = ["OPTIMIZERS", "OptimizerSpec", "check_optimizer", "component_lr", "make_optimizer", "make_scheduler",
           "optimizer_class", "relative_step", "require_optimizer"]
