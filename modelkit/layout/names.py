"""Name maps between diffusers components and the LDM single-file layout A1111 and ComfyUI load.

Pure data and rules, no torch. Each map goes both ways and is checked against diffusers' own
converters (``tests/ops/test_layout_convert.py``):

* UNet (``model.diffusion_model.``): diffusers ``down_blocks.i.resnets.j`` <-> LDM ``input_blocks.n.0``
  and so on. Each down level holds ``layers_per_block`` resnets (each followed by its attention) and a
  downsampler; each up level ``layers_per_block + 1`` resnets and an upsampler after the last one.
* VAE (``first_stage_model.``): ``down_blocks`` <-> ``down``, the decoder's ``up_blocks`` in reverse
  order <-> ``up``, the mid attention's ``to_q``/``to_k``/``to_v``/``to_out.0`` (linear, ``[C, C]``)
  <-> ``q``/``k``/``v``/``proj_out`` (1x1 conv, ``[C, C, 1, 1]``).
* CLIP ViT-L (``cond_stage_model.transformer.``, SDXL's ``conditioner.embedders.0.transformer.``):
  the Hugging Face names under a prefix.
* OpenCLIP (``cond_stage_model.model.``, SDXL's ``conditioner.embedders.1.model.``): ``resblocks``,
  with q/k/v fused in ``attn.in_proj_weight``/``in_proj_bias`` and ``text_projection`` transposed.

The functions map one name and say how its tensor changes (``Op``); splits, reshapes and transposes
are views of the source tensor, a fusion is a concatenation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

#: Where each family keeps its text encoders in the LDM layout: (diffusers folder, kind, LDM prefix).
TEXT_ENCODERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sd1": (("text_encoder", "clip", "cond_stage_model.transformer."),),
    "sd2": (("text_encoder", "openclip", "cond_stage_model.model."),),
    "sdxl": (("text_encoder", "clip", "conditioner.embedders.0.transformer."),
             ("text_encoder_2", "openclip", "conditioner.embedders.1.model.")),
}

# --- UNet -----------------------------------------------------------------------------------------

_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_TOP = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(?:(\d+)\.)?(\d+)(?:\.(.*))?$")


def _resnet(rest: str | None) -> str:
    if not rest:
        return ""
    head, _, tail = rest.partition(".")
    mapped = _RESNET.get(head, head)
    return "." + mapped + ("." + tail if tail else "")


def _resnet_back(rest: str | None) -> str:
    if not rest:
        return ""
    for ldm, dif in _RESNET_BACK.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return "." + dif + rest[len(ldm):]
    raise ValueError(f"{rest!r} is not a part of an LDM ResBlock")


def _join(prefix: str, rest: str | None) -> str:
    return prefix + ("." + rest if rest else "")


def _has_attention(config: Mapping[str, Any], i: int) -> bool:
    up_types: Sequence[str] = config.get("up_block_types") or ()
    return i < len(up_types) and str(up_types[i]).startswith("CrossAttn")


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
        return _join(f"output_blocks.{i * (per + 1) + per}.{2 if _has_attention(config, i) else 1}", rest)
    idx = i * (per + 1) + j
    return f"output_blocks.{idx}.0" + _resnet(rest) if kind == "resnets" else _join(f"output_blocks.{idx}.1", rest)


def _op(rest: str | None) -> str | None:
    """``conv.weight`` of a diffusers downsampler is ``op.weight`` in LDM."""
    if rest is None:
        return None
    return "op" + rest[len("conv"):] if rest == "conv" or rest.startswith("conv.") else rest


def unet_diffusers_name(name: str, config: Mapping[str, Any]) -> str:
    """The diffusers name of an LDM UNet parameter (without ``model.diffusion_model.``): the inverse
    of ``unet_ldm_name``.

    Raises:
        ValueError: a name outside the LDM ``UNetModel`` layout this config describes.
    """
    per = int(config["layers_per_block"])
    for top, ldm in _TOP.items():
        if name == ldm or name.startswith(ldm + "."):
            return top + name[len(ldm):]
    m = _LDM_BLOCK.match(name)
    if not m:
        raise ValueError(f"{name!r} is not an LDM UNet parameter")
    side, n_s, k_s, rest = m.group(1), m.group(2), m.group(3), m.group(4)
    if side == "middle_block":
        if n_s is not None:
            raise ValueError(f"{name!r} is not an LDM UNet parameter")
        k = int(k_s)
        if k == 1:
            return _join("mid_block.attentions.0", rest)
        if k in (0, 2):
            return f"mid_block.resnets.{k // 2}" + _resnet_back(rest)
        raise ValueError(f"{name!r} is not an LDM UNet parameter")
    if n_s is None:
        raise ValueError(f"{name!r} is not an LDM UNet parameter")
    n, k = int(n_s), int(k_s)
    if side == "input_blocks":
        i, j = divmod(n - 1, per + 1)
        if n >= 1 and j == per and k == 0:
            if rest is None or not (rest == "op" or rest.startswith("op.")):
                raise ValueError(f"{name!r} is not an LDM downsampler parameter")
            return _join(f"down_blocks.{i}.downsamplers.0", "conv" + rest[2:])
        if n >= 1 and k == 0:
            return f"down_blocks.{i}.resnets.{j}" + _resnet_back(rest)
        if n >= 1 and k == 1:
            return _join(f"down_blocks.{i}.attentions.{j}", rest)
        raise ValueError(f"{name!r} is not an LDM UNet parameter")
    i, j = divmod(n, per + 1)
    attn = _has_attention(config, i)
    if k == 0:
        return f"up_blocks.{i}.resnets.{j}" + _resnet_back(rest)
    if k == 1 and attn:
        return _join(f"up_blocks.{i}.attentions.{j}", rest)
    if j == per and k == (2 if attn else 1):
        return _join(f"up_blocks.{i}.upsamplers.0", rest)
    raise ValueError(f"{name!r} is not an LDM UNet parameter")


# --- VAE ------------------------------------------------------------------------------------------

#: diffusers -> LDM names of the mid-block attention (their weights are 1x1 convs in LDM).
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTENTION_BACK = {v: k for k, v in VAE_ATTENTION.items()}
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_DIF = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$")
_VAE_DIF_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")
_VAE_LDM = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)$")
_VAE_LDM_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)$")


def _shortcut(rest: str, to_ldm: bool) -> str:
    a, b = ("conv_shortcut", "nin_shortcut") if to_ldm else ("nin_shortcut", "conv_shortcut")
    return b + rest[len(a):] if rest == a or rest.startswith(a + ".") else rest


def vae_ldm_name(name: str, levels: int) -> tuple[str, bool]:
    """The LDM name (without ``first_stage_model.``) of a diffusers ``AutoencoderKL`` parameter, and
    whether its tensor is a mid-attention linear weight that LDM keeps as a 1x1 conv.

    Args:
        name: for example ``decoder.up_blocks.0.resnets.1.conv1.weight``.
        levels: ``len(block_out_channels)`` (the decoder's levels are numbered in reverse).

    Raises:
        ValueError: a name outside the AutoencoderKL layout.
    """
    for dif, ldm in _VAE_TOP.items():
        if name.startswith(dif + "."):
            return ldm + name[len(dif):], False
    m = _VAE_DIF_MID.match(name)
    if m:
        side, kind, j, rest = m.groups()
        if kind == "resnets":
            return f"{side}.mid.block_{int(j) + 1}.{_shortcut(rest, True)}", False
        for dif, ldm in VAE_ATTENTION.items():
            if rest.startswith(dif + "."):
                tail = rest[len(dif) + 1:]
                return f"{side}.mid.attn_1.{ldm}.{tail}", dif != "group_norm" and tail == "weight"
        raise ValueError(f"{name!r} is not an AutoencoderKL parameter")
    m = _VAE_DIF.match(name)
    if m:
        side, blocks, i_s, kind, j, rest = m.groups()
        i = int(i_s) if blocks == "down_blocks" else levels - 1 - int(i_s)
        level = f"{side}.{'down' if blocks == 'down_blocks' else 'up'}.{i}"
        if kind == "resnets":
            return f"{level}.block.{j}.{_shortcut(rest, True)}", False
        return f"{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}", False
    if re.match(r"^(encoder\.|decoder\.)?(conv_in|conv_out|quant_conv|post_quant_conv)\.", name):
        return name, False
    raise ValueError(f"{name!r} is not an AutoencoderKL parameter")


def vae_diffusers_name(name: str, levels: int) -> tuple[str, bool]:
    """The inverse of ``vae_ldm_name``: (diffusers name, whether a 1x1 conv weight becomes linear).

    Raises:
        ValueError: a name outside the LDM ``AutoencoderKL`` layout.
    """
    for dif, ldm in _VAE_TOP.items():
        if name.startswith(ldm + "."):
            return dif + name[len(ldm):], False
    m = _VAE_LDM_MID.match(name)
    if m:
        side, part, rest = m.groups()
        if part != "attn_1":
            return f"{side}.mid_block.resnets.{int(part[-1]) - 1}.{_shortcut(rest, False)}", False
        for ldm, dif in _VAE_ATTENTION_BACK.items():
            if rest.startswith(ldm + "."):
                tail = rest[len(ldm) + 1:]
                return f"{side}.mid_block.attentions.0.{dif}.{tail}", ldm != "norm" and tail == "weight"
        raise ValueError(f"{name!r} is not an LDM VAE parameter")
    m = _VAE_LDM.match(name)
    if m:
        side, way, i_s, part, j, rest = m.groups()
        i = int(i_s) if way == "down" else levels - 1 - int(i_s)
        blocks = f"{side}.{way}_blocks.{i}"
        if j is not None:
            return f"{blocks}.resnets.{j}.{_shortcut(rest, False)}", False
        return f"{blocks}.{way}samplers.0.{rest}", False
    if re.match(r"^(encoder\.|decoder\.)?(conv_in|conv_out|quant_conv|post_quant_conv)\.", name):
        return name, False
    raise ValueError(f"{name!r} is not an LDM VAE parameter")


# --- OpenCLIP text towers ------------------------------------------------------------------------

#: Hugging Face CLIP names -> OpenCLIP names inside one encoder layer.
OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                  ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))
#: Hugging Face CLIP names -> OpenCLIP names outside the layers.
OPENCLIP_TOP = (("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
                ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
                ("text_model.final_layer_norm.weight", "ln_final.weight"),
                ("text_model.final_layer_norm.bias", "ln_final.bias"),
                ("text_projection.weight", "text_projection"))
_OC_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.*)$")
_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.*)$")
#: The fused projection and the parts it holds, in order.
QKV = ("q_proj", "k_proj", "v_proj")


def openclip_diffusers_names(name: str) -> tuple[str, ...]:
    """The Hugging Face name(s) of an OpenCLIP parameter (without its prefix): three for a fused
    ``in_proj`` (q, k, v, in that order), one otherwise (``text_projection`` is transposed).

    Raises:
        ValueError: a name outside the OpenCLIP text tower.
    """
    for hf, oc in OPENCLIP_TOP:
        if name == oc:
            return (hf,)
    m = _OC_LAYER.match(name)
    if m:
        i, rest = m.groups()
        base = f"text_model.encoder.layers.{i}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            p = rest.rsplit("_", 1)[1]
            return tuple(f"{base}self_attn.{q}.{p}" for q in QKV)
        for hf, oc in OPENCLIP_LAYER:
            if rest.startswith(oc + "."):
                return (base + hf + rest[len(oc):],)
    raise ValueError(f"{name!r} is not an OpenCLIP text-tower parameter")


def openclip_ldm_name(name: str) -> tuple[str, int]:
    """The OpenCLIP name of a Hugging Face CLIP text parameter and, for q/k/v, its place (0, 1, 2)
    in the fused ``in_proj`` (-1 for any other).

    Raises:
        ValueError: a name with no OpenCLIP counterpart.
    """
    name = name if name.startswith(("text_model.", "text_projection")) else "text_model." + name
    for hf, oc in OPENCLIP_TOP:
        if name == hf:
            return oc, -1
    m = _HF_LAYER.match(name)
    if m:
        i, rest = m.groups()
        base = f"transformer.resblocks.{i}."
        for k, q in enumerate(QKV):
            if rest.startswith(f"self_attn.{q}."):
                return f"{base}attn.in_proj_{rest.rsplit('.', 1)[1]}", k
        for hf, oc in OPENCLIP_LAYER:
            if rest.startswith(hf + "."):
                return base + oc + rest[len(hf):], -1
    raise ValueError(f"{name!r} has no OpenCLIP counterpart")


def openclip_layer(name: str) -> int | None:
    """The layer index of an OpenCLIP parameter name (``transformer.resblocks.N.``), else None."""
    m = _OC_LAYER.match(name)
    return int(m.group(1)) if m else None
