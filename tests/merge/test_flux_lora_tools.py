"""``lora extract``, ``lora convert`` and ``lora merge`` for Flux.1 and SD3.x, and T5 / CLIP modules baked
into their single files.

Tiny diffusers transformers (``fixtures.dit_layouts``) in the original and the diffusers keys; LoRAs in
kohya, BFL, XLabs and diffusers names. Extraction at full rank bakes back to the tuned weights, and at a
lower rank to the best approximation (Eckart-Young); a converted LoRA bakes within 1 ulp of the original,
and its diffusers file loads in ``FluxPipeline``/``StableDiffusion3Pipeline`` with no warning and gives the
baked model's outputs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelkit
from fixtures import detect_layouts as dlay
from fixtures import dit_layouts as dl
from fixtures import merge_layouts as ml
from modelkit.errors import UsageError
from modelkit.ops.lora.keymap import KeyMap
from modelkit.ops.lora.tools import convert_lora, merge_loras
from tests.merge.reference import assert_all_within_ulp, merged

pytest.importorskip("diffusers")
pytest.importorskip("peft")

P = "model.diffusion_model."


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


def _run(family: str, model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(family)).sample


def _save(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _module(shape: tuple[int, ...], rank: int, seed: int, alpha: float | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"down": torch.randn(rank, shape[1], generator=g) * 0.3, "up": torch.randn(shape[0], rank, generator=g) * 0.3}
    if alpha is not None:
        out["alpha"] = torch.tensor(alpha)
    return out


def _kohya(path: Path, mods: dict[str, dict[str, torch.Tensor]], down: str = ".lora_down.weight",
           up: str = ".lora_up.weight") -> Path:
    flat = {}
    for name, m in mods.items():
        flat[name + down], flat[name + up] = m["down"], m["up"]
        if "alpha" in m:
            flat[name + ".alpha"] = m["alpha"]
    return _save(path, flat)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_extract_gives_kohya_modules_that_bake_back_in_every_layout(tmp_path: Path, models, family: str) -> None:
    sd = models[family]
    g = torch.Generator().manual_seed(5)
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in sd.items()}
    orig = dl.to_original(sd, family)
    names = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k, v in orig.items()
             if k.endswith(".weight") and v.dim() == 2}
    loras = {}
    for layout in ("prefixed", "diffusers"):
        conv = (lambda d: d) if layout == "diffusers" else (lambda d: dl.to_original(d, family, P))
        base, tuned_f = _save(tmp_path / f"{layout}-base.safetensors", conv(sd)), _save(tmp_path / f"{layout}-tuned.safetensors", conv(tuned))
        out = tmp_path / f"{layout}-x.safetensors"
        res = modelkit.extract_lora(base, tuned_f, out, rank=10_000, dtype="fp32", compute_dtype="fp64")
        loras[layout] = load_file(str(out))
        assert {k.split(".")[0] for k in loras[layout]} == names and res.modules == len(names), layout
        baked = tmp_path / f"{layout}-baked.safetensors"
        modelkit.merge_lora(base, [str(out)], baked, compute_dtype="fp64")
        got, want = load_file(str(baked)), load_file(str(tuned_f))
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=2e-6, msg=k)
    for k, v in loras["prefixed"].items():  # the same LoRA from either layout
        torch.testing.assert_close(loras["diffusers"][k], v, rtol=1e-6, atol=1e-6, msg=k)
    # rank 1: the best rank-1 approximation of each change, here of the fused q, k, v weight
    qkv = {"flux": "double_blocks.0.img_attn.qkv.weight", "sd3": "joint_blocks.0.x_block.attn.qkv.weight"}[family]
    base, tuned_f = tmp_path / "prefixed-base.safetensors", tmp_path / "prefixed-tuned.safetensors"
    modelkit.extract_lora(base, tuned_f, tmp_path / "r1.safetensors", rank=1, dtype="fp32", compute_dtype="fp64")
    modelkit.merge_lora(base, [str(tmp_path / "r1.safetensors")], tmp_path / "r1-baked.safetensors", compute_dtype="fp64")
    diff = dl.to_original(tuned, family)[qkv].double() - orig[qkv].double()
    err = load_file(str(tmp_path / "r1-baked.safetensors"))[P + qkv].double() - dl.to_original(tuned, family)[qkv].double()
    s = torch.linalg.svdvals(diff)
    assert abs(float(err.norm()) - float(s[1:].norm())) < 1e-4 * float(s.norm())


def _single_file(tmp: Path, family: str, transformer: dict[str, torch.Tensor]) -> tuple[Path, dict[str, torch.Tensor]]:
    clip_l = ml.checkpoint(str(tmp / "clip_l.safetensors"), dlay.hf_clip(""), dtype=torch.float32)
    clip_g = ml.checkpoint(str(tmp / "clip_g.safetensors"), dlay.hf_clip("", width=48), dtype=torch.float32) \
        if family == "sd3" else None
    t5 = {k: v.detach().clone() for k, v in dl.tiny_t5().state_dict().items()}
    full = dl.flux_single_file(transformer, clip_l, t5, family, clip_g)
    return _save(tmp / f"{family}-full.safetensors", full), full


#: Text-encoder modules per family: (module name, single-file key it adapts).
T5 = "text_encoders.t5xxl.transformer.encoder.block.{}.{}.weight"
TEXT_MODULES = {
    "flux": [("lora_te3_encoder_block_0_layer_0_SelfAttention_q", T5.format(0, "layer.0.SelfAttention.q")),
             ("lora_te2_encoder_block_1_layer_1_DenseReluDense_wo", T5.format(1, "layer.1.DenseReluDense.wo")),
             ("text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wi_0", T5.format(1, "layer.1.DenseReluDense.wi_0")),
             ("lora_te1_text_model_encoder_layers_0_mlp_fc1",
              "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight")],
    "sd3": [("lora_te3_encoder_block_0_layer_0_SelfAttention_v", T5.format(0, "layer.0.SelfAttention.v")),
            ("text_encoder_3.encoder.block.1.layer.0.SelfAttention.o", T5.format(1, "layer.0.SelfAttention.o")),
            ("lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
             "text_encoders.clip_g.transformer.text_model.encoder.layers.1.self_attn.k_proj.weight"),
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
             "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")],
}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_t5_and_clip_modules_bake_into_the_single_file_and_extract_back(tmp_path: Path, models, family: str) -> None:
    src, full = _single_file(tmp_path, family, models[family])
    mods = {}
    for i, (name, key) in enumerate(TEXT_MODULES[family]):
        dot = name.startswith("text_encoder")
        mods[name] = ml.module("lora", tuple(full[key].shape), seed=i, alpha=None if dot else 2.0)
    lora = tmp_path / "te.safetensors"
    ml.lora_file(str(lora), mods)
    res = modelkit.merge_lora(src, [(str(lora), 0.8)], tmp_path / "out.safetensors", te_ratio=0.5, compute_dtype="fp64")
    assert res.base == family and res.touched == len(mods) and res.loras[0].matched == len(mods)
    got = load_file(str(tmp_path / "out.safetensors"))
    assert_all_within_ulp({key: (got[key], merged(full[key], mods[name], 0.4)) for name, key in TEXT_MODULES[family]})
    t5 = dl.tiny_t5()
    t5.load_state_dict({k[len("text_encoders.t5xxl.transformer."):]: v for k, v in got.items()
                        if k.startswith("text_encoders.t5xxl.")}, strict=True)
    # the baked file is a "tuned" model: extraction gives the text modules back in kohya's names
    x = tmp_path / "x.safetensors"
    modelkit.extract_lora(src, tmp_path / "out.safetensors", x, rank=10_000, dtype="fp32", compute_dtype="fp64")
    te3 = {k.split(".")[0] for k in load_file(str(x)) if k.startswith("lora_te3_")}
    assert te3 == {"lora_te3_" + k[len("text_encoders.t5xxl.transformer."):-len(".weight")].replace(".", "_")
                   for _n, k in TEXT_MODULES[family] if k.startswith("text_encoders.t5xxl.")}
    km = KeyMap.build({k: tuple(v.shape) for k, v in full.items()}, family)
    other = {"flux": "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q",
             "sd3": "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"}[family]
    assert km.lookup(other) is None  # SD3's text_encoder_2 is CLIP-G, Flux's is T5: never the other's


#: Original-keys LoRAs: style -> [(module name, original weight, rows of it the module covers)].
ORIGINAL = {
    "flux-kohya": [("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", None, 2.0),
                   ("lora_unet_double_blocks_0_txt_attn_qkv", "double_blocks.0.txt_attn.qkv", None, 3.0),
                   ("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1", None, 1.5),
                   ("lora_unet_single_blocks_0_linear2", "single_blocks.0.linear2", None, 2.0),
                   ("lora_unet_final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1", None, 4.0)],
    "flux-xlabs": [("double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv", None, None),
                   ("double_blocks.0.processor.proj_lora2", "double_blocks.0.txt_attn.proj", None, None),
                   ("single_blocks.0.processor.qkv_lora", "single_blocks.0.linear1", (0, 96), None)],
    "flux-bfl": [("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.qkv", None, None),
                 ("single_blocks.0.linear1", "single_blocks.0.linear1", None, None)],
    "sd3-kohya": [("lora_unet_joint_blocks_0_x_block_attn_qkv", "joint_blocks.0.x_block.attn.qkv", None, 2.0),
                  ("lora_unet_joint_blocks_1_context_block_attn_qkv", "joint_blocks.1.context_block.attn.qkv", None, 1.0),
                  ("lora_unet_joint_blocks_0_x_block_attn2_qkv", "joint_blocks.0.x_block.attn2.qkv", None, 2.0),
                  ("lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
                   "joint_blocks.1.context_block.adaLN_modulation.1", None, 2.0),
                  ("lora_unet_final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1", None, 3.0)],
}
SUFFIXES = {"kohya": (".lora_down.weight", ".lora_up.weight"), "xlabs": (".down.weight", ".up.weight"),
            "bfl": (".lora_A.weight", ".lora_B.weight")}


def _original_lora(tmp: Path, style: str, orig: dict[str, torch.Tensor]) -> Path:
    mods = {}
    for i, (name, path, rows, alpha) in enumerate(ORIGINAL[style]):
        shape = orig[path + ".weight"].shape
        a, b = rows or (0, shape[0])
        mods[name] = _module((b - a, shape[1]), 2 + i % 2, seed=10 + i, alpha=alpha)
    return _kohya(tmp / f"{style}.safetensors", mods, *SUFFIXES[style.split("-")[1]])


class _Caught(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def _noise() -> Iterator[list[str]]:
    """Every WARNING+ record of diffusers, PEFT and transformers (their loggers do not propagate) and
    every Python warning in the block, in the list yielded (filled when the block ends)."""
    handler = _Caught()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    seen: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    seen += handler.seen + [str(w.message) for w in caught]


def _clips(family: str) -> list[Any]:
    """The tiny CLIP text encoders of a pipeline (Flux: CLIP-L; SD3: CLIP-L and CLIP-G, with projections)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = []
    for i, width in enumerate((32,) if family == "flux" else (32, 48)):
        cfg = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=64, projection_dim=width, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        torch.manual_seed(i)
        model = (CLIPTextModel if family == "flux" else CLIPTextModelWithProjection)(cfg)
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        out.append(model.eval())
    return out


def _text_sd(model: Any) -> dict[str, torch.Tensor]:
    """A text encoder's tensors as a single file keeps them (``text_model.`` always; a fused PEFT layer's
    weight under its plain name)."""
    sd = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.detach().clone()
            for k, v in sd.items()}


def _load_in_diffusers(family: str, path: Path, text: bool = True) -> tuple[torch.Tensor, list[Any]]:
    """The tiny transformer and text encoders in their pipeline, the LoRA file loaded by ``load_lora_weights``
    and fused; asserts that nothing warned (but, without ``text``, diffusers' note per CLIP encoder that the
    file has no module for it). Returns the transformer's output and the text encoders."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    model, clips = dl.tiny(family), _clips(family)
    if family == "flux":
        pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=clips[0], tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=model)
    else:
        pipe = StableDiffusion3Pipeline(transformer=model, scheduler=None, vae=None, text_encoder=clips[0], tokenizer=None,
                                        text_encoder_2=clips[1], tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    with _noise() as noise:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=1.0, components=["transformer", *(["text_encoder", "text_encoder_2"][:len(clips)])])
    if not text:
        noise = [m for m in noise if "No LoRA keys associated to CLIPTextModel" not in m]
    assert not noise, noise
    return _run(family, pipe.transformer), clips


#: Text-encoder modules added to each original-style LoRA: (module name, text encoder, its weight).
TEXT = [("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "clip_l", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("lora_te2_text_model_encoder_layers_1_self_attn_v_proj", "clip_g", "text_model.encoder.layers.1.self_attn.v_proj")]


def _with_text(tmp_path: Path, models, style: str) -> tuple[str, dict[str, dict[str, torch.Tensor]],
                                                             dict[str, torch.Tensor], Path, Path, dict[str, torch.Tensor]]:
    """A single file of ``style``'s family with its CLIP encoders, and an original-style LoRA with a
    module on each encoder: (family, encoder tensors by name, the file's tensors, the file, the LoRA,
    the LoRA's tensors)."""
    family = style.split("-")[0]
    sd = models[family]
    clips = dict(zip(("clip_l", "clip_g"), (_text_sd(c) for c in _clips(family))))
    full = {**dl.to_original(sd, family, P),
            **{f"text_encoders.{n}.transformer.{k}": v for n, c in clips.items() for k, v in c.items()}}
    ckpt = _save(tmp_path / "full.safetensors", full)
    lora = _original_lora(tmp_path, style, dl.to_original(sd, family))
    flat = load_file(str(lora))
    for i, (name, enc, w) in enumerate(TEXT[:len(clips)]):
        m = _module(tuple(clips[enc][w + ".weight"].shape), 2, seed=30 + i, alpha=1.0)
        flat.update({f"{name}.lora_down.weight": m["down"], f"{name}.lora_up.weight": m["up"], f"{name}.alpha": m["alpha"]})
    _save(lora, flat)
    return family, clips, full, ckpt, lora, flat


@pytest.mark.parametrize("style", list(ORIGINAL))
def test_original_style_lora_to_diffusers_loads_and_equals_the_bake(tmp_path: Path, models, style: str) -> None:
    family, clips, full, ckpt, lora, flat = _with_text(tmp_path, models, style)
    out = tmp_path / "conv.safetensors"
    res = convert_lora(lora, out, to="diffusers", checkpoint=ckpt)
    keys = load_file(str(out))
    assert all(k.startswith(("transformer.", "text_encoder.", "text_encoder_2."))
               and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    if style == "flux-kohya":  # a fused module: one diffusers module per part, the same down, its rows of up
        assert res.modules == 3 * 2 + 4 + 1 + 1 + 1
        assert torch.equal(keys["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"],
                           flat["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    baked = {}
    for which, f in (("original", lora), ("converted", out)):
        modelkit.merge_lora(ckpt, [str(f)], tmp_path / f"{which}-baked.safetensors")
        baked[which] = load_file(str(tmp_path / f"{which}-baked.safetensors"))
    assert_all_within_ulp({k: (baked["converted"][k], baked["original"][k].double()) for k in full})
    want = dl.tiny(family)
    want.load_state_dict(dl.to_diffusers(baked["original"], family, P))
    got, encoders = _load_in_diffusers(family, out)
    torch.testing.assert_close(got, _run(family, want), rtol=1e-5, atol=1e-5)
    for (n, _c), enc in zip(clips.items(), encoders):
        fused = _text_sd(enc)
        for k, v in fused.items():
            torch.testing.assert_close(v, baked["original"][f"text_encoders.{n}.transformer.{k}"], rtol=1e-5, atol=1e-6,
                                       msg=k)
        assert any(not torch.equal(v, clips[n][k]) for k, v in fused.items())  # the LoRA reached it


@pytest.mark.parametrize("style", ["flux-kohya", "sd3-kohya"])
def test_original_style_lora_to_peft_folders_loads_with_peft_as_the_bake(tmp_path: Path, models, style: str) -> None:
    """--to peft for Flux/SD3: a transformer/ adapter in diffusers' module names (the fused qkv and
    linear1 split into their parts) and one per CLIP encoder, each loaded by PeftModel.from_pretrained
    into the bare model, give the outputs and weights of the LoRA baked into the checkpoint."""
    import json

    import peft

    family, clips, _full, ckpt, lora, _flat = _with_text(tmp_path, models, style)
    out = tmp_path / "adapters"
    res = convert_lora(lora, out, to="peft", checkpoint=ckpt)
    parts = ["transformer", "text_encoder", *(["text_encoder_2"] if family == "sd3" else [])]
    assert sorted(p.name for p in out.iterdir()) == sorted(parts) and res.status == "written"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapters", "full.safetensors", lora.name])  # no temp
    modelkit.merge_lora(ckpt, [str(lora)], tmp_path / "baked.safetensors")
    baked = load_file(str(tmp_path / "baked.safetensors"))
    want = dl.tiny(family)
    want.load_state_dict(dl.to_diffusers(baked, family, P))
    with _noise() as noise, torch.no_grad():
        cfg = json.loads((out / "transformer" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and all(t.startswith(("transformer_blocks.", "single_transformer_blocks.",
                                                                "norm_out.")) for t in cfg["target_modules"])
        pm = peft.PeftModel.from_pretrained(dl.tiny(family), str(out / "transformer"))
        torch.testing.assert_close(_run(family, pm), _run(family, want), rtol=1e-5, atol=1e-5)
        assert float((_run(family, want) - _run(family, dl.tiny(family))).abs().max()) > 1e-4  # the LoRA acts
        merged = pm.merge_and_unload().state_dict()
        for k, v in want.state_dict().items():
            torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6, msg=k)
        for (n, _c), fresh, folder in zip(clips.items(), _clips(family), parts[1:]):
            enc = peft.PeftModel.from_pretrained(fresh, str(out / folder)).merge_and_unload()
            for k, v in _text_sd(enc).items():
                torch.testing.assert_close(v, baked[f"text_encoders.{n}.transformer.{k}"], rtol=1e-5, atol=1e-6,
                                           msg=k)
    # the one warning allowed, as in test_lora_convert_loaders: PEFT 0.21 reads transformers 5's old
    # is_gradient_checkpointing name on any text model it wraps, whatever the adapter
    assert not [m for m in noise if not m.startswith("`is_gradient_checkpointing` is deprecated")]


#: Diffusers modules (kohya's ``lora_transformer_`` names, with alphas): (path, rank, alpha).
DIFFUSERS = {
    "flux": [("transformer_blocks.0.attn.to_q", 2, 1.0), ("transformer_blocks.0.attn.to_k", 4, 2.0),
             ("transformer_blocks.0.attn.to_v", 2, 1.0), ("single_transformer_blocks.0.attn.to_q", 3, 3.0),
             ("single_transformer_blocks.0.proj_mlp", 2, 2.0), ("norm_out.linear", 2, 2.0), ("x_embedder", 2, 1.0)],
    "sd3": [("transformer_blocks.0.attn.to_q", 2, 1.0), ("transformer_blocks.0.attn.to_k", 2, 1.0),
            ("transformer_blocks.0.attn.add_v_proj", 3, 1.0), ("transformer_blocks.1.norm1_context.linear", 2, 2.0),
            ("norm_out.linear", 2, 1.0)],
}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_lora_to_kohya_fuses_q_k_v_exactly(tmp_path: Path, models, family: str) -> None:
    sd = models[family]
    dif = _save(tmp_path / "dif.safetensors", sd)
    ckpt = _save(tmp_path / "orig.safetensors", dl.to_original(sd, family, P))
    mods = {"lora_transformer_" + p.replace(".", "_"): _module(tuple(sd[p + ".weight"].shape), r, seed=i, alpha=a)
            for i, (p, r, a) in enumerate(DIFFUSERS[family])}
    lora = _kohya(tmp_path / "dif-lora.safetensors", mods)
    out = tmp_path / "kohya.safetensors"
    convert_lora(lora, out, to="kohya", checkpoint=ckpt)
    got = load_file(str(out))
    qkv = {"flux": "lora_unet_double_blocks_0_img_attn_qkv", "sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv"}[family]
    rank = sum(r for p, r, _a in DIFFUSERS[family] if p.startswith("transformer_blocks.0.attn.to_"))
    assert got[f"{qkv}.lora_down.weight"].shape[0] == rank and float(got[f"{qkv}.alpha"]) == rank / 2  # scale 1/2 kept
    assert all(k.startswith("lora_unet_") for k in got)
    back = tmp_path / "back.safetensors"
    convert_lora(out, back, to="diffusers", checkpoint=dif)
    baked = {}
    for which, f in (("original", lora), ("kohya", out), ("back", back)):
        modelkit.merge_lora(dif, [str(f)], tmp_path / f"{which}-baked.safetensors")
        baked[which] = load_file(str(tmp_path / f"{which}-baked.safetensors"))
    for which in ("kohya", "back"):
        assert_all_within_ulp({k: (baked[which][k], baked["original"][k].double()) for k in sd})
    if family == "flux":  # modules of another scale fused in: their scale goes into their block of up (rounded once)
        name = "lora_transformer_single_transformer_blocks_0_proj_mlp"
        mods[name]["alpha"] = torch.tensor(0.7)
        _kohya(lora, mods)
        convert_lora(lora, out, to="kohya", checkpoint=ckpt, force=True)
        assert float(load_file(str(out))["lora_unet_single_blocks_0_linear1.alpha"]) == 5.0  # rank 5, scale 1
        for which, f in (("original", lora), ("kohya", out)):
            modelkit.merge_lora(dif, [str(f)], tmp_path / f"{which}-baked.safetensors", force=True)
            baked[which] = load_file(str(tmp_path / f"{which}-baked.safetensors"))
        for k in sd:
            torch.testing.assert_close(baked["kohya"][k], baked["original"][k], rtol=0, atol=2e-7, msg=k)


def test_reference_layouts_name_real_sizes_without_a_checkpoint(tmp_path: Path) -> None:
    """No checkpoint: Flux.1 at its real widths, SD3.5 large told from its module shapes; kohya -> diffusers ->
    kohya gives the very tensors back."""
    flux = {"lora_unet_double_blocks_3_img_attn_qkv": _module((9216, 3072), 1, 1, alpha=1.0),
            "lora_unet_single_blocks_37_linear1": _module((21504, 3072), 1, 2, alpha=1.0)}
    sd35 = {"lora_unet_joint_blocks_37_context_block_attn_qkv": _module((7296, 2432), 1, 3, alpha=1.0),
            "lora_unet_joint_blocks_2_x_block_mlp_fc1": _module((9728, 2432), 1, 4, alpha=1.0)}
    for name, mods, split in (("flux", flux, "single_transformer_blocks.37.proj_mlp"),
                              ("sd3", sd35, "transformer_blocks.37.attn.add_k_proj")):
        src = _kohya(tmp_path / f"{name}.safetensors", mods)
        d = tmp_path / f"{name}-d.safetensors"
        res = convert_lora(src, d, to="diffusers", base=name)
        assert res.base == name and f"transformer.{split}.lora_B.weight" in load_file(str(d))
        k = tmp_path / f"{name}-k.safetensors"
        convert_lora(d, k, to="kohya", base=name)
        again = load_file(str(k))
        for n, m in mods.items():
            assert torch.equal(again[f"{n}.lora_down.weight"], m["down"]) and torch.equal(again[f"{n}.lora_up.weight"], m["up"])


def test_lora_merge_of_flux_loras_is_exact(tmp_path: Path) -> None:
    a = _kohya(tmp_path / "a.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": _module((9216, 3072), 2, 1, 1.0)})
    b = _kohya(tmp_path / "b.safetensors", {"lora_transformer_transformer_blocks_0_attn_to_k": _module((3072, 3072), 1, 2, 2.0),
                                            "lora_transformer_single_transformer_blocks_0_proj_mlp":
                                                _module((12288, 3072), 1, 3, 1.0)})
    out = tmp_path / "m.safetensors"
    res = merge_loras([(str(a), 0.5), (str(b), 2.0)], out, base="flux", dtype="fp32")
    got = load_file(str(out))
    assert res.modules == 2 and set(k.split(".")[0] for k in got) == {"lora_unet_double_blocks_0_img_attn_qkv",
                                                                      "lora_unet_single_blocks_0_linear1"}
    la, lb = load_file(str(a)), load_file(str(b))
    want = 0.5 * 0.5 * la["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].double() \
        @ la["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].double()
    kname = "lora_transformer_transformer_blocks_0_attn_to_k"
    want[3072:6144] += 2.0 * 2.0 * lb[f"{kname}.lora_up.weight"].double() @ lb[f"{kname}.lora_down.weight"].double()
    n = "lora_unet_double_blocks_0_img_attn_qkv"
    prod = got[f"{n}.lora_up.weight"].double() @ got[f"{n}.lora_down.weight"].double() * float(got[f"{n}.alpha"]) / 3
    torch.testing.assert_close(prod, want, rtol=1e-5, atol=1e-6)
    # linear1 = [q; k; v; mlp]: only proj_mlp's rows, ratio 2 x scale 1 (compared through a random projection)
    n, mlp = "lora_unet_single_blocks_0_linear1", "lora_transformer_single_transformer_blocks_0_proj_mlp"
    up, down = got[f"{n}.lora_up.weight"].double(), got[f"{n}.lora_down.weight"].double()
    assert up.shape == (21504, 1) and float(got[f"{n}.alpha"]) == 1.0 and not up[:9216].any()
    v = torch.randn(3072, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = 2.0 * lb[f"{mlp}.lora_up.weight"].double() @ (lb[f"{mlp}.lora_down.weight"].double() @ v)
    torch.testing.assert_close(up[9216:] @ (down @ v), want, rtol=1e-6, atol=1e-9)


def test_sd3_extract_converts_to_diffusers_context_embedder_included(tmp_path: Path, models) -> None:
    """SD3's ``context_embedder`` has one name in both layouts; an extracted SD3 LoRA (which adapts it)
    converts --to diffusers, bakes as the kohya file does, and loads in diffusers with no warning."""
    sd = models["sd3"]
    g = torch.Generator().manual_seed(6)
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in sd.items()}
    base, tuned_f = _save(tmp_path / "base.safetensors", sd), _save(tmp_path / "tuned.safetensors", tuned)
    x = tmp_path / "x.safetensors"
    modelkit.extract_lora(base, tuned_f, x, rank=10_000, dtype="fp32", compute_dtype="fp64")
    assert "lora_unet_context_embedder.lora_down.weight" in load_file(str(x))
    out = tmp_path / "d.safetensors"
    convert_lora(x, out, to="diffusers", checkpoint=base)
    assert "transformer.context_embedder.lora_A.weight" in load_file(str(out))
    baked = {}
    for which, f in (("kohya", x), ("diffusers", out)):
        modelkit.merge_lora(base, [str(f)], tmp_path / f"{which}-baked.safetensors", compute_dtype="fp64")
        baked[which] = load_file(str(tmp_path / f"{which}-baked.safetensors"))
    for k, v in baked["kohya"].items():
        torch.testing.assert_close(baked["diffusers"][k], v, rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(v, tuned[k], rtol=0, atol=2e-6, msg=k)
    got, _encoders = _load_in_diffusers("sd3", out, text=False)
    want = dl.tiny("sd3")
    want.load_state_dict(tuned)
    torch.testing.assert_close(got, _run("sd3", want), rtol=1e-5, atol=1e-5)


def test_fusing_modules_of_alpha_0_or_of_mixed_scales(tmp_path: Path, models) -> None:
    """Alpha 0 is scale 0, as the loader reads it (no division by zero); mixed scales keep the largest as
    alpha / rank, so no up is scaled up and the others' ups only shrink by their ratio to it; the fused
    alpha is float32 whatever the factors' dtype."""
    sd = models["flux"]
    ckpt = _save(tmp_path / "orig.safetensors", dl.to_original(sd, "flux", P))
    dif = _save(tmp_path / "dif.safetensors", sd)
    qkv = [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"]
    zero = {"lora_transformer_" + p.replace(".", "_"): _module(tuple(sd[p + ".weight"].shape), 2, seed=i, alpha=0.0)
            for i, p in enumerate(qkv)}
    lora = _kohya(tmp_path / "zero.safetensors", zero)
    out = tmp_path / "zero-k.safetensors"
    convert_lora(lora, out, to="kohya", checkpoint=ckpt)
    got = load_file(str(out))
    n = "lora_unet_double_blocks_0_img_attn_qkv"
    assert float(got[f"{n}.alpha"]) == 0.0 and got[f"{n}.alpha"].dtype == torch.float32
    modelkit.merge_lora(dif, [str(out)], tmp_path / "zero-baked.safetensors")
    baked = load_file(str(tmp_path / "zero-baked.safetensors"))
    assert all(torch.equal(baked[k], v) for k, v in sd.items())  # scale 0: nothing applied, as the input
    modelkit.merge_lora(dif, [str(lora)], tmp_path / "zero-in.safetensors")
    assert all(torch.equal(load_file(str(tmp_path / "zero-in.safetensors"))[k], v) for k, v in sd.items())
    mixed = {k: {**m, "alpha": torch.tensor(a)} for (k, m), a in zip(zero.items(), (0.5, 2.0, 0.25))}
    for m in mixed.values():
        m["up"], m["down"] = m["up"].half(), m["down"].half()
    lora = _kohya(tmp_path / "mixed.safetensors", mixed)
    convert_lora(lora, out, to="kohya", checkpoint=ckpt, force=True)
    got = load_file(str(out))
    assert float(got[f"{n}.alpha"]) == 6.0  # rank 6, the largest scale 2 / 2 = 1
    up, down = got[f"{n}.lora_up.weight"], got[f"{n}.lora_down.weight"]
    for (rows, f), m in zip(((0, 0.25), (32, 1.0), (64, 0.125)), mixed.values()):  # q, k (the largest), v
        c = next(c for c in range(0, 6, 2) if torch.equal(down[c:c + 2], m["down"]))  # its column block
        assert torch.equal(up[rows:rows + 32, c:c + 2], (m["up"].double() * f).half())
        assert not up[:, c:c + 2].abs().sum() - up[rows:rows + 32, c:c + 2].abs().sum()  # zeros elsewhere
    # a fused alpha bfloat16 cannot hold (3 x 101 = 303; bf16 rounds it to 304) is written in float32
    wide = {k: {"down": m["down"][:1].bfloat16(), "up": m["up"][:, :1].bfloat16(), "alpha": torch.tensor(101.0)}
            for k, m in mixed.items()}
    convert_lora(_kohya(tmp_path / "wide.safetensors", wide), out, to="kohya", checkpoint=ckpt, force=True)
    got = load_file(str(out))
    assert got[f"{n}.alpha"].dtype == torch.float32 and float(got[f"{n}.alpha"]) == 303.0
    assert got[f"{n}.lora_up.weight"].dtype == torch.bfloat16


def test_what_does_not_match_is_refused_in_one_line(tmp_path: Path, models) -> None:
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    flux, sd3 = models["flux"], models["sd3"]
    fo = _save(tmp_path / "flux.safetensors", dl.to_original(flux, "flux", P))
    so = _save(tmp_path / "sd3.safetensors", dl.to_original(sd3, "sd3", P))
    with pytest.raises(UsageError, match="is SD3 but the base flux.safetensors is Flux"):
        modelkit.extract_lora(fo, so, tmp_path / "x.safetensors")
    lora = _original_lora(tmp_path, "flux-kohya", dl.to_original(flux, "flux"))
    with pytest.raises(UsageError, match="this LoRA is for Flux, the checkpoint sd3.safetensors is SD3"):
        convert_lora(lora, tmp_path / "c.safetensors", to="diffusers", checkpoint=so)
    with pytest.raises(UsageError, match=r"this LoRA is for Flux, not SD3 \(--base sd3\)"):
        convert_lora(lora, tmp_path / "c.safetensors", to="kohya", base="sd3")
    loha = tmp_path / "loha.safetensors"
    ml.lora_file(str(loha), {"lora_unet_double_blocks_0_img_attn_qkv": ml.module("loha", (96, 32))})
    with pytest.raises(UsageError, match="would have to be cut or fused into .*only a plain LoRA can be"):
        convert_lora(loha, tmp_path / "c.safetensors", to="diffusers", checkpoint=fo)
    loha_q = tmp_path / "loha-q.safetensors"
    ml.lora_file(str(loha_q), {"lora_transformer_transformer_blocks_0_attn_to_q": ml.module("loha", (32, 32)),
                               "lora_unet_single_blocks_0_linear2": ml.module("lora", (32, 160))})
    with pytest.raises(UsageError, match="would have to be cut or fused into rows 0:32 of double_blocks.0.img_attn.qkv"):
        convert_lora(loha_q, tmp_path / "c.safetensors", to="kohya", checkpoint=fo)
    t5 = tmp_path / "t5.safetensors"
    ml.lora_file(str(t5), {"lora_te3_encoder_block_0_layer_0_SelfAttention_q": ml.module("lora", (4096, 4096), rank=1),
                           "lora_unet_single_blocks_0_linear2": ml.module("lora", (3072, 15360), rank=1)})
    with pytest.raises(UsageError, match="adapt the T5 text encoder .* FluxPipeline.load_lora_weights does not apply"):
        convert_lora(t5, tmp_path / "c.safetensors", to="diffusers")
    with pytest.raises(UsageError, match="adapt the T5 text encoder .* for which modelkit writes no PEFT adapter"):
        convert_lora(t5, tmp_path / "t5-peft", to="peft")
    assert not (tmp_path / "t5-peft").exists()
    r = CliRunner().invoke(cli, ["lora", "convert", str(lora), "-o", str(tmp_path / "c.safetensors"), "--to",
                                 "diffusers", "--checkpoint", str(so)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "this LoRA is for Flux" in r.stderr, r.output
    assert not (tmp_path / "c.safetensors").exists()
    r = CliRunner().invoke(cli, ["lora", "extract", str(fo), str(so), "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "is SD3 but the base" in r.stderr, r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_t5_modules_name_the_base_only_when_they_can(tmp_path: Path) -> None:
    """kohya names T5 ``lora_te3_`` for Flux and SD3 alike; T5 as the second encoder is Flux's (OneTrainer,
    diffusers); a CLIP-G (``lora_te2_`` CLIP) beside T5 is SD3's."""
    q = "encoder_block_0_layer_0_SelfAttention_q"
    clip = "text_model_encoder_layers_0_self_attn_q_proj"
    cases = {"flux": {f"lora_te2_{q}": (64, 64), f"lora_te1_{clip}": (32, 32)},
             None: {f"lora_te3_{q}": (64, 64), f"lora_te1_{clip}": (32, 32)},
             "sd3": {f"lora_te3_{q}": (64, 64), f"lora_te2_{clip}": (48, 48), f"lora_te1_{clip}": (32, 32)}}
    for want, mods in cases.items():
        path = tmp_path / f"{want}.safetensors"
        ml.lora_file(str(path), {n: ml.module("lora", s, rank=2) for n, s in mods.items()})
        assert modelkit.detect(path).base == want, want
