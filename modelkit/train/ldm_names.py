"""Names of UNet modules in the original LDM layout (``input_blocks.4.1...``) from diffusers names
(the map itself lives in the core, ``modelkit.layout.names``).

kohya names SDXL LoRA modules after the LDM layout (``lora_unet_input_blocks_4_1_...``) and SD1/SD2
modules after diffusers (``lora_unet_down_blocks_1_attentions_0_...``); A1111 and ComfyUI read both
styles. The map follows the two UNet definitions: each down level holds ``layers_per_block``
resnets (each followed by its attention) and a downsampler; each up level ``layers_per_block + 1``
resnets and an upsampler after the last one. The tests check it against diffusers' own converter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..layout.names import OPENCLIP_LAYER as _OPENCLIP_LAYER
from ..layout.names import unet_ldm_name

__all__ = ["openclip_ldm_state", "unet_ldm_name"]


def openclip_ldm_state(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A Hugging Face CLIP text model's tensors in the OpenCLIP layout SD2/SDXL checkpoints keep.

    The inverse of diffusers' ``convert_open_clip_checkpoint``: q/k/v projections are concatenated
    into ``attn.in_proj_weight``/``in_proj_bias``, ``text_projection`` is transposed.

    Args:
        state: ``CLIPTextModel``/``CLIPTextModelWithProjection`` tensors (with or without ``text_model.``).
        prefix: ``cond_stage_model.model.`` (SD2) or ``conditioner.embedders.1.model.`` (SDXL).
    """
    import torch

    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "token_embedding.weight": s["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": s["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": s["final_layer_norm.weight"], prefix + "ln_final.bias": s["final_layer_norm.bias"]}
    if "text_projection.weight" in s:
        out[prefix + "text_projection"] = s["text_projection.weight"].T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in s if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for a, b in _OPENCLIP_LAYER:
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = s[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([s[f"{src}self_attn.{q}_proj.{p}"] for q in ("q", "k", "v")])
    return out
