"""``modelkit merge lora``: bake LoRA-family files into a checkpoint, streaming, in one op for every base.

The LoRAs are loaded into RAM; the checkpoint is streamed one tensor at a time. Every LoRA module is
matched to a checkpoint weight through the forward key table built from the checkpoint's own keys
(``keymap.KeyMap``) and checked against its shape before anything is written. A weight no LoRA
touches is copied byte for byte; a touched one is read, widened into a reused scratch buffer in the
compute dtype, changed by each module in turn (``math.apply``: one ``addmm_`` for a plain LoRA)
and rounded once to its output dtype just before the writer needs it.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ... import dtypes
from ..._torch import require_torch
from ...detect import detect_modelfile
from ...errors import UsageError
from ...formats.safetensors_write import OutTensor, Pieces, WriteStats
from ...layout.folder import open_input as open_model
from ...model import TensorRef
from ...paths import check_output
from .. import metadata as md
from .. import modelspec as ms
from ..convert import Progress, check_scan, default_output
from ..fp8 import QUANT_METADATA
from ..fp8_merge import Requant, Scaled, dequantized
from ..gguf_ops import refuse_quantized
from ..result import result_dict
from ..streaming import (
    CHUNK,
    COMPUTE_DTYPES,
    OUTPUT_DTYPES,
    Ahead,
    Slots,
    default_jobs,
    float_dtype,
    narrow_in_place,
    overflow_count,
    overflow_warning,
    plain_ref,
    read_into,
    tensor_bytes,
    write_output,
)
from . import math as lmath
from .keymap import KeyMap
from .loader import LoraFile, Module, load_lora

#: Unmatched module names shown in a message.
SHOW = 3


@dataclass(frozen=True)
class LoraUse:
    """One LoRA as it went into a merge.

    Attributes:
        path, sha256: the file.
        ratio: its ratio (``--unet-ratio``/``--te-ratio`` multiply it per component).
        base: the base detection gave it; key_style: its key style.
        modules: its modules; matched: those merged; unmatched: names that matched nothing.
        algorithms: module kind -> count.
    """

    path: str
    sha256: str
    ratio: float
    base: str | None
    key_style: str | None
    modules: int
    matched: int
    unmatched: tuple[str, ...]
    algorithms: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "ratio": self.ratio, "base": self.base,
                "key_style": self.key_style, "modules": self.modules, "matched": self.matched,
                "unmatched": list(self.unmatched), "algorithms": dict(self.algorithms)}


@dataclass(frozen=True)
class MergeLoraResult:
    """What ``merge_lora`` did (or would do).

    Attributes:
        source, output, status: the checkpoint, the output, ``written`` or ``dry-run``.
        base: the checkpoint's base model; loras: each LoRA's use.
        unet_ratio, te_ratio, compute_dtype, dtype: the options.
        tensors: output tensors; touched: tensors a LoRA changed; size: output bytes.
        overflow: tensor -> values that became inf in the output dtype.
        scan: the checkpoint's scan verdict (the LoRAs are scanned too; an unsafe one is refused).
    """

    source: str
    output: str
    status: str
    base: str | None
    loras: tuple[LoraUse, ...]
    unet_ratio: float
    te_ratio: float
    compute_dtype: str
    dtype: str | None
    tensors: int
    touched: int
    size: int
    overflow: dict[str, int] = field(default_factory=dict)
    changes: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    stats: WriteStats | None = None
    scan: str | None = None
    seconds: float = 0.0

    to_dict = result_dict


def parse_spec(spec: str | tuple[str | os.PathLike[str], float]) -> tuple[str, float]:
    """``"a.safetensors:0.8"`` -> ``("a.safetensors", 0.8)``; a path alone has ratio 1.

    Raises:
        UsageError: the ratio is not a finite number.
    """
    if isinstance(spec, tuple):
        return os.fspath(spec[0]), float(spec[1])
    path, sep, tail = spec.rpartition(":")
    # a ratio holds no slash: "http://host:8000/a.safetensors" and "C:\\a.safetensors" are paths alone
    if sep and path and not os.path.exists(spec) and not any(c in tail for c in "/\\"):
        try:
            ratio = float(tail)
        except ValueError:
            raise UsageError(spec, f"the ratio {tail!r} is not a number", "Write FILE:RATIO, e.g. a.safetensors:0.8") from None
        if ratio != ratio or ratio in (float("inf"), float("-inf")):
            raise UsageError(spec, "the ratio must be a finite number")
        return path, ratio
    return spec, 1.0


@dataclass
class _Plan:
    contribs: dict[str, list[tuple[tuple[int, int] | None, Module, float]]] = field(default_factory=dict)
    uses: list[LoraUse] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _match(km: KeyMap, loras: list[tuple[LoraFile, float]], ckpt: str, base: str | None, unet_ratio: float,
           te_ratio: float, allow_unmatched: bool) -> _Plan:
    plan = _Plan()
    for lf, ratio in loras:
        unmatched: list[str] = []
        misfits: list[str] = []
        matched = 0
        _refuse_family(lf, base, ckpt)
        for name, mod in lf.modules.items():
            pieces = km.pieces(name)
            if pieces is None:
                unmatched.append(name)
                continue
            for t, up_rows in pieces:
                part = mod if up_rows is None else _cut(lf.path, mod, up_rows, t.key)
                why = lmath.misfit(part, t.shape)
                if why is not None:
                    misfits.append(f"{name}: {why} ({t.key}{'' if t.rows is None else f' rows {t.rows[0]}:{t.rows[1]}'})")
                    continue
                r = ratio * (unet_ratio if t.component == "unet" else te_ratio)
                plan.contribs.setdefault(t.key, []).append((t.rows, part, r))
            matched += 1
        made = f"; it looks made for {lf.base}" if lf.base and lf.base != base else ""
        if misfits:
            raise UsageError(lf.path, f"{len(misfits)} of its {len(lf.modules)} modules do not fit {ckpt} "
                                      f"({base or 'base unknown'}){made}: {misfits[0]}",
                             "Use a LoRA made for this base model")
        if unmatched and not allow_unmatched:
            raise UsageError(lf.path, f"{len(unmatched)} of its {len(lf.modules)} modules match no weight of {ckpt} "
                                      f"({base or 'base unknown'}){made}: " + ", ".join(unmatched[:SHOW])
                             + (" ..." if len(unmatched) > SHOW else ""),
                             "Check that the LoRA is for this base model; --allow-unmatched merges the rest")
        if unmatched:
            plan.warnings.append(f"{lf.path}: {len(unmatched)} modules matched nothing and were skipped: "
                                 + ", ".join(unmatched[:SHOW]) + (" ..." if len(unmatched) > SHOW else ""))
        if lf.leftover:
            plan.warnings.append(f"{lf.path}: {len(lf.leftover)} tensors outside any module were ignored "
                                 f"(e.g. {lf.leftover[0]})")
        plan.warnings.extend(f"{lf.path}: {n}" for n in lf.notes)
        plan.uses.append(LoraUse(lf.path, lf.sha256, ratio, lf.base, lf.detection.details.get("key_style"),
                                 len(lf.modules), matched, tuple(unmatched), lf.algorithms()))
    return plan


#: Base names in messages.
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "the SDXL refiner",
                "sd3": "SD3", "flux": "Flux"}


def _refuse_family(lf: LoraFile, base: str | None, ckpt: str) -> None:
    """A LoRA for a DiT family (Flux, SD3) on another base, or the reverse, is refused in one line."""
    dit = ("flux", "sd3")
    if lf.base and base and lf.base != base and (lf.base in dit or base in dit):
        raise UsageError(lf.path, f"this LoRA is for {FAMILY_NAMES.get(lf.base, lf.base)}, the checkpoint "
                                  f"{os.path.basename(ckpt)} is {FAMILY_NAMES.get(base, base)}",
                         "Use a LoRA made for this base model")


def _cut(path: str, mod: Module, rows: tuple[int, int], key: str) -> Module:
    """The part of a LoRA whose delta is rows ``rows`` of ``up @ down``: the same module with those rows of ``up``."""
    if mod.algo != "lora" or "mid" in mod.parts or mod.dora:
        raise UsageError(path, f"module {mod.name} ({mod.kind}) spans weights that {key} splits, and only a plain "
                               "LoRA can be cut by rows", "Use a plain LoRA, or a checkpoint in the LoRA's key style")
    parts = dict(mod.parts)
    parts["up"] = parts["up"][rows[0]:rows[1]]
    return Module(mod.name, mod.algo, parts, dict(mod.keys), mod.alpha, mod.scalar, mod.on_input)


class _Baker:
    """Computes one touched weight: read (in chunks) into the slot's reused scratch in the compute
    dtype, apply each module in place (one ``addmm_`` for a LoRA), round once to the output dtype in
    the same memory, which holds the result until it is written."""

    def __init__(self, compute: Any) -> None:
        self.compute = compute
        self.slots = Slots()
        self.overflow: dict[str, int] = {}
        self.lock = threading.Lock()

    def by_rows(self, ref: TensorRef, contribs: list[tuple[tuple[int, int] | None, Module, float]] | None,
                factor: float | None) -> bool:
        """Whether ``fn`` bakes this weight a block of rows at a time (then it holds a block, not the tensor)."""
        return (factor is None and bool(contribs) and ref.numel > 4 * CHUNK and len(ref.shape) >= 2
                and plain_ref(ref) and all(_plain(mod) for _r, mod, _x in contribs or []))

    def cost(self, ref: TensorRef, contribs: list[tuple[tuple[int, int] | None, Module, float]] | None,
             factor: float | None, itemsize: int) -> int:
        """The bytes ``fn``'s job holds until written (``Ahead``'s budget)."""
        return 2 * CHUNK * itemsize if self.by_rows(ref, contribs, factor) else ref.numel * itemsize

    def fn(self, ref: TensorRef, contribs: list[tuple[tuple[int, int] | None, Module, float]], out_dt: Any,
           factor: float | None = None) -> Any:
        if self.by_rows(ref, contribs, factor):
            return self._by_rows(ref, contribs, out_dt)

        def run(slot: int) -> Any:
            flat = self.slots.scratch(slot, ref.numel, self.compute)
            if factor is None:
                read_into(ref, flat, self.slots, slot)
            else:  # a scaled fp8 weight: its value, q.float() * scale
                flat.copy_(dequantized(ref, factor, self.compute).reshape(-1))
            w = flat.view(ref.shape)
            for rows, mod, ratio in contribs:
                lmath.apply(mod, w if rows is None else w[rows[0]:rows[1]], ratio)
            res, lost = narrow_in_place(flat, out_dt, self.slots, slot)
            if lost:
                with self.lock:
                    self.overflow[ref.name] = lost
            return tensor_bytes(res)
        return run

    def _by_rows(self, ref: TensorRef, contribs: list[tuple[tuple[int, int] | None, Module, float]],
                 out_dt: Any) -> Any:
        """A large weight changed by plain LoRAs only, a block of rows at a time (read, ``addmm_`` of each
        module's rows of ``up``, rounded into the output dtype) as the writer takes it (``Pieces``): no
        copy of the whole weight is ever in memory, in any dtype."""
        import torch

        rows = int(ref.shape[0])
        cols = ref.numel // rows
        per = max(1, CHUNK // cols)
        item, stored, begin = ref.dtype.itemsize, ref.dtype.torch(), ref.byte_range[0]
        assert ref.source is not None
        source = ref.source

        def blocks(slot: int) -> Iterator[Any]:
            mods = []
            for span, mod, ratio in contribs:
                if ratio == 0.0:
                    continue
                a, b = span or (0, rows)
                up = mod.parts["up"].to(self.compute).reshape(b - a, -1)
                down = mod.parts["down"].to(self.compute)
                mods.append((a, b, up, down.reshape(int(down.shape[0]), -1), ratio * mod.scale()))
            buf = self.slots.get(slot, "rows", per * cols, self.compute)
            raw = self.slots.get(slot, "raw", per * cols * item, torch.uint8)
            out = self.slots.get(slot, "out", per * cols, out_dt)
            lost = 0
            for r0 in range(0, rows, per):
                r1 = min(rows, r0 + per)
                n = (r1 - r0) * cols
                source.read_into(memoryview(raw[: n * item].numpy()), begin + r0 * cols * item)
                part = buf[:n]
                part.copy_(raw[: n * item].view(stored))
                block = part.view(r1 - r0, cols)
                for a, b, up, down, alpha in mods:
                    lo, hi = max(a, r0), min(b, r1)
                    if lo < hi:
                        block[lo - r0:hi - r0].addmm_(up[lo - a:hi - a], down, alpha=alpha)
                lost += overflow_count(part, out_dt)
                yield tensor_bytes(out[:n].copy_(part))
            if lost:
                with self.lock:
                    self.overflow[ref.name] = lost
        return lambda slot: Pieces(blocks(slot))

    def dense(self, ref: TensorRef, contribs: list[tuple[tuple[int, int] | None, Module, float]],
              factor: float | None) -> Callable[[], Any]:
        """The merged weight of a scaled fp8 input, as a new tensor in the compute dtype (``fp8_merge.Requant``
        scales it again)."""
        def make() -> Any:
            w = dequantized(ref, factor, self.compute)
            for rows, mod, ratio in contribs:
                lmath.apply(mod, w if rows is None else w[rows[0]:rows[1]], ratio)
            return w
        return make


def merge_lora(
    base: str | os.PathLike[str],
    loras: Sequence[str | tuple[str | os.PathLike[str], float]],
    out: str | os.PathLike[str] | None = None,
    *,
    unet_ratio: float = 1.0,
    te_ratio: float = 1.0,
    allow_unmatched: bool = False,
    compute_dtype: str = "fp32",
    dtype: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    ignore_scan: bool = False,
    jobs: int | None = None,
    progress: Progress | None = None,
    allow_overflow: bool = False,
) -> MergeLoraResult:
    """Bake LoRA-family files into a checkpoint, one tensor at a time.

    Args:
        base: the checkpoint (SD 1.x, SD 2.x or SDXL single file; Flux.1 or SD3.x single file,
            transformer-only file or diffusers transformer; any container).
        loras: ``"file:ratio"`` strings or ``(file, ratio)`` pairs, applied in order.
        out: the output ``.safetensors``; default ``<base>.merged.safetensors`` beside the base.
        unet_ratio, te_ratio: multiply every LoRA's ratio for UNet / text-encoder modules.
        allow_unmatched: skip (and report) modules that match no weight instead of failing.
        compute_dtype: ``fp32`` (default) or ``fp64``; the result is rounded once to its dtype.
        dtype: cast every float tensor of the output (``fp16``, ``bf16``, ``fp32``); default:
            each tensor keeps the checkpoint's dtype.
        force, dry_run, ignore_scan: as for ``convert``.
        jobs: worker threads computing ahead of the writer (default 1; each op already uses every core).
        progress: called after each tensor is written with its name and size.
        allow_overflow: write the output even when finite values become inf in its dtype (a
            warning then names them); by default that raises ``CastOverflowError`` and writes nothing.

    torch's OpenMP threads spin between operations unless ``OMP_WAIT_POLICY=PASSIVE`` is set before
    torch is imported (the CLI sets it); spinning makes a merge several times slower on a busy
    machine with few cores.

    Returns:
        MergeLoraResult.

    Raises:
        UsageError: a file is not a LoRA/checkpoint, a LoRA is for another base, or modules match
            nothing (without ``allow_unmatched``).
        UnsafeFileError, OutputExistsError, FormatError, OutputWriteError: as for ``convert``.
        CastOverflowError: values overflowed to inf (without ``allow_overflow``); nothing was written.

    Example:
        >>> modelkit.merge_lora("v1-5.safetensors", ["style.safetensors:0.8"], "out.safetensors")  # doctest: +SKIP
    """
    require_torch("modelkit merge lora")
    t0 = time.perf_counter()
    src = os.fspath(base)
    specs = [parse_spec(s) for s in loras]
    if not specs:
        raise UsageError(None, "no LoRA given", "Name at least one LoRA file, e.g. style.safetensors:0.8")
    for opt, value in (("--unet-ratio", unet_ratio), ("--te-ratio", te_ratio)):
        if not math.isfinite(value):
            raise UsageError(None, f"{opt} must be a finite number, not {value}")
    compute = float_dtype(compute_dtype, COMPUTE_DTYPES, "--compute-dtype")
    cast = float_dtype(dtype, OUTPUT_DTYPES, "--dtype")
    assert compute is not None
    target = default_output(src, out, None, ".merged")
    check_output(target, force=force, inputs=[src, *(p for p, _ in specs)])
    verdict, warnings = check_scan(src, ignore_scan)
    for p, _ in specs:
        warnings += check_scan(p, ignore_scan)[1]
    loaded = [(load_lora(p), r) for p, r in specs]
    with open_model(src) as mf:
        refuse_quantized(mf, src, "merge lora")
        scaled = Scaled(mf.tensors, mf.metadata)
        det = detect_modelfile(mf)
        if det.kind != "checkpoint":
            raise UsageError(src, f"is not a checkpoint (detected as {det.kind})", "Pass the checkpoint first, then the LoRAs")
        km = KeyMap.build({k: r.shape for k, r in mf.items()}, det.base)
        plan = _match(km, loaded, src, det.base, unet_ratio, te_ratio, allow_unmatched)
        warnings += plan.warnings
        baker = _Baker(compute.torch())
        ahead = Ahead(jobs or default_jobs())
        tensors: list[OutTensor] = []
        cells = {w: Requant(baker.dense(mf[w], plan.contribs[w], scaled.factor(w)), scaled.found[w].format, w)
                 for w in scaled.found if w in plan.contribs and cast is None}
        for name, ref in mf.items():
            out_dt = cast if cast is not None and ref.dtype.is_float else ref.dtype
            contribs = plan.contribs.get(name)
            if name in scaled.drop:  # a scale or marker of a scaled fp8 weight
                if cast is None:
                    cell = cells.get(scaled.scale_of.get(name, ""))
                    tensors.append(OutTensor.of(ref) if cell is None else
                                   OutTensor(name, dtypes.BY_NAME["float32"], ref.shape, compute=cell.scale))
                continue
            if name in cells:
                tensors.append(OutTensor(name, ref.dtype, ref.shape, ref,
                                         compute=ahead.bind(name, cells[name].weight, ref.numel * compute.itemsize)))
                continue
            if name in scaled.found and cast is not None:  # written as its value in the cast dtype
                fn = baker.fn(ref, contribs or [], out_dt.torch(), scaled.factor(name))
                tensors.append(OutTensor(name, out_dt, ref.shape, ref, compute=ahead.bind(name, fn, ref.numel * compute.itemsize)))
                continue
            if contribs is None:
                tensors.append(OutTensor.of(ref, dtype=out_dt))
                continue
            if not ref.dtype.is_float:
                raise UsageError(src, f"a LoRA targets {name}, which is {ref.dtype.name}, not a float weight")
            fn = baker.fn(ref, contribs, out_dt.torch())
            cost = baker.cost(ref, contribs, None, compute.itemsize)
            tensors.append(OutTensor(name, out_dt, ref.shape, ref, compute=ahead.bind(name, fn, cost)))
        changes = _changes(mf.container, plan, dtype)
        if cells:
            changes.append(f"{len(cells)} scaled fp8 weights merged as weight*scale and scaled again (new scales)")
        if scaled and cast is not None:
            changes.append(f"{len(scaled.found)} scaled fp8 weights written as {dtype} values; their scales dropped")
        meta_extra, _dropped = md.split_extras(mf.extras)
        record = {"loras": [{"file": os.path.basename(u.path), "sha256": u.sha256, "ratio": u.ratio,
                             "modules": u.matched} for u in plan.uses],
                  "unet_ratio": unet_ratio, "te_ratio": te_ratio, "compute_dtype": compute.name}
        title = os.path.splitext(os.path.basename(target))[0]
        spec = ms.modelspec_block(kind="checkpoint", base=det.base, prediction=det.variant.get("prediction"),
                                  title=title, names=list(mf), date=True,
                                  merged_from=[mf.metadata.get("modelspec.title") or _stem(src)]
                                  + [_stem(u.path) for u in plan.uses])
        base_meta = ms.fill(mf.metadata, spec, changes=changes,
                            override=("modelspec.title", "modelspec.date", "modelspec.merged_from"))
        meta = md.combine(base_meta, meta_extra, md.provenance(src, changes),
                          {"modelkit.merge": json.dumps(record, separators=(",", ":"))})
        if scaled and cast is not None:  # the layers ComfyUI's quantization metadata names are plain now
            meta.pop(QUANT_METADATA, None)
        header, meta, stats = write_output(target, tensors, meta, source=src, inputs=[src, *(p for p, _ in specs)],
                                           force=force, dry_run=dry_run, progress=progress, ahead=ahead,
                                           allow_overflow=allow_overflow, overflow=lambda: dict(baker.overflow),
                                           dtype=dtype)
    overflow = {**(stats.overflow if stats else {}), **baker.overflow}
    if overflow:
        warnings.append(overflow_warning(overflow, tensors))
    return MergeLoraResult(
        source=src, output=target, status="dry-run" if dry_run else "written", base=det.base, loras=tuple(plan.uses),
        unet_ratio=unet_ratio, te_ratio=te_ratio, compute_dtype=compute.name, dtype=dtype, tensors=len(tensors),
        touched=len(plan.contribs), size=header.size, overflow=overflow, changes=tuple(changes),
        metadata=meta, warnings=tuple(warnings), stats=stats, scan=verdict, seconds=time.perf_counter() - t0,
    )


def _plain(mod: Module) -> bool:
    """A plain LoRA/LoCon module, whose change is one ``addmm_`` (so rows of it can be applied alone)."""
    return mod.algo == "lora" and "mid" not in mod.parts and not mod.dora


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _changes(container: str, plan: _Plan, dtype: str | None) -> list[str]:
    out = [f"container {container} -> safetensors"] if container != "safetensors" else []
    for u in plan.uses:
        out.append(f"merged {os.path.basename(u.path)} at ratio {u.ratio:g} ({u.matched} modules)")
    out.append(f"{len(plan.contribs)} weights changed by LoRAs")
    if dtype:
        out.append(f"float tensors written as {dtype}")
    return out
