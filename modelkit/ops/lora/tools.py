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

Flux.1 and SD3.x (``dit_tools``): the key table is that of the layout the output names (original keys
for kohya and for merge, diffusers' keys for diffusers), from ``dit_ref``'s reference sizes or from
``checkpoint``; every module that lands on one weight of it becomes one module there (fused q/k/v
into ``qkv`` for kohya, a ``qkv`` module into ``to_q``/``to_k``/``to_v`` for diffusers), exactly.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from ..._torch import require_torch
from ...detect.meta import read_hints
from ...errors import UsageError
from ...paths import check_output, require_safetensors_name
from .. import metadata as md
from .. import modelspec as ms
from ..convert import check_scan
from ..streaming import COMPUTE_DTYPES, OUTPUT_DTYPES, float_dtype, write_output
from . import dit_tools, peft_out
from . import math as lmath
from .bake import FAMILY_NAMES, _refuse_family, parse_spec
from .extract import LoraOutResult, lora_metadata, out_tensor, svd_factors
from .keymap import OUTPUT_STYLES, KeyMap, Target
from .loader import LoraFile, Module, load_lora

STYLES = tuple(OUTPUT_STYLES)


#: The bases these tools read LoRAs for without a checkpoint (``arch``, ``dit_ref``).
BASES = ("sd1", "sd2", "sdxl", "flux", "sd3")


def _base(loras: list[LoraFile], base: str | None) -> str:
    if base is not None:
        if base not in BASES:
            raise UsageError(None, f"--base must be one of {', '.join(BASES)}, not {base!r}")
        for lf in loras:
            if lf.base and lf.base != base and (lf.base in dit_tools.DIT or base in dit_tools.DIT):
                raise UsageError(lf.path, f"this LoRA is for {FAMILY_NAMES.get(lf.base, lf.base)}, not "
                                          f"{FAMILY_NAMES.get(base, base)} (--base {base})",
                                 "Leave --base out, or pass the base the LoRA was made for")
        return base
    found = {lf.base for lf in loras}
    known = sorted(b for b in found if b)
    if len(known) > 1:
        raise UsageError(None, f"the LoRAs are for different bases ({', '.join(known)})", "Merge LoRAs of one base model")
    if not known or known[0] not in BASES:
        what = known[0] if known else "not known"
        raise UsageError(loras[0].path, f"its base model is {what}", f"Pass --base {'|'.join(BASES)}")
    return known[0]


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _prediction(loras: Sequence[tuple[LoraFile, float]]) -> str | None:
    """The base's prediction (``v``/``eps``) as the LoRAs' own metadata tells it, if any does."""
    return next((p for lf, _ in loras if (p := read_hints(lf.metadata).prediction)), None)


def _convert_meta(s: str, lf: LoraFile, km: KeyMap, changes: list[str], to: str, names: Sequence[str] = (),
                  implementation: str | None = None) -> dict[str, str]:
    """The metadata of ``convert_lora``'s output: the input's (no stale hashes), its ModelSpec block filled
    in (the implementation follows the new key names), kohya's base tags where missing, provenance."""
    pred = _prediction([(lf, 1.0)])
    spec = ms.modelspec_block(kind="lora", base=km.base, prediction=pred, title=_stem(s), names=names,
                              implementation=implementation)
    return md.combine(ms.fill(lf.metadata, spec, override=("modelspec.implementation",), changes=changes),
                      md.provenance(s, changes), {"modelkit.lora_style": to}, defaults=ms.kohya_tags(km.base, pred))


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
        base: ``sd1``, ``sd2``, ``sdxl``, ``flux`` or ``sd3`` when detection cannot tell.
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
    family = _base([lf for lf, _ in loaded], base)
    dit = family in dit_tools.DIT
    km = (dit_tools.reference_keymap([lf for lf, _ in loaded], family, diffusers=False) if dit
          else KeyMap.reference(family))
    groups: dict[tuple[str, tuple[int, int] | None], list[tuple[Target, Module, float]]] = {}
    for lf, ratio in loaded:  # Flux, SD3: each LoRA first as one module per original weight (fused q/k/v ...)
        for t, mod in (dit_tools.fused(lf.path, km, lf, allow_unmatched, warnings) if dit
                       else _targets(km, lf, allow_unmatched, warnings)):
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
                    _alpha(name, float(down.shape[0]))]
    how = "ranks concatenated (exact)" if rank is None else f"SVD to rank {rank}"
    changes = [f"merged {len(specs)} LoRAs into {len(groups)} modules, {how}: "
               + ", ".join(f"{os.path.basename(p)} x{r:g}" for p, r in specs)]
    record = {"loras": [{"file": os.path.basename(lf.path), "sha256": lf.sha256, "ratio": r} for lf, r in loaded],
              "rank": rank, "conv_rank": conv_rank, "compute_dtype": compute.name}
    meta = md.combine(lora_metadata(km.base, rank, conv_rank if rank else None, prediction=_prediction(loaded),
                                    title=_stem(target), names=[x.name for x in tensors]),
                      {"modelspec.merged_from": ", ".join(_stem(lf.metadata.get("modelspec.title") or lf.path)
                                                          for lf, _ in loaded)},
                      md.provenance(specs[0][0], changes), {"modelkit.merge": json.dumps(record, separators=(",", ":"))})
    header, meta, stats = write_output(target, tensors, meta, source=specs[0][0], inputs=[p for p, _ in specs],
                                       force=force, dry_run=dry_run, allow_overflow=allow_overflow,
                                       overflow=lambda: overflow, dtype=cast.name)
    return LoraOutResult("merge", tuple(p for p, _ in specs), target, "dry-run" if dry_run else "written", km.base,
                         "kohya", len(groups), 0, rank, conv_rank, len(tensors), header.size, tuple(changes), meta,
                         tuple(warnings), stats, time.perf_counter() - t0)


def _alpha(name: str, v: float) -> Any:
    """Module ``name``'s ``.alpha`` tensor, in float32 whatever the factors' dtype: a fused or merged alpha
    (parts x alpha, or a total rank, e.g. 3 x 101 = 303) may not fit float16/bfloat16 exactly, and kohya,
    ComfyUI and diffusers read an alpha of any float dtype with ``.item()``."""
    import torch

    return out_tensor(f"{name}.alpha", torch.tensor(float(v), dtype=torch.float32), torch.float32)


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
    checkpoint: str | os.PathLike[str] | None = None,
    allow_unmatched: bool = False,
    force: bool = False,
    dry_run: bool = False,
    ignore_scan: bool = False,
) -> LoraOutResult:
    """Rewrite a LoRA in another style: ``kohya``, ``diffusers`` or ``peft``.

    ``diffusers`` writes the one file ``pipe.load_lora_weights`` applies (ranks and alphas in its
    ``lora_adapter_metadata`` header); ``peft`` with an output that is not a ``.safetensors`` name
    writes a folder of PEFT adapters, one per component (``unet/``, ``text_encoder/``,
    ``text_encoder_2/``), for ``PeftModel.from_pretrained`` (see ``peft_out``); a ``.safetensors``
    name for it is refused (PEFT key names in one file are applied by no loader).

    Args:
        src: the input LoRA.
        out: the output file, or folder for PEFT adapters.
        to: the style of the output.
        base: ``sd1``, ``sd2``, ``sdxl``, ``flux`` or ``sd3`` when detection cannot tell.
        checkpoint: the checkpoint the LoRA is for; its own layers name the modules instead of the
            base's reference layout (for a model whose size differs from it).
        allow_unmatched, force, dry_run, ignore_scan: as elsewhere.

    Returns:
        LoraOutResult.

    Raises:
        UsageError: an unknown style, a module that style cannot hold, or names that match nothing.

    Example:
        >>> convert_lora("style.safetensors", "style-peft", to="peft")  # doctest: +SKIP
    """
    require_torch("modelkit lora convert")
    t0 = time.perf_counter()
    if to not in STYLES:
        raise UsageError(None, f"--to must be one of {', '.join(STYLES)}, not {to!r}")
    s = os.fspath(src)
    folder = to == "peft"
    if folder and os.fspath(out).lower().endswith(".safetensors"):
        raise UsageError(os.fspath(out), "PEFT adapters are folders (adapter_config.json and adapter_model.safetensors "
                                         "per component), not one .safetensors file",
                         "Name a folder with -o, or use --to diffusers for the one file load_lora_weights applies")
    if folder:
        target = peft_out.check_folder(os.fspath(out), force, [s])
    else:
        target = require_safetensors_name(out)
        check_output(target, force=force, inputs=[s])
    warnings = check_scan(s, ignore_scan)[1]
    lf = load_lora(s)
    lf.metadata.pop(peft_out.DIFFUSERS_METADATA_KEY, None)  # now in the alphas; a stale copy would mislead diffusers
    km = _keymap(lf, base, checkpoint, ignore_scan, warnings, diffusers=to != "kohya")
    tensors = []
    dit = km.base in dit_tools.DIT
    pairs = dit_tools.fused(s, km, lf, allow_unmatched, warnings) if dit else _targets(km, lf, allow_unmatched, warnings)
    if to == "diffusers" or folder:
        if dit:
            dit_tools.refuse_t5(s, pairs, km.base, to)
        return _for_loaders(s, target, lf, km, pairs, to, folder, force, dry_run, warnings, t0)
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
    meta = _convert_meta(s, lf, km, changes, to, [x.name for x in tensors])
    header, meta, stats = write_output(target, tensors, meta, source=s, inputs=[s], force=force, dry_run=dry_run)
    return LoraOutResult("convert", (s,), target, "dry-run" if dry_run else "written", km.base, to, len(pairs),
                         len(lf.modules) - len(pairs), None, None, len(tensors), header.size, tuple(changes), meta,
                         tuple(warnings), stats, time.perf_counter() - t0)


def _keymap(lf: LoraFile, base: str | None, checkpoint: str | os.PathLike[str] | None, ignore_scan: bool,
            warnings: list[str], diffusers: bool = False) -> KeyMap:
    """The key table of ``checkpoint`` when given, else of the base's reference layout (for Flux and SD3
    in the layout the output names: diffusers' keys for ``diffusers``, else the original ones)."""
    if checkpoint is None:
        family = _base([lf], base)
        if family in dit_tools.DIT:
            return dit_tools.reference_keymap([lf], family, diffusers=diffusers)
        return KeyMap.reference(family)
    from ...detect import detect_modelfile
    from ...formats import open_model

    c = os.fspath(checkpoint)
    warnings += check_scan(c, ignore_scan)[1]
    with open_model(c) as mf:
        det = detect_modelfile(mf)
        if det.kind != "checkpoint":
            raise UsageError(c, f"is not a checkpoint (detected as {det.kind})", "Pass the checkpoint the LoRA is for")
        _refuse_family(lf, base or det.base, c)
        shapes = {k: r.shape for k, r in mf.items()}
        if (base or det.base) in dit_tools.DIT:
            return dit_tools.checkpoint_keymap(shapes, base or det.base, diffusers=diffusers)
        return KeyMap.build(shapes, base or det.base)


def _for_loaders(s: str, target: str, lf: LoraFile, km: KeyMap, pairs: list[tuple[Target, Module]], to: str,
                 folder: bool, force: bool, dry_run: bool, warnings: list[str], t0: float) -> LoraOutResult:
    """``convert_lora`` to the diffusers file or the PEFT adapter folder (``peft_out``)."""
    items, dropped = peft_out.adapted(s, km, pairs, to)
    if dropped:
        warnings.append(f"{s}: {len(dropped)} modules on the last layer of the SD 2 text encoder left out "
                        f"(e.g. {dropped[0]}): diffusers' text encoder stops one layer short, and SD 2 never "
                        "uses that layer's output")
    denoiser = "transformer" if km.base in dit_tools.DIT else "unet"
    parts = sorted(peft_out.by_component(items, denoiser))
    changes = [f"{lf.detection.details.get('key_style')} -> {to} {'folders' if folder else 'file'} "
               f"({len(items)} modules: {', '.join(parts)})"]
    meta = _convert_meta(s, lf, km, changes, to, implementation=ms.IMPL_DIFFUSERS)
    stats = None
    if folder:
        count, size, meta = peft_out.write_peft_folder(target, items, meta, source=s, force=force, dry_run=dry_run,
                                                       denoiser=denoiser)
    else:
        tensors, extra = peft_out.diffusers_tensors(items, denoiser)
        header, meta, stats = write_output(target, tensors, md.combine(meta, extra), source=s, inputs=[s],
                                           force=force, dry_run=dry_run)
        count, size = len(tensors), header.size
    return LoraOutResult("convert", (s,), target, "dry-run" if dry_run else "written", km.base, to, len(items),
                         len(lf.modules) - len(items), None, None, count, size, tuple(changes), meta,
                         tuple(warnings), stats, time.perf_counter() - t0)


def _renamed(name: str, mod: Module, to: str) -> list[Any]:
    down, up = mod.parts["down"], mod.parts["up"]
    if to == "kohya":
        out = [out_tensor(f"{name}.lora_down.weight", down, down.dtype), out_tensor(f"{name}.lora_up.weight", up, up.dtype)]
        if "mid" in mod.parts:
            out.append(out_tensor(f"{name}.lora_mid.weight", mod.parts["mid"], mod.parts["mid"].dtype))
        if mod.alpha is not None:
            out.append(_alpha(name, mod.alpha))
        return out
    s = mod.scale()
    b = up if s == 1.0 else (up.double() * s).to(up.dtype)
    return [out_tensor(f"{name}.lora_A.weight", down, down.dtype), out_tensor(f"{name}.lora_B.weight", b, up.dtype)]
