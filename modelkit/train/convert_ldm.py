"""LDM single-file keys -> diffusers keys, with diffusers' own conversion functions.

The tensors come from ``modelkit.load`` (the safe reader); diffusers only renames and reshapes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Where each family keeps its text encoders in the LDM layout: (kind, prefix) per encoder.
TEXT_ENCODERS = {
    "sd1": (("clip", "cond_stage_model.transformer."),),
    "sd2": (("openclip", "cond_stage_model.model."),),
    "sdxl": (("clip", "conditioner.embedders.0.transformer."), ("openclip", "conditioner.embedders.1.model.")),
}


@dataclass
class Parts:
    """The UNet and VAE state dicts in diffusers keys."""

    unet: dict[str, Any]
    vae: dict[str, Any]


def convert(state: dict[str, Any], family: str, unet_config: dict[str, Any], vae_config: dict[str, Any]) -> Parts:
    """Rename the UNet and VAE tensors of an LDM checkpoint to diffusers keys.

    Args:
        state: every tensor of the checkpoint (``model.diffusion_model.*``, ``first_stage_model.*`` ...).
        family: ``sd1``, ``sd2`` or ``sdxl`` (the layouts differ only in the text encoders).
        unet_config, vae_config: the diffusers configs the tensors are meant for.

    Returns:
        ``Parts`` (the tensors are shared with ``state``, not copied, except where reshaped).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    del family  # the UNet/VAE layout is the same for the three families
    unet = convert_ldm_unet_checkpoint(state, dict(unet_config))
    vae = convert_ldm_vae_checkpoint(state, dict(vae_config))
    return Parts(unet, vae)


def text_encoder(state: dict[str, Any], family: str, index: int, model: Any) -> dict[str, Any]:
    """The state dict of text encoder ``index`` (0 or 1) in transformers keys.

    Args:
        state: the checkpoint's tensors.
        family: ``sd1``, ``sd2`` or ``sdxl``.
        index: which encoder (SDXL has two).
        model: the (empty) transformers model, whose config the OpenCLIP conversion reads.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    kind, prefix = TEXT_ENCODERS[family][index]
    if kind == "clip":
        picked = {k: v for k, v in state.items() if k.startswith(prefix)}
        return dict(convert_ldm_clip_checkpoint(picked, prefix))
    picked = {k: v for k, v in state.items() if k.startswith(prefix)}
    return dict(convert_open_clip_checkpoint(model, picked, prefix=prefix))
