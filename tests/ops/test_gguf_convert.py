"""GGUF out (the layout ComfyUI-GGUF loads, values equal to the gguf package's own quantizer) and
GGUF in (dequantized to a float dtype), atomic and streaming like every output."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import modelkit
from fixtures.torchfree import save_safetensors
from modelkit import numcast
from modelkit.dtypes import BY_NAME
from modelkit.errors import OutputExistsError, UsageError
from modelkit.ops.gguf_ops import choose_qtype, from_gguf, to_gguf

#: What ComfyUI-GGUF's loader accepts as an image model's general.architecture.
COMFY_IMG_ARCH = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2"}


def tiny_flux(path: Path, dtype: type = np.float16) -> dict[str, np.ndarray]:
    """A Flux-named transformer (BFL/ComfyUI keys), tiny dims that are whole quant blocks, plus a VAE key."""
    rng = np.random.default_rng(0)
    h = 64
    t = {
        "model.diffusion_model.img_in.weight": rng.standard_normal((h, 64)),
        "model.diffusion_model.img_in.bias": rng.standard_normal(h),
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": rng.standard_normal((3 * h, h)),
        "model.diffusion_model.double_blocks.0.img_attn.qkv.bias": rng.standard_normal(3 * h),
        "model.diffusion_model.double_blocks.0.img_attn.proj.weight": rng.standard_normal((h, h)),
        "model.diffusion_model.double_blocks.0.img_mlp.0.weight": rng.standard_normal((4 * h, h)),
        "model.diffusion_model.single_blocks.0.linear1.weight": rng.standard_normal((7 * h, h)),
        "model.diffusion_model.single_blocks.0.norm.query_norm.scale": rng.standard_normal(16),
        "model.diffusion_model.final_layer.linear.weight": rng.standard_normal((64, h)),
        "first_stage_model.decoder.conv_in.weight": rng.standard_normal((8, 4, 3, 3)),
    }
    arrays = {k: v.astype(dtype) for k, v in t.items()}
    save_safetensors(arrays, str(path))
    return arrays


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q5_1", "F16", "BF16"])
def test_flux_to_gguf_is_what_comfyui_gguf_reads_with_ggufs_own_values(tmp_path: Path, quant: str) -> None:
    src = tmp_path / "flux.safetensors"
    arrays = tiny_flux(src)
    out = tmp_path / f"flux-{quant}.gguf"
    r = to_gguf(src, out, quant=quant, base="flux")
    assert r.status == "written" and r.arch == "flux" and r.left_out == 1  # the VAE tensor
    reader = gguf.GGUFReader(str(out))
    arch = bytes(reader.get_field("general.architecture").parts[-1]).decode()
    assert arch == "flux" and arch in COMFY_IMG_ARCH
    by_name = {t.name: t for t in reader.tensors}
    assert set(by_name) == {k.removeprefix("model.diffusion_model.") for k in arrays if k.startswith("model.")}
    with modelkit.open_model(src) as mf:
        for full, arr in arrays.items():
            if not full.startswith("model."):
                continue
            t = by_name[full.removeprefix("model.diffusion_model.")]
            # what ComfyUI-GGUF's loader does: the logical shape is the reversed ggml shape
            assert tuple(int(v) for v in reversed(t.shape)) == arr.shape, full
            want = choose_qtype(full, mf[full], quant)
            assert t.tensor_type.name == want, full
            expect = gguf.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType[want])
            assert np.asarray(t.data).tobytes() == expect.tobytes(), full  # gguf's own quantizer, bit for bit
    if quant == "Q8_0":
        assert by_name["double_blocks.0.img_attn.qkv.weight"].tensor_type.name == "Q8_0"
        assert by_name["img_in.weight"].tensor_type.name == "F16"  # kept at full precision, as ComfyUI-GGUF does
        assert by_name["double_blocks.0.img_attn.qkv.bias"].tensor_type.name == "F16"


def test_round_trip_dequantizes_to_ggufs_values(tmp_path: Path) -> None:
    src = tmp_path / "flux.safetensors"
    tiny_flux(src, np.float32)
    g = tmp_path / "flux.gguf"
    to_gguf(src, g, quant="Q8_0", base="flux")
    back = tmp_path / "back.safetensors"
    target, n, _size = from_gguf(g, back, dtype="bf16")
    assert target == str(back) and n == 9
    reader = gguf.GGUFReader(str(g))
    with modelkit.open_model(back) as mf:
        assert mf.metadata["general.architecture"] == "flux"
        for t in reader.tensors:
            ref = mf[t.name]
            assert ref.dtype.name == "bfloat16"
            vals = gguf.dequantize(t.data, t.tensor_type).astype(np.float32)
            want = numcast.cast(vals.reshape(ref.shape), BY_NAME["float32"], BY_NAME["bfloat16"])
            assert bytes(ref.read_raw()) == np.ascontiguousarray(want).tobytes(), t.name


def test_sd1_checkpoint_to_gguf_keeps_only_the_unet(tmp_path: Path) -> None:
    from fixtures.demo import main

    main(str(tmp_path / "demo"))  # built here, not in the checkout's fixtures/demo/
    src = tmp_path / "demo" / "sd15-tiny.ckpt"
    out = tmp_path / "unet.gguf"
    r = to_gguf(src, out, quant="Q8_0")  # detection says sd1
    assert r.arch == "sd1" and r.quantized > 0 and r.left_out > 0
    with modelkit.open_model(src) as mf:
        unet = {k[len("model.diffusion_model."):]: v.shape for k, v in mf.items() if k.startswith("model.diffusion_model.")}
    reader = gguf.GGUFReader(str(out))
    assert {t.name: tuple(int(v) for v in reversed(t.shape)) for t in reader.tensors} == unet
    assert modelkit.scan.scan_file(out).verdict == "safe"
    assert modelkit.inspect(out).container == "gguf"
    # --keys: a quantized tensor is listed by its quant type and logical shape (as the dtype table
    # counts it), with the packed uint8 shape it is stored in beside
    listed = {t.name: t for t in modelkit.inspect(out, keys=True).tensors or ()}
    by_gguf = {t.name: t for t in reader.tensors}
    assert set(listed) == set(unet)
    for name, t in listed.items():
        assert t.shape == unet[name], name
        assert t.dtype == by_gguf[name].tensor_type.name.replace("F16", "float16").replace("F32", "float32"), name
        if t.dtype == "Q8_0":
            assert t.packed_shape == (math.prod(unet[name][:-1]), unet[name][-1] // 32 * 34), name
            assert t.to_dict()["packed_shape"] == list(t.packed_shape)
        else:
            assert t.packed_shape is None and "packed_shape" not in t.to_dict()
    assert any(t.dtype == "Q8_0" for t in listed.values())
    text = subprocess.run([sys.executable, "-m", "modelkit", "inspect", "--keys", str(out)], capture_output=True,
                          text=True, check=True).stdout
    q8 = next(n for n, t in listed.items() if t.dtype == "Q8_0")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(q8 + " "))
    assert "Q8_0" in line and str(list(unet[q8])) in line and f"stored as uint8 {list(listed[q8].packed_shape)}" in line


def test_refusals_write_nothing(tmp_path: Path) -> None:
    src = tmp_path / "flux.safetensors"
    tiny_flux(src)
    with pytest.raises(UsageError, match="--quant must be one of"):
        to_gguf(src, tmp_path / "a.gguf", quant="IQ4_XS", base="flux")
    with pytest.raises(UsageError, match="ends in .gguf"):
        to_gguf(src, tmp_path / "a.safetensors", base="flux")
    with pytest.raises(UsageError, match="GGUF holds the denoiser"):
        to_gguf(src, tmp_path / "a.gguf", base="controlnet")
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        to_gguf(src, tmp_path / "exists.gguf", base="flux")
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["exists.gguf", "flux.safetensors"]
    with pytest.raises(UsageError, match="not GGUF"):
        from_gguf(src, tmp_path / "x.safetensors")


def test_cli_to_gguf_and_back_and_inspect(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from modelkit.cli.main import cli

    src = tmp_path / "flux.safetensors"
    arrays = tiny_flux(src)
    run = CliRunner().invoke
    r = run(cli, ["convert", str(src), "--to", "gguf", "--base", "flux", "--out-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)["files"][0]
    g = tmp_path / "flux-Q8_0.gguf"
    assert doc["output"] == str(g) and doc["quant"] == "Q8_0" and doc["left_out"] == 1
    info = modelkit.inspect(g)
    unet = {k: v for k, v in arrays.items() if k.startswith("model.")}
    assert info.parameter_count == sum(v.size for v in unet.values())  # logical, not packed, sizes
    assert "Q8_0" in info.bytes_by_dtype
    r = run(cli, ["convert", str(g), "--dtype", "fp32", "-o", str(tmp_path / "back.safetensors")])
    assert r.exit_code == 0, r.output
    with modelkit.open_model(tmp_path / "back.safetensors") as mf:
        assert {k: v.shape for k, v in mf.items()} == {k.removeprefix("model.diffusion_model."): v.shape
                                                       for k, v in unet.items()}
        assert all(v.dtype.name == "float32" for v in mf.values())
    r = run(cli, ["convert", str(src), "--to", "gguf", "--quant", "IQ4_XS", "--base", "flux", "-o", str(tmp_path / "k.gguf")])
    assert r.exit_code == 2 and "--quant must be one of" in r.stderr and not (tmp_path / "k.gguf").exists()
    r = run(cli, ["convert", str(src), "--dtype", "fp16", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "--dtype is for GGUF input" in r.stderr


def test_verify_checks_both_directions_of_a_gguf_conversion(tmp_path: Path) -> None:
    src = tmp_path / "flux.safetensors"
    tiny_flux(src)
    g = tmp_path / "flux.gguf"
    to_gguf(src, g, quant="Q8_0", base="flux")
    r = modelkit.verify(src, g)
    assert r.ok, r.mismatches
    assert r.only_in_source == ("first_stage_model.decoder.conv_in.weight",)
    back = tmp_path / "back.safetensors"
    from_gguf(g, back, dtype="fp16")
    assert modelkit.verify(g, back).ok
    # a wrong quantization is caught: rewrite one Q8_0 block's scale
    data = bytearray(g.read_bytes())
    with modelkit.open_model(g) as mf:
        start = mf["double_blocks.0.img_attn.qkv.weight"].byte_range[0]
    data[start] ^= 0x01
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    r = modelkit.verify(src, bad)
    assert not r.ok and [m.name for m in r.mismatches] == ["double_blocks.0.img_attn.qkv.weight"]


def test_quantized_gguf_is_refused_where_float_weights_are_read_and_dequantized_by_load(tmp_path: Path) -> None:
    """A quantized tensor is packed blocks, not values: every command that reads float weights refuses such a
    GGUF in one line (it wrote the blocks under the weight's name); ``load(dequantize=True)`` gives the values in
    their logical shape, what gguf's dequantizer gives."""
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    src = tmp_path / "flux.safetensors"
    tiny_flux(src, np.float32)
    g = tmp_path / "flux.gguf"
    to_gguf(src, g, quant="Q8_0", base="flux")
    lora = tmp_path / "l.safetensors"
    save_safetensors({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": np.ones((4, 64), np.float32),
                      "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": np.ones((64, 4), np.float32)},
                     str(lora))
    runs = {"prune": ["prune", str(g), "-o", "{o}.safetensors"],
            "merge models": ["merge", "models", str(g), str(src), "-o", "{o}.safetensors"],
            "merge lora": ["merge", "lora", str(g), str(lora), "-o", "{o}.safetensors"],
            "lora extract": ["lora", "extract", str(src), str(g), "-o", "{o}.safetensors"],
            "convert --to diffusers": ["convert", str(g), "--to", "diffusers", "-o", "{o}"],
            "convert --to gguf": ["convert", str(g), "--to", "gguf", "-o", "{o}.gguf"],
            "diff": ["diff", str(src), str(g)]}
    for what, args in runs.items():
        r = CliRunner().invoke(cli, [a.format(o=tmp_path / "out") for a in args])
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (what, r.output)
        assert "GGUF file with 4 quantized tensors (Q8_0)" in lines[0] and what.split(" ")[0] in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux.gguf", "flux.safetensors", "l.safetensors"]
    raw, values = modelkit.load(g), modelkit.load(g, dequantize=True)
    reader = {t.name: t for t in gguf.GGUFReader(str(g)).tensors}
    name = "double_blocks.0.img_attn.proj.weight"
    assert raw[name].dtype == torch.uint8 and values[name].dtype == torch.float32 and values[name].shape == (64, 64)
    want = gguf.dequantize(reader[name].data, reader[name].tensor_type).astype(np.float32).reshape(64, 64)
    assert np.array_equal(values[name].numpy(), want)
    assert modelkit.load(g, dequantize=True, dtype="float16")[name].dtype == torch.float16


def test_to_gguf_refuses_what_is_not_a_denoiser_in_comfyuis_keys(tmp_path: Path) -> None:
    """A LoRA is no denoiser; a UNet in diffusers' keys is one ComfyUI-GGUF does not load: one line each, and a
    bf16 tensor kept at full precision stays BF16 (not F32)."""
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    lora = tmp_path / "l.safetensors"
    save_safetensors({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": np.ones((4, 64), np.float16),
                      "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": np.ones((64, 4), np.float16)},
                     str(lora))
    unet = tmp_path / "u.safetensors"
    save_safetensors({"conv_in.weight": np.ones((32, 4, 3, 3), np.float16),
                      "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": np.ones((32, 768), np.float16),
                      "mid_block.resnets.0.conv1.weight": np.ones((32, 32, 3, 3), np.float16)}, str(unet))
    for src, base, needle in ((lora, "flux", "is a lora, not a checkpoint"), (unet, "sd1", "diffusers' keys")):
        r = CliRunner().invoke(cli, ["convert", str(src), "--to", "gguf", "--base", base, "-o", str(tmp_path / "o.gguf")])
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
    assert not (tmp_path / "o.gguf").exists()
    from modelkit.ops.gguf_ops import choose_qtype

    with modelkit.open_model(lora) as mf:
        ref = mf["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"]
        assert choose_qtype("img_in.weight", ref, "Q8_0") == "F16"
