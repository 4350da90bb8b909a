"""The streaming safetensors writer: header first, then each tensor's bytes in header order.

Every output name, dtype and shape is known before any data is read, so the header (and with it
every offset) is written first; the data follows in header order. What the writer does with one
tensor depends on whether its bytes change:

* bytes that pass through unchanged (same dtype, contiguous, little-endian, stored verbatim in
  the input) never enter Python: ``os.copy_file_range`` copies them from the input file to the
  output file inside the kernel, with a ``pread``/``write`` fallback in fixed-size chunks;
* bytes that change (a dtype cast, a non-contiguous view, a big-endian array, a deflated or
  inline storage) pass through one buffer, allocated once and sized for the largest of them;
* bytes computed by the caller (a merge) come from ``OutTensor.compute``, called when the writer
  reaches that tensor, so only the tensors in flight are ever held;
* a cast uses torch where it is installed and else numpy (``modelkit.numcast``, which rounds as
  torch does; a cast numpy cannot do exactly, to fp8, needs torch); gathers and byte swaps use numpy.

The layout is the one ``safetensors.torch.save_file`` writes, byte for byte: tensors sorted by
dtype (safetensors' own order, widest types first) then by name, compact JSON, the header padded
with spaces to a multiple of 8 bytes, ``__metadata__`` first. (``save_file`` emits metadata in
hash order; we emit it sorted by key, so files are equal byte for byte when the metadata has at
most one key, and equal as parsed headers otherwise.)
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import portable
from .._torch import have_torch, require_torch
from ..dtypes import DType
from ..errors import FormatError, UnsupportedFormatError
from ..model import TensorRef, _inflate

#: safetensors' ``Dtype`` enum order, lowest first; the writer sorts by it, highest first.
ST_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
    "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)
_RANK = {code: i for i, code in enumerate(ST_ORDER)}

#: Chunk size of the pread/write fallback (and of nothing else).
CHUNK = 8 << 20
#: Source bytes cast per step: small enough that the read, the cast, the overflow check and the
#: write of a step stay in the CPU caches (whole 150 MB tensors at once took 1.5-3x as long).
CAST_STEP = 1 << 20



@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output.

    Attributes:
        name: the output name.
        dtype: the output dtype; when it differs from ``ref.dtype`` the tensor is cast.
        shape: the output shape (the source's).
        ref: where the bytes come from.
        data: replacement bytes (little-endian, C order) used instead of ``ref``.
        compute: a zero-argument callable the writer calls when it reaches this tensor; it returns
            the tensor's bytes (any object with the buffer protocol: ``bytes``, a numpy array ...,
            little-endian, C order, exactly ``nbytes`` long), or a ``Pieces`` of such buffers in order.
            Merges use it so that each output tensor is computed only when it is written, never all
            at once.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    ref: TensorRef | None = None
    data: bytes | None = field(default=None, repr=False)
    compute: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_cast(self) -> bool:
        return self.data is None and self.compute is None and self.ref is not None and self.ref.dtype != self.dtype

    @classmethod
    def of(cls, ref: TensorRef, name: str | None = None, dtype: DType | None = None) -> OutTensor:
        """The tensor ``ref`` written as ``name`` (default: its own) in ``dtype`` (default: its own)."""
        return cls(name if name is not None else ref.name, dtype or ref.dtype, ref.shape, ref)


@dataclass(frozen=True)
class WriteStats:
    """What one write did.

    Attributes:
        size: bytes in the output file.
        copied: data bytes copied by the kernel (or the pread/write fallback) unchanged.
        transformed: data bytes that went through the buffer.
        casts: tensors cast to another dtype.
        overflow: for casts that overflowed, tensor name -> count of finite values that became inf.
        buffer_bytes: size of the one reused buffer (0 when none was needed).
    """

    size: int
    copied: int
    transformed: int
    casts: int
    overflow: dict[str, int]
    buffer_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "copied": self.copied, "transformed": self.transformed, "casts": self.casts,
                "overflow": dict(self.overflow), "buffer_bytes": self.buffer_bytes}


@dataclass(frozen=True)
class Header:
    """A laid-out header: its bytes, the tensors in data order, and where patchable values sit."""

    raw: bytes
    order: tuple[OutTensor, ...]
    data_size: int
    value_offsets: dict[str, int]

    @property
    def size(self) -> int:
        return len(self.raw) + self.data_size


def _dumps(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def layout(tensors: Sequence[OutTensor], metadata: Mapping[str, str] | None = None, path: str | None = None) -> Header:
    """Order the tensors and build the header bytes.

    Raises:
        FormatError: two tensors share a name, a name or value is not valid text, or a dtype has no
            safetensors code.
    """
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise FormatError(path, f"two output tensors are named {t.name!r}")
        seen.add(t.name)
        if t.dtype.st is None:
            raise UnsupportedFormatError(
                path, f"tensor {t.name!r} is {t.dtype.name}, which safetensors cannot store",
                "Cast it first, or leave this file in its container",
            )
        if t.data is not None and len(t.data) != t.nbytes:
            raise FormatError(path, f"tensor {t.name!r}: {len(t.data)} replacement bytes for {t.nbytes}")
        if t.data is not None and t.compute is not None:
            raise FormatError(path, f"tensor {t.name!r} has both replacement bytes and a compute function")
    order = sorted(tensors, key=lambda t: (-_RANK[t.dtype.st or ""], t.name))
    parts: list[str] = []
    value_offsets: dict[str, int] = {}
    pos = 9  # 8 length bytes, then "{"
    if metadata is not None:
        head = '"__metadata__":{'
        pos += len(head.encode())
        items = []
        for i, (k, v) in enumerate(sorted(metadata.items())):
            if not isinstance(k, str) or not isinstance(v, str):
                raise FormatError(path, f"metadata {k!r} must map a string to a string")
            key = ("," if i else "") + _dumps(k) + ":"
            pos += len(_utf8(key, path))
            value_offsets[k] = pos + 1  # after the opening quote
            val = _dumps(v)
            pos += len(_utf8(val, path))
            items.append(key + val)
        parts.append(head + "".join(items) + "}")
    offset = 0
    for t in order:
        end = offset + t.nbytes
        parts.append(f'{_dumps(t.name)}:{{"dtype":"{t.dtype.st}","shape":{_shape(t.shape)},'
                     f'"data_offsets":[{offset},{end}]}}')
        offset = end
    body = _utf8("{" + ",".join(parts) + "}", path)
    n = len(body) + (-len(body)) % 8
    raw = struct.pack("<Q", n) + body + b" " * (n - len(body))
    return Header(raw, tuple(order), offset, value_offsets)


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(int(s)) for s in shape) + "]"


def _utf8(text: str, path: str | None) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(path, f"a tensor name or metadata value is not valid text: {text[:80]!r}") from None


def write_stream(
    fd: int,
    tensors: Sequence[OutTensor] | Header,
    metadata: Mapping[str, str] | None = None,
    *,
    late: Mapping[str, Callable[[], str]] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
    path: str | None = None,
) -> WriteStats:
    """Write a safetensors file to ``fd`` (a fresh, empty file opened for writing).

    Args:
        fd: the output; written sequentially with ``os.write``/``os.copy_file_range``.
        tensors: the output tensors (any order), or a ``Header`` from ``layout``.
        metadata: the ``__metadata__`` map (``None`` writes none).
        late: metadata values known only after the data is written (a hash of the input): the
            header holds the placeholder value from ``metadata`` and is patched in place at the end;
            the final value must have the same length in bytes. With ``late``, the data is fsynced
            before the values are awaited, so the write-back overlaps their computation.
        on_tensor: called after each tensor with its name and byte count; may raise to abort.
        path: the output path, for messages.

    Returns:
        WriteStats.

    Raises:
        OSError: from the file system (ENOSPC, EIO ...). The caller owns cleanup (see
            ``modelkit.paths.atomic_output``).
        FormatError: a source is truncated or corrupt.
    """
    header = tensors if isinstance(tensors, Header) else layout(tensors, metadata, path)
    _write_all(fd, header.raw)
    need = max((_buffer_need(t) for t in header.order), default=0)
    buf = bytearray(need) if need else None
    copier = _Copier(fd)
    flusher = _Writeback(fd, len(header.raw))
    copied = transformed = casts = 0
    overflow: dict[str, int] = {}
    for t in header.order:
        mode = _mode(t)
        if mode == "copy":
            assert t.ref is not None and t.ref.source is not None
            copier.copy(t.ref.source.fd, t.ref.byte_range[0], t.nbytes, t.ref.source.path)
            copied += t.nbytes
        elif mode == "data":
            assert t.data is not None
            _write_all(fd, t.data)
            transformed += t.nbytes
        elif mode == "compute":
            assert t.compute is not None
            _write_computed(fd, t, path)
            transformed += t.nbytes
        elif mode == "inline":
            assert t.ref is not None and t.ref.inline is not None
            begin, end = t.ref.byte_range
            _write_all(fd, memoryview(t.ref.inline)[begin:end])
            copied += t.nbytes
        elif mode == "buffer":
            assert buf is not None
            lost = _transform(fd, t, buf)
            transformed += t.nbytes
            if t.is_cast:
                casts += 1
            if lost:
                overflow[t.name] = lost
        flusher.advance(t.nbytes)
        if on_tensor is not None:
            on_tensor(t.name, t.nbytes)
    if late:
        os.fsync(fd)  # flush the data now, while the late values (a hash of the input) are still computing
    for key, fn in (late or {}).items():
        value = _utf8(_dumps(fn())[1:-1], path)
        old = _utf8(_dumps((metadata or {})[key])[1:-1], path)
        if len(value) != len(old):
            raise ValueError(f"late metadata {key!r} changed length ({len(old)} -> {len(value)} bytes)")
        portable.write_at(fd, value, header.value_offsets[key])
    return WriteStats(header.size, copied, transformed, casts, overflow, need)


def _mode(t: OutTensor) -> str:
    if t.data is not None:
        return "data"
    if t.compute is not None:
        return "compute"
    ref = t.ref
    if ref is None:
        raise ValueError(f"tensor {t.name!r} has neither a source nor data")
    if t.numel == 0:
        return "empty"
    plain = not t.is_cast and ref.is_contiguous and (ref.byteorder == "little" or ref.dtype.itemsize == 1)
    if plain and ref.compressed is None:
        if ref.inline is not None:
            return "inline"
        if ref.source is not None and ref.source.fd >= 0:  # a virtual source (no fd) goes through the buffer
            return "copy"
    return "buffer"


class Pieces:
    """What a ``compute`` may return instead of the whole tensor: its bytes as consecutive buffers
    (an iterable, typically a generator), each written as it comes, so a large computed tensor is
    never whole in memory. A buffer may be reused for the next piece once the iterator resumes."""

    def __init__(self, parts: Iterable[Any]):
        self.parts = parts


def _write_computed(fd: int, t: OutTensor, path: str | None) -> None:
    """Call ``t.compute`` and write what it returns, after checking its length."""
    assert t.compute is not None
    payload = t.compute()
    if isinstance(payload, Pieces):
        done = 0
        for part in payload.parts:
            view = memoryview(part).cast("B")
            done += len(view)
            if done > t.nbytes:
                break
            _write_all(fd, view)
        if done != t.nbytes:
            got = f"more than {t.nbytes}" if done > t.nbytes else str(done)
            raise FormatError(path, f"tensor {t.name!r}: computed {got} bytes for {t.nbytes}")
        return
    view = memoryview(payload).cast("B")
    if len(view) != t.nbytes:
        raise FormatError(path, f"tensor {t.name!r}: computed {len(view)} bytes for {t.nbytes}")
    _write_all(fd, view)


def _buffer_need(t: OutTensor) -> int:
    """Bytes of the shared buffer this tensor needs: the source span (a step of it for a stepped
    cast), plus the output if it differs."""
    if _mode(t) != "buffer":
        return 0
    assert t.ref is not None
    if _stepped(t):
        per = _step_elems(t)
        return _align(per * t.ref.dtype.itemsize) + per * t.dtype.itemsize
    begin, end = t.ref.byte_range
    span = end - begin
    separate = t.is_cast or not t.ref.is_contiguous
    return _align(span) + t.nbytes if separate else span


def _stepped(t: OutTensor) -> bool:
    """A cast of a contiguous tensor in a file: done ``CAST_STEP`` bytes at a time."""
    ref = t.ref
    return (t.is_cast and ref is not None and ref.is_contiguous and ref.inline is None and ref.compressed is None
            and ref.source is not None)


def _step_elems(t: OutTensor) -> int:
    assert t.ref is not None
    return max(1, min(t.numel, CAST_STEP // t.ref.dtype.itemsize))


def _transform(fd: int, t: OutTensor, buf: bytearray) -> int:
    """Read, swap, gather and/or cast one tensor through ``buf``; write it. Returns the overflow count."""
    if _stepped(t):
        return _cast_stepped(fd, t, buf)
    ref = t.ref
    assert ref is not None
    begin, end = ref.byte_range
    span = end - begin
    view = memoryview(buf)
    src = view[:span]
    if ref.inline is not None:
        src[:] = memoryview(ref.inline)[begin:end]
    elif ref.compressed is not None:
        assert ref.source is not None
        member = _inflate(ref.source, *ref.compressed)
        rel = begin - ref.storage_start
        if rel + span > len(member):
            raise FormatError(ref.source.path, f"tensor {ref.name!r} runs past its compressed member")
        src[:] = memoryview(member)[rel : rel + span]
        del member
    else:
        if ref.source is None:
            raise FormatError(None, f"tensor {ref.name!r} is not attached to an open file")
        ref.source.read_into(src, begin)
    if ref.byteorder == "big" and ref.dtype.itemsize > 1:
        _byteswap(src, ref.dtype)
    out = _align(span)
    if t.is_cast:
        dst = view[out : out + t.nbytes]
        lost = _cast(buf, out, ref, t)
        _write_all(fd, dst)
        return lost
    if not ref.is_contiguous:
        dst = view[out : out + t.nbytes]
        _gather(src, dst, ref)
        _write_all(fd, dst)
        return 0
    _write_all(fd, src)
    return 0


def _cast_stepped(fd: int, t: OutTensor, buf: bytearray) -> int:
    """Cast a contiguous tensor from its file ``CAST_STEP`` source bytes at a time: read a step,
    cast it, check it for overflow and write it while it is still in the CPU caches."""
    ref = t.ref
    assert ref is not None and ref.source is not None
    isz, osz = ref.dtype.itemsize, t.dtype.itemsize
    per = _step_elems(t)
    out = _align(per * isz)
    view = memoryview(buf)
    step = _stepper(buf, out, per, ref.dtype, t.dtype)
    begin = ref.byte_range[0]
    lost = done = 0
    while done < t.numel:
        k = min(per, t.numel - done)
        ref.source.read_into(view[: k * isz], begin + done * isz)
        if ref.byteorder == "big" and isz > 1:
            _byteswap(view[: k * isz], ref.dtype)
        lost += step(k)
        _write_all(fd, view[out : out + k * osz])
        done += k
    return lost


def _backend(src: DType, dst: DType) -> str:
    """``torch`` where it is installed (threaded, and the reference); else ``numpy`` where it casts
    exactly as torch does (``modelkit.numcast``); else a MissingExtraError."""
    from .. import numcast  # numpy, imported when a cast needs it

    if have_torch():
        return "torch"
    if numcast.can_cast(src, dst):
        return "numpy"
    require_torch(f"casting {src.name} to {dst.name}")
    raise AssertionError("unreachable")


def _by_table(src_dt: DType, dst_dt: DType) -> bool:
    """Whether a stepped cast goes through ``_lut_stepper``'s table (numpy, never torch)."""
    return src_dt.name in ("float16", "bfloat16") and dst_dt.name in ("float8_e4m3fn", "float8_e5m2")


def casts_with_torch(t: OutTensor) -> bool:
    """Whether writing ``t`` runs a torch cast (so torch is imported and its thread pool used)."""
    if not t.is_cast:
        return False
    assert t.ref is not None
    return not (_stepped(t) and _by_table(t.ref.dtype, t.dtype)) and have_torch()


def _stepper(buf: bytearray, out: int, per: int, src_dt: DType, dst_dt: DType) -> Callable[[int], int]:
    """A function that casts the first ``k`` source elements at ``buf[0:]`` to ``buf[out:]`` and
    returns how many finite values overflowed to inf (fp8: overflowed its range)."""
    if _by_table(src_dt, dst_dt):
        return _lut_stepper(buf, out, per, src_dt, dst_dt)
    if _backend(src_dt, dst_dt) == "numpy":
        import numpy as np

        src_np = np.frombuffer(buf, dtype=_np_code(src_dt), count=per, offset=0)
        dst_np = np.frombuffer(buf, dtype=_np_code(dst_dt), count=per, offset=out)

        def numpy_step(k: int) -> int:
            return _cast_numpy(src_np[:k], dst_np[:k], src_dt, dst_dt)

        return numpy_step
    import torch

    src_all = torch.frombuffer(buf, dtype=src_dt.torch(), count=per, offset=0)
    dst_all = torch.frombuffer(buf, dtype=dst_dt.torch(), count=per, offset=out)
    fmax = _overflow_limit(src_all.dtype, dst_all.dtype)

    def torch_step(k: int) -> int:
        src, dst = src_all[:k], dst_all[:k]
        dst.copy_(src)
        return 0 if fmax is None else _overflowed(src, dst, fmax)

    return torch_step


def _lut_stepper(buf: bytearray, out: int, per: int, src_dt: DType, dst_dt: DType) -> Callable[[int], int]:
    """16-bit float -> fp8 through a 65536-entry table (``numcast.fp8_table16``: torch's rounding,
    bit for bit); several times faster than torch's element-by-element CPU cast. Overflow is
    counted on the source's magnitude bits."""
    import numpy as np

    from .. import numcast

    table, limit, inf = numcast.fp8_table16(src_dt.name, dst_dt.name)
    src_all = np.frombuffer(buf, dtype=np.uint16, count=per, offset=0)
    dst_all = np.frombuffer(buf, dtype=np.uint8, count=per, offset=out)
    mag_all = np.empty(per, dtype=np.uint16)

    def lut_step(k: int) -> int:
        src, mag = src_all[:k], mag_all[:k]
        np.take(table, src, out=dst_all[:k], mode="clip")
        np.bitwise_and(src, np.uint16(0x7FFF), out=mag)
        if not k or int(mag.max()) <= limit:
            return 0
        return int(np.count_nonzero((mag > limit) & (mag < inf)))

    return lut_step


def _np_code(dtype: DType) -> str:
    """The numpy type of ``dtype``'s elements (its bits, for types numpy lacks)."""
    return dtype.numpy or f"<u{dtype.itemsize}"


def _cast_numpy(src: Any, dst: Any, src_dt: DType, dst_dt: DType) -> int:
    """Cast numpy ``src`` (elements of ``src_dt``) into ``dst``; the overflow count."""
    from .. import numcast

    res = numcast.cast(src, src_dt, dst_dt)
    dst[...] = res.reshape(dst.shape)
    return numcast.overflowed(numcast.values(src, src_dt), res, dst_dt)


def _align(n: int) -> int:
    return n + (-n) % 64


def _byteswap(region: memoryview, dtype: DType) -> None:
    import numpy as np

    width = dtype.itemsize // 2 if dtype.name.startswith("complex") else dtype.itemsize
    np.frombuffer(region, dtype=np.dtype(f"u{width}")).byteswap(inplace=True)


def _gather(src: memoryview, dst: memoryview, ref: TensorRef) -> None:
    import numpy as np

    item = ref.dtype.itemsize
    code = np.dtype(f"u{item}") if item in (1, 2, 4, 8) else np.dtype((np.void, item))
    flat = np.frombuffer(src, dtype=code)
    strided = np.lib.stride_tricks.as_strided(flat, ref.shape, tuple(s * item for s in ref.strides), writeable=False)
    out = np.frombuffer(dst, dtype=code).reshape(ref.shape)
    np.copyto(out, strided)


def _cast(buf: bytearray, out: int, ref: TensorRef, t: OutTensor) -> int:
    begin, end = ref.byte_range
    count = (end - begin) // ref.dtype.itemsize
    if _backend(ref.dtype, t.dtype) == "numpy":
        import numpy as np

        flat = np.frombuffer(buf, dtype=_np_code(ref.dtype), count=count, offset=0)
        item = flat.itemsize
        src_np = np.lib.stride_tricks.as_strided(flat, ref.shape, tuple(s * item for s in ref.strides),
                                                 writeable=False)
        dst_np = np.frombuffer(buf, dtype=_np_code(t.dtype), count=t.numel, offset=out).reshape(t.shape)
        return _cast_numpy(src_np, dst_np, ref.dtype, t.dtype)
    import torch

    src_dt, dst_dt = ref.dtype.torch(), t.dtype.torch()
    flat_t = torch.frombuffer(buf, dtype=src_dt, count=count, offset=0)
    src = flat_t.as_strided(ref.shape, ref.strides, 0)
    dst = torch.frombuffer(buf, dtype=dst_dt, count=t.numel, offset=out).view(t.shape)
    dst.copy_(src)
    fmax = _overflow_limit(src_dt, dst_dt)
    return 0 if fmax is None else _overflowed(src, dst, fmax)


def _overflow_limit(src_dt: Any, dst_dt: Any) -> float | None:
    """The largest finite value of ``dst_dt`` when a float cast to it can overflow, else None."""
    import torch

    if not (src_dt.is_floating_point and dst_dt.is_floating_point):
        return None
    fmax = float(torch.finfo(dst_dt).max)
    return None if fmax >= torch.finfo(src_dt).max else fmax


def _overflowed(src: Any, dst: Any, fmax: float) -> int:
    """How many finite values of ``src`` became inf in ``dst`` (for an fp8 ``dst``: overflowed it)."""
    import torch

    if dst.element_size() == 1:
        return fp8_overflow_torch(src, str(dst.dtype).removeprefix("torch."))
    try:
        # One reduction over the narrower result: finite extremes mean nothing became inf. False
        # for NaN and inf (either overflow or already in the source): those are counted below.
        lo, hi = torch.aminmax(dst)
        if float(hi) <= fmax and float(lo) >= -fmax:
            return 0
    except RuntimeError:  # aminmax lacks this dtype
        pass
    inf = torch.isinf(dst)
    if not bool(inf.any()):
        return 0
    return int((inf & ~torch.isinf(src)).sum())


def fp8_overflow_torch(src: Any, name: str) -> int:
    """How many finite values of the torch tensor ``src`` overflow the fp8 type ``name``: go past
    ``numcast.FP8_LIMITS``' bound (e4m3fn saturates them to +-448, e5m2 makes them inf)."""
    import torch

    from ..numcast import FP8_LIMITS

    limit = FP8_LIMITS[name][1]
    if not src.dtype.is_floating_point or src.numel() == 0:
        return 0
    if src.element_size() == 1:  # fp8 to fp8: torch has no aminmax for fp8
        src = src.float()
    lo, hi = torch.aminmax(src)
    if float(hi) < limit and float(lo) > -limit:  # false for NaN: then count exactly
        return 0
    mag = src.abs()
    past = (mag >= limit) if name == "float8_e5m2" else (mag > limit)
    return int((past & torch.isfinite(src)).sum())


class _Writeback:
    """Stream the output to disk as it is written, every ``STEP`` bytes, and out of the page cache.

    Each step starts the disk writes of the step just written, without waiting for them, then
    waits for those of the step before (long done, as a rule) and lets the page cache drop it.
    The final ``fsync`` then waits only for the tail, instead of for the whole file after the last
    byte went into the page cache: the copy and the disk overlap. And a multi-GB output never
    fills the page cache, which on a machine whose memory is full of cached files makes every
    write reclaim pages first: a 4 GB merge took 28-32 s that way here and 9-10 s streamed (the
    same bytes). Linux ``sync_file_range`` through libc and ``posix_fadvise`` DONTNEED
    (``portable.drop_cached``); elsewhere (or if it fails) nothing.
    """

    STEP = 64 << 20
    _fn: Any = None

    def __init__(self, fd: int, start: int):
        self.fd, self.done, self.pos = fd, start, start
        self.fn = self._libc()
        self.prev: tuple[int, int] | None = None  # the step whose writes were started last time

    @classmethod
    def _libc(cls) -> Any:
        if cls._fn is None:
            cls._fn = False
            if portable.LINUX_WRITEBACK:
                try:
                    import ctypes
                    import ctypes.util

                    fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").sync_file_range
                    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                    fn.restype = ctypes.c_int
                    cls._fn = fn
                except (OSError, AttributeError):
                    pass
        return cls._fn or None

    def advance(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.fn is None or self.pos - self.done < self.STEP:
            return
        if self.fn(self.fd, self.done, self.pos - self.done, 2) != 0:  # 2: SYNC_FILE_RANGE_WRITE
            self.fn = None  # not supported here: the final fsync does it all
            return
        if self.prev is not None:  # 7: WAIT_BEFORE | WRITE | WAIT_AFTER: that step is on disk, drop it
            a, n = self.prev
            if self.fn(self.fd, a, n, 7) == 0:
                portable.drop_cached(self.fd, a, n)
        self.prev = (self.done, self.pos - self.done)
        self.done = self.pos


class _Copier:
    """Copy input bytes to the output's current position without passing them through Python.

    ``modelkit.portable.RangeCopier``: ``copy_file_range`` first (a reflink or an in-kernel copy);
    where the kernel refuses it (across file systems since Linux 5.19, or on file systems without
    it) ``sendfile`` (Linux); and where that is refused too, or on other systems, reads and writes
    through one reused ``CHUNK``-sized buffer.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.copier = portable.RangeCopier(fd, CHUNK)

    def copy(self, src_fd: int, offset: int, count: int, src_path: str) -> None:
        done = self.copier.copy(src_fd, offset, count)
        if done < count:
            raise FormatError(src_path, f"the file ends at byte {offset + done}, inside tensor data")


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        view = view[n:]

