"""``modelkit prune``: drop EMA, optimizer state and junk; cast floats; fix broken keys; extract a part.

The steps, in order, all decided from the header before any data is read (except the few bytes
of ``position_ids``, read to check them):

1. drop junk tensors (``loss.*``, ``optimizer*``, ``lr_scheduler*``, ...);
2. EMA (``--ema``): ``keep``; ``drop`` every ``model_ema.*``; or ``only``, which writes each UNet
   weight ``model.diffusion_model.a.b.weight`` from its EMA copy ``model_ema.diffusion_modelabweight``
   (LitEma's name: the name after ``model.`` with its dots removed) and drops the rest of
   ``model_ema.*`` (``decay``, ``num_updates``);
3. ``--part unet|te|vae`` keeps one component; a VAE loses its ``first_stage_model.`` prefix so it
   loads as a standalone VAE;
4. ``position_ids`` that are not int64 ``0, 1, ..., n-1`` are rewritten as exactly that;
5. ``--dtype`` casts floating-point tensors only (never int or bool); a cast that turns finite
   values into inf is refused (``CastOverflowError``, nothing written) unless ``allow_overflow``.
   ``fp8_e4m3fn``/``fp8_e5m2`` cast the weight matrices only, and ``fp8`` says what happens to
   values out of their range (refuse, clamp, or a per-tensor scale): see ``modelkit.ops.fp8``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..dtypes import DType
from ..errors import FormatError, UsageError
from ..formats.safetensors_write import OutTensor, WriteStats
from ..layout.folder import open_input
from ..model import ModelFile, TensorRef
from ..paths import check_output
from ..remote import is_remote
from . import families
from . import fp8 as fp8_ops
from . import metadata as md
from .convert import (
    Plan,
    Progress,
    _architecture,
    _note_layout_changes,
    check_scan,
    default_output,
    early_hash,
    meta_changes,
    write_plan,
)
from .gguf_ops import refuse_quantized
from .result import result_dict

EMA_MODES = ("keep", "drop", "only")
#: The ModelSpec kind of each ``--part`` (its architecture suffix).
PART_KINDS = {"unet": "unet", "te": "text-encoder", "vae": "vae"}
PARTS = {
    "unet": ("model.diffusion_model.",),
    "te": ("cond_stage_model.", "conditioner."),
    "vae": ("first_stage_model.",),
}
#: A part whose prefix is removed when it is extracted, so it loads on its own.
STRIP = {"vae": "first_stage_model."}
JUNK_PREFIXES = ("loss.", "optimizer", "lr_scheduler", "lr_schedulers.", "callbacks.", "loops.", "discriminator.")
EMA_PREFIX = "model_ema."
UNET_PREFIX = "model.diffusion_model."
POSITION_IDS = "text_model.embeddings.position_ids"
CAST_TARGETS = ("fp16", "bf16", "fp32", *fp8_ops.FP8_CHOICES)


@dataclass(frozen=True)
class PruneResult:
    """What ``prune`` did (or would do) for one file.

    Attributes:
        source, output, status, container, tensors, size: as in ``ConvertResult``.
        input_size: the input's size in bytes.
        ema, dtype, part: the options used.
        removed: reason -> number of tensors removed (``junk``, ``ema``, ``other parts``).
        ema_swapped: UNet tensors written from their EMA copy.
        casts: tensors cast to ``dtype``.
        overflow: tensor -> count of finite values that became inf in the cast.
        fixed: keys rewritten because they were broken, with the reason.
    """

    source: str
    output: str
    status: str
    container: str
    tensors: int
    size: int
    input_size: int
    ema: str
    dtype: str | None
    part: str | None
    removed: dict[str, int] = field(default_factory=dict)
    ema_swapped: int = 0
    casts: int = 0
    overflow: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)
    changes: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, Any] = field(default_factory=dict)
    sidecars: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    stats: WriteStats | None = None
    scan: str | None = None
    seconds: float = 0.0

    to_dict = result_dict


def ema_name(name: str) -> str:
    """LitEma's name for a UNet weight: ``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab``."""
    return EMA_PREFIX + name[len("model."):].replace(".", "")


@dataclass
class _State:
    out: dict[str, OutTensor]
    removed: dict[str, int] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fixed: dict[str, str] = field(default_factory=dict)
    swapped: int = 0
    casts: int = 0

    def remove(self, names: list[str], reason: str) -> None:
        for n in names:
            del self.out[n]
        if names:
            self.removed[reason] = self.removed.get(reason, 0) + len(names)


def plan_prune(mf: ModelFile, *, ema: str = "drop", dtype: str | None = None, part: str | None = None,
               fp8: str | None = None) -> tuple[Plan, _State]:
    """Decide the output of ``prune`` for an open file (reads only ``position_ids`` data).

    Raises:
        UsageError: an unknown option value.
        FormatError: an EMA copy does not match its weight, or ``part`` selects nothing.
    """
    target = check_options(ema, dtype, part, fp8)
    st = _State({n: OutTensor.of(ref) for n, ref in mf.items()})
    if mf.container != "safetensors":
        st.changes.append(f"container {mf.container} -> safetensors")
    if mf.wrappers:
        st.changes.append(f"{'/'.join(mf.wrappers)} wrapper removed")
    junk = [n for n in st.out if n.startswith(JUNK_PREFIXES)]
    st.remove(junk, "junk")
    if junk:
        st.changes.append(f"removed {len(junk)} optimizer/loss/junk tensors")
    _ema(mf, st, ema)
    if part is not None:
        _part(mf.path, st, part)
    _fix_position_ids(st)
    if target is not None and target.itemsize == 1:
        mode = fp8_ops.check_mode(fp8, target)
        scaled_in = fp8_ops.scaled_weights(mf.tensors, mf.metadata)
        if scaled_in:  # another fp8 cast would keep the old scales and markers beside the new codes
            raise UsageError(mf.path, f"holds {len(scaled_in)} scaled fp8 weights; casting a scaled file to fp8 "
                                      "again is not done in one step",
                             "Upcast it first (prune FILE --dtype bf16 -o x.safetensors), then prune x to fp8")
        st.casts = fp8_ops.plan(st.out, target, mode)
        already = sum(1 for t in st.out.values() if t.ref is not None and t.ref.dtype == target
                      and fp8_ops.casts_to_fp8(t.name, t.shape, mode == "scaled"))
        if not st.casts and already and mode != "refuse":
            st.warnings.append(f"{already} weight matrices are {target.name} already: --fp8 {mode} applies to "
                               "casts from 16- and 32-bit weights, so they are written as they are")
        if st.casts:
            how = {"refuse": "", "clamp": ", saturated to its range", "scaled": ", each with a float32 scale "
                   "(ComfyUI comfy_quant layout)"}[mode]
            st.changes.append(f"cast {st.casts} weight matrices to {target.name}{how}; biases, norms and "
                              "embeddings kept")
    elif target is not None:
        upcast = fp8_ops.plan_dequantize(st.out, mf.tensors, mf.metadata, target)
        if upcast:
            st.casts += upcast
            st.changes.append(f"{upcast} scaled fp8 weights written as weight*scale in {target.name}; their "
                              "scales and markers dropped")
        for n, t in list(st.out.items()):
            if t.data is None and t.ref is not None and t.ref.dtype.is_float and t.ref.dtype != target:
                st.out[n] = OutTensor(t.name, target, t.shape, t.ref)
                st.casts += 1
        if st.casts:
            st.changes.append(f"cast {st.casts} float tensors to {target.name}")
    _note_layout_changes(mf, st.changes)
    meta, dropped = md.split_extras(mf.extras)
    if meta:
        st.changes.append("non-tensor values to metadata: " + ", ".join(sorted(meta)))
    if dropped:
        st.changes.append(f"{len(dropped)} non-tensor value{_s(len(dropped))} dropped")
    base = dict(mf.metadata)
    if any("scaled fp8 weights written as" in c for c in st.changes):  # the layers it names are plain now
        base.pop(fp8_ops.QUANT_METADATA, None)
    arch = _architecture(mf, "checkpoint") if part is None else None
    if part is not None and base.get("modelspec.architecture") is not None:
        st.changes.append("modelspec.architecture replaced (it described the whole checkpoint)")
    from ..detect import detect_modelfile

    det = detect_modelfile(mf)
    plan = Plan(list(st.out.values()), meta, dropped, st.changes, st.warnings, "checkpoint", arch, None, base,
                det.base, det.variant.get("prediction"),
                {**families.PART_KINDS, **PART_KINDS}[part] if part else det.kind if det.kind not in ("checkpoint", "unknown") else None,
                ("modelspec.architecture",) if part else ())
    return plan, st


def check_options(ema: str, dtype: str | None, part: str | None, fp8: str | None = None) -> DType | None:
    """Validate prune's options; returns the cast target (or None).

    Raises:
        UsageError: a value outside the documented choices.
    """
    if ema not in EMA_MODES:
        raise UsageError(None, f"--ema must be one of {', '.join(EMA_MODES)}, not {ema!r}")
    if part is not None and part not in PARTS and part not in families.PARTS:
        raise UsageError(None, f"--part must be one of {', '.join(dict.fromkeys([*PARTS, *families.PARTS]))}, "
                               f"not {part!r}")
    if dtype is None:
        fp8_ops.check_mode(fp8, None)
        return None
    target = fp8_ops.fp8_target(dtype)
    if target is not None:
        fp8_ops.check_mode(fp8, target)
        return target
    fp8_ops.check_mode(fp8, None)
    target = dtypes.ALIASES.get(dtype.lower())
    if target is None or target.name not in ("float16", "bfloat16", "float32"):
        raise UsageError(None, f"--dtype must be one of {', '.join(CAST_TARGETS)}, not {dtype!r}")
    return target


def _ema(mf: ModelFile, st: _State, mode: str) -> None:
    ema_keys = [n for n in st.out if n.startswith(EMA_PREFIX)]
    if mode == "keep":
        return
    if mode == "only":
        if not ema_keys:
            raise UsageError(mf.path, "has no EMA weights (model_ema.*), so --ema only has nothing to take",
                             "Use --ema drop (the default) or keep")
        else:
            missing = 0
            for n in [n for n in st.out if n.startswith(UNET_PREFIX)]:
                e = ema_name(n)
                ref = mf.get(e)
                if ref is None:
                    missing += 1
                    continue
                if ref.shape != st.out[n].shape:
                    raise FormatError(mf.path, f"EMA tensor {e!r} has shape {list(ref.shape)} but {n!r} has "
                                               f"{list(st.out[n].shape)}")
                st.out[n] = OutTensor.of(ref, n)
                st.swapped += 1
            st.changes.append(f"{st.swapped} UNet tensors taken from their EMA copies")
            if missing:
                st.warnings.append(f"{missing} UNet tensors have no EMA copy and were kept as they were")
    st.remove(ema_keys, "ema")
    if ema_keys:
        st.changes.append(f"removed {len(ema_keys)} EMA tensors (model_ema.*)")


def _part(path: str, st: _State, part: str) -> None:
    prefixes, strip = families.part_prefixes(st.out, part) or (PARTS.get(part, ()), STRIP.get(part))
    other = [n for n in st.out if not n.startswith(prefixes)]
    st.remove(other, "other parts")
    if not st.out:
        where = f" (none start with {' or '.join(prefixes)})" if prefixes else ""
        raise FormatError(path, f"has no {part} tensors{where}: --part takes one component out of a full checkpoint",
                          "Pass the full checkpoint, or prune this file without --part")
    if strip:
        st.out = {n[len(strip):]: OutTensor(n[len(strip):], t.dtype, t.shape, t.ref, t.data) for n, t in st.out.items()}
        st.changes.append(f"kept only the {part}, without its {strip} prefix")
    else:
        st.changes.append(f"kept only the {part}")


def _fix_position_ids(st: _State) -> None:
    import numpy as np

    for n, t in list(st.out.items()):
        if not n.endswith(POSITION_IDS) or t.ref is None or t.numel == 0:
            continue
        count = t.shape[-1] if t.shape else 1
        if t.numel != count:
            continue
        want = np.arange(count, dtype="<i8")
        reason = position_ids_problem(t.ref, want)
        if reason is None:
            continue
        st.out[n] = OutTensor(n, dtypes.BY_NAME["int64"], t.shape, None, want.tobytes())
        st.fixed[n] = reason
        st.changes.append(f"fixed {n} ({reason}) -> int64 0..{count - 1}")


def position_ids_problem(ref: TensorRef, want: Any) -> str | None:
    """Why a ``position_ids`` tensor is broken (float, or wrong values), or None when it is fine."""
    import numpy as np

    if ref.dtype.name != "int64":
        return f"it was {ref.dtype.name}"
    got = np.asarray(ref.read("numpy")).reshape(-1)
    bad = int((got != want).sum())
    return f"{bad} wrong values" if bad else None


def prune(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    ema: str = "drop",
    dtype: str | None = None,
    part: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    ignore_scan: bool = False,
    progress: Progress | None = None,
    allow_overflow: bool = False,
    fp8: str | None = None,
) -> PruneResult:
    """Prune a checkpoint into ``.safetensors``.

    Args:
        src: the input file (any container).
        out: the output; default ``<stem>.pruned.safetensors`` (``<stem>.<part>.safetensors`` with
            ``part``), in ``out_dir`` or beside the input.
        ema: ``keep``, ``drop`` (default) or ``only``.
        dtype: ``fp16``, ``bf16`` or ``fp32``: cast floating-point tensors only; ``fp8_e4m3fn`` or
            ``fp8_e5m2``: cast the weight matrices (see ``modelkit.ops.fp8`` for which).
        fp8: with an fp8 ``dtype``, what to do with values beyond its range: ``refuse`` (the
            default: ``CastOverflowError`` unless ``allow_overflow``), ``clamp`` (saturate) or
            ``scaled`` (a float32 scale per weight, in ComfyUI's ``comfy_quant`` layout).
        part: ``unet``, ``te`` or ``vae``: keep one component.
        force, dry_run, ignore_scan, progress: as for ``convert``.
        allow_overflow: write the output even when the cast turns finite values into inf (a
            warning then names them); by default that raises ``CastOverflowError`` and writes nothing.

    Returns:
        PruneResult.

    Raises:
        UsageError, UnsafeFileError, OutputExistsError, FormatError, OutputWriteError.
        CastOverflowError: the cast overflowed to inf (without ``allow_overflow``); nothing was written.

    Example:
        >>> modelkit.prune("v1-5.ckpt", ema="only", dtype="fp16").output  # doctest: +SKIP
        'v1-5.pruned.safetensors'
    """
    t0 = time.perf_counter()
    s = os.fspath(src)
    target = default_output(s, out, out_dir, default_tag(part))
    if is_remote(s) and not dry_run:  # downloaded whole beside the output, pruned as a local file, the copy removed
        from ..remote.download import run_on_copy

        check_output(target, force=force)
        return run_on_copy(s, target, lambda local: prune(
            local, target, ema=ema, dtype=dtype, part=part, force=force, dry_run=dry_run, ignore_scan=ignore_scan,
            progress=progress, allow_overflow=allow_overflow, fp8=fp8), progress)
    check_output(target, force=force, inputs=[] if is_remote(s) else [s])  # a remote dry run: ranged reads
    with early_hash(s, dry_run) as hasher:
        verdict, warnings = check_scan(s, ignore_scan)
        with open_input(s, allow_hidden_pickles=ignore_scan) as mf:
            refuse_quantized(mf, s, "prune")
            plan, st = plan_prune(mf, ema=ema, dtype=dtype, part=part, fp8=fp8)
            header, meta, stats, cars = write_plan(s, target, plan, force=force, dry_run=dry_run,
                                                   progress=progress, hasher=hasher,
                                                   allow_overflow=allow_overflow, dtype=dtype)
            warnings += st.warnings
            if not (st.removed or st.casts or st.fixed or st.swapped or plan.dropped):
                warnings.append("nothing to prune (no EMA, junk or optimizer state, no cast, no broken keys): "
                                "the output holds the same tensors; `modelkit convert` does this too")
            overflow = dict(stats.overflow) if stats else {}
            if overflow:
                what = ("were saturated to ±448 in" if str(dtype).replace("fp8_", "float8_") == "float8_e4m3fn"
                        else "overflowed to inf in")  # torch's e4m3fn cast saturates; e5m2 and the rest go to inf
                warnings.append(f"{sum(overflow.values()):,} values in {len(overflow)} tensors {what} "
                                f"{dtype}: " + ", ".join(f"{k} ({v})" for k, v in list(overflow.items())[:3]))
            if plan.dropped:
                warnings.append(f"{len(plan.dropped)} non-tensor value{_s(len(plan.dropped))} dropped: "
                                + ", ".join(list(plan.dropped)[:5]) + (" ..." if len(plan.dropped) > 5 else ""))
            return PruneResult(
                source=s, output=target, status="dry-run" if dry_run else "written", container=mf.container,
                tensors=len(plan.tensors), size=header.size, input_size=mf.size, ema=ema, dtype=dtype, part=part,
                removed=st.removed, ema_swapped=st.swapped, casts=st.casts, overflow=overflow, fixed=st.fixed,
                changes=tuple(meta_changes(meta)), metadata=meta, dropped=plan.dropped, sidecars=tuple(cars),
                warnings=tuple(warnings), stats=stats, scan=verdict, seconds=time.perf_counter() - t0,
            )


def default_tag(part: str | None) -> str:
    """The tag of prune's default output name: ``.pruned``, or ``.vae``/``.unet``/``.te``."""
    return f".{part}" if part else ".pruned"


def _s(n: int) -> str:
    """The plural ending for ``n`` things."""
    return "" if n == 1 else "s"
