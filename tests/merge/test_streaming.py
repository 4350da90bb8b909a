"""Computed tensors in the writer, and the look-ahead that computes them just before they are written."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modelkit.dtypes import BY_NAME
from modelkit.errors import FormatError
from modelkit.formats.safetensors_write import OutTensor, layout, write_stream
from modelkit.ops.streaming import CHUNK, Ahead, Slots, chunks, narrow_in_place


def _write(path: Path, tensors: list[OutTensor]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)  # Windows: no newline translation
    try:
        write_stream(fd, tensors, None)
    finally:
        os.close(fd)


def test_computed_tensors_are_written_when_reached(tmp_path: Path) -> None:
    calls: list[str] = []

    def make(name: str, value: float):
        def fn():
            calls.append(name)
            return np.full((2, 3), value, dtype="<f4")
        return fn

    f32 = BY_NAME["float32"]
    tensors = [OutTensor("b", f32, (2, 3), compute=make("b", 2.0)), OutTensor("a", f32, (2, 3), compute=make("a", 1.0)),
               OutTensor("c", BY_NAME["float16"], (1,), data=b"\x00\x3c")]
    _write(tmp_path / "x.safetensors", tensors)
    got = load_file(tmp_path / "x.safetensors")
    assert calls == ["a", "b"]  # header order: dtype, then name
    assert torch.equal(got["a"], torch.ones(2, 3)) and torch.equal(got["b"], torch.full((2, 3), 2.0))
    with pytest.raises(FormatError, match="computed 4 bytes for 24"):
        _write(tmp_path / "y.safetensors", [OutTensor("a", f32, (2, 3), compute=lambda: b"\x00" * 4)])
    with pytest.raises(FormatError, match="both"):
        layout([OutTensor("a", f32, (1,), data=b"\x00" * 4, compute=lambda: b"")])


def test_ahead_stays_within_its_depth_and_keeps_order(tmp_path: Path) -> None:
    started: list[str] = []
    taken: list[str] = []
    lock = threading.Lock()
    slots_in_use: set[int] = set()
    ahead = Ahead(jobs=2, depth=2)
    f32 = BY_NAME["float32"]
    tensors = []
    for i in range(12):
        name = f"t{i:02d}"

        def fn(slot: int, name: str = name) -> bytes:
            with lock:
                started.append(name)
                assert len(started) <= len(taken) + 2, "computed too far ahead of the writer"
                assert slot not in slots_in_use, "a slot used twice at once"
                slots_in_use.add(slot)
            value = np.full(4, float(int(name[1:])), dtype="<f4").tobytes()
            with lock:
                slots_in_use.discard(slot)
            return value

        bound = ahead.bind(name, fn)

        def take(name: str = name, bound=bound) -> bytes:
            with lock:
                taken.append(name)
            return bound()

        tensors.append(OutTensor(name, f32, (4,), compute=take))
    header = layout(tensors)
    ahead.start(header)
    fd = os.open(tmp_path / "z.safetensors", os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        write_stream(fd, header, None)
    finally:
        os.close(fd)
        ahead.close()
    got = load_file(tmp_path / "z.safetensors")
    assert all(float(got[f"t{i:02d}"][0]) == i for i in range(12))
    assert sorted(started) == [f"t{i:02d}" for i in range(12)]


def test_slots_chunks_and_narrowing_in_place(tmp_path: Path) -> None:
    import modelkit
    from fixtures import build

    slots = Slots()
    a = slots.get(0, "w", 10, torch.float32)
    assert slots.get(0, "w", 5, torch.float32).data_ptr() == a.data_ptr()
    assert slots.get(1, "w", 5, torch.float32).data_ptr() != a.data_ptr()
    n = 2 * CHUNK + 123
    src = torch.randn(n).half()
    src[7] = 65504  # the largest fp16
    build.write_safetensors(str(tmp_path / "t.safetensors"), {"t": src})
    with modelkit.open_model(tmp_path / "t.safetensors") as mf:
        got = torch.cat([c.clone() for c in chunks(mf["t"], slots, 0)])
    assert torch.equal(got, src)
    wide = slots.get(0, "wide", n, torch.float32)
    wide.copy_(src)
    wide[7] = 1e6  # overflows fp16
    ref = wide.clone()
    out, lost = narrow_in_place(wide, torch.float16, slots, 0)
    assert lost == 1 and out.data_ptr() == wide.data_ptr()
    assert torch.equal(out, ref.half())
