"""Names of UNet modules in the original LDM layout (``input_blocks.4.1...``) from diffusers names.

kohya names SDXL LoRA modules after the LDM layout (``lora_unet_input_blocks_4_1_...``) and SD1/SD2
modules after diffusers (``lora_unet_down_blocks_1_attentions_0_...``); A1111 and ComfyUI read both
styles. The map below follows the two UNet definitions: each down level holds ``layers_per_block``
resnets (each followed by its attention) and a downsampler; each up level ``layers_per_block + 1``
resnets and an upsampler after the last one. The tests check it against diffusers' own converter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _resnet(rest: str | None) -> str:
    if not rest:
        return ""
    head, _, tail = rest.partition(".")
    mapped = _RESNET.get(head, head)
    return "." + mapped + ("." + tail if tail else "")


def _join(prefix: str, rest: str | None) -> str:
    return prefix + ("." + rest if rest else "")


def unet_ldm_name(name: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without ``model.diffusion_model.``) of a diffusers UNet module or parameter.

    Args:
        name: for example ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` or
            ``up_blocks.0.resnets.2.conv1.weight``.
        config: the UNet's config (``layers_per_block`` and ``up_block_types`` are read).

    Returns:
        For the examples, ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` and
        ``output_blocks.2.0.in_layers.2.weight``.

    Raises:
        ValueError: a name outside the UNet2DConditionModel layout.
    """
    per = int(config["layers_per_block"])
    for top, ldm in _TOP.items():
        if name == top or name.startswith(top + "."):
            return ldm + name[len(top):]
    m = _MID.match(name)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return _join("middle_block.1", rest)
        return f"middle_block.{2 * j}" + _resnet(rest)
    m = _BLOCK.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a UNet2DConditionModel module name")
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        if kind == "downsamplers":
            return _join(f"input_blocks.{(i + 1) * (per + 1)}.0", _op(rest))
        idx = i * (per + 1) + j + 1
        return f"input_blocks.{idx}.0" + _resnet(rest) if kind == "resnets" else _join(f"input_blocks.{idx}.1", rest)
    if kind == "upsamplers":
        up_types: Sequence[str] = config.get("up_block_types") or ()
        has_attn = i < len(up_types) and str(up_types[i]).startswith("CrossAttn")
        return _join(f"output_blocks.{i * (per + 1) + per}.{2 if has_attn else 1}", rest)
    idx = i * (per + 1) + j
    return f"output_blocks.{idx}.0" + _resnet(rest) if kind == "resnets" else _join(f"output_blocks.{idx}.1", rest)


def _op(rest: str | None) -> str | None:
    """``conv.weight`` of a diffusers downsampler is ``op.weight`` in LDM."""
    if rest is None:
        return None
    return "op" + rest[len("conv"):] if rest == "conv" or rest.startswith("conv.") else rest


#: Hugging Face CLIP layer names -> OpenCLIP (``resblocks``) names inside one encoder layer.
_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


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
