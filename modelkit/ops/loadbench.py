"""Timing for ``modelkit load`` and ``--bench``: modelkit beside the usual loaders, one run.

Every loader is timed until its tensors are usable on the device: on the CPU each page of
each tensor is touched (a lazy mapping is not a load), on CUDA the device is synchronised.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..reading import open_model


@dataclass(frozen=True)
class Row:
    name: str
    seconds: float
    gbps: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"loader": self.name, "seconds": self.seconds, "gb_per_s": self.gbps, "note": self.note}


@dataclass(frozen=True)
class LoadBench:
    path: str
    device: str
    tensors: int
    gigabytes: float
    rows: tuple[Row, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "modelkit.load/1", "path": self.path, "device": self.device, "tensors": self.tensors,
                "gigabytes": self.gigabytes, "loaders": [r.to_dict() for r in self.rows]}


def _touch(sd: dict[str, Any], device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return
    for t in sd.values():
        if t.numel():
            step = max(1, 4096 // t.element_size())
            flat = t.reshape(-1)
            if flat.dtype.is_floating_point or flat.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32,
                                                              torch.int64, torch.bool):
                flat[::step].to(torch.float32).sum()


def _time(fn: Callable[[], dict[str, Any]], device: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sd = fn()
        _touch(sd, device)
        times.append(time.perf_counter() - t0)
        del sd
    return statistics.median(times)


def _size(path: str) -> tuple[int, int]:
    with open_model(path) as mf:
        return len(mf), sum(t.nbytes for t in mf.values())


def time_modelkit(path: str, device: str, dtype: str | None) -> LoadBench:
    """Load once with modelkit and report the time.

    torch is imported before the clock starts: its import takes about a second, longer than
    loading a small file, and is no part of the load.

    Raises:
        MissingExtraError: torch is not installed.
        ModelkitError: the file cannot be read safely (see ``open_model``).
    """
    from .._torch import require_torch
    from ..load import load

    require_torch("modelkit load")
    n, nbytes = _size(path)
    s = _time(lambda: load(path, device=device, dtype=dtype), device, 1)
    return LoadBench(path, device, n, nbytes / 1e9, (Row("modelkit.load", s, nbytes / 1e9 / s if s else 0.0),))


def bench_load(path: str, device: str, dtype: str | None, repeat: int) -> LoadBench:
    """modelkit beside safetensors.load_file, torch.load (mmap and plain) and a pinned copy."""
    import torch

    from ..formats.sniff import sniff
    from ..load import load

    n, nbytes = _size(path)
    gb = nbytes / 1e9
    kind = sniff(path)
    rows: list[Row] = []

    def add(name: str, fn: Callable[[], dict[str, Any]], note: str = "") -> None:
        s = _time(fn, device, repeat)
        rows.append(Row(name, s, gb / s if s else 0.0, note))

    add("modelkit.load", lambda: load(path, device=device, dtype=dtype))
    if kind == "safetensors":
        from safetensors.torch import load_file

        add("safetensors.torch.load_file", lambda: load_file(path, device=device))
    if kind == "zip":
        add("torch.load(weights_only, mmap)", lambda: _flat(torch.load(path, weights_only=True, mmap=True,
                                                                       map_location=device)))
    if kind in ("zip", "torch-legacy"):
        add("torch.load(weights_only)", lambda: _flat(torch.load(path, weights_only=True, map_location=device)))
    if device.startswith("cuda"):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)

        def copy() -> dict[str, Any]:
            dev.copy_(host, non_blocking=True)
            return {}

        add("pinned host->device copy (the limit)", copy, "same bytes, no file I/O")
    return LoadBench(path, device, n, gb, tuple(rows))


def _flat(obj: Any) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    stack = [("", obj)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, torch.Tensor):
            out[prefix] = node
        elif isinstance(node, dict):
            stack.extend((f"{prefix}.{k}", v) for k, v in node.items())
    return out


__all__ = ["LoadBench", "Row", "bench_load", "time_modelkit"]
