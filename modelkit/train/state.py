"""A resumable training state: ``state.safetensors`` (tensors) + ``state.json`` (everything else).

Nothing is pickled. The tensors are the trainable parameters (``param.<name>``) and each tensor of
the optimizer state (``optim.<param index>.<key>``, for AdamW ``step``, ``exp_avg``, ``exp_avg_sq``)
and, with ``train.ema``, the moving average (``ema.<name>``);
the JSON holds the step counters, the optimizer's parameter groups and scalar state, the LR
scheduler, the gradient scaler and a fingerprint of the settings a resume must not change. The JSON
is written last, so a folder without it is an interrupted save and is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import TrainingError
from ..paths import write_text_atomic
from .export import save_tensors

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
FORMAT = "modelkit.train.state/1"


@dataclass(frozen=True)
class Counters:
    """Where a run stands: optimizer steps done and micro-batches consumed."""

    step: int
    micro: int


def save_state(folder: str, counters: Counters, params: dict[str, Any], optimizer: Any, scheduler: Any,
               scaler: Any, fingerprint: dict[str, Any], force: bool = False, extra: dict[str, Any] | None = None) -> str:
    """Write a state folder (created if needed); returns its path. ``extra``: more tensors to keep
    (``ema.<name>``: the EMA), read back with ``load_extra``.

    Raises:
        OutputExistsError: the folder already holds a state and ``force`` is false.
    """
    os.makedirs(folder, exist_ok=True)
    tensors: dict[str, Any] = {f"param.{k}": v for k, v in params.items()}
    tensors.update(extra or {})
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if _is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            elif isinstance(value, dict):  # bitsandbytes nests its state tensors one level down
                nested = scalars.setdefault(str(idx), {}).setdefault(key, {})
                for sub, v in value.items():
                    if _is_tensor(v):
                        tensors[f"optim.{idx}.{key}/{sub}"] = v
                    else:
                        nested[sub] = v
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {
        "format": FORMAT, "step": counters.step, "micro": counters.micro, "fingerprint": fingerprint,
        # A scheduler may leave tensors in the groups (transformers' AdafactorSchedule)
        "optimizer": {"param_groups": _jsonable(opt["param_groups"]), "scalars": _jsonable(scalars)},
        "scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None,
        "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
    }
    save_tensors(os.path.join(folder, STATE_TENSORS), tensors, {"format": FORMAT}, force=force)
    write_text_atomic(os.path.join(folder, STATE_JSON), json.dumps(meta, indent=1, sort_keys=True))
    return folder


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "dtype") and hasattr(value, "shape")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "numel") and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None  # functions (LambdaLR's lambdas) are rebuilt from the config, not saved


def load_extra(folder: str, prefix: str) -> dict[str, Any]:
    """The state's tensors whose names start with ``prefix`` (``ema.``).

    Raises:
        TrainingError: the state holds none (it was saved without that feature).
    """
    from .. import load

    tensors = {k: v for k, v in load(os.path.join(folder, STATE_TENSORS)).items() if k.startswith(prefix)}
    if not tensors:
        raise TrainingError(folder, f"holds no {prefix}* tensors (it was saved without them)",
                            "Resume with the settings the state was saved with")
    return tensors


#: Fingerprint entries added after states were first written, and the value a state written before
#: then had in effect: no optimizer arguments; an older EMA state trained without the warm-up.
_BEFORE: dict[str, Any] = {"optimizer_args": {}}
_BEFORE_EMA: dict[str, Any] = {"ema_warmup": False}
#: Fingerprint entries named as the config keys a user sets.
_KEYS = {"ema": "train.ema_decay", "ema_warmup": "train.ema_warmup", "seed": "train.seed",
         "batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "optimizer": "optimizer.name",
         "optimizer_args": "optimizer.args"}


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each setting that differs between a state's fingerprint and this run's, as
    ``KEY (the state: A, this run: B)`` with the config key (``train.seed``, ``network.dim``)."""
    saved = {**_BEFORE, **(_BEFORE_EMA if "ema" in saved else {}), **saved}
    out = []
    for key in sorted(now):
        was, new = saved.get(key), now[key]
        if was == new:
            continue
        if isinstance(was, dict) and isinstance(new, dict):
            out += [f"{_KEYS.get(key, key)}.{k} (the state: {was.get(k)!r}, this run: {new.get(k)!r})"
                    for k in sorted(set(was) | set(new)) if was.get(k) != new.get(k)]
        else:
            out.append(f"{_KEYS.get(key, key)} (the state: {'none' if was is None else repr(was)}, this run: "
                       f"{'none' if new is None else repr(new)})")
    return out


def load_state(folder: str, params: dict[str, Any], optimizer: Any, scheduler: Any, scaler: Any,
               fingerprint: dict[str, Any]) -> Counters:
    """Restore parameters, optimizer, scheduler and scaler in place from a state folder.

    Args:
        folder: a folder written by ``save_state``.
        params: the run's trainable parameters by name (must match the saved ones exactly).
        optimizer, scheduler, scaler: restored with ``load_state_dict`` (scaler may be None).
        fingerprint: this run's settings; a change in any of them is refused.

    Returns:
        The counters to continue from.

    Raises:
        TrainingError: a missing, interrupted or mismatching state.
    """
    import torch

    from .. import load

    meta_path = os.path.join(folder, STATE_JSON)
    if not os.path.isfile(meta_path):
        raise TrainingError(folder, f"has no {STATE_JSON} (not a state folder, or its save was interrupted)",
                            "Point output.resume at a folder written by a save of modelkit train")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise TrainingError(folder, f"is a state of format {meta.get('format')!r}, not {FORMAT}")
    changed = fingerprint_changes(meta.get("fingerprint", {}), fingerprint)
    if changed:
        raise TrainingError(folder, f"was saved with other settings: {'; '.join(changed)}",
                            "Resume with the settings the state was saved with")
    tensors = load(os.path.join(folder, STATE_TENSORS))
    names = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if names != set(params):
        missing = sorted(set(params) - names)[:1] or sorted(names - set(params))[:1]
        raise TrainingError(folder, f"holds other trainable tensors than this run (first difference: {missing[0]!r})")
    with torch.no_grad():
        for name, p in params.items():
            saved = tensors[f"param.{name}"]
            if tuple(saved.shape) != tuple(p.shape):
                raise TrainingError(folder, f"tensor {name!r} has shape {list(saved.shape)}, the run has {list(p.shape)}")
            p.copy_(saved.to(p.dtype))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            outer, _, sub = name.partition("/")
            if sub:
                state.setdefault(int(idx), {}).setdefault(outer, {})[sub] = value.clone()
            else:
                state.setdefault(int(idx), {})[name] = value.clone()
    for idx, entries in meta["optimizer"]["scalars"].items():
        for name, entry in entries.items():
            if isinstance(entry, dict):
                state.setdefault(int(idx), {}).setdefault(name, {}).update(entry)
            else:
                state.setdefault(int(idx), {})[name] = entry
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if scheduler is not None and meta.get("scheduler"):
        sched = dict(meta["scheduler"])
        sched.pop("lr_lambdas", None)
        scheduler.load_state_dict({**scheduler.state_dict(), **sched})
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return Counters(int(meta["step"]), int(meta["micro"]))
