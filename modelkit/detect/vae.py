"""VAEs (LDM and diffusers key styles) and A1111's approximate latent previewers (VAE-approx)."""

from __future__ import annotations

import re
from typing import Any

from . import tables
from .meta import read_hints, reconcile
from .result import Detection
from .view import KeyView

_STYLES = {
    "ldm": (r"(?:^|\.)(?:decoder\.up|encoder\.down)\.0\.block\.0\.conv1\.weight$", "decoder.conv_in.weight",
            r"(?:encoder|decoder)\.mid\.attn_1\.q\.weight$"),
    "diffusers": (r"(?:^|\.)(?:decoder\.up_blocks|encoder\.down_blocks)\.0\.resnets\.0\.conv1\.weight$",
                  "decoder.conv_in.weight", r"(?:encoder|decoder)\.mid_block\.attentions\.0\.(?:to_q|query)\.weight$"),
}


def _vae(view: KeyView, style: str) -> Detection | None:
    marker, conv_in, attn = _STYLES[style]
    key = view.find(marker)
    if key is None:
        return None
    prefix = re.sub(r"(?:decoder|encoder)\..*$", "", key)
    z_key = prefix + conv_in
    shape = view.shape(z_key)
    if shape is None:
        z_key = prefix + "post_quant_conv.weight"
        shape = view.shape(z_key)
    if shape is None or len(shape) != 4:
        return None
    z = shape[1]
    evidence = [f"{key} ({style} VAE keys)", f"{z_key} {list(shape)}: {z} latent channels"]
    details: dict[str, Any] = {"layout": style, "latent_channels": z,
                               "encoder": view.any_prefix(prefix + "encoder."),
                               "decoder": view.any_prefix(prefix + "decoder.")}
    if prefix:
        details["prefix"] = prefix
    attn_key = view.find("^" + re.escape(prefix) + attn)
    if style == "diffusers" and attn_key:
        details["attention_keys"] = "old (query/key/value/proj_attn)" if ".query." in attn_key else "new (to_q/to_k/to_v/to_out.0)"
    if view.any_prefix(prefix + "loss."):
        details["training_loss_keys"] = view.count_prefix(prefix + "loss.")
    if view.any_prefix("model_ema."):
        details["ema"] = True
    if view.wrappers:
        details["wrappers"] = list(view.wrappers)
    shared = tables.VAE_SHARED.get(z)
    evidence.append(shared or f"{z} latent channels: no SD base uses this VAE")
    hints = read_hints(view.metadata)
    conflicts: list[str] = []
    compatible = {4: ("sd1", "sd2", "sdxl", "sdxl-refiner"), 16: ("sd3", "flux")}.get(z, ())
    base = None
    if hints.base and hints.base in compatible:
        base, _ = reconcile(None, hints, evidence, conflicts)
    elif hints.base:
        conflicts.append(f"conflict: {hints.base_from} says {hints.base}, but a {z}-channel VAE is not {hints.base}")
        evidence.append(conflicts[-1])
        details["conflicts"] = conflicts
    confidence = "high" if (details["encoder"] or details["decoder"]) and base is None else "medium"
    return Detection("vae", style, base, {"latent_channels": z}, confidence, tuple(evidence), details)


def vae_ldm(view: KeyView) -> Detection | None:
    """An LDM-style VAE (``encoder.down.0.block.0.conv1.weight``, maybe ``first_stage_model.``-prefixed)."""
    return _vae(view, "ldm")


def vae_diffusers(view: KeyView) -> Detection | None:
    """A diffusers ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.0.conv1.weight``)."""
    return _vae(view, "diffusers")


def vae_approx(view: KeyView) -> Detection | None:
    """A1111's "Approx NN" previewer: eight small convolutions ``conv1``..``conv8``, not a VAE."""
    convs = view.indices(r"^conv(\d)\.weight$")
    first, last = view.shape("conv1.weight") or (), view.shape("conv8.weight") or ()
    if convs != list(range(1, 9)) or len(first) != 4 or len(last) != 4 or last[0] != 3:
        return None
    z = first[1]
    evidence = [f"only conv1..conv8 ({len(view)} tensors); conv1.weight {list(first)} takes {z} latent channels, "
                f"conv8.weight {list(last)} gives RGB: A1111's approximate previewer, not a VAE"]
    shared = tables.VAE_SHARED.get(z)
    evidence.append(shared.replace("VAEs", "approximate previewers") if shared else f"{z} latent channels")
    details = {"latent_channels": z, "parameters": sum(view.tensors[n].numel for n in view.names)}
    return Detection("vae-approx", "a1111", None, {"latent_channels": z}, "high", tuple(evidence), details)
