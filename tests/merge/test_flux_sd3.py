"""Flux.1 and SD3.x: the key map against diffusers' single-file converters, LoRA bakes in every key style
(fused and split weights both ways) against float64 references (1 ulp) and against diffusers'
``load_lora_adapter`` + ``fuse_lora`` on layer outputs, the refusal of a LoRA for another family,
per-block ``merge models`` and ``prune --part``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelkit
from fixtures import dit_layouts as dl
from fixtures import merge_layouts as ml
from modelkit.errors import FormatError, UsageError
from tests.merge.reference import assert_all_within_ulp

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

P = "model.diffusion_model."
pytestmark = pytest.mark.filterwarnings("ignore")  # diffusers/peft deprecation chatter


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, torch.Tensor]]:
    """family -> the tiny diffusers state dict (float32)."""
    return {f: {k: v.detach().clone() for k, v in dl.tiny(f).state_dict().items()} for f in ("flux", "sd3")}


def _inputs(family: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    if family == "flux":
        return dict(hidden_states=torch.randn(1, 4, 16, generator=g), encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                    pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([3.5]))
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500.0]))


def _run(family: str, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    m = dl.tiny(family)
    m.load_state_dict(sd)
    with torch.no_grad():
        return m(**_inputs(family)).sample


def _lora(shapes: dict[str, tuple[int, ...]], paths: list[str], seed: int = 1, rank: int = 4) -> dict[str, torch.Tensor]:
    """``path -> (down, up)`` flattened as ``{path}.down`` / ``{path}.up`` for ``paths`` of these shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in paths:
        rows, cols = shapes[p]
        out[p + ".down"] = torch.randn(rank, cols, generator=g) * 0.3
        out[p + ".up"] = torch.randn(rows, rank, generator=g) * 0.3
    return out


def _files(tmp: Path, family: str, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Path]:
    """The same transformer as a diffusers file, an original-keys file and a ComfyUI single file (prefixed)."""
    cast = {k: v.to(dtype) for k, v in sd.items()}
    out = {"diffusers": tmp / f"{family}-diffusers.safetensors", "original": tmp / f"{family}-original.safetensors",
           "prefixed": tmp / f"{family}-prefixed.safetensors"}
    save_file(cast, str(out["diffusers"]))
    save_file(dl.to_original(cast, family), str(out["original"]))
    save_file(dl.to_original(cast, family, P), str(out["prefixed"]))
    return out


def _as_diffusers(path: Path, layout: str, family: str) -> dict[str, torch.Tensor]:
    sd = load_file(str(path))
    return sd if layout == "diffusers" else dl.to_diffusers(sd, family, P if layout == "prefixed" else "")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_key_map_agrees_with_diffusers_single_file_converter(models, family: str) -> None:
    from diffusers.loaders import single_file_utils as sfu

    if family == "flux":  # its converter splits single blocks by the real widths: rows of numbers, 1 column
        sd, convert = dl.fake_flux_full_width(), sfu.convert_flux_transformer_checkpoint_to_diffusers
    else:
        sd, convert = models["sd3"], sfu.convert_sd3_transformer_checkpoint_to_diffusers
    back = convert(dl.to_original(sd, family, P))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k].reshape(v.shape), v), k


#: Diffusers modules a diffusers/PEFT LoRA adapts: fused q/k/v thirds, Flux's linear1 parts, renames,
#: the final modulation whose halves the original stores swapped (SD3: also the last context block's).
DIFFUSERS_MODULES = {
    "flux": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj",
             "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.net.0.proj",
             "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
             "single_transformer_blocks.0.proj_out", "norm_out.linear", "x_embedder"],
    "sd3": ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.0.attn2.to_v",
            "transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.norm1_context.linear", "norm_out.linear",
            "context_embedder"],
}


def _peft_lora(tmp: Path, sd: dict[str, torch.Tensor], family: str) -> tuple[Path, dict[str, torch.Tensor]]:
    shapes = {k[:-len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2}
    raw = _lora(shapes, DIFFUSERS_MODULES[family])
    flat = {}
    for p in DIFFUSERS_MODULES[family]:
        flat[f"transformer.{p}.lora_A.weight"], flat[f"transformer.{p}.lora_B.weight"] = raw[p + ".down"], raw[p + ".up"]
    path = tmp / f"{family}-peft.safetensors"
    save_file(flat, str(path))
    return path, flat


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_lora_equals_fuse_lora_in_every_layout(tmp_path: Path, models, family: str) -> None:
    sd = models[family]
    files = _files(tmp_path, family, sd, torch.float32)
    lora, flat = _peft_lora(tmp_path, sd, family)
    want_model = dl.tiny(family)
    want_model.load_lora_adapter(dict(flat), prefix="transformer")
    want_model.fuse_lora(lora_scale=0.8)
    with torch.no_grad():
        want = want_model(**_inputs(family)).sample
    assert not torch.allclose(want, _run(family, sd), atol=1e-3)  # the LoRA changes the outputs
    baked = {}
    for layout, path in files.items():
        out = tmp_path / f"{layout}-out.safetensors"
        res = modelkit.merge_lora(path, [(str(lora), 0.8)], out, compute_dtype="fp64")
        assert res.base == family and res.loras[0].matched == len(DIFFUSERS_MODULES[family]), layout
        baked[layout] = _as_diffusers(out, layout, family)
        torch.testing.assert_close(_run(family, baked[layout]), want, rtol=1e-5, atol=1e-5, msg=layout)
    for layout in ("original", "prefixed"):  # the same numbers whatever the layout
        assert all(torch.equal(baked[layout][k], v) for k, v in baked["diffusers"].items()), layout


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_lora_bake_is_within_one_ulp(tmp_path: Path, models, family: str) -> None:
    sd = {k: v.to(torch.bfloat16) for k, v in models[family].items()}
    files = _files(tmp_path, family, models[family], torch.bfloat16)
    lora, flat = _peft_lora(tmp_path, models[family], family)
    ref = {}
    for p in DIFFUSERS_MODULES[family]:
        w = sd[p + ".weight"].double()
        ref[p + ".weight"] = w + 0.6 * flat[f"transformer.{p}.lora_B.weight"].double() @ flat[f"transformer.{p}.lora_A.weight"].double()
    for layout, path in files.items():
        out = tmp_path / f"{layout}-out.safetensors"
        modelkit.merge_lora(path, [(str(lora), 0.6)], out)
        got = _as_diffusers(out, layout, family)
        assert_all_within_ulp({k: (got[k], r) for k, r in ref.items()})
        assert all(torch.equal(got[k], v) for k, v in sd.items() if k not in ref), layout


#: Original-key LoRA styles: style -> [(module name, original path, rows of that weight it covers)].
ORIGINAL_STYLES = {
    "kohya": [("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", None),
              ("lora_unet_double_blocks_0_txt_attn_qkv", "double_blocks.0.txt_attn.qkv", None),
              ("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1", None),
              ("lora_unet_single_blocks_0_linear2", "single_blocks.0.linear2", None),
              ("lora_unet_final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1", None)],
    "xlabs": [("double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv", None),
              ("double_blocks.0.processor.qkv_lora2", "double_blocks.0.txt_attn.qkv", None),
              ("double_blocks.0.processor.proj_lora2", "double_blocks.0.txt_attn.proj", None),
              ("single_blocks.0.processor.qkv_lora", "single_blocks.0.linear1", (0, 96)),
              ("single_blocks.0.processor.proj_lora", "single_blocks.0.linear2", None)],
    "bfl": [("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.qkv", None),
            ("single_blocks.0.linear1", "single_blocks.0.linear1", None)],
    "comfyui": [("diffusion_model.double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.0", None),
                ("diffusion_model.single_blocks.0.linear1", "single_blocks.0.linear1", None)],
    "kohya-sd3": [("lora_unet_joint_blocks_0_x_block_attn_qkv", "joint_blocks.0.x_block.attn.qkv", None),
                  ("lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
                   "joint_blocks.1.context_block.adaLN_modulation.1", None),
                  ("lora_unet_joint_blocks_0_x_block_attn2_qkv", "joint_blocks.0.x_block.attn2.qkv", None)],
}
SUFFIXES = {"kohya": (".lora_down.weight", ".lora_up.weight"), "xlabs": (".down.weight", ".up.weight"),
            "bfl": (".lora_A.weight", ".lora_B.weight"), "comfyui": (".lora_down.weight", ".lora_up.weight")}


def _original_lora(tmp: Path, style: str, orig: dict[str, torch.Tensor]) -> tuple[Path, dict[str, torch.Tensor], dict]:
    family = "sd3" if style.endswith("sd3") else "flux"
    g = torch.Generator().manual_seed(3)
    flat: dict[str, torch.Tensor] = {}
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    down_s, up_s = SUFFIXES[style.removesuffix("-sd3")]
    for name, path, rows in ORIGINAL_STYLES[style]:
        w = orig[path + ".weight"]
        n = (rows[1] - rows[0]) if rows else w.shape[0]
        down, up = torch.randn(4, w.shape[1], generator=g) * 0.3, torch.randn(n, 4, generator=g) * 0.3
        flat[name + down_s], flat[name + up_s] = down, up
        scale = 1.0
        if style.startswith("kohya"):
            flat[name + ".alpha"] = torch.tensor(2.0)
            scale = 0.5
        parts[name] = (down, up, scale)
    path = tmp / f"{style}.safetensors"
    save_file(flat, str(path))
    return path, flat, {"family": family, "parts": parts}


@pytest.mark.parametrize("style", list(ORIGINAL_STYLES))
def test_original_style_lora_in_every_layout_is_within_one_ulp(tmp_path: Path, models, style: str) -> None:
    family = "sd3" if style.endswith("sd3") else "flux"
    files = _files(tmp_path, family, models[family], torch.bfloat16)
    orig = dl.to_original({k: v.to(torch.bfloat16) for k, v in models[family].items()}, family)
    lora, _flat, info = _original_lora(tmp_path, style, orig)
    ref: dict[str, torch.Tensor] = {}
    for name, path, rows in ORIGINAL_STYLES[style]:
        down, up, scale = info["parts"][name]
        w = ref.setdefault(path + ".weight", orig[path + ".weight"].double())
        a, b = rows or (0, w.shape[0])
        w[a:b] += 0.7 * scale * (up.double() @ down.double())
    for layout, path in files.items():
        out = tmp_path / f"{layout}-out.safetensors"
        res = modelkit.merge_lora(path, [(str(lora), 0.7)], out)
        assert res.loras[0].matched == len(ORIGINAL_STYLES[style]) and res.base == family, layout
        got = dl.to_original(_as_diffusers(out, layout, family), family)
        assert_all_within_ulp({k: (got[k], r) for k, r in ref.items()})
        assert all(torch.equal(got[k], v) for k, v in orig.items() if k not in ref), layout


@pytest.mark.parametrize("style", ["kohya", "xlabs"])
def test_original_style_lora_equals_diffusers_own_conversion(tmp_path: Path, models, style: str) -> None:
    """diffusers converts kohya and XLabs Flux LoRAs itself (``lora_state_dict``); fused, it gives the same
    outputs. Its kohya converter splits ``linear1`` by the real widths and drops the alpha of
    ``final_layer`` modules (kohya and ComfyUI apply it, as modelkit does), so those are left out here."""
    from diffusers.loaders import FluxLoraLoaderMixin

    orig = dl.to_original(models["flux"], "flux")
    lora, flat, _info = _original_lora(tmp_path, style, orig)
    if style == "kohya":
        flat = {k: v for k, v in flat.items() if "linear1" not in k and "final_layer" not in k}
        save_file(flat, str(lora))
    want_model = dl.tiny("flux")
    want_model.load_lora_adapter(FluxLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in flat.items()}),
                                 prefix="transformer")
    want_model.fuse_lora(lora_scale=0.9)
    with torch.no_grad():
        want = want_model(**_inputs("flux")).sample
    files = _files(tmp_path, "flux", models["flux"], torch.float32)
    for layout in ("diffusers", "prefixed"):
        out = tmp_path / f"{layout}-out.safetensors"
        modelkit.merge_lora(files[layout], [(str(lora), 0.9)], out, compute_dtype="fp64")
        torch.testing.assert_close(_run("flux", _as_diffusers(out, layout, "flux")), want, rtol=1e-5, atol=1e-5)


def test_a_flux_lora_on_sdxl_is_refused_in_one_line(tmp_path: Path, models) -> None:
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    sdxl = tmp_path / "sdxl.safetensors"
    ml.checkpoint(str(sdxl), ml.sdxl())
    orig = dl.to_original(models["flux"], "flux")
    lora, _flat, _info = _original_lora(tmp_path, "kohya", orig)
    with pytest.raises(UsageError, match="this LoRA is for Flux, the checkpoint sdxl.safetensors is SDXL"):
        modelkit.merge_lora(sdxl, [str(lora)], tmp_path / "out.safetensors")
    r = CliRunner().invoke(cli, ["merge", "lora", str(sdxl), str(lora), "-o", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "this LoRA is for Flux" in r.stderr, r.output
    assert not (tmp_path / "out.safetensors").exists()
    files = _files(tmp_path, "flux", models["flux"], torch.float32)
    sd1_lora = tmp_path / "sd1-lora.safetensors"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    ml.lora_file(str(sd1_lora), {ml.kohya_name(key): ml.module("lora", (32, 768))})
    with pytest.raises(UsageError, match="this LoRA is for SD 1.x, the checkpoint flux-original.safetensors is Flux"):
        modelkit.merge_lora(files["original"], [str(sd1_lora)], tmp_path / "out.safetensors")


def test_a_split_weight_takes_only_a_plain_lora(tmp_path: Path, models) -> None:
    files = _files(tmp_path, "flux", models["flux"], torch.float32)
    lora = tmp_path / "loha.safetensors"
    ml.lora_file(str(lora), {"lora_unet_double_blocks_0_img_attn_qkv": ml.module("loha", (96, 32))})
    with pytest.raises(UsageError, match="only a plain LoRA can be cut by rows"):
        modelkit.merge_lora(files["diffusers"], [str(lora)], tmp_path / "out.safetensors")
    res = modelkit.merge_lora(files["original"], [str(lora)], tmp_path / "out.safetensors")  # fused there: fine
    assert res.touched == 1


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_block_weights_follow_the_transformer_blocks(tmp_path: Path, models, family: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _files(tmp_path / "a", family, models[family], torch.float32)
    other = {k: v + 1.0 for k, v in models[family].items()}
    b = _files(tmp_path / "b", family, other, torch.float32)
    names = {"flux": ["D00", "S00"], "sd3": ["J00", "J01"]}[family]
    for layout in ("prefixed", "diffusers"):
        out = tmp_path / f"{layout}-merged.safetensors"
        res = modelkit.merge_models(a[layout], b[layout], out=out, block_weights="0.1,0.25,0.75")
        assert res.block_weights == {"BASE": 0.1, names[0]: 0.25, names[1]: 0.75}
        got, sa = load_file(str(out)), load_file(str(a[layout]))
        block = {"flux": ("double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.to_q.weight"),
                 "sd3": ("joint_blocks.0.x_block.mlp.fc1.weight", "transformer_blocks.0.ff.net.0.proj.weight")}[family]
        second = {"flux": ("single_blocks.0.linear2.weight", "single_transformer_blocks.0.proj_out.weight"),
                  "sd3": ("joint_blocks.1.x_block.mlp.fc1.weight", "transformer_blocks.1.ff.net.0.proj.weight")}[family]
        top = {"flux": ("img_in.weight", "x_embedder.weight"), "sd3": ("context_embedder.weight", "context_embedder.weight")}[family]
        pick = 0 if layout == "prefixed" else 1
        for keys, w in ((block, 0.25), (second, 0.75), (top, 0.1)):
            k = (P if layout == "prefixed" else "") + keys[pick]
            torch.testing.assert_close(got[k], sa[k] + w, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="this transformer takes 2 block weights"):
        modelkit.merge_models(a["prefixed"], b["prefixed"], out=tmp_path / "x.safetensors", block_weights="1,2,3,4")


def test_prune_part_splits_a_flux_single_file(tmp_path: Path, models) -> None:
    orig = dl.to_original(models["flux"], "flux", P)
    extra = {"vae.decoder.conv_in.weight": torch.ones(4, 16, 3, 3),
             "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8),
             "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": torch.ones(8)}
    src = tmp_path / "flux-full.safetensors"
    save_file({**orig, **extra}, str(src))
    want = {"transformer": {k[len(P):] for k in orig}, "vae": {"decoder.conv_in.weight"},
            "clip_l": {"text_model.final_layer_norm.weight"}, "t5xxl": {"encoder.final_layer_norm.weight"},
            "te": {k for k in extra if k.startswith("text_encoders.")}}
    for part, keys in want.items():
        out = tmp_path / f"{part}.safetensors"
        modelkit.prune(src, out, part=part)
        assert set(load_file(str(out))) == keys, part
    with pytest.raises(FormatError, match="has no clip_g tensors"):
        modelkit.prune(src, tmp_path / "g.safetensors", part="clip_g")


def test_a_flux_single_file_takes_text_encoder_modules_and_merges_by_component(tmp_path: Path, models) -> None:
    """A ComfyUI Flux single file (transformer, ``vae.``, CLIP-L, T5): a kohya LoRA's ``lora_te1_`` module
    reaches CLIP-L; ``merge models --components te`` merges the text encoders only."""
    from fixtures import detect_layouts as dlay

    clip = ml.checkpoint(str(tmp_path / "clip.safetensors"), dlay.hf_clip("text_encoders.clip_l.transformer."),
                         dtype=torch.bfloat16)
    full = {**dl.to_original({k: v.to(torch.bfloat16) for k, v in models["flux"].items()}, "flux", P), **clip,
            "vae.decoder.conv_in.weight": torch.ones(4, 16, 3, 3, dtype=torch.bfloat16),
            "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": torch.ones(8, dtype=torch.bfloat16)}
    src = tmp_path / "flux-full.safetensors"
    save_file(full, str(src))
    te_key = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    qkv_key = P + "double_blocks.0.img_attn.qkv.weight"
    mods = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ml.module("lora", tuple(full[te_key].shape), seed=1),
            "lora_unet_double_blocks_0_img_attn_qkv": ml.module("lora", tuple(full[qkv_key].shape), seed=2)}
    lora = tmp_path / "lora.safetensors"
    ml.lora_file(str(lora), mods)
    res = modelkit.merge_lora(src, [(str(lora), 0.5)], tmp_path / "out.safetensors", te_ratio=0.5)
    assert res.base == "flux" and res.touched == 2
    got = load_file(str(tmp_path / "out.safetensors"))
    from tests.merge.reference import merged

    assert_all_within_ulp({te_key: (got[te_key], merged(full[te_key], mods["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"], 0.25)),
                           qkv_key: (got[qkv_key], merged(full[qkv_key], mods["lora_unet_double_blocks_0_img_attn_qkv"], 0.5))})
    other = tmp_path / "other.safetensors"
    save_file({k: (v + 1 if v.is_floating_point() else v) for k, v in full.items()}, str(other))
    modelkit.merge_models(src, other, out=tmp_path / "te.safetensors", alpha=1.0, components=["te"])
    te_only = load_file(str(tmp_path / "te.safetensors"))
    for k, v in full.items():
        moved = k.startswith("text_encoders.") and v.is_floating_point()
        assert torch.equal(te_only[k], v + 1 if moved else v), k
    # one part of a Flux/SD3 file by its own name: CLIP-L alone (T5 stays A's), or with the transformer
    for parts, prefixes in ((["clip_l"], ("text_encoders.clip_l.",)),
                            (["transformer", "t5xxl"], (P, "text_encoders.t5xxl."))):
        modelkit.merge_models(src, other, out=tmp_path / f"{parts[0]}.safetensors", alpha=1.0, components=parts)
        got = load_file(str(tmp_path / f"{parts[0]}.safetensors"))
        for k, v in full.items():
            assert torch.equal(got[k], v + 1 if k.startswith(prefixes) and v.is_floating_point() else v), (parts, k)
    ml.checkpoint(str(tmp_path / "sd-a.safetensors"), {"model.diffusion_model.x.weight": ((4, 4), "float16")})
    with pytest.raises(UsageError, match="names parts of Flux/SD3 files; this checkpoint's are unet, te and vae"):
        modelkit.merge_models(tmp_path / "sd-a.safetensors", tmp_path / "sd-a.safetensors", out=tmp_path / "x.safetensors",
                              components=["clip_l"])
    with pytest.raises(UsageError, match="components must be among unet, te, vae, transformer, clip_l"):
        modelkit.merge_models(src, other, out=tmp_path / "x.safetensors", components=["clip"])
    vae = tmp_path / "ae.safetensors"  # a Flux VAE file as ComfyUI loads it: no prefix
    save_file({"decoder.conv_in.weight": torch.full((4, 16, 3, 3), 2.0, dtype=torch.bfloat16)}, str(vae))
    res = modelkit.merge_models(src, other, out=tmp_path / "vae.safetensors", alpha=0.0, vae=vae)
    assert res.vae_tensors == 1
    assert torch.equal(load_file(str(tmp_path / "vae.safetensors"))["vae.decoder.conv_in.weight"],
                       torch.full((4, 16, 3, 3), 2.0, dtype=torch.bfloat16))


@pytest.mark.parametrize("style", ["kohya", "diffusers-fused"])
def test_large_weights_baked_a_block_of_rows_at_a_time_are_within_one_ulp(tmp_path: Path, models, style: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights over ``4 * CHUNK`` elements are baked a block of rows at a time (each module on its rows of a
    fused weight); with CHUNK made tiny, every weight of the tiny models takes that path, one row per block."""
    from modelkit.ops.lora import bake

    monkeypatch.setattr(bake, "CHUNK", 8)
    calls = []
    by_rows = bake._Baker._by_rows

    def spy(self: Any, ref: Any, *args: Any) -> Any:
        calls.append(ref.name)
        return by_rows(self, ref, *args)

    monkeypatch.setattr(bake._Baker, "_by_rows", spy)
    if style == "kohya":
        test_original_style_lora_in_every_layout_is_within_one_ulp(tmp_path, models, "kohya")
    else:
        test_diffusers_lora_bake_is_within_one_ulp(tmp_path, models, "flux")
    assert any(".qkv." in n or "to_q" in n for n in calls)
