"""A tiny SD1-style model built from configs in code, saved as a single-file LDM checkpoint.

The tensors come from freshly initialised diffusers/transformers modules (seeded); their LDM names
are found by running diffusers' own LDM->diffusers conversion over a copy of the LDM layout whose
every tensor holds its own index (``modelkit.detect.layouts.tiny_sd1_layout`` gives the layout), so
no name table is written here. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 2, "cross_attention_dim": 32, "attention_head_dim": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "sample_size": 8, "norm_num_groups": 32,
}
#: ``tiny_sd1_layout`` settings that give the same UNet in LDM keys.
LAYOUT = {"channel_mult": (1, 2), "attention_levels": (0,), "vocab": 49408, "schedule": True}
VAE = {
    "block_out_channels": [32, 64, 32, 32], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 64,
    "scaling_factor": 0.18215,
}
TEXT = {
    "_class_name": "CLIPTextModel", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "num_hidden_layers": 12, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "projection_dim": 32, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}


def write_configs(folder: str) -> str:
    """A ``model.configs`` folder for the tiny model (diffusers layout, configs only)."""
    from modelkit.train.tokenizer import configs_root

    for sub, cfg, name in (("unet", {"_class_name": "UNet2DConditionModel", **UNET}, "config.json"),
                           ("vae", {"_class_name": "AutoencoderKL", **VAE}, "config.json"),
                           ("text_encoder", TEXT, "config.json")):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        with open(os.path.join(folder, sub, name), "w") as f:
            json.dump(cfg, f)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    sched = configs_root().joinpath("sd1", "scheduler", "scheduler_config.json").read_text()
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        f.write(sched)
    return folder


def diffusers_state(seed: int = 0) -> dict[str, dict[str, Any]]:
    """Seeded state dicts of the tiny UNet, VAE and text encoder (diffusers/transformers keys)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in TEXT.items() if not k.startswith("_")}))
    return {"unet": unet.state_dict(), "vae": vae.state_dict(), "text": text.state_dict()}


def ldm_checkpoint(seed: int = 0) -> dict[str, Any]:
    """The tiny model as an LDM single-file state dict (``model.diffusion_model.*`` ...)."""
    import torch

    from modelkit.detect.layouts import tiny_sd1_layout
    from modelkit.train import convert_ldm

    layout = tiny_sd1_layout(**LAYOUT)
    tagged = {k: torch.full(shape, float(i)) for i, (k, (shape, dt)) in enumerate(layout.items()) if dt == "float32"}
    keys = list(layout)
    parts = convert_ldm.convert(tagged, "sd1", UNET, VAE)
    text = convert_ldm.text_encoder(tagged, "sd1", 0, None)
    states = diffusers_state(seed)
    out: dict[str, Any] = {}
    for name, converted in (("unet", parts.unet), ("vae", parts.vae), ("text", text)):
        own = states[name]
        for dkey, tag in converted.items():
            dkey = dkey.removeprefix("text_model.") if dkey.removeprefix("text_model.") in own else dkey
            ldm_key = keys[int(tag.reshape(-1)[0])]
            out[ldm_key] = own[dkey].reshape(layout[ldm_key][0]).clone()
    for k, (shape, dt) in layout.items():  # schedule buffers and position ids
        if k not in out:
            out[k] = torch.arange(77, dtype=torch.int64).reshape(shape) if dt == "int64" else torch.linspace(0.1, 0.9, shape[0])
    return out


def write_checkpoint(path: str, seed: int = 0) -> str:
    """Write the tiny LDM checkpoint with modelkit's own writer."""
    from modelkit.train.export import save_tensors

    save_tensors(path, ldm_checkpoint(seed), {})
    return path


def write_images(folder: str, sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 64)),
                 captions: tuple[str, ...] = ("red square, simple", "blue circle, wide", "green, plain")) -> str:
    """A few small generated images with same-name ``.txt`` captions."""
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    colours = ((200, 30, 30), (30, 30, 200), (30, 160, 30))
    for i, ((w, h), cap) in enumerate(zip(sizes, captions)):
        im = Image.new("RGB", (w, h), (240, 240, 240))
        ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colours[i % 3])
        im.save(os.path.join(folder, f"img{i}.png"))
        with open(os.path.join(folder, f"img{i}.txt"), "w") as f:
            f.write(cap)
    return folder


# --- SD2 and SDXL: OpenCLIP text towers, two encoders, LDM-named UNets -------------------------

XL_UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 2, "cross_attention_dim": 64, "attention_head_dim": [2, 4],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2], "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32, "sample_size": 8,
    "norm_num_groups": 32,
}
SD2_UNET = {**UNET, "attention_head_dim": [2, 4], "use_linear_projection": True}
OPENCLIP = {**TEXT, "hidden_act": "gelu", "num_hidden_layers": 3}


def _openclip_ldm(state: dict[str, Any], prefix: str, layers: int) -> dict[str, Any]:
    """OpenCLIP keys (``modelkit.train.ldm_names``), plus the unused last layer SD2 files keep, and an
    identity ``text_projection`` where the HF model has none (SD2 files carry one that is ignored)."""
    import torch

    from modelkit.train.ldm_names import openclip_ldm_state

    out = openclip_ldm_state(state, prefix)
    width = out[prefix + "ln_final.weight"].shape[0]
    out.setdefault(prefix + "text_projection", torch.eye(width))
    have = {int(k.split(".resblocks.")[1].split(".")[0]) for k in out if ".resblocks." in k}
    for i in range(max(have) + 1, layers):
        for k in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.0.")]:
            out[k.replace(".resblocks.0.", f".resblocks.{i}.")] = out[k].clone() + 0.01
    return out


def _vae_ldm(vae_state: dict[str, Any]) -> dict[str, Any]:
    """The tiny VAE in LDM keys, found by tagging the LDM layout (as ``ldm_checkpoint`` does)."""
    import torch

    from modelkit.detect.layouts import tiny_sd1_layout
    from modelkit.train import convert_ldm

    layout = {k: v for k, v in tiny_sd1_layout(**LAYOUT).items() if k.startswith("first_stage_model.")}
    keys = list(layout)
    tagged = {k: torch.full(shape, float(i)) for i, (k, (shape, _)) in enumerate(layout.items())}
    converted = convert_ldm.convert(tagged, "sd1", UNET, VAE).vae
    return {keys[int(t.reshape(-1)[0])]: vae_state[d].reshape(layout[keys[int(t.reshape(-1)[0])]][0]).clone()
            for d, t in converted.items()}


def family_checkpoint(family: str, folder: str, seed: int = 0) -> tuple[str, str, dict[str, dict[str, Any]]]:
    """A tiny SD2 or SDXL single-file checkpoint and its configs folder; returns (file, configs, originals)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from modelkit.train.export import save_tensors
    from modelkit.train.ldm_names import unet_ldm_name
    from modelkit.train.tokenizer import configs_root

    torch.manual_seed(seed)
    unet_cfg = XL_UNET if family == "sdxl" else SD2_UNET
    unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**VAE)
    state: dict[str, Any] = {"model.diffusion_model." + unet_ldm_name(k, unet.config): v
                             for k, v in unet.state_dict().items()}
    state.update(_vae_ldm(vae.state_dict()))
    fields = {k: v for k, v in OPENCLIP.items() if not k.startswith("_")}
    originals = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    configs = {"unet": {"_class_name": "UNet2DConditionModel", **unet_cfg}, "vae": {"_class_name": "AutoencoderKL", **VAE}}
    if family == "sdxl":
        te1 = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in TEXT.items() if not k.startswith("_")}))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**fields))
        state.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                      for k, v in te1.state_dict().items()})
        state.update(_openclip_ldm(te2.state_dict(), "conditioner.embedders.1.model.", 3))
        originals.update(text_encoder=te1.state_dict(), text_encoder_2=te2.state_dict())
        configs.update(text_encoder=TEXT, text_encoder_2={**OPENCLIP, "_class_name": "CLIPTextModelWithProjection"})
    else:  # SD2 keeps all OpenCLIP layers; the HF model drops the last one
        te = CLIPTextModel(CLIPTextConfig(**{**fields, "num_hidden_layers": 2}))
        state.update(_openclip_ldm(te.state_dict(), "cond_stage_model.model.", 3))
        originals.update(text_encoder=te.state_dict())
        configs.update(text_encoder={**OPENCLIP, "num_hidden_layers": 2})
    for sub, cfg in configs.items():
        os.makedirs(os.path.join(folder, "configs", sub), exist_ok=True)
        with open(os.path.join(folder, "configs", sub, "config.json"), "w") as f:
            json.dump(cfg, f)
    shipped = "sdxl" if family == "sdxl" else "sd2"
    os.makedirs(os.path.join(folder, "configs", "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "configs", "scheduler", "scheduler_config.json"), "w") as f:
        f.write(configs_root().joinpath(shipped, "scheduler", "scheduler_config.json").read_text())
    path = os.path.join(folder, f"tiny-{family}.safetensors")
    save_tensors(path, {k: v.contiguous() for k, v in state.items()}, {})
    return path, os.path.join(folder, "configs"), originals
