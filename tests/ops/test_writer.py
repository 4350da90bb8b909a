"""The streaming safetensors writer: golden bytes, save_file parity, every source layout."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import modelkit
from fixtures import build
from modelkit.dtypes import BY_NAME
from modelkit.errors import FormatError, UnsupportedFormatError
from modelkit.formats.safetensors_file import OutTensor, layout, write_stream
from tests.conftest import same_bits

SAVEABLE = {k: v for k, v in build.all_dtypes_state().items() if v.dtype != torch.complex128}


def _write(path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)  # Windows: no newline translation
    try:
        write_stream(fd, tensors, metadata)
    finally:
        os.close(fd)


def test_golden_bytes(tmp_path: Path) -> None:
    """Exact bytes: dtype order (I64 before F16), compact JSON, space padding to 8, data in order."""
    out = tmp_path / "g.safetensors"
    _write(out, [
        OutTensor("b", BY_NAME["float16"], (2,), data=b"\x00\x3c\x00\x40"),
        OutTensor("a", BY_NAME["int64"], (1,), data=struct.pack("<q", 7)),
    ], {"k": "v"})
    header = (b'{"__metadata__":{"k":"v"},"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},'
              b'"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}}')
    padded = header + b" " * (-len(header) % 8)
    expected = struct.pack("<Q", len(padded)) + padded + struct.pack("<q", 7) + b"\x00\x3c\x00\x40"
    assert len(padded) == 136 and out.stat().st_size == 8 + 136 + 12
    assert out.read_bytes() == expected
    ref = tmp_path / "ref.safetensors"
    save_file({"b": torch.tensor([1.0, 2.0], dtype=torch.float16), "a": torch.tensor([7])}, ref, metadata={"k": "v"})
    assert ref.read_bytes() == expected


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {}])
def test_byte_identical_to_save_file(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    """Every dtype, views, shared storages, 0-d and empty tensors: the same bytes as save_file."""
    src = tmp_path / "all.pt"
    build.save_torch(SAVEABLE, str(src), "zip")
    ours = tmp_path / "ours.safetensors"
    with modelkit.open_model(src) as mf:
        _write(ours, [OutTensor.of(r) for r in mf.values()], metadata)
    theirs = tmp_path / "theirs.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in SAVEABLE.items()}, theirs, metadata=metadata)
    assert ours.read_bytes() == theirs.read_bytes()


def test_metadata_is_sorted_and_parses_like_save_file(tmp_path: Path) -> None:
    meta = {f"k{i}": f"v{i}" for i in range(20)} | {"é\n": 'quote " and \\ \x01'}
    ours = tmp_path / "ours.safetensors"
    _write(ours, [OutTensor("w", BY_NAME["float32"], (2,), data=b"\0" * 8)], meta)
    theirs = tmp_path / "theirs.safetensors"
    save_file({"w": torch.zeros(2)}, theirs, metadata=meta)
    with modelkit.open_model(ours) as a, modelkit.open_model(theirs) as b:
        assert a.metadata == b.metadata == meta
        assert list(a.metadata) == sorted(meta)
    assert os.path.getsize(ours) == os.path.getsize(theirs)


def test_unwritable_dtype_and_duplicate_names_fail_before_writing() -> None:
    ref = OutTensor("c", BY_NAME["complex128"], (1,), data=b"\0" * 16)
    with pytest.raises(UnsupportedFormatError, match="complex128"):
        layout([ref])
    w = OutTensor("w", BY_NAME["uint8"], (1,), data=b"\0")
    with pytest.raises(FormatError, match="twice|two output"):
        layout([w, w])


def test_numpy_sources_big_endian_fortran_and_deflated(tmp_path: Path) -> None:
    arrays = build.numpy_files(str(tmp_path))
    for name in ("stored.npz", "compressed.npz"):
        r = modelkit.convert(tmp_path / name, out_dir=tmp_path / "out")
        got = load_file(r.output)
        for k, a in arrays.items():
            want = torch.from_numpy(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")))
            assert same_bits(got[k], want), (name, k)
    r = modelkit.convert(tmp_path / "f16be.npy", out_dir=tmp_path / "out")
    assert "big-endian arrays written little-endian" in r.changes
    assert load_file(r.output)["array"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("refuse", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_copy_file_range_unavailable_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                refuse: tuple[str, ...]) -> None:
    import errno

    def no_copy(*a: object, **k: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    for name in refuse:  # raising=False: where the OS lacks one (macOS, Windows) it appears and refuses too
        monkeypatch.setattr(os, name, no_copy, raising=False)
    src = tmp_path / "m.pt"
    build.save_torch(SAVEABLE, str(src), "zip")
    r = modelkit.convert(src)
    got = load_file(r.output)
    for k, v in SAVEABLE.items():
        assert same_bits(got[k], v.detach()), k


def test_plain_copy_uses_whole_chunks_after_a_tiny_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without kernel copies, a 1-byte first tensor must not shrink the buffer for the rest."""
    import errno

    def no_copy(*a: object, **k: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    for name in ("copy_file_range", "sendfile"):
        monkeypatch.setattr(os, name, no_copy, raising=False)  # (where the OS lacks one, it appears and refuses)
    tensors = {"a": torch.zeros(1, dtype=torch.uint8), "b": torch.arange(3 << 20, dtype=torch.float32)}
    src = tmp_path / "m.pt"
    build.save_torch(tensors, str(src), "zip")
    real_write, writes = os.write, [0]

    def counting(fd: int, data: bytes) -> int:
        writes[0] += 1
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting)
    got = load_file(modelkit.convert(src).output)
    assert same_bits(got["b"], tensors["b"])
    assert writes[0] < 10  # 12 MB in 8 MB chunks plus the header, not millions of 1-byte writes


def test_non_contiguous_views_of_every_dtype(tmp_path: Path) -> None:
    views = {}
    for i, dt in enumerate(build.TORCH_DTYPES):
        if dt == torch.complex128:
            continue
        base = build.sample_tensor(dt, (4, 6), seed=i)
        views[f"{dt}.t"] = base.t()
        views[f"{dt}.slice"] = base[1:3, ::2]
    src = tmp_path / "views.pt"
    build.save_torch(views, str(src), "legacy")
    got = load_file(modelkit.convert(src).output)
    for k, v in views.items():
        assert same_bits(got[k], v), k


def _linux_writeback() -> bool:
    """Whether the writer asks for early writeback here (Linux's sync_file_range; not with
    MODELKIT_PORTABLE=1: ``modelkit.portable.LINUX_WRITEBACK``)."""
    try:
        from modelkit import portable
    except ImportError:  # a modelkit without the portable module
        return sys.platform.startswith("linux")
    return bool(portable.LINUX_WRITEBACK)


LINUX_WRITEBACK = pytest.mark.skipif(not _linux_writeback(), reason="sync_file_range writeback is Linux's "
                                                                    "(not macOS or Windows, not MODELKIT_PORTABLE=1)")


@LINUX_WRITEBACK
def test_disk_writes_start_while_streaming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every STEP bytes the writer asks the kernel to start writing them out (sync_file_range
    WRITE, no wait) and waits for the step before (WAIT_BEFORE|WRITE|WAIT_AFTER), which the page
    cache may then drop, so the final fsync waits only for the tail; the bytes are unchanged."""
    from modelkit.formats import safetensors_write as sw

    calls: list[tuple[int, int, int]] = []

    def record(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((offset, nbytes, flags))
        return 0

    monkeypatch.setattr(sw._Writeback, "_fn", record)
    monkeypatch.setattr(sw._Writeback, "STEP", 1 << 20)
    tensors = {f"t{i}": torch.full((1 << 18,), float(i)) for i in range(8)}  # 8 x 1 MiB
    src = tmp_path / "m.pt"
    build.save_torch(tensors, str(src), "zip")
    got = load_file(modelkit.convert(src).output)
    assert all(same_bits(got[k], v) for k, v in tensors.items())
    started = [(a, n) for a, n, flags in calls if flags == 2]
    waited = [(a, n) for a, n, flags in calls if flags == 7]
    assert len(started) >= 7 and {f for _, _, f in calls} == {2, 7}
    assert all(a + n == b for (a, n), (b, _) in zip(started, started[1:]))  # back to back, no gaps
    assert waited == started[:-1]  # each step, once the next one is started, is waited for (then dropped)


@LINUX_WRITEBACK
def test_writeback_refused_is_harmless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkit.formats import safetensors_write as sw

    calls: list[int] = []

    def refuse(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append(offset)
        return -1

    monkeypatch.setattr(sw._Writeback, "_fn", refuse)
    monkeypatch.setattr(sw._Writeback, "STEP", 1 << 20)
    tensors = {f"t{i}": torch.full((1 << 18,), float(i)) for i in range(4)}
    src = tmp_path / "m.pt"
    build.save_torch(tensors, str(src), "zip")
    got = load_file(modelkit.convert(src).output)
    assert all(same_bits(got[k], v) for k, v in tensors.items())
    assert len(calls) == 1  # tried once, then left to the final fsync


@pytest.mark.parametrize("step", [4, 6, 4096, None])
def test_stepped_casts_match_a_whole_tensor_cast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 step: int | None) -> None:
    """Casts run CAST_STEP source bytes at a time: same bits as one torch cast of the whole
    tensor, overflow counted across the steps, a step that does not divide the tensor, and a
    big-endian source swapped step by step."""
    from modelkit.formats import safetensors_write

    if step is not None:
        monkeypatch.setattr(safetensors_write, "CAST_STEP", step)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 41, generator=g) * 3e4  # about 3% beyond the fp16 range, in many steps
    w[0, 0], w[5, 5], w[36, 40] = float("inf"), float("nan"), -1e6
    tensors = {"w": w, "b": torch.randn(1001, generator=g, dtype=torch.float64), "i": torch.arange(10)}
    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src))
    lost = int((torch.isinf(w.half()) & ~torch.isinf(w)).sum())
    assert lost > 10
    for name, tdt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        r = modelkit.prune(src, tmp_path / f"{name}.safetensors", dtype=name, allow_overflow=True)  # counted, kept
        got = load_file(r.output)
        for k, v in tensors.items():
            assert same_bits(got[k], v.to(tdt) if v.is_floating_point() else v), (name, k)
        assert r.overflow == ({"w": lost} if name == "fp16" else {})
    build.numpy_files(str(tmp_path))
    r = modelkit.prune(tmp_path / "f16be.npy", tmp_path / "be.safetensors", dtype="fp32")
    got = load_file(r.output)["array"]
    assert got.dtype == torch.float32 and got.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("parts, error", [
    ([b"\x00\x3c", b"", b"\x00\x40\x00\x42"], None),
    ([b"\x00\x3c", b"\x00\x40"], "computed 4 bytes for 6"),
    ([b"\x00\x3c\x00\x40", b"\x00\x42\x00\x44"], "computed more than 6 bytes for 6"),
])
def test_computed_pieces_are_written_in_order_and_their_length_checked(tmp_path: Path, parts: list[bytes],
                                                                     error: str | None) -> None:
    """A compute that returns ``Pieces`` is written piece by piece (the same bytes as one buffer); too few or too
    many bytes fail with one line naming the tensor, before more than the tensor's bytes are written."""
    from modelkit.formats.safetensors_write import Pieces

    out = tmp_path / "p.safetensors"
    t = OutTensor("w", BY_NAME["float16"], (3,), compute=lambda: Pieces(iter(parts)))
    if error is None:
        _write(out, [t])
        assert load_file(out)["w"].tolist() == [1.0, 2.0, 3.0]
        return
    with pytest.raises(FormatError, match=f"tensor 'w': {error}"):
        _write(out, [t])
    assert out.stat().st_size <= len(layout([t], None).raw) + 6


def test_only_casts_that_run_torch_ask_for_its_threads(tmp_path: Path) -> None:
    """fp16/bf16 -> fp8 from a file goes through the 64K table (numpy): a prune of that kind neither imports
    torch nor narrows its thread pool for the hash; a float32 -> float16 cast runs torch where it is installed."""
    from modelkit.formats.safetensors_write import casts_with_torch

    src = tmp_path / "m.safetensors"
    save_file({"h": torch.zeros(4, dtype=torch.float16), "f": torch.zeros(4)}, src)
    with modelkit.open_model(src) as mf:
        assert not casts_with_torch(OutTensor.of(mf["h"], dtype=BY_NAME["float8_e4m3fn"]))
        assert not casts_with_torch(OutTensor.of(mf["h"]))  # no cast at all
        assert casts_with_torch(OutTensor.of(mf["f"], dtype=BY_NAME["float16"]))
