"""``modelkit merge models``: weighted sum and add difference of checkpoints, streaming, per block.

* weighted sum: ``A (1 - α) + B α``; add difference: ``A + (B - C) α``.
* Per-block weights in the usual convention: one weight per UNet input block, the middle block and
  each output block (``IN00..IN11, M00, OUT00..OUT11``: 25 for SD 1.x/2.x; ``IN00..IN08, M00,
  OUT00..OUT08``: 19 for SDXL), optionally preceded by ``BASE``, the weight of everything else
  (otherwise ``α``). The counts come from the checkpoint's own blocks. The UNet layers outside the
  numbered blocks follow the usual rule (``BLOCK_ALIASES``): ``time_embed``/``label_emb`` take IN00's
  weight, ``out`` the last output block's.
* Flux.1 and SD3.x (any layout: single file, transformer only, diffusers) take one weight per
  transformer block instead: ``D00..`` (double) then ``S00..`` (single) for Flux, ``J00..`` (joint)
  for SD3 (``families.BLOCKS``); everything outside the blocks takes BASE. Their components are the
  transformer (``unet``), the text encoders (``te``: CLIP-L, CLIP-G, T5-XXL) and the VAE.
* Components (``unet``, ``te``, ``vae``) not chosen are A's; ``vae=FILE`` bakes in a VAE.

Tensors are read one key at a time from A, B and C and combined elementwise in chunks in the
compute dtype, then rounded once to A's dtype (or ``dtype``). A weight of 0 copies A's bytes as
they are; a weighted-sum weight of 1 copies B's (cast if needed). EMA weights are dropped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import dtypes
from .._torch import require_torch
from ..detect import detect_modelfile
from ..errors import UsageError
from ..formats.safetensors_write import OutTensor, WriteStats
from ..layout.folder import open_input as open_model
from ..model import ModelFile, TensorRef
from ..paths import check_output, same_file
from . import families
from . import metadata as md
from . import modelspec as ms
from .convert import Progress, check_scan, default_output
from .fp8 import QUANT_METADATA
from .fp8_merge import Requant, Scaled, dequantized
from .gguf_ops import refuse_quantized
from .result import result_dict
from .streaming import (
    CHUNK,
    COMPUTE_DTYPES,
    OUTPUT_DTYPES,
    Ahead,
    Slots,
    chunks,
    default_jobs,
    float_dtype,
    overflow_count,
    overflow_warning,
    tensor_bytes,
    write_output,
)

MODES = ("weighted-sum", "add-difference")
COMPONENTS = {"unet": ("model.diffusion_model.",), "te": ("cond_stage_model.", "conditioner."),
              "vae": ("first_stage_model.",)}
#: A Flux/SD3 file's components (``families.COMPONENTS``) -> the ``--components`` they answer to.
DIT_COMPONENTS = {"transformer": "unet", "vae": "vae", "clip_l": "te", "clip_g": "te", "t5xxl": "te"}
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
FLUX_VAE_PREFIX = "vae."
EMA_PREFIX = "model_ema."
#: UNet layers outside the numbered blocks -> the block whose weight they take ("OUT-LAST": the last one).
BLOCK_ALIASES = (("time_embed.", "IN00"), ("label_emb.", "IN00"), ("out.", "OUT-LAST"))
#: The first letter of a DiT's first block name -> its family (``D00`` Flux, ``J00`` SD3).
DIT_BLOCK_FAMILY = {"D": "flux", "J": "sd3"}
_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


@dataclass(frozen=True)
class MergeModelsResult:
    """What ``merge_models`` did (or would do).

    Attributes:
        sources: A, B (and C); output; status: ``written`` or ``dry-run``.
        mode, alpha, block_weights (name -> weight, when given), components, vae: the options.
        tensors: output tensors; merged: tensors combined; from_a / from_b: copied unchanged;
        vae_tensors: taken from the VAE file; size: output bytes.
        scan: the worst scan verdict of the inputs (an unsafe one is refused).
        overflow: tensor -> values that became inf in the output dtype (written only with ``allow_overflow``).
    """

    sources: tuple[str, ...]
    output: str
    status: str
    mode: str
    alpha: float
    block_weights: dict[str, float]
    components: tuple[str, ...]
    vae: str | None
    tensors: int
    merged: int
    from_a: int
    from_b: int
    vae_tensors: int
    size: int
    changes: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    stats: WriteStats | None = None
    scan: str | None = None
    seconds: float = 0.0
    overflow: dict[str, int] = field(default_factory=dict)

    to_dict = result_dict


def block_names(keys: Sequence[str]) -> list[str]:
    """The per-block weight names of a checkpoint's UNet: ``IN00.., M00, OUT00..`` from its own blocks
    (a Flux transformer: ``D00.., S00..``; SD3: ``J00..``; see ``families``)."""
    family = families.family_of(keys)
    if family is not None:
        return families.block_names(keys, family)
    found: dict[str, set[int]] = {"input_blocks": set(), "output_blocks": set()}
    for k in keys:
        if k.startswith(UNET_PREFIX) and (m := _BLOCK.match(k[len(UNET_PREFIX):])) and m.group(1) in found:
            found[m.group(1)].add(int(m.group(2)))
    n_in, n_out = max(found["input_blocks"], default=-1) + 1, max(found["output_blocks"], default=-1) + 1
    return [f"IN{i:02d}" for i in range(n_in)] + ["M00"] + [f"OUT{i:02d}" for i in range(n_out)]


def block_of(key: str, names: Sequence[str]) -> str | None:
    """The block weight name a key takes (None: BASE, everything outside the UNet blocks)."""
    family = DIT_BLOCK_FAMILY.get(names[0][:1]) if names else None
    if family is not None:
        return families.block_of(key, family)
    if not key.startswith(UNET_PREFIX):
        return None
    rest = key[len(UNET_PREFIX):]
    for prefix, block in BLOCK_ALIASES:
        if rest.startswith(prefix):
            return names[-1] if block == "OUT-LAST" else block
    m = _BLOCK.match(rest)
    if m is None:
        return None
    if m.group(1) == "middle_block":
        return "M00"
    return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"


def parse_block_weights(weights: str | Sequence[float] | None, names: Sequence[str], alpha: float) -> tuple[
        float, dict[str, float]]:
    """``(BASE weight, block -> weight)`` from ``len(names)`` weights, or one more with BASE first.

    Raises:
        UsageError: a count that fits neither form, or a value that is not a number.
    """
    if weights is None:
        return alpha, {}
    if isinstance(weights, str):
        try:
            values = [float(v) for v in weights.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise UsageError(None, f"--block-weights must be comma-separated numbers, not {weights!r}") from None
    else:
        values = [float(v) for v in weights]
    if not all(math.isfinite(v) for v in values):
        raise UsageError(None, f"--block-weights must be finite numbers, not {weights!r}")
    n = len(names)
    if len(values) == n + 1:
        return values[0], dict(zip(names, values[1:]))
    if len(values) == n:
        return alpha, dict(zip(names, values))
    if names[0][:1] in DIT_BLOCK_FAMILY:
        raise UsageError(None, f"this transformer takes {n} block weights ({names[0]}..{names[-1]}) or {n + 1} "
                               f"with BASE first, not {len(values)}")
    raise UsageError(None, f"this UNet takes {n} block weights ({names[0]}..{names[n // 2 - 1]}, M00, "
                           f"OUT00..{names[-1]}) or {n + 1} with BASE first, not {len(values)}")


#: ``--components`` names that pick one part of a Flux/SD3 file (``te`` takes all its text encoders).
DIT_PARTS = ("transformer", "clip_l", "clip_g", "t5xxl")


def selected(key: str, family: str | None, components: Sequence[str]) -> bool:
    """Whether ``--components`` merges ``key``: by its component (``unet``/``te``/``vae``) or, in a
    Flux/SD3 file, by its part (``transformer``, ``clip_l``, ``clip_g``, ``t5xxl``) too."""
    if family is not None and families.component_of(key, family) in components:
        return True
    return component_of(key, family) in components


def component_of(key: str, family: str | None = None) -> str | None:
    """``unet``, ``te`` or ``vae`` (a Flux/SD3 file: transformer, text encoders, VAE), or None."""
    if family is not None:
        return DIT_COMPONENTS[families.component_of(key, family)]
    for comp, prefixes in COMPONENTS.items():
        if key.startswith(prefixes):
            return comp
    return None


class _Mixer:
    """Combines one tensor elementwise, ``CHUNK`` elements at a time, in the compute dtype."""

    def __init__(self, compute: Any, mode: str) -> None:
        self.compute = compute
        self.mode = mode
        self.slots = Slots()
        self.overflow: dict[str, int] = {}
        self.lock = threading.Lock()

    def fn(self, refs: list[TensorRef], alpha: float, out_dt: Any, factors: list[float | None] | None = None,
           copy: bool = False) -> Any:
        """The job of one merged tensor (``copy``: A's values only, a scaled fp8 weight upcast)."""
        name = refs[0].name
        scale = factors or [None] * len(refs)

        def load(x: Any, chunk: Any, f: float | None) -> None:
            if f is None:
                x.copy_(chunk)
            else:  # a scaled fp8 weight: q.float() * scale, in float32 as ComfyUI dequantizes
                x.copy_(chunk.float().mul_(f))

        def run(slot: int) -> Any:
            lost = 0
            n = refs[0].numel
            out = self.slots.scratch(slot, n, out_dt)
            parts = [self.slots.get(slot, f"x{i}", min(n, CHUNK), self.compute) for i in range(len(refs))]
            readers = [chunks(r, self.slots, slot, f"raw{i}") for i, r in enumerate(refs)]
            for s in range(0, n, CHUNK):
                e = min(n, s + CHUNK)
                x = parts[0][: e - s]
                load(x, next(readers[0]), scale[0])
                if copy:
                    pass
                elif self.mode == "weighted-sum":
                    y = parts[1][: e - s]
                    load(y, next(readers[1]), scale[1])
                    x.lerp_(y, alpha)  # A + (B - A)·α, one pass: A·(1-α) + B·α within the compute dtype's rounding
                else:
                    y, z = parts[1][: e - s], parts[2][: e - s]
                    load(y, next(readers[1]), scale[1])
                    load(z, next(readers[2]), scale[2])
                    x.add_(y.sub_(z), alpha=alpha)
                lost += overflow_count(x, out_dt)
                out[s:e].copy_(x)
            if lost:
                with self.lock:
                    self.overflow[name] = lost
            return tensor_bytes(out)
        return run

    def dense(self, refs: list[TensorRef], factors: list[float | None], alpha: float) -> Any:
        """The merged values of one tensor as a new tensor in the compute dtype (for ``fp8_merge.Requant``)."""
        def make() -> Any:
            x, *rest = (dequantized(r, f, self.compute).reshape(-1) for r, f in zip(refs, factors))
            if self.mode == "weighted-sum":
                x.lerp_(rest[0], alpha)
            else:
                x.add_(rest[0].sub_(rest[1]), alpha=alpha)
            return x.view(refs[0].shape)
        return make


def _vae_refs(mf_vae: ModelFile, ma: ModelFile, path: str) -> dict[str, TensorRef]:
    """A's VAE key -> the VAE file's tensor (named with or without ``first_stage_model.``, or ``vae.`` in Flux files).

    Raises:
        UsageError: the file lacks some of A's VAE tensors or has other shapes.
    """
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in ma) else FLUX_VAE_PREFIX  # Flux files: ``vae.``
    keys = [k for k in ma if k.startswith(prefix)]
    out: dict[str, TensorRef] = {}
    for k in keys:
        ref = mf_vae.get(k[len(prefix):]) or mf_vae.get(k)
        if ref is not None:
            out[k] = ref
    if not out:
        raise UsageError(path, "has none of the checkpoint's VAE keys (encoder..., decoder..., quant_conv...)",
                         "Pass an LDM-layout VAE (the .vae.pt/.safetensors files A1111 loads)")
    missing = [k for k in keys if k not in out]
    if missing:
        raise UsageError(path, f"lacks {len(missing)} of the checkpoint's VAE tensors (e.g. {missing[0][len(prefix):]})")
    for k, ref in out.items():
        if tuple(ref.shape) != tuple(ma[k].shape):
            raise UsageError(path, f"{k[len(prefix):]} is {list(ref.shape)} but the checkpoint's is "
                                   f"{list(ma[k].shape)}", "Pass a VAE for this base model")
    return out


def merge_models(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    c: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    alpha: float = 0.5,
    mode: str | None = None,
    block_weights: str | Sequence[float] | None = None,
    components: Sequence[str] = ("unet", "te", "vae"),
    vae: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    compute_dtype: str = "fp32",
    force: bool = False,
    dry_run: bool = False,
    ignore_scan: bool = False,
    jobs: int | None = None,
    progress: Progress | None = None,
    allow_overflow: bool = False,
) -> MergeModelsResult:
    """Merge two checkpoints by weighted sum, or three by add difference, one tensor at a time.

    Args:
        a, b, c: the checkpoints (``c`` only for add difference).
        out: the output ``.safetensors``; default ``<a>.merged.safetensors`` beside A.
        alpha: the weight of B (weighted sum) or of ``B - C`` (add difference).
        mode: ``weighted-sum`` or ``add-difference`` (default: add difference when ``c`` is given).
        block_weights: per-block weights (a comma-separated string or numbers; see the module doc).
        components: which of ``unet``, ``te``, ``vae`` are merged (a Flux/SD3 file also takes its
            parts by name: ``transformer``, ``clip_l``, ``clip_g``, ``t5xxl``); the rest are A's.
        vae: a VAE file baked in place of A's VAE.
        dtype: cast float tensors of the output (``fp16``, ``bf16``, ``fp32``); default A's dtypes.
        compute_dtype: ``fp32`` (default) or ``fp64``.
        force, dry_run, ignore_scan, jobs, progress: as for ``merge_lora`` (see its note on
            ``OMP_WAIT_POLICY``).
        allow_overflow: write the output even when finite values become inf in its dtype (a
            warning then names them); by default that raises ``CastOverflowError`` and writes nothing.

    Returns:
        MergeModelsResult.

    Raises:
        UsageError: bad options, or A and B (C) have different shapes (other base models).
        UnsafeFileError, OutputExistsError, FormatError, OutputWriteError: as for ``convert``.
        CastOverflowError: values overflowed to inf (without ``allow_overflow``); nothing was written.

    Example:
        >>> modelkit.merge_models("a.safetensors", "b.safetensors", alpha=0.3, out="ab.safetensors")  # doctest: +SKIP
    """
    require_torch("modelkit merge models")
    t0 = time.perf_counter()
    paths = [os.fspath(p) for p in (a, b, c) if p is not None]
    mode = mode or ("add-difference" if c is not None else "weighted-sum")
    if mode not in MODES:
        raise UsageError(None, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if (mode == "add-difference") != (c is not None):
        raise UsageError(None, "add difference takes three models (A B C), weighted sum two (A B)")
    bad = [x for x in components if x not in COMPONENTS and x not in DIT_PARTS]
    if bad or not components:
        raise UsageError(None, f"components must be among {', '.join((*COMPONENTS, *DIT_PARTS))}, not "
                               f"{', '.join(bad) or 'none'}")
    if not math.isfinite(alpha):
        raise UsageError(None, f"--alpha must be a finite number, not {alpha}")
    compute = float_dtype(compute_dtype, COMPUTE_DTYPES, "--compute-dtype")
    cast = float_dtype(dtype, OUTPUT_DTYPES, "--dtype")
    assert compute is not None
    vae_path = os.fspath(vae) if vae is not None else None
    inputs = paths + ([vae_path] if vae_path else [])
    target = default_output(paths[0], out, None, ".merged")
    check_output(target, force=force, inputs=inputs)
    warnings: list[str] = []
    names = "ABC"
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            if same_file(paths[i], paths[j]):
                warnings.append(f"{names[i]} and {names[j]} are the same file ({paths[i]})"
                                + ("; B - C is zero, so the result is A" if (i, j) == (1, 2) else ""))
    verdicts = []
    for p in inputs:
        v, w = check_scan(p, ignore_scan)
        verdicts.append(v)
        warnings += w
    verdict = next((v for v in ("unsafe", "suspicious", "error") if v in verdicts), verdicts[0])
    mfs: list[ModelFile] = []
    try:
        for p in inputs:
            mfs.append(open_model(p))
            refuse_quantized(mfs[-1], p, "merge models")
        res = _merge(mfs, paths, vae_path, target, t0, mode, alpha, block_weights, tuple(components), cast,
                     compute.torch(), compute.name, warnings, force=force, dry_run=dry_run, jobs=jobs, progress=progress,
                     allow_overflow=allow_overflow, dtype=dtype)
        return replace(res, scan=verdict)
    finally:
        for mf in mfs:
            mf.close()


def _merge(mfs: list[ModelFile], paths: list[str], vae_path: str | None, target: str, t0: float, mode: str,
           alpha: float, block_weights: str | Sequence[float] | None, components: tuple[str, ...], cast: Any,
           compute: Any, compute_name: str, warnings: list[str], *, force: bool, dry_run: bool, jobs: int | None,
           progress: Progress | None, allow_overflow: bool, dtype: str | None) -> MergeModelsResult:
    ma, others = mfs[0], mfs[1:len(paths)]
    scaled = [Scaled(mf.tensors, mf.metadata) for mf in mfs[:len(paths)]]
    mvae = mfs[len(paths)] if vae_path else None
    names = block_names(list(ma))
    family = families.family_of(ma)
    base_w, weights = parse_block_weights(block_weights, names, alpha)
    parts = [x for x in components if x in DIT_PARTS]
    if parts and family is None:
        raise UsageError(paths[0], f"--components {', '.join(parts)} names parts of Flux/SD3 files; this "
                                   "checkpoint's are unet, te and vae")
    _check_shapes(ma, others, paths, components, family)
    vae_refs = _vae_refs(mvae, ma, vae_path) if mvae is not None and vae_path else {}
    mixer = _Mixer(compute, mode)
    ahead = Ahead(jobs or default_jobs())
    tensors: list[OutTensor] = []
    counts = {"merged": 0, "a": 0, "b": 0, "vae": 0, "ema": 0, "missing": 0, "rescaled": 0}

    def role(name: str, ref: TensorRef) -> tuple[str, float, list[TensorRef | None], list[float | None]]:
        """How A's tensor ``name`` is made: ``a``, ``missing``, ``b`` or ``merge``, its weight, the inputs' tensors and
        the scales of those that are scaled fp8 weights."""
        w = weights.get(block_of(name, names) or "", base_w)
        refs = [ref] + [m.get(name) for m in others]
        factors = [sc.factor(name) for sc in scaled]
        if not selected(name, family, components) or not ref.dtype.is_float or w == 0.0:
            return "a", w, refs, factors
        if any(r is None or not r.dtype.is_float or (r.name in sc.drop) for r, sc in zip(refs[1:], scaled[1:])):
            return "missing", w, refs, factors
        if mode == "weighted-sum" and w == 1.0 and factors[1] is None and factors[0] is None:
            return "b", w, refs, factors
        return "merge", w, refs, factors

    cells: dict[str, Requant] = {}
    if cast is None:  # A's merged scaled fp8 weights are scaled again; made by whichever tensor comes first
        for wname, sw in scaled[0].found.items():
            how, w, refs, factors = role(wname, ma[wname])
            if how == "merge":
                cells[wname] = Requant(mixer.dense([r for r in refs if r is not None], factors, w), sw.format, wname)
    for name, ref in ma.items():
        if name.startswith(EMA_PREFIX):
            counts["ema"] += 1
            continue
        out_dt = cast if cast is not None and ref.dtype.is_float else ref.dtype
        if name in vae_refs:
            vref = vae_refs[name]
            tensors.append(OutTensor.of(vref, name, out_dt if vref.dtype.is_float else vref.dtype))
            counts["vae"] += 1
            continue
        if name in scaled[0].drop:  # A's scales and markers: kept, replaced by a new scale, or dropped with --dtype
            cell = cells.get(scaled[0].scale_of.get(name, ""))
            if cast is None:
                tensors.append(OutTensor.of(ref) if cell is None else
                               OutTensor(name, dtypes.BY_NAME["float32"], ref.shape, compute=cell.scale))
            continue
        if name in cells:
            tensors.append(OutTensor(name, ref.dtype, ref.shape, ref, compute=ahead.bind(
                name, cells[name].weight, ref.numel * compute.itemsize)))
            counts["merged"] += 1
            counts["rescaled"] += 1
            continue
        how, w, refs, factors = role(name, ref)
        if how in ("a", "missing"):
            counts[how] += 1
            if factors[0] is not None and cast is not None:  # A's scaled weight as its value in the cast dtype
                fn = mixer.fn([ref], 0.0, out_dt.torch(), factors[:1], copy=True)
                tensors.append(OutTensor(name, out_dt, ref.shape, ref, compute=ahead.bind(name, fn, ref.numel * out_dt.itemsize)))
            else:
                tensors.append(OutTensor.of(ref, dtype=out_dt))
            continue
        if how == "b":
            assert refs[1] is not None
            tensors.append(OutTensor.of(refs[1], name, out_dt))
            counts["b"] += 1
            continue
        fn = mixer.fn([r for r in refs if r is not None], w, out_dt.torch(), factors)
        tensors.append(OutTensor(name, out_dt, ref.shape, ref, compute=ahead.bind(name, fn, ref.numel * out_dt.itemsize)))
        counts["merged"] += 1
    if counts["rescaled"]:
        changes_fp8 = [f"{counts['rescaled']} scaled fp8 weights merged as weight*scale and scaled again (new scales)"]
    elif cast is not None and scaled[0]:
        changes_fp8 = [f"{len(scaled[0].found)} scaled fp8 weights written as {dtype} values; their scales dropped"]
    else:
        changes_fp8 = []
    if counts["missing"]:
        warnings.append(f"{counts['missing']} tensors of A are missing (or not float) in B/C and were kept from A")
    changes = [f"container {ma.container} -> safetensors"] if ma.container != "safetensors" else []
    what = "A*(1-a) + B*a" if mode == "weighted-sum" else "A + (B-C)*a"
    changes.append(f"{mode} {what} with a={alpha:g} of {', '.join(components)}: {counts['merged']} tensors merged")
    if weights:
        changes.append("block weights " + ",".join(f"{v:g}" for v in [base_w, *weights.values()]) + " (BASE first)")
    changes += changes_fp8
    if counts["ema"]:
        changes.append(f"removed {counts['ema']} EMA tensors (model_ema.*)")
    if vae_path:
        changes.append(f"VAE baked in from {os.path.basename(vae_path)} ({counts['vae']} tensors)")
    record = {"mode": mode, "alpha": alpha, "models": [os.path.basename(p) for p in paths],
              "components": list(components), "compute_dtype": compute_name}
    if weights:
        record["block_weights"] = {"BASE": base_w, **weights}
    if vae_path:
        record["vae"] = os.path.basename(vae_path)
    meta_extra, _dropped = md.split_extras(ma.extras)
    title = os.path.splitext(os.path.basename(target))[0]
    det = detect_modelfile(ma)
    spec = ms.modelspec_block(kind="checkpoint", base=det.base, prediction=det.variant.get("prediction"), title=title,
                              names=list(ma), date=True, merged_from=[_title(m, p) for m, p in zip(mfs, paths)])
    base_meta = ms.fill(ma.metadata, spec, override=("modelspec.title", "modelspec.date", "modelspec.merged_from"),
                        changes=changes)
    files = [*paths, *([vae_path] if vae_path else [])]
    coefs = [1.0 - alpha, alpha] if mode == "weighted-sum" else [1.0, alpha, -alpha]
    entries: list[dict[str, Any]] = [{"role": role, "file": os.path.basename(p), "sha256": md.SHA_PLACEHOLDER,
                                      **({"weight": coefs[i]} if i < len(paths) else {})}
                                     for i, (role, p) in enumerate(zip([*"ABC"[:len(paths)], "VAE"], files))]
    record["inputs"] = entries
    meta = md.combine(base_meta, meta_extra, md.provenance(paths[0], changes),
                      {"modelkit.merge": json.dumps(record, separators=(",", ":"))})
    if scaled[0] and cast is not None:  # the layers ComfyUI's quantization metadata names are plain now
        meta.pop(QUANT_METADATA, None)
    with contextlib.ExitStack() as stack:
        hashers = [] if dry_run else [stack.enter_context(md.SourceHash(p)) for p in files]

        def hashed() -> str:
            for entry, h in zip(entries, hashers):
                entry["sha256"] = h.hexdigest()
            return json.dumps(record, separators=(",", ":"))

        header, meta, stats = write_output(target, tensors, meta, source=paths[0], inputs=files,
                                           force=force, dry_run=dry_run, progress=progress, ahead=ahead,
                                           allow_overflow=allow_overflow, overflow=lambda: dict(mixer.overflow),
                                           dtype=dtype, hasher=hashers[0] if hashers else None,
                                           late={"modelkit.merge": hashed} if hashers else None)
    overflow = {**(stats.overflow if stats else {}), **mixer.overflow}
    if overflow:
        warnings.append(overflow_warning(overflow, tensors))
    return MergeModelsResult(
        sources=tuple(paths), output=target, status="dry-run" if dry_run else "written", mode=mode, alpha=alpha,
        block_weights={"BASE": base_w, **weights} if weights else {}, components=components, vae=vae_path,
        tensors=len(tensors), merged=counts["merged"], from_a=counts["a"] + counts["missing"], from_b=counts["b"],
        vae_tensors=counts["vae"], size=header.size, changes=tuple(changes), metadata=meta, warnings=tuple(warnings),
        stats=stats, seconds=time.perf_counter() - t0, overflow=overflow,
    )


def _title(mf: ModelFile, path: str) -> str:
    """An input's ModelSpec title, else its file name without the extension."""
    return mf.metadata.get("modelspec.title") or os.path.splitext(os.path.basename(path))[0]


def _check_shapes(ma: ModelFile, others: list[ModelFile], paths: list[str], components: tuple[str, ...],
                  family: str | None = None) -> None:
    mergeable = [k for k, r in ma.items() if selected(k, family, components) and r.dtype.is_float]
    if not mergeable:
        kind = detect_modelfile(ma).kind
        raise UsageError(paths[0], f"has no {'/'.join(components)} weights of an LDM checkpoint to merge (detected as "
                                   f"{kind})", "Pass full checkpoints; bake a LoRA in with `modelkit merge lora`")
    for mf, path in zip(others, paths[1:]):
        if not any(k in mf for k in mergeable):
            kind = detect_modelfile(mf).kind
            raise UsageError(path, f"shares none of the {len(mergeable)} {'/'.join(components)} weights of "
                                   f"{paths[0]} (detected as {kind})",
                             "Merge checkpoints of the same layout; bake a LoRA in with `modelkit merge lora`")
        bad = [k for k, r in ma.items() if selected(k, family, components) and k in mf
               and tuple(mf[k].shape) != tuple(r.shape)]
        if bad:
            da, db = detect_modelfile(ma).base, detect_modelfile(mf).base
            k = bad[0]
            raise UsageError(path, f"{len(bad)} tensors differ in shape from {paths[0]} (e.g. {k}: "
                                   f"{list(mf[k].shape)} vs {list(ma[k].shape)}); A is {da or 'of an unknown base'}, "
                                   f"this is {db or 'of an unknown base'}", "Merge checkpoints of the same base model")
