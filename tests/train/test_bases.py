"""SD2 (v) and SDXL single files: OpenCLIP towers, two encoders, LDM-named LoRA keys, clip_l/clip_g."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch  # noqa: E402

import modelkit  # noqa: E402
from modelkit.train import train  # noqa: E402
from modelkit.train.base import load_base  # noqa: E402
from modelkit.train.config import ModelConfig, build_config  # noqa: E402

from . import tiny  # noqa: E402


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[str, Any]]:
    return tiny.family_checkpoint("sdxl", str(tmp_path_factory.mktemp("sdxl")))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[str, Any]]:
    return tiny.family_checkpoint("sd2", str(tmp_path_factory.mktemp("sd2")))


def _same(model: Any, original: dict[str, Any]) -> None:
    own = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    for key, value in original.items():
        key = key.removeprefix("text_model.")
        if key in own:
            torch.testing.assert_close(own[key], value, msg=key)


def _cfg(path: str, configs: str, images: str, out: Path, method: str, base: str, *overrides: str) -> Any:
    return build_config(method, {
        "model": {"path": path, "configs": configs, "base": base},
        "dataset": {"path": images, "resolution": 64, "min_bucket": 32, "max_bucket": 128, "bucket_step": 32},
        "network": {"dim": 2, "alpha": 1.0}, "train": {"max_steps": 2, "device": "cpu"}, "output": {"dir": str(out)},
    }, overrides)


def test_sdxl_single_file_loads_every_weight(sdxl: tuple[str, str, dict[str, Any]]) -> None:
    path, configs, originals = sdxl
    base = load_base(ModelConfig(path=path, configs=configs))  # family from the conditioner.embedders keys
    assert base.family == "sdxl" and base.prediction == "epsilon" and len(base.tokenizers) == 2
    assert base.tokenizers[1].pad_token == "!" and base.tokenizers[0].pad_token == "<|endoftext|>"
    _same(base.unet, originals["unet"])
    _same(base.vae, originals["vae"])
    _same(base.text_encoders[0], originals["text_encoder"])
    _same(base.text_encoders[1], originals["text_encoder_2"])


def test_sdxl_lora_uses_ldm_names_and_loads_in_diffusers(sdxl: tuple[str, str, dict[str, Any]],
                                                        tiny_model: dict[str, str], tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    path, configs, _ = sdxl
    cfg = _cfg(path, configs, tiny_model["images"], tmp_path, "lora", "sdxl", "network.train_text_encoder=true",
               "output.dtype=float32", "output.save_state=false")
    result = train(cfg)
    assert math.isfinite(result.loss) and result.base == "sdxl"
    lora = modelkit.load(result.output)
    modules = {k.split(".")[0] for k in lora}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in modules
    assert "lora_unet_output_blocks_0_1_proj_in" in modules and "lora_unet_middle_block_1_proj_out" in modules
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in modules
    det = modelkit.detect(result.output)
    assert det.kind == "lora" and det.base == "sdxl"
    base = load_base(cfg.model)
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoders[0],
                                     text_encoder_2=base.text_encoders[1], tokenizer=base.tokenizers[0],
                                     tokenizer_2=base.tokenizers[1], unet=base.unet, scheduler=base.scheduler)
    name, kname = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", \
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    before = base.unet.get_submodule(name).weight.detach().clone()
    pipe.load_lora_weights(result.output)
    pipe.fuse_lora()
    layer = base.unet.get_submodule(name)
    after = getattr(layer, "base_layer", layer).weight.detach()
    down, up, alpha = lora[f"{kname}.lora_down.weight"], lora[f"{kname}.lora_up.weight"], lora[f"{kname}.alpha"]
    torch.testing.assert_close(after - before, up @ down * (alpha / down.shape[0]), rtol=1e-4, atol=1e-6)


def test_sdxl_textual_inversion_writes_clip_l_and_clip_g(sdxl: tuple[str, str, dict[str, Any]],
                                                        tiny_model: dict[str, str], tmp_path: Path) -> None:
    path, configs, _ = sdxl
    result = train(_cfg(path, configs, tiny_model["images"], tmp_path, "ti", "sdxl", "ti.token=<xl>", "ti.vectors=3"))
    tensors = modelkit.load(result.output)
    assert set(tensors) == {"clip_l", "clip_g"} and tuple(tensors["clip_g"].shape) == (3, 32)
    det = modelkit.detect(result.output)
    assert det.kind == "embedding" and det.subtype == "sdxl"


def test_sd2_v_single_file(sd2: tuple[str, str, dict[str, Any]], tiny_model: dict[str, str], tmp_path: Path) -> None:
    path, configs, originals = sd2
    base = load_base(ModelConfig(path=path, configs=configs, base="sd2-v"))
    assert base.family == "sd2" and base.prediction == "v_prediction" and base.tokenizers[0].pad_token == "!"
    _same(base.text_encoders[0], originals["text_encoder"])
    _same(base.unet, originals["unet"])
    result = train(_cfg(path, configs, tiny_model["images"], tmp_path, "lora", "sd2-v", "train.min_snr_gamma=5"))
    with modelkit.open_model(result.output) as mf:
        assert mf.metadata["ss_v2"] == "True" and mf.metadata["ss_v_parameterization"] == "True"
        assert mf.metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_a_scaled_fp8_base_is_read_as_weight_times_scale(sdxl: tuple[str, str, dict[str, Any]], tmp_path: Path) -> None:
    """ComfyUI's scaled fp8 checkpoints train from their values (weight*scale), not from their fp8 codes."""
    path, configs, _originals = sdxl
    scaled = tmp_path / "fp8.safetensors"
    modelkit.prune(path, scaled, dtype="fp8_e4m3fn", fp8="scaled")
    want = modelkit.load(scaled, dequantize=True)
    codes = modelkit.load(scaled)
    base = load_base(ModelConfig(path=str(scaled), configs=configs))
    from modelkit.ops.fp8 import scaled_weights

    picked = [k for k in scaled_weights(modelkit.open_model(scaled).tensors, {}) if k.startswith("model.diffusion_model.")]
    assert len(picked) > 20
    params = {repr(v.float().flatten()[:8].tolist()) for v in base.unet.state_dict().values()}
    for k in picked:  # each scaled weight's values (weight*scale) are one of the UNet's parameters
        assert repr(want[k].float().flatten()[:8].tolist()) in params, k
        assert repr(codes[k].float().flatten()[:8].tolist()) not in params, k  # not its fp8 codes
