"""Merges of scaled fp8 checkpoints: ``merge models`` and ``merge lora`` read each scaled weight as
``q.float() * scale``, merge in float and scale the result again (a new per-tensor scale, the same
bytes ``prune --fp8 scaled`` writes for those values), keep the layer's markers, and with
``--dtype fp16`` write plain values without scales. Checked against torch references and against
the path through an upcast copy, in ComfyUI's three scaled layouts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import modelkit
from fixtures import dit_layouts as dl
from fixtures import fp8 as fx
from modelkit.ops.fp8 import scaled_weights

P = "model.diffusion_model."
FMAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def _rescaled(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: ``scale = amax / max`` (float32), ``q = (w / scale).clamp(-max, max)`` in fp8."""
    scale = torch.tensor(float(w.abs().max()), dtype=torch.float32) / torch.tensor(FMAX[fmt], dtype=torch.float32)
    q = (w / scale).clamp(-FMAX[fmt], FMAX[fmt]).to(getattr(torch, fmt))
    return q, scale


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


def _values(path: Path) -> dict[str, torch.Tensor]:
    """name -> float32 values (scaled weights as weight*scale, bookkeeping dropped)."""
    return {k: v.float() for k, v in modelkit.load(path, dequantize=True).items()}


@pytest.mark.parametrize("layout", ["comfy_quant", "metadata", "scaled_fp8"])
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
def test_merge_models_of_a_scaled_file_scales_the_result_again(tmp_path: Path, layout: str, fmt: str) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    fx.write_scaled(str(a), fx.fp16_model(0), fmt, layout, input_scale=True)
    save_file({k: torch.from_numpy(v) for k, v in fx.fp16_model(1, 2.0).items()}, str(b))
    out = tmp_path / "m.safetensors"
    res = modelkit.merge_models(a, b, out=out, alpha=0.3)
    assert any("scaled again" in c for c in res.changes)
    raw_a, got = load_file(str(a)), load_file(str(out))
    assert set(got) == set(raw_a)  # every marker and scale kept, nothing added
    va, vb = _values(a), _values(b)
    found = scaled_weights(modelkit.open_model(out).tensors, modelkit.open_model(out).metadata)
    assert set(found) == {n for n in fx.LAYOUT if n.endswith(".weight") and len(fx.LAYOUT[n]) == 2}
    for name, sw in found.items():
        q, scale = _rescaled(va[name].lerp(vb[name], 0.3), fmt)
        assert got[name].dtype == getattr(torch, fmt)
        assert np.array_equal(_bits(got[name]), _bits(q)), name
        assert torch.equal(got[sw.scale].float().reshape(()), scale), name
    for name in fx.LAYOUT:  # biases and norm scales: merged in float, rounded once to A's dtype
        if name not in found:
            assert torch.equal(got[name], va[name].lerp(vb[name], 0.3).to(raw_a[name].dtype)), name
    # the markers and input scales are A's, unchanged
    for name in raw_a:
        if name.endswith((".comfy_quant", ".input_scale", ".scale_input")) or name == "scaled_fp8":
            assert torch.equal(got[name], raw_a[name]), name


def test_a_scaled_merge_equals_merging_the_upcast_copy_then_scaling(tmp_path: Path) -> None:
    """The same bytes by the long way: prune to fp32, merge, prune --fp8 scaled."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    fx.write_scaled(str(a), fx.fp16_model(3), "float8_e4m3fn", "comfy_quant")
    save_file({k: torch.from_numpy(v) for k, v in fx.fp16_model(4).items()}, str(b))
    direct = tmp_path / "direct.safetensors"
    modelkit.merge_models(a, b, out=direct, alpha=0.6)
    up, merged, again = (tmp_path / f"{s}.safetensors" for s in ("up", "merged", "again"))
    modelkit.prune(a, up, dtype="fp32")
    modelkit.merge_models(up, b, out=merged, alpha=0.6)
    modelkit.prune(merged, again, dtype="fp8_e4m3fn", fp8="scaled")
    d, g = load_file(str(direct)), load_file(str(again))
    long_way = scaled_weights(modelkit.open_model(again).tensors, {})
    assert long_way  # prune scaled the weights it casts (not img_in/final_layer, which it keeps)
    for name, sw in long_way.items():
        assert np.array_equal(_bits(d[name]), _bits(g[name])), name
        assert torch.equal(d[sw.scale].float().reshape(()), g[sw.scale].float().reshape(())), name


def test_merge_models_with_dtype_writes_plain_values_without_scales(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    fx.write_scaled(str(a), fx.fp16_model(5), "float8_e4m3fn", "scaled_fp8", input_scale=True)
    fx.write_scaled(str(b), fx.fp16_model(6), "float8_e5m2", "comfy_quant")
    out = tmp_path / "m.safetensors"
    res = modelkit.merge_models(a, b, out=out, alpha=0.5, dtype="fp16")
    got = load_file(str(out))
    assert set(got) == set(fx.LAYOUT) and any("scales dropped" in c for c in res.changes)
    va, vb = _values(a), _values(b)
    for name in fx.LAYOUT:
        assert got[name].dtype == torch.float16
        assert torch.equal(got[name], va[name].lerp(vb[name], 0.5).half()), name
    # a weight of 0 (block weights off) still upcasts A's scaled weights as their values, not their fp8 codes
    zero = tmp_path / "z.safetensors"
    modelkit.merge_models(a, b, out=zero, alpha=0.0, dtype="fp16")
    z = load_file(str(zero))
    for name in fx.LAYOUT:
        assert torch.equal(z[name], va[name].half()), name


def test_merge_models_takes_a_scaled_b_into_a_plain_a(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in fx.fp16_model(7).items()}, str(a))
    fx.write_scaled(str(b), fx.fp16_model(8), "float8_e4m3fn", "comfy_quant")
    out = tmp_path / "m.safetensors"
    modelkit.merge_models(a, b, out=out, alpha=1.0)  # alpha 1 copies B, which must be B's values, not its codes
    got, vb = load_file(str(out)), _values(b)
    assert set(got) == set(fx.LAYOUT)
    for name in fx.LAYOUT:
        assert torch.equal(got[name], vb[name].half()), name


def _flux_scaled(tmp_path: Path, fmt: str, layout: str) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = {k: v.detach().clone() for k, v in dl.tiny("flux").state_dict().items()}
    orig = dl.to_original(sd, "flux", P)
    path = tmp_path / f"flux-{layout}.safetensors"
    fx.write_scaled(str(path), {k: v.float().numpy() for k, v in orig.items()}, fmt, layout)
    return path, orig


def _kohya_lora(tmp_path: Path, keys: list[str], shapes: dict[str, tuple[int, ...]]) -> Path:
    g = torch.Generator().manual_seed(11)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        o, i = shapes[k]
        name = "lora_unet_" + k[len(P):-len(".weight")].replace(".", "_")
        out[name + ".lora_down.weight"] = torch.randn(4, i, generator=g) * 0.1
        out[name + ".lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.1
        out[name + ".alpha"] = torch.tensor(2.0)
    path = tmp_path / "lora.safetensors"
    save_file(out, str(path))
    return path


@pytest.mark.parametrize("layout", ["comfy_quant", "scaled_fp8"])
def test_merge_lora_into_a_scaled_flux_file(tmp_path: Path, layout: str) -> None:
    fmt = "float8_e4m3fn"
    ckpt, orig = _flux_scaled(tmp_path, fmt, layout)
    targets = [f"{P}double_blocks.0.img_attn.qkv.weight", f"{P}single_blocks.0.linear1.weight",
               f"{P}double_blocks.0.img_mlp.0.weight"]
    lora = _kohya_lora(tmp_path, targets, {k: tuple(orig[k].shape) for k in targets})
    out = tmp_path / "baked.safetensors"
    res = modelkit.merge_lora(ckpt, [(str(lora), 0.8)], out)
    assert res.base == "flux" and res.loras[0].matched == len(targets)
    assert any("scaled again" in c for c in res.changes)
    raw, got, vals = load_file(str(ckpt)), load_file(str(out)), _values(ckpt)
    assert set(got) == set(raw)
    lo = load_file(str(lora))
    found = scaled_weights(modelkit.open_model(out).tensors, modelkit.open_model(out).metadata)
    for key in targets:
        name = "lora_unet_" + key[len(P):-len(".weight")].replace(".", "_")
        w = vals[key].clone()
        w.view(w.shape[0], -1).addmm_(lo[name + ".lora_up.weight"], lo[name + ".lora_down.weight"], alpha=0.8 * 2.0 / 4)
        q, scale = _rescaled(w, fmt)
        assert np.array_equal(_bits(got[key]), _bits(q)), key
        assert torch.equal(got[found[key].scale].float().reshape(()), scale), key
    for name, sw in found.items():  # untouched scaled weights keep their bytes and their scale
        if name not in targets:
            assert torch.equal(got[name].view(torch.uint8), raw[name].view(torch.uint8)), name
            assert torch.equal(got[sw.scale], raw[sw.scale]), name
    # --dtype bf16: every weight as its (merged) value, the scales dropped
    plain = tmp_path / "plain.safetensors"
    modelkit.merge_lora(ckpt, [(str(lora), 0.8)], plain, dtype="bf16")
    p = load_file(str(plain))
    assert set(p) == {k for k in raw if k in orig}
    assert all(v.dtype == torch.bfloat16 for v in p.values())
    key = targets[0]
    name = "lora_unet_" + key[len(P):-len(".weight")].replace(".", "_")
    w = vals[key].clone()
    w.addmm_(lo[name + ".lora_up.weight"], lo[name + ".lora_down.weight"], alpha=0.8 * 2.0 / 4)
    assert torch.equal(p[key], w.bfloat16())
    untouched = f"{P}double_blocks.0.txt_attn.qkv.weight"
    assert torch.equal(p[untouched], vals[untouched].bfloat16())


def test_cli_merge_lora_of_a_scaled_file_says_so(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    ckpt, orig = _flux_scaled(tmp_path, "float8_e4m3fn", "comfy_quant")
    key = f"{P}double_blocks.0.img_attn.proj.weight"
    lora = _kohya_lora(tmp_path, [key], {key: tuple(orig[key].shape)})
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(cli, ["merge", "lora", str(ckpt), str(lora), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert "scaled again" in r.output
    info = modelkit.inspect(out)
    assert info.quantization["scaled"] == info.quantization["fp8_tensors"] > 0


def test_commands_that_would_read_scaled_weights_without_their_scales_refuse_them(tmp_path: Path) -> None:
    """extract, --to gguf and the layout conversions would take the fp8 codes for the values: one line each."""
    from modelkit.errors import UnsupportedFormatError

    ckpt, _orig = _flux_scaled(tmp_path, "float8_e4m3fn", "comfy_quant")
    calls = [lambda: modelkit.extract_lora(ckpt, ckpt, tmp_path / "l.safetensors", rank=4),
             lambda: modelkit.convert_layout(ckpt, tmp_path / "folder", to="diffusers"),
             lambda: modelkit.convert_layout(ckpt, tmp_path / "t.safetensors", to="single", part="transformer")]
    try:
        from modelkit.ops.gguf_ops import to_gguf

        calls.append(lambda: to_gguf(ckpt, tmp_path / "x.gguf", quant="Q8_0"))
    except ImportError:  # the [gguf] extra
        pass
    for call in calls:
        with pytest.raises(UnsupportedFormatError, match="scaled fp8") as err:
            call()
        assert "\n" not in str(err.value) and "--dtype fp16" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]


def test_a_merged_scaled_weight_is_not_held_from_its_scale_to_its_turn() -> None:
    """The writer asks for every float32 scale before any fp8 weight: the cell keeps only the 4-byte scale
    and merges again for the weight, with the same bytes as one merge would give."""
    from modelkit.ops.fp8_merge import Requant, quantize, scale_for

    w = torch.randn(64, 32) * 3
    calls = []

    def make() -> torch.Tensor:
        calls.append(1)
        return w.clone()

    cell = Requant(make, "float8_e4m3fn", "x.weight")
    s = cell.scale()
    assert len(calls) == 1 and set(vars(cell)) == {"make", "fmt", "name", "lock", "value"}
    assert np.frombuffer(s, "<f4")[0] == scale_for(w, "float8_e4m3fn", "x")
    q = cell.weight()
    assert len(calls) == 2
    assert np.array_equal(np.asarray(q), np.asarray(quantize(w, "float8_e4m3fn", scale_for(w, "float8_e4m3fn", "x"))))
    first = Requant(make, "float8_e4m3fn", "x.weight")  # weight first: one merge gives both
    assert np.array_equal(np.asarray(first.weight()), np.asarray(q)) and first.scale() == s and len(calls) == 3


@pytest.mark.parametrize("how", ["merge", "prune"])
def test_plain_values_drop_comfyuis_quantization_metadata(tmp_path: Path, how: str) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    fx.write_scaled(str(a), fx.fp16_model(5), "float8_e4m3fn", "metadata")
    save_file({k: torch.from_numpy(v) for k, v in fx.fp16_model(6).items()}, str(b))
    assert "_quantization_metadata" in modelkit.open_model(a).metadata
    out = tmp_path / "o.safetensors"
    if how == "merge":
        modelkit.merge_models(a, b, out=out, alpha=0.5, dtype="fp16")
    else:
        modelkit.prune(a, out, dtype="fp16")
    assert "_quantization_metadata" not in modelkit.open_model(out).metadata
    kept = tmp_path / "kept.safetensors"  # still scaled: the metadata still describes its layers
    modelkit.merge_models(a, b, out=kept, alpha=0.5)
    assert "_quantization_metadata" in modelkit.open_model(kept).metadata


def test_a_marker_that_names_another_fp8_format_is_refused_in_one_line(tmp_path: Path) -> None:
    from modelkit.errors import FormatError

    good = tmp_path / "good.safetensors"
    fx.write_scaled(str(good), fx.fp16_model(2), "float8_e5m2", "comfy_quant")
    raw = load_file(str(good))
    marker = "double_blocks.0.img_mlp.0.comfy_quant"
    raw[marker] = torch.frombuffer(bytearray(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    bad = tmp_path / "bad.safetensors"
    save_file(raw, str(bad))
    with pytest.raises(FormatError, match="says float8_e4m3fn, but its weight is float8_e5m2") as err:
        modelkit.merge_models(bad, good, out=tmp_path / "m.safetensors")
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    assert not (tmp_path / "m.safetensors").exists()
