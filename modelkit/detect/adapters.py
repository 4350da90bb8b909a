"""Conditioning adapters: ControlNet (original, v1.1 unprefixed, diffusers, MMDiT, Control-LoRA,
ControlNet-LLLite), T2I-Adapter and IP-Adapter."""

from __future__ import annotations

import re
from typing import Any

from . import tables
from .meta import read_hints, reconcile
from .result import Detection
from .view import KeyView


def _finish(view: KeyView, kind: str, subtype: str, base: str | None, level: str, evidence: list[str],
            details: dict[str, Any]) -> Detection:
    conflicts: list[str] = []
    base, from_meta = reconcile(base, read_hints(view.metadata), evidence, conflicts)
    if conflicts:
        details["conflicts"] = conflicts
    if from_meta or (base is None and level == "high"):
        level = "medium"
    if view.wrappers:
        details["wrappers"] = list(view.wrappers)
    return Detection(kind, subtype, base, {}, level, tuple(evidence), details)


def _context_base(view: KeyView, pattern: str, adm_keys: tuple[str, ...], evidence: list[str],
                  details: dict[str, Any]) -> tuple[str | None, str]:
    """Base from a cross-attention ``to_k`` input width, checked against an ADM width."""
    base = None
    level = "medium"
    key = view.find(pattern)
    if key:
        width = (view.shape(key) or (0, 0))[-1]
        base = tables.CONTEXT_WIDTH_BASE.get(width)
        details["context_dim"] = width
        evidence.append(f"{key} {list(view.shape(key) or ())}: context width {width} -> {base}")
        level = "high" if base else "low"
    adm_key = next((k for k in adm_keys if view.has(k)), None)
    if adm_key:
        adm = (view.shape(adm_key) or (0, 0))[1]
        abase = tables.ADM_WIDTH.get(adm, (None, None))[0]
        details["adm_in_channels"] = adm
        evidence.append(f"{adm_key} {list(view.shape(adm_key) or ())}: ADM width {adm} -> {abase}")
        if base and abase and abase != base:
            evidence.append("context and ADM widths disagree: base cannot be told")
            return None, "low"
        if base is None and abase:
            base, level = abase, "high"
    return base, level


def controlnet_ldm(view: KeyView) -> Detection | None:
    """The original ControlNet (``control_model.*``) or its unprefixed v1.1 files."""
    hint = view.find(r"^(?:control_model\.)?input_hint_block\.0\.weight$")
    zero = view.find(r"^(?:control_model\.)?zero_convs\.0\.0\.weight$")
    if not (hint or zero):
        return None
    p = "control_model." if (hint or zero or "").startswith("control_model.") else ""
    evidence = [f"{k} (ControlNet hint encoder / zero convolutions)" for k in (hint, zero) if k]
    details: dict[str, Any] = {"layout": "ldm", "prefixed": bool(p)}
    if hint:
        details["hint_channels"] = (view.shape(hint) or (0, 0))[1]
    base, level = _context_base(view, "^" + re.escape(p) + r"(?:input_blocks|middle_block)\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$",
                                (p + "label_emb.0.0.weight",), evidence, details)
    if view.any_prefix("model.diffusion_model."):
        details["includes_unet"] = True
        evidence.append("also holds a model.diffusion_model.* UNet")
    return _finish(view, "controlnet", "ldm", base, level, evidence, details)


def controlnet_diffusers(view: KeyView) -> Detection | None:
    """A diffusers ``ControlNetModel`` (``controlnet_cond_embedding``, ``controlnet_down_blocks``)."""
    evidence = ["controlnet_cond_embedding.* / controlnet_down_blocks.* (diffusers ControlNet)"]
    details: dict[str, Any] = {"layout": "diffusers"}
    base, level = _context_base(view, r"^(?:down_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.0\.attn2\.to_k\.weight$",
                                ("add_embedding.linear_1.weight",), evidence, details)
    return _finish(view, "controlnet", "diffusers", base, level, evidence, details)


def controlnet_mmdit(view: KeyView) -> Detection | None:
    """A diffusers Flux or SD3 ControlNet (``controlnet_blocks``)."""
    evidence = ["controlnet_blocks.* (diffusers MMDiT ControlNet)"]
    details: dict[str, Any] = {"layout": "diffusers"}
    base = None
    if view.find(r"^(?:single_transformer_blocks|controlnet_single_blocks)\.0\.") or view.has("x_embedder.weight"):
        base = "flux"
        evidence.append("single_transformer_blocks / x_embedder (Flux transformer) -> flux")
    elif view.has("pos_embed.proj.weight") or view.has("pos_embed_input.proj.weight"):
        base = "sd3"
        evidence.append("pos_embed.proj (SD3 transformer) -> sd3")
    return _finish(view, "controlnet", "diffusers", base, "high" if base else "medium", evidence, details)


def control_lora(view: KeyView) -> Detection | None:
    """Stability's Control-LoRA: a ``lora_controlnet`` marker and low-rank ``.up``/``.down`` UNet deltas."""
    evidence = ["lora_controlnet marker tensor (Stability Control-LoRA)"]
    details: dict[str, Any] = {}
    base, level = _context_base(view, r"(?:input_blocks|middle_block)\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.down$",
                                ("label_emb.0.0.weight",), evidence, details)
    ranks = sorted({(view.shape(k) or (0,))[0] for k in view.find_all(r"\.down$")})
    details["ranks"] = ranks
    return _finish(view, "controlnet", "control-lora", base, level, evidence, details)


def controlnet_lllite(view: KeyView) -> Detection | None:
    """kohya's ControlNet-LLLite (``lllite_unet_*.conditioning1``); SDXL in practice, not from shapes."""
    mods = {k.split(".", 1)[0] for k in view.find_all(r"^lllite_unet_")}
    evidence = [f"{len(mods)} lllite_unet_* modules (kohya ControlNet-LLLite)"]
    base = "sdxl" if view.find(tables.SDXL_DEPTH_MODULE) else None
    if base:
        evidence.append("transformer depth above 2 in module names -> sdxl")
    return _finish(view, "controlnet", "lllite", base, "high" if base else "medium", evidence, {"modules": len(mods)})


def t2i_adapter(view: KeyView) -> Detection | None:
    """TencentARC T2I-Adapter: full (``conv_in`` + ``body.N.block1``), light (``body.N.in_conv``), or
    the diffusers layout (``adapter.body.N.resnets.M``)."""
    p = "adapter." if view.any_prefix("adapter.") else ""
    diffusers = view.find(r"^adapter\.body\.\d+\.resnets\.") is not None
    light = view.shape(p + "body.0.in_conv.weight")
    conv_in = view.shape(p + "conv_in.weight")
    if conv_in and len(conv_in) == 4:
        cin, key, subtype = conv_in[1], p + "conv_in.weight", "diffusers" if diffusers else "full"
    elif light and len(light) == 4:
        cin, key, subtype = light[1], p + "body.0.in_conv.weight", "light"
    else:
        return None
    base = tables.T2I_CIN_BASE.get(cin)
    evidence = [f"{key} {list(view.shape(key) or ())}: {cin} pixel-unshuffled input channels -> {base}"]
    if base == "sd1":
        evidence.append("8x8 unshuffle: an SD1.x adapter (SD2 shares the UNet channels)")
    details = {"input_channels": cin, "layout": "diffusers" if diffusers else "tencentarc", "wrapped": bool(p)}
    return _finish(view, "t2i-adapter", subtype, base, "high" if base == "sdxl" else "medium", evidence, details)


def ip_adapter(view: KeyView) -> Detection | None:
    """IP-Adapter: ``image_proj.*`` (projection) and ``ip_adapter.N.to_k_ip/to_v_ip`` (attention)."""
    key = view.find(r"^ip_adapter\.\d+\.to_k_ip\.weight$")
    if key is None:
        return None
    width = (view.shape(key) or (0, 0))[1]
    base = tables.CONTEXT_WIDTH_BASE.get(width)
    evidence = [f"image_proj.* and {key} {list(view.shape(key) or ())}: context width {width} -> {base}"]
    if view.has("image_proj.latents") or view.any_prefix("image_proj.perceiver_resampler."):
        subtype = "plus"
    elif view.any_prefix("image_proj.proj.0."):
        subtype = "full-face"
    else:
        subtype = "base"
    if view.find(r"^ip_adapter\.\d+\.to_(?:q|k|v|out)_lora\.(?:down|up)\.weight$"):
        subtype = "faceid"
    evidence.append(f"projection layout -> {subtype}")
    details = {"attention_layers": len(view.indices(r"^ip_adapter\.(\d+)\.to_k_ip\.weight$")), "context_dim": width}
    return _finish(view, "ip-adapter", subtype, base, "high" if base else "low", evidence, details)


def ip_adapter_flux(view: KeyView) -> Detection | None:
    """XLabs' Flux IP-Adapter (``double_blocks.N.processor.ip_adapter_double_stream_k_proj``)."""
    evidence = ["double_blocks.*.processor.ip_adapter_double_stream_k_proj (XLabs Flux IP-Adapter) -> flux"]
    return _finish(view, "ip-adapter", "xlabs", "flux", "high", evidence, {})
