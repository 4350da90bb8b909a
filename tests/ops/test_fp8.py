"""fp8: ``prune --dtype fp8_e4m3fn|fp8_e5m2`` (refused overflow, ``--fp8 clamp``, ``--fp8 scaled``
in ComfyUI's ``comfy_quant`` layout), and reading plain and scaled fp8 files in inspect, load,
verify, diff, prune (upcast) and merge, against torch's own casts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelkit
from fixtures import fp8 as fx
from modelkit import numcast
from modelkit.errors import CastOverflowError, UsageError
from modelkit.formats import safetensors_write

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

FORMATS = ["float8_e4m3fn", "float8_e5m2"]
CLI = {"float8_e4m3fn": "fp8_e4m3fn", "float8_e5m2": "fp8_e5m2"}
FMAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def _bits(t: Any) -> Any:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _all_fp16_codes() -> Any:
    return torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16)).view(torch.float16).reshape(256, 256)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_fp16_code_round_trips_as_torch_casts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str,
                                                     backend: str) -> None:
    """fp16 -> fp8 (prune, through the writer's torch or numpy path) -> fp16 equals
    ``t.to(fp8).to(torch.float16)`` for all 65536 fp16 codes, bit for bit (NaN as NaN)."""
    monkeypatch.setattr(safetensors_write, "have_torch", lambda: backend == "torch")
    codes = _all_fp16_codes()
    src, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"blk.weight": codes}, str(src))
    with pytest.raises(CastOverflowError) as err:
        modelkit.prune(src, out, dtype=CLI[fmt])
    finite = codes.float().abs()
    want_over = int(((finite >= 61440) if fmt == "float8_e5m2" else (finite > 464)).logical_and(
        torch.isfinite(codes)).sum())
    assert err.value.counts == {"blk.weight": want_over} and not out.exists()
    r = modelkit.prune(src, out, dtype=CLI[fmt], allow_overflow=True)
    assert r.overflow == {"blk.weight": want_over}
    said = "were saturated to ±448 in" if fmt == "float8_e4m3fn" else "overflowed to inf in"
    assert any(said in w for w in r.warnings), r.warnings
    got = load_file(str(out))["blk.weight"]
    want = codes.to(getattr(torch, fmt))
    assert got.dtype == want.dtype and np.array_equal(_bits(got), _bits(want))
    back, ref = got.to(torch.float16), want.to(torch.float16)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(back), nan)
    keep = ~nan.reshape(-1).numpy()
    assert np.array_equal(back.reshape(-1).view(torch.int16).numpy()[keep], ref.reshape(-1).view(torch.int16).numpy()[keep])
    assert modelkit.verify(src, out).ok


def _model(tmp_path: Path, scale: float = 1.0, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    sd = {k: torch.from_numpy(v) for k, v in fx.fp16_model(seed, scale).items()}
    sd["double_blocks.0.img_mlp.0.weight"][0, 0] = 1000.0  # past e4m3fn's range
    sd["single_blocks.0.linear1.weight"][1, 1] = 65504.0  # past e5m2's range
    sd["txt_embedder.weight"] = torch.randn(10, 16).half()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    return path, sd


@pytest.mark.parametrize("fmt", FORMATS)
def test_overflow_is_refused_unless_clamped(tmp_path: Path, fmt: str) -> None:
    src, sd = _model(tmp_path)
    out = tmp_path / "o.safetensors"
    with pytest.raises(CastOverflowError):
        modelkit.prune(src, out, dtype=CLI[fmt])
    r = modelkit.prune(src, out, dtype=CLI[fmt], fp8="clamp")
    got = load_file(str(out))
    # weight matrices only; input/output layers, embeddings, biases and norms keep their dtype
    cast = {k for k, v in got.items() if v.dtype == getattr(torch, fmt)}
    assert cast == {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.0.weight",
                    "single_blocks.0.linear1.weight"} and r.casts == 3
    for k in cast:
        want = sd[k].clamp(-FMAX[fmt], FMAX[fmt]).to(getattr(torch, fmt))
        assert np.array_equal(_bits(got[k]), _bits(want)), k
    for k in set(got) - cast:
        assert torch.equal(got[k], sd[k]), k
    assert float(got["single_blocks.0.linear1.weight"][1, 1].float()) == min(FMAX[fmt], 65504.0)
    assert modelkit.verify(src, out).ok


@pytest.mark.parametrize("fmt", FORMATS)
def test_scaled_writes_comfyui_layout_and_reads_back(tmp_path: Path, fmt: str) -> None:
    src, sd = _model(tmp_path)
    out = tmp_path / "scaled.safetensors"
    r = modelkit.prune(src, out, dtype=CLI[fmt], fp8="scaled")
    assert r.casts == 3 and not r.overflow
    got = load_file(str(out))
    for k in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"):
        w = sd[k + ".weight"]
        scale = w.abs().amax().float() / FMAX[fmt]  # as torch computes it, in float32
        assert got[k + ".weight_scale"].dtype == torch.float32 and got[k + ".weight_scale"].shape == ()
        assert torch.equal(got[k + ".weight_scale"], scale)
        want = (w.float() / scale).to(getattr(torch, fmt))
        assert np.array_equal(_bits(got[k + ".weight"]), _bits(want)), k
        assert bytes(got[k + ".comfy_quant"].tolist()) == json.dumps({"format": fmt}).encode()
    assert got["img_in.weight"].dtype == torch.float16 and "img_in.weight_scale" not in got
    assert modelkit.verify(src, out).ok
    info = modelkit.inspect(out)
    assert info.quantization["scaled"] == 3 and info.quantization["layouts"] == ["comfy_quant"]
    assert "scaled per tensor" in info.quantization["text"]
    # load: raw as stored, or upcast weight * scale without the bookkeeping tensors
    raw = modelkit.load(out)
    assert raw["single_blocks.0.linear1.weight"].dtype == getattr(torch, fmt)
    up = modelkit.load(out, dequantize=True)
    assert not any(k.endswith((".weight_scale", ".comfy_quant")) for k in up)
    k = "single_blocks.0.linear1"
    assert torch.equal(up[k + ".weight"], got[k + ".weight"].float() * got[k + ".weight_scale"])
    # diff compares values: scaled weight * scale against the fp16 source
    d = modelkit.diff(src, out)
    e = {x.name: x for x in d.entries}[k + ".weight"]
    assert e.change == "dtype" and "scaled" in e.detail
    assert e.max_abs is not None and 0 < e.max_abs <= float(sd[k + ".weight"].abs().max()) / 8


def test_verify_catches_a_wrong_scale(tmp_path: Path) -> None:
    src, sd = _model(tmp_path)
    out = tmp_path / "scaled.safetensors"
    modelkit.prune(src, out, dtype="fp8_e4m3fn", fp8="scaled")
    got = load_file(str(out))
    got["double_blocks.0.img_mlp.0.weight_scale"] = got["double_blocks.0.img_mlp.0.weight_scale"] * 2
    bad = tmp_path / "bad.safetensors"
    save_file(got, str(bad))
    v = modelkit.verify(src, bad)
    assert not v.ok and [m.name for m in v.mismatches] == ["double_blocks.0.img_mlp.0.weight"]
    assert "scale" in v.mismatches[0].problem


@pytest.mark.parametrize("layout", ["comfy_quant", "metadata", "scaled_fp8"])
def test_reads_every_comfyui_scaled_layout(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "s.safetensors"
    scales = fx.write_scaled(str(path), fx.fp16_model(1), "float8_e4m3fn", layout, input_scale=True)
    info = modelkit.inspect(path)
    assert info.quantization["scaled"] == len(scales) == 5
    assert info.quantization["layouts"] == ["scaled_fp8" if layout == "scaled_fp8" else "comfy_quant"]
    raw = load_file(str(path))
    up = modelkit.load(path, dequantize=True)
    assert set(up) == set(fx.LAYOUT)  # scales, markers and the scaled_fp8 marker dropped
    for name, scale in scales.items():
        assert torch.equal(up[name], raw[name].float() * torch.tensor(scale, dtype=torch.float32))
    # prune to fp16 upcasts weight*scale (never the bare fp8 values) and drops the bookkeeping
    half = tmp_path / "half.safetensors"
    r = modelkit.prune(path, half, dtype="fp16")
    got = load_file(str(half))
    assert set(got) == set(fx.LAYOUT) and r.casts >= len(scales)
    for name in scales:
        assert torch.equal(got[name], up[name].half())
    assert modelkit.verify(path, half).ok


def test_merges_plain_fp8(tmp_path: Path) -> None:
    names = ["model.diffusion_model.a.weight", "model.diffusion_model.b.weight"]
    sds = [{n: torch.randn(16, 8).to(torch.float8_e4m3fn) for n in names} for _ in range(2)]
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for sd, p in zip(sds, paths):
        save_file(sd, str(p))
    out = tmp_path / "m.safetensors"
    modelkit.merge_models(paths[0], paths[1], out=out, alpha=0.5)
    got = load_file(str(out))
    for n in names:
        want = sds[0][n].float().lerp(sds[1][n].float(), 0.5).to(torch.float8_e4m3fn)
        assert got[n].dtype == torch.float8_e4m3fn and np.array_equal(_bits(got[n]), _bits(want))


def test_options_are_checked(tmp_path: Path) -> None:
    src, _ = _model(tmp_path)
    with pytest.raises(UsageError, match="--fp8 scaled needs"):
        modelkit.prune(src, tmp_path / "o.safetensors", dtype="fp16", fp8="scaled")
    with pytest.raises(UsageError, match="--fp8 must be"):
        modelkit.prune(src, tmp_path / "o.safetensors", dtype="fp8_e4m3fn", fp8="round")
    assert numcast.FP8_LIMITS["float8_e4m3fn"][0] == float(torch.finfo(torch.float8_e4m3fn).max)
    assert numcast.FP8_LIMITS["float8_e5m2"][0] == float(torch.finfo(torch.float8_e5m2).max)


def test_cli_prune_fp8_scaled(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    src, _ = _model(tmp_path)
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(cli, ["prune", str(src), "-o", str(out), "--dtype", "fp8_e4m3fn", "--fp8", "scaled"])
    assert r.exit_code == 0, r.output
    assert "comfy_quant" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "quantization  fp8 (float8_e4m3fn)" in r.output, r.output
    r = CliRunner().invoke(cli, ["prune", str(src), "-o", str(tmp_path / "p.safetensors"), "--dtype", "fp8_e4m3fn"])
    assert r.exit_code == 2 and "overflow" in r.output


@pytest.mark.parametrize("src", ["float16", "bfloat16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_writers_lookup_table_is_torchs_cast(src: str, fmt: str) -> None:
    """The 65536-entry table the writer casts 16-bit floats with equals torch's cast of every code,
    and its overflow bounds match ``numcast.fp8_overflow``."""
    table, limit, inf = numcast.fp8_table16(src, fmt)
    codes = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16)).view(getattr(torch, src))
    assert np.array_equal(table, _bits(codes.to(getattr(torch, fmt))))
    mag = np.arange(1 << 16, dtype=np.uint16) & 0x7FFF
    over = (mag > limit) & (mag < inf)
    vals = codes.float().numpy()
    assert int(over.sum()) == numcast.fp8_overflow(vals, fmt) > 0


@pytest.mark.parametrize("src", ["float16", "bfloat16", "float32", "float64"])
def test_scaled_fast_paths_equal_the_float_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src: str) -> None:
    """``--fp8 scaled`` takes amax from the integer bits (sign cleared) and casts in torch, a chunk at a time;
    both equal the plain float path (values to float32, ``np.abs().max()``, divide, clip, numpy's rounding)
    bit for bit, for every source dtype, magnitudes from subnormal to near the dtype's top, zeros of both
    signs, over several chunks. inf, NaN and float64 values past float32 are refused by both."""
    from modelkit import _torch, dtypes
    from modelkit.errors import FormatError
    from modelkit.ops import fp8

    monkeypatch.setattr(fp8, "CHUNK", 4096)
    g = torch.Generator().manual_seed(7)
    dt = getattr(torch, src)
    sd: dict[str, Any] = {}
    for i, mag in enumerate((1e-6, 3e-3, 1.0, 250.0, 5e4)):
        x = torch.randn(96, 130, generator=g, dtype=torch.float64) * mag
        x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -6e-8], dtype=torch.float64)
        sd[f"m{i}.weight"] = x.to(dt)
    sd["zeros.weight"] = torch.zeros(50, 100, dtype=dt)
    bad = {"inf": float("inf"), "nan": float("nan")} | ({"huge": 1e300} if src == "float64" else {})
    for k, v in bad.items():
        w = torch.zeros(40, 120, dtype=dt)
        w[39, 119] = v
        sd[f"{k}.weight"] = w
    save_file(sd, str(tmp_path / "s.safetensors"))
    with modelkit.open_model(tmp_path / "s.safetensors") as mf:
        for name, ref in mf.items():
            amax = np.max(np.abs(np.concatenate(list(fp8.chunks(ref)))))
            for fmt in FORMATS:
                target = dtypes.BY_NAME[fmt]
                if not np.isfinite(np.float32(amax)):
                    assert name.split(".")[0] in bad or src == "float16"  # 5e4 * randn overflows fp16 too
                    with pytest.raises(FormatError, match="holds inf or NaN"):
                        fp8.scale_of(ref, target)
                    continue
                scale = fp8.scale_of(ref, target)
                want = np.float32(amax) / np.float32(FMAX[fmt])
                assert scale == (want if want > 0 else np.float32(1.0)), name
                fast = fp8.scaled_cast(ref, target, scale)
                with monkeypatch.context() as m:
                    m.setattr(_torch, "have_torch", lambda: False)
                    slow = fp8.scaled_cast(ref, target, scale)
                assert np.array_equal(fast, slow), (name, fmt)
                ref_bits = _bits((torch.from_numpy(np.asarray(ref.read("numpy"))).view(dt).float() / float(scale))
                                 .clamp(-FMAX[fmt], FMAX[fmt]).to(getattr(torch, fmt)))
                assert np.array_equal(fast, ref_bits), (name, fmt)


def test_a_scaled_file_is_not_cast_to_fp8_again_and_fp8_options_on_fp8_weights_warn(tmp_path: Path) -> None:
    """Casting a scaled file to (another) fp8 would leave its old scales and markers beside new codes: refused
    in one line, nothing written. --fp8 clamp|scaled on weights that are fp8 already says it does nothing."""
    from modelkit.errors import UsageError as Usage

    src, _sd = _model(tmp_path)
    scaled = tmp_path / "scaled.safetensors"
    modelkit.prune(src, scaled, dtype="fp8_e4m3fn", fp8="scaled")
    for dtype in ("fp8_e5m2", "fp8_e4m3fn"):
        with pytest.raises(Usage, match="scaled fp8 weights; casting a scaled file to fp8 again"):
            modelkit.prune(scaled, tmp_path / "again.safetensors", dtype=dtype)
    assert not (tmp_path / "again.safetensors").exists()
    plain = tmp_path / "plain.safetensors"
    modelkit.prune(src, plain, dtype="fp8_e4m3fn", fp8="clamp")
    r = modelkit.prune(plain, tmp_path / "p2.safetensors", dtype="fp8_e4m3fn", fp8="scaled")
    assert r.casts == 0 and any("float8_e4m3fn already: --fp8 scaled" in w for w in r.warnings), r.warnings
