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

from .pickle_vm import COMPUTED, Limits, PickleError, PickleVM
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

    @property
    def is_pickle(self) -> bool:
        return self.end is not None

    @property
    def dangerous(self) -> list[tuple[str, str, int]]:
        return [r for r in self.refused if importable(r[0], r[1])]


def probe(data: Any, base: int = 0, persistent_load: Callable[[Any], Any] | None = None,
          limits: Limits | None = None, keep_blobs: bool = False) -> Probe:
    """Run the VM over ``data`` in collect mode; never raises for bad input."""
    found: list[tuple[str, str, int]] = []
    vm = PickleVM(data, make_policy(collect(found), persistent_load), base_offset=base, limits=limits)
    if keep_blobs:
        vm.blobs = []
    out = Probe(None, found, vm.globals_seen)
    try:
        vm.run()
        out.end = vm.pos
    except PickleError as exc:
        # Keep a bare copy: the raised error's traceback and context hold frames that would keep
        # the probed bytes alive for as long as the probe result lives.
        out.error = PickleError(str(exc), exc.offset, exc.kind, exc.needed)
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:  # hostile input in a deep corner
        out.error = PickleError(f"{type(exc).__name__}: {exc}", base + vm.op_pos)
    if keep_blobs and vm.blobs:
        out.blobs = vm.blobs
    return out


def probe_chain(data: Any, base: int = 0, max_pickles: int = 64) -> list[Probe]:
    """Probe a pickle and whatever follows each STOP, as a loop of ``pickle.load`` would."""
    out: list[Probe] = []
    pos = 0
    while len(out) < max_pickles and pos < len(data):
        p = probe(data[pos:], base + pos)
        out.append(p)
        if p.end is None or p.end == 0:
            break
        pos += p.end
    return out


def first_value(data: Any) -> Any:
    """The value of the first pickle under the allow-list, or None if it does not parse cleanly."""
    found: list[tuple[str, str, int]] = []
    vm = PickleVM(data, make_policy(collect(found), None), limits=Limits(max_ops=10_000))
    try:
        value = vm.run()
    except (PickleError, ValueError, TypeError):
        return None
    return None if found else value
