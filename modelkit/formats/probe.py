"""Probing bytes that a loader *might* unpickle, for the reader and the scanner alike.

``torch.load`` unpickles more than the obvious stream: any non-zip file from byte 0 (after trying
it as a tar archive), every member of an old tar checkpoint, and some tools read pickles
concatenated after the first STOP. A probe runs the VM over such bytes in collect mode and
reports the globals outside the allow-list that it reaches, whether or not the bytes later
turn out to be a valid pickle (a loader has run everything up to its error by then).

Random data (tensor bytes) can look like a GLOBAL opcode by chance. A name that is not a dotted
Python identifier cannot be imported, so it can run nothing; probes ignore such names, which
keeps probes of tensor data free of false alarms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .pickle_vm import COMPUTED, Limits, PickleError, PickleVM, Symbolic
from .unpickler import collect, make_policy

#: Bytes of a zip member read at first, then at second; the whole member only if the probe
#: still runs past them. Tensor bytes stop the VM within a few bytes, so scans stay cheap.
HEAD_STEPS = (64, 64 * 1024)


def importable(module: str, name: str) -> bool:
    """Could ``find_class`` resolve this pair at all? (dotted identifiers only).

    EXT codes and computed names are not counted in probes: random tensor bytes produce them
    often, and they resolve to nothing in a process that registered no extension codes.
    """
    if module == COMPUTED or module == "copyreg.extension":
        return False
    parts = module.split(".") + name.split(".")
    return all(p.isidentifier() for p in parts)


@dataclass
class Probe:
    """What a probe reached."""

    end: int | None  # relative end of the pickle when it ran to STOP, else None
    refused: list[tuple[str, str, int]] = field(default_factory=list)
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    error: PickleError | None = None
    blobs: list[bytes] = field(default_factory=list)
    #: Unsafe calls or states that involve only allowed globals: (message, offset, kind).
    unsafe: list[tuple[str, int, str]] = field(default_factory=list)
    #: The value of the pickle, when it ran to STOP.
    value: Any = None
    #: Where a dropping reader (io.BytesIO) would start the next pickle (relative).
    next_pos: int | None = None

    @property
    def is_pickle(self) -> bool:
        return self.end is not None

    @property
    def dangerous(self) -> list[tuple[str, str, int]]:
        """Globals that could be imported, and unsafe calls (as ``("<call>", message, offset)``).

        A frame anomaly counts only in a pickle that ran to STOP: tensor bytes can look like a
        FRAME opcode by chance, never like a whole pickle.
        """
        calls = [("<call>", m, off) for m, off, kind in self.unsafe if kind != "frame" or self.is_pickle]
        return [r for r in self.refused if importable(r[0], r[1])] + calls


def unsafe_collector(found: list[tuple[str, int, str]]) -> Callable[[str, int, str], Any]:
    """An ``on_unsafe`` hook that records (message, offset, kind) and goes on."""

    def hook(message: str, offset: int, kind: str) -> Any:
        found.append((message, offset, kind))
        return Symbolic(f"unsafe: {message[:60]}")

    return hook


def probe(data: Any, base: int = 0, persistent_load: Callable[[Any], Any] | None = None,
          limits: Limits | None = None, keep_blobs: bool = False, drop_frames: bool = False) -> Probe:
    """Run the VM over ``data`` in collect mode; never raises for bad input."""
    found: list[tuple[str, str, int]] = []
    unsafe: list[tuple[str, int, str]] = []
    policy = make_policy(collect(found), persistent_load, on_unsafe=unsafe_collector(unsafe))
    vm = PickleVM(data, policy, base_offset=base, limits=limits, drop_frames=drop_frames)
    if keep_blobs:
        vm.blobs = []
    out = Probe(None, found, vm.globals_seen, unsafe=unsafe)
    try:
        out.value = vm.run()
        out.end = vm.pos
        out.next_pos = vm.end_pos
    except PickleError as exc:
        # Keep a bare copy: the raised error's traceback and context hold frames that would keep
        # the probed bytes alive for as long as the probe result lives.
        out.error = PickleError(str(exc), exc.offset, exc.kind, exc.needed)
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:  # hostile input in a deep corner
        out.error = PickleError(f"{type(exc).__name__}: {exc}", base + vm.op_pos)
    if keep_blobs:
        seen_ids = {id(b) for b in vm.blobs or ()}
        out.blobs = list(vm.blobs or ()) + [b for b in vm.nested_loads if id(b) not in seen_ids]
    return out


class Window:
    """``data[start:end]`` without a copy, read as the VM reads ``bytes`` or an ``mmap``."""

    __slots__ = ("data", "start", "end")

    def __init__(self, data: Any, start: int, end: int):
        self.data = data
        self.start = start
        self.end = end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, key: int | slice) -> Any:
        n = self.end - self.start
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                raise ValueError("a Window slices with step 1 only")
            return self.data[self.start + a : self.start + max(a, b)]
        i = key + n if key < 0 else key
        if not 0 <= i < n:
            raise IndexError("Window index out of range")
        return self.data[self.start + i]

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        n = self.end - self.start
        a, b, _ = slice(start, end).indices(n)
        at: int = self.data.find(sub, self.start + a, self.start + max(a, b))
        return at - self.start if at >= 0 else -1


def tail(data: Any, pos: int) -> Any:
    """``data[pos:]``: a copy for ``bytes``, else a ``Window`` (an mmap of a big file, or a remote file read by
    ranges, must not be copied whole, nor fetched whole, to scan what follows a pickle)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data[pos:]
    return Window(data, pos, len(data))


def probe_chain(data: Any, base: int = 0, max_pickles: int = 64) -> list[Probe]:
    """Probe a pickle and whatever follows each STOP, as a loop of ``pickle.load`` would."""
    out: list[Probe] = []
    pos = 0
    while len(out) < max_pickles and pos < len(data):
        p = probe(tail(data, pos), base + pos)
        out.append(p)
        if p.end is None or p.end == 0:
            break
        pos += p.end
    return out

