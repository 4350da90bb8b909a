"""Fast, safe loading onto the CPU or a GPU: ``modelkit.load`` and ``modelkit.load_into``.

Every container goes through the safe readers (pickle formats through the allow-list), then:

* **CPU**: tensors whose bytes already have the target dtype, byte order and alignment are
  zero-copy views of one private (copy-on-write) memory map of the file; the rest are read with
  ``pread`` and cast.
* **CUDA**: tensors are grouped by stored dtype; each group gets one device buffer and its
  tensors are views into it. The file is read with ``pread`` into a few pinned staging buffers
  laid out exactly like the device buffer, so each staging buffer is one asynchronous copy, and
  the read of chunk i+1 overlaps the copy of chunk i. Casts run on the GPU.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import portable
from ._torch import require_torch
from .dtypes import ALIASES
from .errors import FormatError, ModelkitError, UsageError
from .model import ModelFile, TensorRef
from .reading import open_model

ALIGN = 256
STAGING_BYTES = 64 * 1024 * 1024
STAGING_BUFFERS = 3


def _torch() -> Any:
    import torch

    return torch


def _target_dtype(ref: TensorRef, dtype: Any) -> Any:
    src = ref.dtype.torch()
    if dtype is None or not (src.is_floating_point and not src.is_complex):
        return src
    return dtype


def resolve_dtype(dtype: Any) -> Any:
    """``dtype`` (a torch dtype or a name such as ``float16``/``fp16``/``bf16``) as a floating-point
    torch dtype, or ``None``.

    Raises:
        UsageError: not a floating-point dtype name.
    """
    if dtype is None:
        return None
    torch = _torch()
    if isinstance(dtype, torch.dtype):
        target = dtype
    else:
        d = ALIASES.get(str(dtype).lower())
        target = d.torch() if d is not None and d.is_float else None
    if target is None or not target.is_floating_point:
        names = ", ".join(sorted(k for k, v in ALIASES.items() if v.is_float and not k.startswith("float8")))
        raise UsageError(None, f"--dtype {dtype!s} is not a floating-point type to cast to", f"Use one of {names}")
    return target


def resolve_device(device: str) -> Any:
    """``device`` as a ``torch.device`` that this machine has.

    Raises:
        UsageError: the name is not a device, or this torch build or machine lacks it.
    """
    torch = _torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(None, f"--device {device!r} is not a device name", "Use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(None, f"--device {device}: CUDA is not available (no GPU, or a CPU-only torch build)",
                             "Use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(None, f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                             "Use cuda:0 .. cuda:N-1")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(None, f"--device {device}: MPS is not available on this machine", "Use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(None, f"--device {device}: modelkit loads onto cpu, cuda or mps only", "Use cpu, cuda, cuda:N or mps")
    return dev


def _select(mf: ModelFile, keys: Iterable[str] | None) -> list[TensorRef]:
    if keys is None:
        return list(mf.values())
    wanted = list(keys)
    missing = [k for k in wanted if k not in mf]
    if missing:
        raise FormatError(mf.path, f"{len(missing)} requested keys are not in the file (first: {missing[0]!r})")
    return [mf[k] for k in wanted]


def load(path: str | os.PathLike[str], device: str = "cpu", dtype: Any = None,
         keys: Iterable[str] | None = None, dequantize: bool = False) -> dict[str, Any]:
    """Load tensors from any supported container, safely and fast.

    Args:
        path: the model file (safetensors, torch zip or legacy, pickle, npy/npz).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: cast floating-point tensors to this dtype (torch dtype or name); ints stay.
        keys: load only these tensors (for example one component).
        dequantize: return each scaled fp8 weight (ComfyUI's ``comfy_quant`` or ``scaled_fp8``
            layout) as ``weight.float() * scale`` (float32, or ``dtype``), without its scale and
            marker tensors, and each quantized GGUF tensor (Q8_0, Q4_K ...) as its values in its
            logical shape (float32, or ``dtype``; the ``[gguf]`` extra); by default the file's tensors
            are returned as stored (a quantized GGUF tensor as its packed ``uint8`` blocks).

    Returns:
        ``{name: torch.Tensor}`` in file order.

    Raises:
        UnsafeFileError, FormatError: from the safe readers.
        UsageError: an unknown or unavailable device, or a dtype that is not floating-point.

    Example:
        >>> sd = modelkit.load("model.safetensors", device="cuda", dtype="float16")  # doctest: +SKIP
    """
    require_torch("modelkit load")
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype)
    with open_model(path) as mf:
        refs = _select(mf, keys)
        if dev.type == "cuda":
            out = _load_cuda(mf, refs, dev, dtype)
        else:
            out = _load_cpu(mf, refs, dtype)
            if dev.type != "cpu":
                out = {k: v.to(dev) for k, v in out.items()}
        return _dequantize(mf, out, dtype) if dequantize else out


def _dequantize(mf: ModelFile, out: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """``out`` with its scaled fp8 weights upcast (``weight.float() * scale``) and their scales and
    markers dropped."""
    from .ops import fp8

    if mf.container == "gguf":
        from .ops.gguf_ops import dequantized_torch

        values = {name: dequantized_torch(mf, name) for name in out}
        return {name: t if values[name] is None else values[name].to(
            device=t.device, dtype=dtype if dtype is not None else values[name].dtype) for name, t in out.items()}
    found = fp8.scaled_weights(mf.tensors, mf.metadata)
    if not found:
        return out
    drop = fp8.bookkeeping(mf.tensors, found)
    res: dict[str, Any] = {}
    for name, t in out.items():
        if name in drop:
            continue
        sw = found.get(name)
        if sw is not None:
            t = t.float() * fp8.scale_value(mf.tensors, sw)
            if dtype is not None:
                t = t.to(dtype)
        res[name] = t
    return res


def _load_cpu(mf: ModelFile, refs: list[TensorRef], dtype: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mm = None
    if mf.source is not None and mf.source.fd >= 0 and mf.size > 0:
        # A private mapping is writable (torch wants that) and copies a page only if written.
        mm = mmap.mmap(mf.source.fd, 0, access=mmap.ACCESS_COPY)
    for ref in refs:
        target = _target_dtype(ref, dtype)
        t = _zero_copy(mm, ref) if mm is not None else None
        if t is None:
            t = ref.read("torch")
        if t.dtype != target:
            t = t.to(target)
        out[ref.name] = t
    return out


def _zero_copy(mm: Any, ref: TensorRef) -> Any:
    """A view of the mapping, or None where the bytes need work (cast, swap, inflate)."""
    if ref.compressed is not None or ref.inline is not None or ref.byteorder != "little" or ref.numel == 0:
        return None
    begin, end = ref.byte_range
    item = ref.dtype.itemsize
    if begin % item or end > len(mm):
        return None
    torch = _torch()
    flat = torch.frombuffer(mm, dtype=ref.dtype.torch(), count=ref.span, offset=begin)
    if ref.is_contiguous:
        return flat.view(ref.shape) if ref.shape else flat.reshape(())
    return flat.as_strided(ref.shape, ref.strides, 0)


@dataclass
class _Plan:
    """Where each tensor goes in its dtype group's device buffer."""

    dtype_name: str
    refs: list[TensorRef]
    offsets: list[int]
    total: int


def _plans(refs: list[TensorRef]) -> list[_Plan]:
    groups: dict[str, list[TensorRef]] = {}
    for r in refs:
        groups.setdefault(r.dtype.name, []).append(r)
    plans = []
    for name, group in groups.items():
        group.sort(key=lambda r: r.byte_range[0])
        offsets, pos = [], 0
        for r in group:
            offsets.append(pos)
            span = r.byte_range[1] - r.byte_range[0]
            pos += -(-span // ALIGN) * ALIGN
        plans.append(_Plan(name, group, offsets, pos))
    return plans


def _load_cuda(mf: ModelFile, refs: list[TensorRef], dev: Any, dtype: Any) -> dict[str, Any]:
    return _load_staged(mf, refs, dev, dtype, STAGING_BYTES)


def _load_staged(mf: ModelFile, refs: list[TensorRef], dev: Any, dtype: Any, staging_bytes: int) -> dict[str, Any]:
    """The staged pipeline: pread into staging buffers laid out like one device buffer per dtype.

    On CUDA the staging buffers are pinned and each fill is one asynchronous copy on a side
    stream, so reading the next fill overlaps copying the last. On any other device the same
    pipeline runs with plain buffers and synchronous copies (which is how CI tests it).
    """
    torch = _torch()
    cuda = dev.type == "cuda"
    out: dict[str, Any] = {}
    direct = [r for r in refs if r.compressed is None and r.inline is None and r.byteorder == "little"]
    slow = [r for r in refs if r not in direct]
    stream = torch.cuda.Stream(device=dev) if cuda else None
    staging = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(STAGING_BUFFERS)]
    events: list[Any] = [None] * STAGING_BUFFERS
    views = [s.numpy() for s in staging]
    assert mf.source is not None
    fd = mf.source.fd
    slot = 0

    def flush(slot: int, buf: Any, start: int, length: int) -> None:
        if length == 0:
            return
        if stream is None:
            buf[start : start + length].copy_(staging[slot][:length])
            return
        with torch.cuda.stream(stream):
            buf[start : start + length].copy_(staging[slot][:length], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        events[slot] = ev

    for plan in _plans(direct):
        device_buf = torch.empty(max(plan.total, 1), dtype=torch.uint8, device=dev)
        if stream is not None:
            # The caching allocator may hand back memory that work queued on the current stream
            # still uses; the side stream must not write into it before that work is done.
            stream.wait_stream(torch.cuda.current_stream(dev))
        fill_start = 0  # device_buf offset of staging[slot][0]
        fill_len = 0
        for ref, off in zip(plan.refs, plan.offsets):
            begin, end = ref.byte_range
            done = 0
            while done < end - begin:
                if fill_len == 0:
                    if events[slot] is not None:
                        events[slot].synchronize()  # that staging buffer's last copy is done
                    fill_start = off + done
                rel = off + done - fill_start
                room = staging_bytes - rel
                if room <= 0:
                    flush(slot, device_buf, fill_start, fill_len)
                    slot = (slot + 1) % STAGING_BUFFERS
                    fill_len = 0
                    continue
                n = min(room, end - begin - done)
                got = portable.read_into(fd, views[slot][rel : rel + n], begin + done)
                if got != n:
                    raise FormatError(mf.path, f"the file ends inside tensor {ref.name!r}")
                done += n
                fill_len = rel + n
            # padding up to the next aligned offset is copied as garbage; nothing views it
        flush(slot, device_buf, fill_start, fill_len)
        slot = (slot + 1) % STAGING_BUFFERS
        for ref, off in zip(plan.refs, plan.offsets):
            span = ref.byte_range[1] - ref.byte_range[0]
            if not ref.numel:
                out[ref.name] = torch.empty(ref.shape, dtype=ref.dtype.torch(), device=dev)
                continue
            t = device_buf[off : off + span].view(ref.dtype.torch())
            # as_strided keeps the slice's own storage offset (the tensor's place in device_buf)
            out[ref.name] = t.as_strided(ref.shape, ref.strides)
    if stream is not None:
        torch.cuda.current_stream(dev).wait_stream(stream)
    for ref in slow:
        out[ref.name] = ref.read("torch").to(dev)
    for ref in refs:
        target = _target_dtype(ref, dtype)
        if out[ref.name].dtype != target:
            out[ref.name] = out[ref.name].to(target)  # on CUDA the cast runs on the GPU
    if cuda:
        torch.cuda.synchronize(dev)
    return {r.name: out[r.name] for r in refs}


def load_into(module: Any, path: str | os.PathLike[str], strict: bool = True) -> list[str]:
    """Fill an existing ``torch.nn.Module`` from a file, one tensor at a time.

    Each parameter and buffer is copied in place from a zero-copy view of the file, so no second
    full copy of the model exists at any point.

    Args:
        module: the module to fill.
        path: the model file.
        strict: every module key must be in the file and every file tensor must be used.

    Returns:
        The module keys that were not in the file (empty when ``strict``).

    Raises:
        ModelkitError: a missing or unexpected key (strict), or a shape mismatch.
    """
    require_torch("modelkit.load_into")
    torch = _torch()
    target = module.state_dict(keep_vars=True)
    with open_model(path) as mf:
        missing = [k for k in target if k not in mf]
        unexpected = [k for k in mf if k not in target]
        if strict and (missing or unexpected):
            what = []
            if missing:
                what.append(f"{len(missing)} module keys missing from the file (first: {missing[0]!r})")
            if unexpected:
                what.append(f"{len(unexpected)} file tensors the module lacks (first: {unexpected[0]!r})")
            raise ModelkitError(mf.path, "; ".join(what), "Pass strict=False to load what matches")
        mm = mmap.mmap(mf.source.fd, 0, access=mmap.ACCESS_COPY) if mf.source and mf.size else None
        with torch.no_grad():
            for name, param in target.items():
                if name not in mf:
                    continue
                ref = mf[name]
                if tuple(param.shape) != ref.shape:
                    raise ModelkitError(mf.path, f"tensor {name!r} has shape {list(ref.shape)}, the module expects "
                                                 f"{list(param.shape)}", "Check that the file is for this model")
                src = _zero_copy(mm, ref) if mm is not None else None
                if src is None:
                    src = ref.read("torch")
                param.copy_(src)
    return missing
