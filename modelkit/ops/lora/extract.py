"""``modelkit lora extract``: a kohya-format LoRA from the difference of two checkpoints, by SVD.

For every adaptable weight (``keymap.Target``) the difference ``tuned - base`` is taken in the
compute dtype and cut to rank ``R`` by a truncated SVD, ``ΔW ≈ (U_R S_R) V_R``: ``lora_up = U_R S_R``,
``lora_down = V_R`` and ``alpha = R`` (scale 1). Which layers, as kohya trains them: the UNet's
transformer blocks (attention, feed-forward, ``proj_in``/``proj_out``) and the text encoders'
attention and MLP layers; with ``conv_rank`` also the ResBlock, downsampler and upsampler
convolutions (3x3 at ``conv_rank``, 1x1 at ``rank``). An OpenCLIP fused ``in_proj_weight`` gives
three modules, ``q_proj``, ``k_proj``, ``v_proj``. The checkpoints are read one tensor at a time.

A Flux.1 or SD3.x transformer (single file, transformer-only file or diffusers transformer) gives one
module per weight of its original layout, in kohya's names (``lora_unet_double_blocks_0_img_attn_qkv``),
fused ``qkv``/``linear1`` whole as kohya's trainers and ComfyUI have them (``dit_tools.extract``); its
text encoders (CLIP-L, CLIP-G, T5-XXL) as ``lora_te1_``/``lora_te2_``/``lora_te3_`` modules.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..._torch import require_torch
from ...detect import detect_modelfile
from ...errors import FormatError, UsageError
from ...formats.safetensors_write import OutTensor, WriteStats
from ...layout.folder import open_input
from ...paths import check_output
from .. import metadata as md
from .. import modelspec as ms
from ..convert import Progress, check_scan, default_output
from ..fp8 import refuse_scaled
from ..gguf_ops import refuse_quantized
from ..result import result_dict
from ..streaming import COMPUTE_DTYPES, OUTPUT_DTYPES, float_dtype, overflow_count, tensor_bytes, write_output
from . import dit, dit_tools
from .dit_tools import DIT
from .keymap import KeyMap, Target

#: Blocks extracted always, and those extracted only with ``conv_rank``.
LINEAR_BLOCKS = ("attention", "text")
CONV_BLOCKS = ("resnet", "sampler")


@dataclass(frozen=True)
class LoraOutResult:
    """What ``extract_lora``, ``merge_loras`` or ``convert_lora`` wrote (or would write).

    Attributes:
        operation: ``extract``, ``merge`` or ``convert``; sources: the inputs; output; status.
        base: the base model the key table came from; style: the output key style.
        modules: modules written; skipped: modules left out (unchanged layers, unmatched names).
        rank, conv_rank: the ranks asked for (None: kept as they were).
        tensors, size: output tensors and bytes.
    """

    operation: str
    sources: tuple[str, ...]
    output: str
    status: str
    base: str | None
    style: str
    modules: int
    skipped: int
    rank: int | None
    conv_rank: int | None
    tensors: int
    size: int
    changes: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    stats: WriteStats | None = None
    seconds: float = 0.0

    to_dict = result_dict


def svd_factors(delta: Any, shape: tuple[int, ...], rank: int) -> tuple[Any, Any]:
    """``(up, down)`` of rank ``min(rank, ...)`` with ``up @ down`` the best approximation of ``delta``.

    Shapes follow the layer: ``[out, R]``/``[R, in]``, or ``[out, R, 1, 1]``/``[R, in, kh, kw]``.
    """
    import torch

    out = shape[0]
    mat = delta.reshape(out, -1)
    r = max(1, min(rank, *mat.shape))
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    up = u[:, :r] * s[:r]
    down = vh[:r]
    if len(shape) > 2:
        return up.reshape(out, r, *([1] * (len(shape) - 2))), down.reshape(r, *shape[1:])
    return up.contiguous(), down.contiguous()


def out_tensor(name: str, t: Any, dt: Any, overflow: dict[str, int] | None = None) -> OutTensor:
    """A finished tensor (cast once to ``dt``) as an OutTensor holding its bytes; the finite values
    the cast turns into inf are counted into ``overflow`` (name -> count)."""
    from ...dtypes import BY_NAME

    if overflow is not None and (lost := overflow_count(t, dt)):
        overflow[name] = lost
    c = t.to(dt).contiguous()
    return OutTensor(name, BY_NAME[str(c.dtype).removeprefix("torch.")], tuple(c.shape), data=bytes(tensor_bytes(c)))


def lora_metadata(base: str | None, rank: int | None, conv_rank: int | None, *, title: str,
                  prediction: str | None = None, names: Iterable[str] = ()) -> dict[str, str]:
    """kohya's ``ss_*`` keys (``ss_base_model_version``, ``ss_v2`` ...) and the ModelSpec block of a new
    kohya LoRA of ``base`` (dated now)."""
    out = {"ss_network_module": "networks.lora"}
    if rank is not None:
        out.update({"ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    if conv_rank is not None:
        out["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})
    out.update(ms.kohya_tags(base, prediction))
    out.update(ms.modelspec_block(kind="lora", base=base, prediction=prediction, title=title, names=names, date=True))
    return out


def _rank_for(t: Target, rank: int, conv_rank: int | None) -> int | None:
    if t.block in LINEAR_BLOCKS:
        return rank
    if t.block in CONV_BLOCKS and conv_rank is not None:
        return conv_rank if len(t.shape) == 4 and t.shape[2] * t.shape[3] > 1 else rank
    return None


def extract_lora(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    rank: int = 16,
    conv_rank: int | None = None,
    dtype: str = "fp16",
    compute_dtype: str = "fp32",
    min_diff: float = 0.0,
    force: bool = False,
    dry_run: bool = False,
    ignore_scan: bool = False,
    progress: Progress | None = None,
    allow_overflow: bool = False,
) -> LoraOutResult:
    """Extract a kohya LoRA (LoCon with ``conv_rank``) from ``tuned - base`` by truncated SVD.

    Args:
        base, tuned: checkpoints of the same base model.
        out: the output; default ``<tuned>.lora.safetensors`` beside ``tuned``.
        rank: rank of linear and 1x1 layers; conv_rank: rank of 3x3 convolutions (None: skip them).
        dtype: the LoRA's dtype (``fp16`` default, ``bf16``, ``fp32``); compute_dtype: ``fp32``/``fp64``.
        min_diff: layers whose largest difference is at most this are left out (default: only
            layers that are equal).
        force, dry_run, ignore_scan, progress: as for ``convert`` (progress: once per layer).

    Returns:
        LoraOutResult.

    Raises:
        UsageError: bad ranks, the files are not checkpoints of the same base, or nothing differs.

    Example:
        >>> modelkit.extract_lora("v1-5.safetensors", "finetuned.safetensors", rank=32)  # doctest: +SKIP
    """
    require_torch("modelkit lora extract")
    t0 = time.perf_counter()
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UsageError(None, "--rank and --conv-rank must be 1 or more")
    if not math.isfinite(min_diff):
        raise UsageError(None, f"--min-diff must be a finite number, not {min_diff}")
    compute = float_dtype(compute_dtype, COMPUTE_DTYPES, "--compute-dtype")
    cast = float_dtype(dtype, OUTPUT_DTYPES, "--dtype")
    assert compute is not None and cast is not None
    b, t = os.fspath(base), os.fspath(tuned)
    target = default_output(t, out, None, ".lora")
    check_output(target, force=force, inputs=[b, t])
    warnings = check_scan(b, ignore_scan)[1] + check_scan(t, ignore_scan)[1]
    with open_input(b) as mb, open_input(t) as mt:
        for mf, path in ((mb, b), (mt, t)):
            refuse_scaled(mf.tensors, mf.metadata, path, "lora extract")
            refuse_quantized(mf, path, "lora extract")
        det = detect_modelfile(mb)
        if det.kind != "checkpoint":
            raise UsageError(b, f"is not a checkpoint (detected as {det.kind})")
        det_t = detect_modelfile(mt)
        if det.base != det_t.base and (det.base in DIT or det_t.base in DIT):
            raise UsageError(t, f"is {_family(det_t.base)} but the base {os.path.basename(b)} is {_family(det.base)}",
                             "Extract from two checkpoints of the same base model")
        km = KeyMap.build({k: r.shape for k, r in mb.items()}, det.base)
        overflow: dict[str, int] = {}
        tensors, skipped = _extract(km, mb, mt, t, rank, conv_rank, compute.torch(), cast.torch(), min_diff, progress,
                                    overflow)
        if dit.layout({k: r.shape for k, r in mb.items()}) is not None:  # Flux, SD3: the transformer by original weight
            def named(name: str, up: Any, down: Any) -> list[OutTensor]:
                return _module(name, up, down, cast.torch(), overflow)

            more, more_skipped = dit_tools.extract(mb, mt, t, rank, compute.torch(), cast.torch(), min_diff, progress,
                                                   overflow, named)
            tensors, skipped = more + tensors, skipped + more_skipped
    if not tensors:
        raise UsageError(t, f"no adaptable layer differs from {b}", "Check that these are two different checkpoints")
    modules = len(tensors) // 3
    linear = [t.shape[0] for t in tensors
              if t.name.endswith(".lora_down.weight") and (len(t.shape) == 2 or tuple(t.shape[2:]) == (1, 1))]
    dim = rank
    if linear and max(linear) < rank:  # every layer is smaller than the rank asked for: it kept its full rank
        dim = max(linear)
        warnings.append(f"--rank {rank} is more than any layer's full rank; the modules have rank {dim} at most, "
                        "and ss_network_dim says so")
    changes = [f"extracted {modules} modules at rank {rank}" + (f", conv rank {conv_rank}" if conv_rank else "")
               + f" from {os.path.basename(t)} - {os.path.basename(b)}"]
    record = {"base": os.path.basename(b), "tuned": os.path.basename(t), "rank": rank, "conv_rank": conv_rank,
              "compute_dtype": compute.name}
    meta = md.combine(lora_metadata(det.base, dim, conv_rank, prediction=det.variant.get("prediction"),
                                    title=os.path.splitext(os.path.basename(target))[0], names=[x.name for x in tensors]),
                      md.provenance(t, changes),
                      {"modelkit.extract": json.dumps(record, separators=(",", ":"))})
    header, meta, stats = write_output(target, tensors, meta, source=t, inputs=[b, t], force=force, dry_run=dry_run,
                                       allow_overflow=allow_overflow, overflow=lambda: overflow, dtype=cast.name)
    return LoraOutResult("extract", (b, t), target, "dry-run" if dry_run else "written", det.base, "kohya", modules,
                         skipped, rank, conv_rank, len(tensors), header.size, tuple(changes), meta, tuple(warnings),
                         stats, time.perf_counter() - t0)


def _family(base: str | None) -> str:
    from .bake import FAMILY_NAMES

    return FAMILY_NAMES.get(base or "", base or "of no known base")


def _module(name: str, up: Any, down: Any, cast: Any, overflow: dict[str, int]) -> list[OutTensor]:
    """A kohya module's three tensors, ``alpha`` = its rank (scale 1)."""
    import torch

    return [out_tensor(f"{name}.lora_down.weight", down, cast, overflow),
            out_tensor(f"{name}.lora_up.weight", up, cast, overflow),
            out_tensor(f"{name}.alpha", torch.tensor(float(down.shape[0])), cast, overflow)]


def _extract(km: KeyMap, mb: Any, mt: Any, tuned: str, rank: int, conv_rank: int | None, compute: Any, cast: Any,
             min_diff: float, progress: Callable[[str, int], None] | None, overflow: dict[str, int]
             ) -> tuple[list[OutTensor], int]:

    by_key: dict[str, list[tuple[Target, int]]] = {}
    for tg in km.targets:
        r = _rank_for(tg, rank, conv_rank)
        if r is not None:
            by_key.setdefault(tg.key, []).append((tg, r))
    tensors: list[OutTensor] = []
    skipped = 0
    for key, group in by_key.items():
        diff = weight_diff(mb, mt, key, tuned, compute)
        for tg, r in group:
            d = diff if tg.rows is None else diff[tg.rows[0]:tg.rows[1]]
            if float(d.abs().max()) <= min_diff:
                skipped += 1
                continue
            up, down = svd_factors(d, tg.shape, r)
            tensors += _module(km.name_for(tg, "kohya"), up, down, cast, overflow)
        if progress is not None:
            progress(key, mb[key].nbytes)
    return tensors, skipped


def weight_diff(mb: Any, mt: Any, key: str, tuned: str, compute: Any) -> Any:
    """``tuned[key] - base[key]`` in ``compute``, once both are checked: the same shape, finite values.

    Raises:
        UsageError: the tuned model lacks the tensor or has another shape.
        FormatError: either holds NaN or inf.
    """
    import torch

    ref_b, ref_t = mb[key], mt.get(key)
    if ref_t is None or tuple(ref_t.shape) != tuple(ref_b.shape):
        got = "missing" if ref_t is None else f"{list(ref_t.shape)}"
        raise UsageError(tuned, f"{key} is {got} but the base's is {list(ref_b.shape)}",
                         "Extract from two checkpoints of the same base model")
    tuned_w, base_w = ref_t.read("torch").to(compute), ref_b.read("torch").to(compute)
    for path, w in ((tuned, tuned_w), (mb.path, base_w)):
        if not bool(torch.isfinite(w).all()):
            raise FormatError(path, f"tensor {key!r} holds NaN or inf values, so no LoRA can be taken from it",
                              "The checkpoint is damaged (or was saved after a diverged training run); "
                              "use a good copy")
    return tuned_w.sub_(base_w)
