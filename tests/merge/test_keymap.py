"""The forward key table: known names, real-size layouts of every base and key style, no ambiguity."""

from __future__ import annotations

import pytest
import torch

from fixtures import detect_layouts as dl
from fixtures import merge_layouts as ml
from fixtures.sd_layout import sd1_layout
from modelkit.detect.tables import LORA_SUFFIXES
from modelkit.ops.lora.arch import reference_shapes
from modelkit.ops.lora.keymap import KeyMap
from modelkit.ops.lora.loader import Module
from modelkit.ops.lora.math import misfit

SUFFIXES = sorted(LORA_SUFFIXES, key=lambda r: -len(r[0]))


def _modules(layout: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, (shape, _dt) in layout.items():
        for suffix, _algo, role in SUFFIXES:
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], {})[role] = shape
                break
    return out


def test_known_sd1_names_map_to_their_keys() -> None:
    km = KeyMap.build({k: s for k, (s, _) in sd1_layout().items()}, "sd1")
    assert not km.ambiguous
    for key, comp, path in ml.KNOWN_SD1:
        prefix = "lora_unet_" if comp == "unet" else "lora_te_"
        for name in (prefix + path.replace(".", "_"), ("unet." if comp == "unet" else "text_encoder.") + path,
                     "base_model.model." + path):
            t = km.lookup(name)
            assert t is not None and t.key == key and t.rows is None, name
        if comp == "unet":
            ldm = key[len("model.diffusion_model."):-len(".weight")]
            assert km.lookup("lora_unet_" + ldm.replace(".", "_")).key == key
            assert km.lookup("diffusion_model." + ldm).key == key


def test_reference_layout_is_the_real_sd1_key_set() -> None:
    real = {k: s for k, (s, _) in sd1_layout().items()
            if len(s) >= 2 and (k.startswith("model.diffusion_model.") or ".encoder.layers." in k)}
    assert reference_shapes("sd1") == real


@pytest.mark.parametrize(("base", "targets", "styles"), [
    ("sd1", dl.sd1_targets(conv=True), ("kohya", "diffusers", "peft", "attnproc")),
    ("sd2", dl.sd1_targets(context=1024), ("kohya", "diffusers", "peft", "attnproc")),
    ("sdxl", dl.sdxl_targets(), ("kohya",)),
    ("sdxl", dl.sdxl_targets(diffusers_names=True), ("kohya", "diffusers", "attnproc")),
])
def test_real_size_loras_of_every_style_map_and_fit(base: str, targets: list, styles: tuple[str, ...]) -> None:
    km = KeyMap.reference(base)
    for style in styles:
        tg = [t for t in targets if t[0] == "unet" and ".attn" in t[1]] if style == "attnproc" else targets
        layout, _ = dl.lora_layout(tg, style=style)
        mods = _modules(layout)
        assert mods
        for name, parts in mods.items():
            t = km.lookup(name)
            assert t is not None, (base, style, name)
            m = Module(name, "lora", {r: torch.zeros(s) for r, s in parts.items() if r in ("down", "up")})
            assert misfit(m, t.shape) is None, (name, t.shape, parts)


def test_openclip_thirds_and_kohya_output_names() -> None:
    km = KeyMap.reference("sdxl")
    v = km.lookup("lora_te2_text_model_encoder_layers_31_self_attn_v_proj")
    assert v is not None and v.key == "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
    assert v.rows == (2560, 3840) and v.shape == (1280, 1280)
    assert km.name_for(v, "kohya") == "lora_te2_text_model_encoder_layers_31_self_attn_v_proj"
    assert km.name_for(v, "diffusers") == "text_encoder_2.text_model.encoder.layers.31.self_attn.v_proj"
    q = km.lookup("lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k")
    assert q is not None and q.key == "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"
    assert km.name_for(q, "kohya") == "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k"
    assert km.name_for(q, "peft") == "base_model.model.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"
    sd1 = KeyMap.reference("sd1")
    t = sd1.lookup("lora_unet_output_blocks_11_1_proj_out")
    assert t is not None and sd1.name_for(t, "kohya") == "lora_unet_up_blocks_3_attentions_2_proj_out"
    for base in ("sd1", "sd2", "sdxl"):
        assert not KeyMap.reference(base).ambiguous
