"""``modelkit lora merge`` and ``modelkit lora convert``: LoRA files in, one LoRA file out.

Without a checkpoint at hand, modules are identified through the key table of the base model's
reference layout (``KeyMap.reference``; the base comes from detection, or ``base=``), so kohya,
diffusers and PEFT names of the same layer meet.

* merge, exact (no ``rank``): the ranks are concatenated, ``down = [d_1; d_2; ...]`` and
  ``up = [r_1 s_1 u_1, r_2 s_2 u_2, ...]`` with ``alpha`` = the total rank, so ``up @ down`` is
  ``Σ r_i s_i u_i d_i`` exactly; plain LoRA/LoCon modules only.
* merge with ``rank``: each layer's full change ``Σ r_i ΔW_i`` (any format but (IA)^3 and DoRA,
  which depend on the base weights) is cut to ``rank`` by SVD.
* convert ``to``: kohya (``lora_down``/``lora_up``/``alpha``, tensors unchanged), diffusers
  (``unet.``/``text_encoder.``… ``lora_A``/``lora_B``) or PEFT (``base_model.model.``…); the last
  two have no alpha, so the scale is folded into ``lora_B`` when it is not 1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from ..._torch import require_torch
from ...errors import UsageError
from ...paths import check_output, require_safetensors_name
from .. import metadata as md
from ..convert import check_scan
from ..streaming import COMPUTE_DTYPES, OUTPUT_DTYPES, float_dtype, write_output
from . import math as lmath
from .bake import parse_spec
from .extract import LoraOutResult, lora_metadata, out_tensor, svd_factors
from .keymap import OUTPUT_STYLES, KeyMap, Target
from .loader import LoraFile, Module, load_lora

STYLES = tuple(OUTPUT_STYLES)


def _base(loras: list[LoraFile], base: str | None) -> str:
    if base is not None:
        if base not in ("sd1", "sd2", "sdxl"):
            raise UsageError(None, f"--base must be sd1, sd2 or sdxl, not {base!r}")
        return base
    found = {lf.base for lf in loras}
    known = sorted(b for b in found if b)
    if len(known) > 1:
        raise UsageError(None, f"the LoRAs are for different bases ({', '.join(known)})", "Merge LoRAs of one base model")
    if not known or known[0] not in ("sd1", "sd2", "sdxl"):
        what = known[0] if known else "not known"
        raise UsageError(loras[0].path, f"its base model is {what}", "Pass --base sd1|sd2|sdxl")
    return known[0]


def _targets(km: KeyMap, lf: LoraFile, allow_unmatched: bool, warnings: list[str]) -> list[tuple[Target, Module]]:
    out: list[tuple[Target, Module]] = []
    missing: list[str] = []
    for name, mod in lf.modules.items():
        t = km.lookup(name)
        if t is None:
            missing.append(name)
            continue
        why = lmath.misfit(mod, t.shape)
        if why is not None:
            raise UsageError(lf.path, f"module {name} does not fit the {km.base} layout: {why}", "Pass the right --base")
        out.append((t, mod))
    if missing and not allow_unmatched:
        raise UsageError(lf.path, f"{len(missing)} modules have names no {km.base} layer has: {', '.join(missing[:3])}",
                         "Check --base, or pass --allow-unmatched to leave them out")
    if missing:
        warnings.append(f"{lf.path}: {len(missing)} unmatched modules left out (e.g. {missing[0]})")
    return out


def merge_loras(
    loras: Sequence[str | tuple[str | os.PathLike[str], float]],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    base: str | None = None,
    dtype: str = "fp16",
    compute_dtype: str = "fp32",
    allow_unmatched: bool = False,
    force: bool = False,
    dry_run: bool = False,
    ignore_scan: bool = False,
    allow_overflow: bool = False,
) -> LoraOutResult:
    """Merge several LoRAs (``"file:ratio"`` or ``(file, ratio)``) into one kohya-format LoRA.

    Args:
        loras: the inputs and their ratios.
        out: the output file.
        rank: None for the exact merge (ranks concatenated); else the SVD rank of every layer.
        conv_rank: the SVD rank of 3x3 convolutions (default ``rank``).
        base: ``sd1``, ``sd2`` or ``sdxl`` when detection cannot tell.
        dtype, compute_dtype, allow_unmatched, force, dry_run, ignore_scan: as elsewhere.

    Returns:
        LoraOutResult.

    Raises:
        UsageError: bases differ, a module cannot be merged this way, or names match nothing.
    """
    require_torch("modelkit lora merge")
    t0 = time.perf_counter()
    specs = [parse_spec(s) for s in loras]
    if len(specs) < 2:
        raise UsageError(None, "lora merge takes two or more LoRAs")
    if rank is not None and rank < 1:
        raise UsageError(None, "--rank must be 1 or more")
    compute = float_dtype(compute_dtype, COMPUTE_DTYPES, "--compute-dtype")
    cast = float_dtype(dtype, OUTPUT_DTYPES, "--dtype")
    assert compute is not None and cast is not None
    target = require_safetensors_name(out)
    check_output(target, force=force, inputs=[p for p, _ in specs])
    warnings: list[str] = []
    for p, _ in specs:
        warnings += check_scan(p, ignore_scan)[1]
    loaded = [(load_lora(p), r) for p, r in specs]
    km = KeyMap.reference(_base([lf for lf, _ in loaded], base))
    groups: dict[tuple[str, tuple[int, int] | None], list[tuple[Target, Module, float]]] = {}
    for lf, ratio in loaded:
        for t, mod in _targets(km, lf, allow_unmatched, warnings):
            groups.setdefault((t.key, t.rows), []).append((t, mod, ratio))
    c, dt = compute.torch(), cast.torch()
    tensors = []
    overflow: dict[str, int] = {}
    for items in groups.values():
        t = items[0][0]
        name = km.name_for(t, "kohya")
        up, down = _exact(items, c) if rank is None else _svd(items, c, rank, conv_rank)
        tensors += [out_tensor(f"{name}.lora_down.weight", down, dt, overflow),
                    out_tensor(f"{name}.lora_up.weight", up, dt, overflow),
                    out_tensor(f"{name}.alpha", _scalar(float(down.shape[0])), dt, overflow)]
    how = "ranks concatenated (exact)" if rank is None else f"SVD to rank {rank}"
    changes = [f"merged {len(specs)} LoRAs into {len(groups)} modules, {how}: "
               + ", ".join(f"{os.path.basename(p)} x{r:g}" for p, r in specs)]
    record = {"loras": [{"file": os.path.basename(lf.path), "sha256": lf.sha256, "ratio": r} for lf, r in loaded],
              "rank": rank, "conv_rank": conv_rank, "compute_dtype": compute.name}
    meta = md.combine(lora_metadata(km.base, rank, conv_rank if rank else None), md.provenance(specs[0][0], changes),
                      {"modelkit.merge": json.dumps(record, separators=(",", ":"))})
    header, meta, stats = write_output(target, tensors, meta, source=specs[0][0], inputs=[p for p, _ in specs],
                                       force=force, dry_run=dry_run, allow_overflow=allow_overflow,
                                       overflow=lambda: overflow, dtype=cast.name)
    return LoraOutResult("merge", tuple(p for p, _ in specs), target, "dry-run" if dry_run else "written", km.base,
                         "kohya", len(groups), 0, rank, conv_rank, len(tensors), header.size, tuple(changes), meta,
                         tuple(warnings), stats, time.perf_counter() - t0)


def _scalar(v: float) -> Any:
    import torch

    return torch.tensor(v)


def _exact(items: list[tuple[Target, Module, float]], c: Any) -> tuple[Any, Any]:
    import torch

    shape = items[0][0].shape
    ups, downs = [], []
    for _t, mod, ratio in items:
        if mod.algo != "lora" or "mid" in mod.parts or mod.dora:
            raise UsageError(None, f"module {mod.name} is {mod.kind}; the exact merge concatenates plain LoRA ranks",
                             "Pass --rank to merge by SVD")
        r = int(mod.parts["down"].shape[0])
        downs.append(mod.parts["down"].to(c).reshape(r, *shape[1:]))
        ups.append(mod.parts["up"].to(c).reshape(shape[0], r, *([1] * (len(shape) - 2))) * (ratio * mod.scale()))
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _svd(items: list[tuple[Target, Module, float]], c: Any, rank: int, conv_rank: int | None) -> tuple[Any, Any]:
    shape = items[0][0].shape
    total = None
    for _t, mod, ratio in items:
        if mod.algo == "ia3" or mod.dora:
            raise UsageError(None, f"module {mod.name} is {mod.kind}, whose change depends on the base weights",
                             "Bake it into a checkpoint with `modelkit merge lora` instead")
        d = lmath.delta(mod, shape, c)
        total = d.mul_(ratio) if total is None else total.add_(d, alpha=ratio)
    assert total is not None
    conv = len(shape) == 4 and shape[2] * shape[3] > 1
    return svd_factors(total, shape, (conv_rank or rank) if conv else rank)


def convert_lora(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: str,
    base: str | None = None,
    allow_unmatched: bool = False,
    force: bool = False,
    dry_run: bool = False,
    ignore_scan: bool = False,
) -> LoraOutResult:
    """Rewrite a LoRA's key names in another style: ``kohya``, ``diffusers`` or ``peft``.

    Args:
        src, out: the input and output files.
        to: the key style of the output.
        base: ``sd1``, ``sd2`` or ``sdxl`` when detection cannot tell.
        allow_unmatched, force, dry_run, ignore_scan: as elsewhere.

    Returns:
        LoraOutResult.

    Raises:
        UsageError: an unknown style, a module that style cannot hold, or names that match nothing.
    """
    require_torch("modelkit lora convert")
    t0 = time.perf_counter()
    if to not in STYLES:
        raise UsageError(None, f"--to must be one of {', '.join(STYLES)}, not {to!r}")
    s = os.fspath(src)
    target = require_safetensors_name(out)
    check_output(target, force=force, inputs=[s])
    warnings = check_scan(s, ignore_scan)[1]
    lf = load_lora(s)
    km = KeyMap.reference(_base([lf], base))
    tensors = []
    pairs = _targets(km, lf, allow_unmatched, warnings)
    for t, mod in pairs:
        if mod.algo != "lora" or mod.dora or (to != "kohya" and "mid" in mod.parts):
            raise UsageError(s, f"module {mod.name} is {mod.kind}, which the {to} key style cannot hold",
                             "Only LoRA/LoCon modules change key style")
        try:
            name = km.name_for(t, to)
        except KeyError:
            raise UsageError(s, f"the {to} style has no names for {t.component} modules", "Use --to diffusers") from None
        tensors += _renamed(name, mod, to)
    changes = [f"key style {lf.detection.details.get('key_style')} -> {to} ({len(pairs)} modules)"]
    meta = md.combine(lf.metadata, md.provenance(s, changes), {"modelkit.lora_style": to})
    header, meta, stats = write_output(target, tensors, meta, source=s, inputs=[s], force=force, dry_run=dry_run)
    return LoraOutResult("convert", (s,), target, "dry-run" if dry_run else "written", km.base, to, len(pairs),
                         len(lf.modules) - len(pairs), None, None, len(tensors), header.size, tuple(changes), meta,
                         tuple(warnings), stats, time.perf_counter() - t0)


def _renamed(name: str, mod: Module, to: str) -> list[Any]:
    down, up = mod.parts["down"], mod.parts["up"]
    if to == "kohya":
        out = [out_tensor(f"{name}.lora_down.weight", down, down.dtype), out_tensor(f"{name}.lora_up.weight", up, up.dtype)]
        if "mid" in mod.parts:
            out.append(out_tensor(f"{name}.lora_mid.weight", mod.parts["mid"], mod.parts["mid"].dtype))
        if mod.alpha is not None:
            out.append(out_tensor(f"{name}.alpha", _scalar(mod.alpha), down.dtype))
        return out
    s = mod.scale()
    b = up if s == 1.0 else (up.double() * s).to(up.dtype)
    return [out_tensor(f"{name}.lora_A.weight", down, down.dtype), out_tensor(f"{name}.lora_B.weight", b, up.dtype)]
