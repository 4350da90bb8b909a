"""What the merges share: computing output tensors just ahead of the writer, and writing the file.

The writer asks for tensors in header order (``OutTensor.compute``). ``Ahead`` computes the next
one (or ``depth``) in a worker thread while the writer is busy with the current one, so reading,
computing and writing overlap (torch releases the GIL and spreads each operation over the cores),
within a memory budget. A job reads its tensor in chunks (``chunks``, ``read_into``) into its
look-ahead slot's reused scratch in the compute dtype (``Slots``; a tensor over ``SCRATCH_CAP``
gets a buffer of its own, freed once written) and rounds it to its output dtype in that same
memory (``narrow_in_place``). Memory is bounded by the budget (or the largest tensor in the
compute dtype), never by the model.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import dtypes
from ..dtypes import DType
from ..errors import CastOverflowError, UsageError
from ..formats.safetensors_write import Header, OutTensor, WriteStats, fp8_overflow_torch, layout, write_stream
from ..model import TensorRef
from ..paths import atomic_output, ensure_room
from . import metadata as md
from .convert import Progress

#: The compute dtypes ``--compute-dtype`` accepts.
COMPUTE_DTYPES = ("fp32", "fp64")
#: The output dtypes ``--dtype`` accepts.
OUTPUT_DTYPES = ("fp16", "bf16", "fp32")


def float_dtype(name: str | None, allowed: Sequence[str], option: str) -> DType | None:
    """The DType an option names (None for None).

    Raises:
        UsageError: a name outside ``allowed``.
    """
    if name is None:
        return None
    dt = dtypes.ALIASES.get(name.lower())
    if dt is None or dt.name not in {dtypes.ALIASES[a].name for a in allowed}:
        raise UsageError(None, f"{option} must be one of {', '.join(allowed)}, not {name!r}")
    return dt


def default_jobs() -> int:
    """Worker threads computing ahead of the writer: one. torch's own threads already use every
    core for each tensor's maths (``addmm_``, the casts), and the writer's I/O runs beside them."""
    return 1


#: Elements read or converted at a time (the size of the reused chunk buffers).
CHUNK = 1 << 20
#: The largest scratch (bytes) a look-ahead slot keeps for reuse; larger tensors get their own.
SCRATCH_CAP = 16 << 20


class Slots:
    """Reusable buffers, one set per look-ahead slot (``Ahead`` gives each job its slot).

    A slot is used by one job at a time, and its previous tensor has been written before the slot
    is handed out again, so a slot's buffers can hold a finished tensor until the writer takes it.
    """

    def __init__(self) -> None:
        self.bufs: dict[tuple[int, str], Any] = {}
        self.lock = threading.Lock()

    def scratch(self, slot: int, numel: int, dtype: Any) -> Any:
        """The slot's reused scratch of ``numel`` elements, or a buffer of its own for a tensor over
        ``SCRATCH_CAP`` bytes (freed once written, so the few largest never stay resident)."""
        import torch

        if numel * torch.empty((), dtype=dtype).element_size() > SCRATCH_CAP:
            return torch.empty(numel, dtype=dtype)
        return self.get(slot, "scratch", numel, dtype)

    def get(self, slot: int, role: str, numel: int, dtype: Any) -> Any:
        """A flat tensor of ``numel`` elements of ``dtype``: the front of buffer ``(slot, role)``."""
        import torch

        key = (slot, role)
        with self.lock:
            buf = self.bufs.get(key)
            if buf is None or buf.dtype != dtype or buf.numel() < numel:
                buf = torch.empty(max(numel, 1), dtype=dtype)
                self.bufs[key] = buf
        return buf[:numel]


def plain_ref(ref: TensorRef) -> bool:
    """Whether ``ref``'s bytes sit in its file as they are (contiguous, little-endian, not packed)."""
    return (ref.source is not None and ref.inline is None and ref.compressed is None and ref.is_contiguous
            and (ref.byteorder == "little" or ref.dtype.itemsize == 1) and ref.source.fd >= 0)


def chunks(ref: TensorRef, slots: Slots, slot: int, role: str = "read") -> Iterator[Any]:
    """``ref``'s elements as flat tensors of ``CHUNK`` elements (the last one shorter), in order.

    A tensor stored plainly in its file is read piece by piece through one reused buffer (each
    chunk is valid until the next is asked for); any other is read whole, then cut.
    """
    import torch

    n = ref.numel
    if n <= CHUNK or not plain_ref(ref):
        flat = ref.read("torch").reshape(-1)
        for s in range(0, n, CHUNK):
            yield flat[s:s + CHUNK]
        return
    assert ref.source is not None
    item, dt, begin = ref.dtype.itemsize, ref.dtype.torch(), ref.byte_range[0]
    raw = slots.get(slot, role, CHUNK * item, torch.uint8)
    for s in range(0, n, CHUNK):
        part = raw[: min(CHUNK, n - s) * item]
        ref.source.read_into(memoryview(part.numpy()), begin + s * item)
        yield part.view(dt)


def read_into(ref: TensorRef, out: Any, slots: Slots, slot: int, role: str = "read") -> None:
    """Fill the flat tensor ``out`` (any float dtype) with ``ref``'s elements, converting on the way,
    without a whole copy in the stored dtype (see ``chunks``)."""
    s = 0
    for part in chunks(ref, slots, slot, role):
        out[s:s + part.numel()].copy_(part)
        s += part.numel()


def narrow_in_place(flat: Any, dtype: Any, slots: Slots, slot: int) -> tuple[Any, int]:
    """Round the flat tensor ``flat`` to ``dtype`` (no wider) into the front of its own memory.

    Chunks are converted in order through a small buffer: chunk ``k`` lands in bytes
    ``[2s, 2e)`` (for a 2-byte ``dtype``), before the source of any later chunk (``4e`` onwards),
    so nothing unread is overwritten. Returns ``(the result, values that overflowed to inf)``.
    """
    import torch

    if flat.dtype == dtype:
        return flat, 0
    n = flat.numel()
    size = torch.empty((), dtype=dtype).element_size()
    dest = flat.view(torch.uint8)[: n * size].view(dtype)
    tmp = slots.get(slot, "narrow", min(n, CHUNK), dtype)
    lost = 0
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        t, src = tmp[: e - s], flat[s:e]
        lost += overflow_count(src, dtype)
        t.copy_(src)
        dest[s:e].copy_(t)
    return dest, lost


class Ahead:
    """Compute ``fn(slot)``s in header order, ahead of the writer, within a memory budget.

    Use ``bind(name, fn, cost)`` as each OutTensor's ``compute`` (``cost``: the bytes its job
    holds until written); call ``start(header)`` once the header is laid out, and ``close()`` when
    done (it cancels what is still queued). When the writer asks for a tensor (so the one before it
    has been written), the following jobs are queued as long as at most ``depth`` are ahead and the
    jobs not yet written together hold at most ``budget`` bytes; a job larger than the budget runs
    alone. Jobs in flight have consecutive positions, so ``slot = position % (depth + 1)`` is never
    used by two jobs at once.
    """

    def __init__(self, jobs: int = 1, depth: int = 1, budget: int = 64 << 20) -> None:
        self.jobs = max(1, jobs)
        self.depth = max(self.jobs, depth)
        self.budget = budget
        self.fns: dict[str, tuple[Callable[[int], Any], int]] = {}
        self.order: list[str] = []
        self.index: dict[str, int] = {}
        self.futures: dict[str, Future[Any]] = {}
        self.next = 0
        self.pool: ThreadPoolExecutor | None = None

    @property
    def slots(self) -> int:
        return self.depth + 1

    def bind(self, name: str, fn: Callable[[int], Any], cost: int = 0) -> Callable[[], Any]:
        """Register ``fn`` for tensor ``name``; returns the callable the writer calls."""
        self.fns[name] = (fn, cost)
        return lambda: self.take(name)

    def start(self, header: Header) -> None:
        self.order = [t.name for t in header.order if t.name in self.fns]
        self.index = {n: i for i, n in enumerate(self.order)}
        self.pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="modelkit-merge")

    def _submit(self) -> None:
        assert self.pool is not None
        n = self.order[self.next]
        self.futures[n] = self.pool.submit(self.fns[n][0], self.next % self.slots)
        self.next += 1

    def take(self, name: str) -> Any:
        """The bytes of tensor ``name`` (computed ahead, or now)."""
        i = self.index.get(name)
        if self.pool is None or i is None:
            return self.fns[name][0](0)
        while self.next <= i:
            self._submit()
        held = sum(self.fns[n][1] for n in self.futures)
        while self.next < len(self.order) and self.next <= i + self.depth:
            cost = self.fns[self.order[self.next]][1]
            if held + cost > self.budget:
                break
            held += cost
            self._submit()
        return self.futures.pop(name).result()

    def close(self) -> None:
        if self.pool is not None:
            for fut in self.futures.values():
                fut.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.futures.clear()


def overflow_count(src: Any, dtype: Any) -> int:
    """How many finite values of the torch tensor ``src`` become inf when cast to ``dtype``."""
    import torch

    if not dtype.is_floating_point or src.dtype == dtype or not src.dtype.is_floating_point:
        return 0
    if dtype.itemsize == 1:
        return fp8_overflow_torch(src, str(dtype).removeprefix("torch."))
    fmax = torch.finfo(dtype).max
    if fmax >= torch.finfo(src.dtype).max:
        return 0
    lo, hi = torch.aminmax(src)
    if float(hi) <= fmax and float(lo) >= -fmax:  # false for NaN too: then count exactly
        return 0
    return int((torch.isfinite(src) & ~torch.isfinite(src.to(dtype))).sum())


def refuse_overflow(target: str, counts: Mapping[str, int], dtype: str | None = None) -> None:
    """Raise ``CastOverflowError`` for ``target`` when any tensor overflowed (``counts``: name -> values).

    Called inside ``atomic_output`` after the data is written, so the temp file is discarded."""
    lost = {k: v for k, v in counts.items() if v}
    if lost:
        raise CastOverflowError(target, lost, dtype)


def tensor_bytes(t: Any) -> Any:
    """The bytes of a contiguous torch tensor, without a copy (a numpy ``uint8`` view)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def overflow_warning(overflow: Mapping[str, int], tensors: Sequence[OutTensor]) -> str:
    """The warning for values that did not fit their output dtype (``allow_overflow``): they became inf, or
    for float8_e4m3fn (which has no inf) torch saturated them to +-448."""
    dts = {t.name: t.dtype.name for t in tensors}
    saturated = all(dts.get(k) == "float8_e4m3fn" for k in overflow)
    what = "were saturated to +-448 (float8_e4m3fn)" if saturated else "overflowed to inf"
    return (f"{sum(overflow.values()):,} values in {len(overflow)} tensors {what}: "
            + ", ".join(f"{k} ({v:,})" for k, v in list(overflow.items())[:3]))


def write_output(
    target: str, tensors: list[OutTensor], metadata: Mapping[str, str], *, source: str, inputs: Sequence[str],
    force: bool, dry_run: bool, progress: Progress | None = None, ahead: Ahead | None = None,
    allow_overflow: bool = True, overflow: Callable[[], Mapping[str, int]] | None = None, dtype: str | None = None,
    hasher: md.SourceHash | None = None, late: Mapping[str, Callable[[], str]] | None = None,
) -> tuple[Header, dict[str, str], WriteStats | None]:
    """Lay out and (unless ``dry_run``) write ``target`` atomically.

    Unless ``allow_overflow``, a write where finite values became inf (the writer's own casts, plus
    ``overflow()``: counts kept by the compute functions; ``dtype`` names the output dtype in the
    message) raises ``CastOverflowError`` before the rename: nothing is published.

    ``modelkit.source_sha256`` (the sha256 of ``source``) is hashed in the background while the
    tensors are written and patched into the header at the end (``hasher``: that hash, already started
    by the caller, who then also stops it); ``late``: more values patched in that way (same length).

    Returns:
        (header, final metadata, write stats or None).

    Raises:
        OutputExistsError, OutputWriteError: see ``paths.atomic_output``.
        CastOverflowError: values overflowed to inf and ``allow_overflow`` is false.
    """
    meta = dict(metadata)
    meta.setdefault("modelkit.source_sha256", md.SHA_PLACEHOLDER)
    header = layout(tensors, meta, target)
    if dry_run:
        return header, meta, None
    ensure_room(target, header.size)
    try:
        # The look-ahead workers start inside: torch fixes a thread's pool size at its first op, so
        # they keep one core fewer for the whole write (main thread writing, the hash beside it).
        with (contextlib.nullcontext(hasher) if hasher is not None else md.SourceHash(source)) as h, \
                md.core_for_hash(True):
            if ahead is not None:
                ahead.start(header)
            with atomic_output(target, force=force, inputs=inputs) as fd:
                stats = write_stream(fd, header, meta, late={"modelkit.source_sha256": h.hexdigest, **(late or {})},
                                     on_tensor=progress, path=target)
                if not allow_overflow:
                    refuse_overflow(target, {**stats.overflow, **(overflow() if overflow else {})}, dtype)
            meta["modelkit.source_sha256"] = h.hexdigest()
            for key, fn in (late or {}).items():
                meta[key] = fn()
    finally:
        if ahead is not None:
            ahead.close()
    return header, meta, stats
