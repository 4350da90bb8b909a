"""numcast: the casts and decodes the core does in numpy, against torch's own bit for bit (where
torch is installed), and against values worked out by hand (everywhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures import torchfree
from modelkit import numcast
from modelkit.dtypes import BY_NAME as D
from modelkit.formats import safetensors_write
from modelkit.reading import open_model

FP8 = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]


def _bits16(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr).view(np.uint16)


def test_hand_worked_values() -> None:
    f32 = np.array([1.0, -2.0, 3.140625, 65504.0, 65520.0, 1e-8, np.inf, -0.0], dtype=np.float32)
    assert _bits16(numcast.cast(f32, D["float32"], D["bfloat16"])).tolist() == [
        0x3F80, 0xC000, 0x4049, 0x4780, 0x4780, 0x322C, 0x7F80, 0x8000]
    # ties go to even: 1 + 2**-8 lies halfway between bf16 1.0 and 1 + 2**-7
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8], dtype=np.float32)
    assert _bits16(numcast.cast(ties, D["float32"], D["bfloat16"])).tolist() == [0x3F80, 0x3F82]
    half = numcast.cast(f32, D["float32"], D["float16"])
    assert half[3] == 65504 and np.isinf(half[4]) and half[5] == 0  # 65520 rounds up past the largest half
    assert numcast.overflowed(f32, half, D["float16"]) == 1  # 65520; inf was inf already
    nan = numcast.cast(np.array([np.nan, -np.nan], dtype=np.float32), D["float32"], D["bfloat16"])
    vals = numcast.values(nan, D["bfloat16"])
    assert np.isnan(vals).all() and np.signbit(vals).tolist() == [False, True]
    e4m3 = numcast.values(np.array([0x7E, 0x7F, 0x01, 0x80, 0xFE], dtype=np.uint8), D["float8_e4m3fn"])
    assert e4m3[0] == 448 and np.isnan(e4m3[1]) and e4m3[2] == 2.0**-9 and e4m3[3] == 0 and np.signbit(e4m3[3])
    assert e4m3[4] == -448
    # a double that rounds differently when it goes straight to half: torch goes through float32
    d = np.array([1 + 2**-11 + 2**-40], dtype=np.float64)  # just above a half tie; float32 rounds the tail away
    assert _bits16(numcast.cast(d, D["float64"], D["float16"]))[0] == 0x3C00  # 1.0, as torch gives
    assert _bits16(d.astype(np.float16))[0] == 0x3C01  # numpy's single rounding gives the next value up
    with pytest.raises(ValueError):
        numcast.cast(f32, D["float32"], D["float8_e4m3fnuz"])


def test_every_fp8_and_16_bit_code_against_torch() -> None:
    torch = pytest.importorskip("torch")
    for name in FP8:
        codes = np.arange(256, dtype=np.uint8)
        ref = torch.from_numpy(codes.copy()).view(getattr(torch, name)).float().numpy()
        got = numcast.values(codes, D[name])
        assert np.array_equal(ref, got, equal_nan=True), name
        assert np.array_equal(np.signbit(ref), np.signbit(got)), name
    codes16 = np.arange(1 << 16, dtype=np.uint16)
    for src in ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"):
        arr = codes16 if src.endswith("16") else np.arange(256, dtype=np.uint8)
        t_src = torch.from_numpy(arr.view(np.int16) if src.endswith("16") else arr).view(getattr(torch, src))
        mine_src = arr.view(np.float16) if src == "float16" else arr
        for dst in numcast.TARGETS:
            t = t_src.to(getattr(torch, dst)).contiguous()
            ref = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]).numpy().tobytes()
            got = np.ascontiguousarray(numcast.cast(mine_src, D[src], D[dst])).tobytes()
            assert numcast.same_values(ref, got, D[dst]), (src, dst)


def test_float32_and_float64_against_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    u = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    f32 = u.view(np.float32)
    # float64 values at and around the ties of float16 and bfloat16, where double rounding shows
    lo = rng.integers(0, 0x7BFE, 1 << 16).astype(np.uint16)
    a, b = lo.view(np.float16).astype(np.float64), (lo + 1).view(np.float16).astype(np.float64)
    mid = (a + b) / 2
    f64 = np.concatenate([mid, mid * (1 + 2.0**-40), mid * (1 - 2.0**-40), -mid, rng.standard_normal(1 << 16) * 1e3])
    for src, arr in (("float32", f32), ("float64", f64)):
        for dst in numcast.TARGETS:
            t = torch.from_numpy(arr.copy()).to(getattr(torch, dst))
            ref = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]).numpy().tobytes()
            got = np.ascontiguousarray(numcast.cast(arr, D[src], D[dst])).tobytes()
            assert numcast.same_values(ref, got, D[dst]), (src, dst)


def test_writer_casts_in_numpy_as_torch_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's numpy path (the core install's) writes what its torch path writes, stepped
    casts, strided views and big tensors across several steps included."""
    rng = np.random.default_rng(2)
    big = (rng.standard_normal(safetensors_write.CAST_STEP // 2 + 7) * 3e4).astype(np.float32)  # > 1 step, overflows f16
    tensors = {"big": big, "h": rng.standard_normal((3, 5)).astype(np.float16),
               "bf": torchfree.Bits(rng.integers(0, 1 << 16, 40, dtype=np.uint64).astype(np.uint16), "bfloat16"),
               "d": rng.standard_normal(9),
               "t": torchfree.View("h", 1, (5, 2), (1, 5))}
    src = tmp_path / "m.ckpt"
    torchfree.save_zip(tensors, str(src))
    outs = {}
    backends = ["numpy", "torch"] if numcast.installed_torch() else ["numpy"]
    for backend in backends:
        monkeypatch.setattr(safetensors_write, "have_torch", lambda b=backend: b == "torch")
        for dst in ("float16", "bfloat16", "float32", "float64"):
            out = tmp_path / f"{backend}-{dst}.safetensors"
            with open_model(src) as mf:
                fd = open(out, "wb")
                try:
                    stats = safetensors_write.write_stream(
                        fd.fileno(), [safetensors_write.OutTensor.of(r, dtype=D[dst]) for r in mf.values()])
                finally:
                    fd.close()
            outs[backend, dst] = (out.read_bytes(), stats.overflow)
            with open_model(src) as mf, open_model(out) as mo:
                for name, ref in mf.items():
                    want = numcast.cast(ref.read("numpy"), ref.dtype, D[dst])
                    got = mo[name].read("numpy")
                    assert numcast.same_values(np.ascontiguousarray(want).tobytes(), got.tobytes(), D[dst]), name
    with np.errstate(over="ignore"):
        expect = {"big": int(np.count_nonzero(np.abs(big) >= 65520)),  # the half-way point above 65504
                  "bf": int(np.count_nonzero(np.isinf(numcast.values(tensors["bf"].array, D["bfloat16"]).astype(np.float16))
                                             & np.isfinite(numcast.values(tensors["bf"].array, D["bfloat16"]))))}
    assert outs["numpy", "float16"][1] == expect and expect["big"] > 0
    if "torch" in backends:
        for dst in ("float16", "bfloat16", "float32", "float64"):
            a, b = outs["numpy", dst], outs["torch", dst]
            assert a[1] == b[1]
            head = int.from_bytes(a[0][:8], "little") + 8
            assert a[0][:head] == b[0][:head]
            assert numcast.same_values(a[0][head:], b[0][head:], D[dst])  # every tensor is now of dtype dst
