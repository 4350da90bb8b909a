"""Offline base models: the shipped configs, the shipped CLIP tokenizer, LDM names and conversion."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import torch  # noqa: E402

from modelkit.train.ldm_names import unet_ldm_name  # noqa: E402
from modelkit.train.tokenizer import build_tokenizer, configs_root  # noqa: E402

from . import tiny  # noqa: E402

#: Parameter counts of the released models (UNet, VAE, text encoders).
KNOWN = {
    "sd1": (859_520_964, 83_653_863, [123_060_480]),
    "sd2": (865_910_724, 83_653_863, [340_387_840]),
    "sd2-v": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}


def _json(*parts: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(configs_root().joinpath(*parts).read_text())
    return data


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("base", sorted(KNOWN))
def test_shipped_configs_build_the_released_architectures(base: str) -> None:
    from modelkit.train.base import _clip_model, _diffusers_model

    unet = _diffusers_model("UNet2DConditionModel", _json(base, "unet", "config.json"))
    vae = _diffusers_model("AutoencoderKL", _json(base, "vae", "config.json"))
    subs = ["text_encoder", "text_encoder_2"] if base == "sdxl" else ["text_encoder"]
    encoders = [_clip_model(_json(base, s, "config.json")) for s in subs]
    assert (_count(unet), _count(vae), [_count(e) for e in encoders]) == KNOWN[base]
    assert _json(base, "scheduler", "scheduler_config.json")["prediction_type"] == (
        "v_prediction" if base == "sd2-v" else "epsilon")


def test_sd1_config_fits_the_real_ldm_layout_through_diffusers_conversion() -> None:
    """Every tensor of a full-size SD1 checkpoint lands on a UNet/VAE/CLIP parameter of the same shape."""
    from modelkit.detect.layouts import sd1_layout
    from modelkit.train import convert_ldm
    from modelkit.train.base import _clip_model, _diffusers_model

    state = {k: torch.empty(shape, device="meta") for k, (shape, dt) in sd1_layout().items() if dt == "float32"}
    ucfg, vcfg = _json("sd1", "unet", "config.json"), _json("sd1", "vae", "config.json")
    parts = convert_ldm.convert(state, "sd1", ucfg, vcfg)
    te = _clip_model(_json("sd1", "text_encoder", "config.json"))
    text = {k.removeprefix("text_model."): v for k, v in convert_ldm.text_encoder(state, "sd1", 0, te).items()}
    for model, converted in ((_diffusers_model("UNet2DConditionModel", ucfg), parts.unet),
                             (_diffusers_model("AutoencoderKL", vcfg), parts.vae), (te, text)):
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted.items() if k in own}
        assert got == own


def test_ldm_names_agree_with_diffusers_converter() -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    xl = {"block_out_channels": (32, 64, 64), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
          "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 64,
          "attention_head_dim": (2, 4, 4), "transformer_layers_per_block": (1, 2, 2), "use_linear_projection": True,
          "addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
          "layers_per_block": 2, "sample_size": 8}
    for cfg in (tiny.UNET, xl):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg)
        own = unet.state_dict()
        ldm = {"model.diffusion_model." + unet_ldm_name(k, unet.config): v for k, v in own.items()}
        back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
        assert set(back) == set(own) and all(back[k] is own[k] for k in own)
    assert unet_ldm_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", xl) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert unet_ldm_name("up_blocks.1.upsamplers.0.conv", xl) == "output_blocks.5.2.conv"
    assert unet_ldm_name("mid_block.resnets.1.time_emb_proj", xl) == "middle_block.2.emb_layers.1"
    with pytest.raises(ValueError):
        unet_ldm_name("not_a_unet.module", xl)


def test_shipped_clip_tokenizer_matches_clip_ids() -> None:
    tok = build_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert build_tokenizer(pad_token="!").pad_token_id == 0
    assert tok.pad_token_id == 49407


def test_tokenizer_from_a_folder(tmp_path: Any) -> None:
    """A tiny vocabulary written here works through model.tokenizer; a folder without files is refused."""
    from modelkit.errors import ConfigError

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters] + ["ca", "cat</w>",
                                                                                  "<|startoftext|>", "<|endoftext|>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = build_tokenizer(str(tmp_path))
    assert tok("cat").input_ids == [vocab["<|startoftext|>"], vocab["cat</w>"], vocab["<|endoftext|>"]]
    with pytest.raises(ConfigError, match="vocab.json"):
        build_tokenizer(str(tmp_path / "nope"))
