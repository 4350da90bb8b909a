"""Denoisers, alone or in full checkpoints: SD1/SD2/SDXL/refiner UNets (LDM/SGM and diffusers key
styles), SD3/SD3.5 MMDiT and Flux.

The base comes from the UNet's cross-attention context width (``attn2.to_k`` input) and its
``label_emb`` (ADM) input width; the subtype from ``conv_in``'s input channels. The text encoders
beside the UNet are checked against that base, and a disagreement is reported, never hidden.
"""

from __future__ import annotations

import re
from typing import Any

from . import tables
from .meta import Hints, read_hints, reconcile, yaml_prediction
from .result import Detection, weakest
from .view import KeyView

_CTX_LDM = r"(?:input_blocks|middle_block|output_blocks)\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$"
_CTX_DIFFUSERS = r"^(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.transformer_blocks\.0\.attn2\.to_k\.weight$"


def components(view: KeyView) -> dict[str, int]:
    """Tensor count per checkpoint component (``tables.COMPONENT_PREFIXES``)."""
    out: dict[str, int] = {}
    for name in view.names:
        for prefix, comp in tables.COMPONENT_PREFIXES:
            if name.startswith(prefix):
                out[comp] = out.get(comp, 0) + 1
                break
    return out


def _foreign(view: KeyView, evidence: list[str], details: dict[str, Any]) -> bool:
    """Keys outside every checkpoint component (only checkable when the denoiser is prefixed)."""
    if not view.any_prefix("model.diffusion_model."):
        return False
    prefixes = tuple(p for p, _ in tables.COMPONENT_PREFIXES)
    extras = set(tables.CHECKPOINT_EXTRAS)
    foreign = [n for n in view.names if not n.startswith(prefixes) and n not in extras]
    if foreign:
        details["foreign_keys"] = len(foreign)
        evidence.append(f"{len(foreign)} keys outside a checkpoint's components (e.g. {foreign[0]})")
    return bool(foreign)


def _common(view: KeyView, details: dict[str, Any], denoiser: str) -> None:
    comps = components(view)
    if not comps.get("unet"):
        comps = {denoiser: len(view), **{k: v for k, v in comps.items() if k != "unet"}}
    elif denoiser != "unet":
        comps[denoiser] = comps.pop("unet")
    details["components"] = sorted(c for c in comps if c not in ("ema", "training_loss"))
    details["ema"] = bool(comps.get("ema"))
    if comps.get("ema"):
        details["ema_keys"] = comps["ema"]
    if comps.get("training_loss"):
        details["training_loss_keys"] = comps["training_loss"]
    if view.wrappers:
        details["wrappers"] = list(view.wrappers)


def _prediction(view: KeyView, base: str | None, hints: Hints, evidence: list[str],
                conflicts: list[str]) -> dict[str, Any]:
    """The UNet's sampling variant: markers in the file, then metadata, then a ``.yaml`` beside it."""
    variant: dict[str, Any] = {}
    marker = next(((k, p) for k, p in tables.PREDICTION_MARKERS if view.has(k)), None)
    pred = None
    if marker:
        pred = marker[1]
        evidence.append(f"marker tensor {marker[0]!r} -> prediction {pred}")
        if hints.prediction and hints.prediction != pred:
            conflicts.append(f"conflict: {hints.prediction_from} says {hints.prediction}, marker says {pred}")
            evidence.append(conflicts[-1])
    elif hints.prediction:
        pred = hints.prediction
        evidence.append(f"{hints.prediction_from} -> prediction {pred}")
    else:
        pred, why = yaml_prediction(view.path)
        if pred:
            evidence.append(why)
        elif base == "sd2":
            pred = _sd2_weight_probe(view, evidence)
        elif base in ("sd1", "sdxl", "sdxl-refiner"):
            pred = "eps"
            evidence.append("prediction eps assumed (no v_pred marker, metadata or .yaml says otherwise)")
    variant["prediction"] = pred
    if view.has(tables.ZSNR_MARKER):
        variant["zsnr"] = True
        evidence.append(f"marker tensor {tables.ZSNR_MARKER!r} -> zero terminal SNR")
    resolution = tables.BASE_RESOLUTION.get(base or "")
    if hints.resolution:
        resolution = hints.resolution
        evidence.append(hints.resolution_from)
    variant["resolution"] = resolution
    return variant


def _sd2_weight_probe(view: KeyView, evidence: list[str]) -> str | None:
    """SD2 eps and v models share shapes; the spread of one LayerNorm bias tells them apart.

    The last output block's first transformer ``norm1.bias`` has a standard deviation above
    about 0.09 in the v-prediction 768 models and below it in the eps 512 ones (a heuristic
    ComfyUI also relies on). Inpainting UNets (9 input channels) are eps.
    """
    conv_in = view.find(r"input_blocks\.0\.0\.weight$")
    if conv_in and (view.shape(conv_in) or (0, 0))[1] != 4:
        evidence.append("SD2 with a non-4-channel conv_in: eps (v-prediction SD2 models are 4-channel)")
        return "eps"
    bias = view.find(r"output_blocks\.11\.1\.transformer_blocks\.0\.norm1\.bias$")
    std = view.std(bias) if bias else None
    if std is None:
        evidence.append("SD2 eps and v-prediction models have identical shapes: prediction unknown")
        return None
    pred = "v" if std > 0.09 else "eps"
    evidence.append(f"weight statistics: std({bias}) = {std:.4f} {'>' if pred == 'v' else '<='} 0.09 -> "
                    f"prediction {pred} (a heuristic; a .yaml or metadata overrides it)")
    return pred


def _unet(view: KeyView, layout: str, prefix: str, cin_key: str, ctx_key: str | None, adm_key: str | None) -> Detection:
    conv_in = view.shape(cin_key) or ()
    in_ch, mc = conv_in[1], conv_in[0]
    evidence = [f"{cin_key} {list(conv_in)}: {in_ch} input channels"]
    conflicts: list[str] = []
    details: dict[str, Any] = {"layout": layout, "in_channels": in_ch, "model_channels": mc}
    if prefix:
        details["unet_prefix"] = prefix
    cbase = abase = None
    asub: str | None = None
    level = "high"
    if ctx_key:
        context = (view.shape(ctx_key) or (0, 0))[1]
        cbase = tables.CONTEXT_WIDTH_BASE.get(context)
        details["context_dim"] = context
        evidence.append(f"{ctx_key} {list(view.shape(ctx_key) or ())}: context width {context} -> {cbase}")
    if adm_key:
        adm = (view.shape(adm_key) or (0, 0))[1]
        abase, asub = tables.ADM_WIDTH.get(adm, (None, None))
        details["adm_in_channels"] = adm
        evidence.append(f"{adm_key} {list(view.shape(adm_key) or ())}: ADM width {adm} -> {abase}")
    base = cbase or abase
    if cbase and abase and cbase != abase:
        evidence.append(f"context width says {cbase} but ADM width says {abase}: base cannot be told")
        base, level = None, "low"
    elif cbase in ("sdxl", "sdxl-refiner") and not adm_key:
        evidence.append(f"no label_emb/add_embedding, which every {cbase} UNet has")
        level = "medium"
    elif not cbase:
        level = "medium" if abase else "low"
    subtype = tables.IN_CHANNELS_SUBTYPE.get(in_ch, "other")
    for key, marked in tables.SUBTYPE_MARKERS:
        if view.has(key):
            subtype = marked
            evidence.append(f"{key} present -> {marked}")
    if asub and subtype == "standard":
        subtype = asub
    text = sorted({b for p, b in tables.TEXT_PREFIX_BASE if view.any_prefix(p)})
    if text:
        details["text_encoder_layout"] = text
        if base and base not in text:
            conflicts.append(f"conflict: the text encoders are laid out for {', '.join(text)}, the UNet is {base}")
            evidence.append(conflicts[-1])
            level = weakest(level, "medium")
    hints = read_hints(view.metadata)
    base, from_meta = reconcile(base, hints, evidence, conflicts)
    if from_meta:
        level = "medium"
    variant = _prediction(view, base, hints, evidence, conflicts)
    _common(view, details, "unet")
    if _foreign(view, evidence, details):
        level = weakest(level, "medium")
    if conflicts:
        details["conflicts"] = conflicts
    return Detection("checkpoint", subtype, base, variant, level, tuple(evidence), details)


def ldm(view: KeyView) -> Detection | None:
    """An LDM/SGM UNet (``model.diffusion_model.input_blocks...``), alone or in a full checkpoint."""
    for prefix in tables.DENOISER_PREFIXES:
        cin_key = prefix + "input_blocks.0.0.weight"
        if len(view.shape(cin_key) or ()) == 4:
            break
    else:
        return None
    ctx_key = view.find("^" + re.escape(prefix) + _CTX_LDM)
    adm_key = prefix + "label_emb.0.0.weight"
    return _unet(view, "ldm", prefix, cin_key, ctx_key, adm_key if view.has(adm_key) else None)


def diffusers_unet(view: KeyView) -> Detection | None:
    """A diffusers ``UNet2DConditionModel`` state dict (``unet/diffusion_pytorch_model.*``)."""
    if len(view.shape("conv_in.weight") or ()) != 4:
        return None
    adm_key = next((k for k in ("add_embedding.linear_1.weight", "class_embedding.linear_1.weight") if view.has(k)), None)
    return _unet(view, "diffusers", "", "conv_in.weight", view.find(_CTX_DIFFUSERS), adm_key)


def _dit_common(view: KeyView, base: str, subtype: str, variant: dict[str, Any], evidence: list[str],
                details: dict[str, Any], level: str = "high") -> Detection:
    conflicts: list[str] = []
    base_out, _ = reconcile(base, read_hints(view.metadata), evidence, conflicts)
    _common(view, details, "transformer")
    if _foreign(view, evidence, details):
        level = weakest(level, "medium")
    if conflicts:
        details["conflicts"] = conflicts
        level = weakest(level, "medium")
    return Detection("checkpoint", subtype, base_out, variant, level, tuple(evidence), details)


def _sd3_variant(depth: int, attn2: bool, rms: bool) -> str | None:
    for d, a, r, name in tables.SD3_VARIANTS:
        if d == depth and (a is None or a == attn2) and (r is None or r == rms):
            return name
    return None


def sd3(view: KeyView) -> Detection | None:
    """Stable Diffusion 3 / 3.5 (MMDiT ``joint_blocks``), original key style."""
    key = view.find(r"(?:^|\.)joint_blocks\.0\.(?:context|x)_block\.attn\.qkv\.weight$")
    if key is None:
        return None
    prefix = key[: key.index("joint_blocks.")]
    emb = view.shape(prefix + "x_embedder.proj.weight")
    depth = emb[0] // 64 if emb else len(view.indices("^" + re.escape(prefix) + r"joint_blocks\.(\d+)\."))
    attn2 = view.find("^" + re.escape(prefix) + r"joint_blocks\.\d+\.x_block\.attn2\.qkv\.weight$") is not None
    rms = view.find("^" + re.escape(prefix) + r"joint_blocks\.0\.(?:context|x)_block\.attn\.ln_q\.weight$") is not None
    name = _sd3_variant(depth, attn2, rms)
    evidence = [f"{key}: MMDiT joint blocks -> sd3",
                f"depth {depth}{' (x_embedder width / 64)' if emb else ''}, "
                f"{'MMDiT-X attn2' if attn2 else 'no attn2'}, {'RMS qk-norm' if rms else 'no qk-norm'} -> {name}"]
    details: dict[str, Any] = {"layout": "sd3", "depth": depth}
    if emb:
        details["in_channels"] = emb[1]
    if prefix:
        details["transformer_prefix"] = prefix
    return _dit_common(view, "sd3", "standard", {"sd3": name, "depth": depth}, evidence, details)


def _flux(view: KeyView, layout: str, in_key: str, guidance_key: str, double: str, single: str,
          prefix: str) -> Detection:
    img_in = view.shape(in_key) or ()
    guidance = view.has(guidance_key)
    evidence = [f"{double}0.* / {single}0.*: Flux double and single stream blocks -> flux"]
    details: dict[str, Any] = {"layout": layout, "double_blocks": len(view.indices("^" + re.escape(double) + r"(\d+)\.")),
                               "single_blocks": len(view.indices("^" + re.escape(single) + r"(\d+)\."))}
    if prefix:
        details["transformer_prefix"] = prefix
    level = "high"
    kind_of = None
    if len(img_in) == 2:
        details["hidden_size"], details["img_in_width"] = img_in
        if img_in[1] not in tables.FLUX_IMG_IN_VARIANT:
            evidence.append(f"{in_key} {list(img_in)}: an input width no Flux.1 release has")
            level = "medium"
        kind_of = tables.FLUX_IMG_IN_VARIANT.get(img_in[1])
        evidence.append(f"{in_key} {list(img_in)}: input width {img_in[1]}"
                        + (f" -> {kind_of}" if kind_of else ""))
    if kind_of is None:
        if guidance:
            kind_of = "dev"
            evidence.append(f"{guidance_key} present (guidance-distilled) -> dev")
        elif view.find("^" + re.escape(prefix) + r"distilled_guidance_layer\.") is not None:
            kind_of = "chroma"
            evidence.append("distilled_guidance_layer.* and no guidance input -> a Chroma-style model")
        else:
            kind_of = "schnell"
            evidence.append(f"no {guidance_key} (dev has it) -> schnell")
    subtype = {"fill": "inpaint", "control": "control"}.get(kind_of, "standard")
    return _dit_common(view, "flux", subtype, {"flux": kind_of}, evidence, details, level)


def flux(view: KeyView) -> Detection | None:
    """Flux.1 in BFL's key style (``double_blocks``/``single_blocks``), alone or prefixed."""
    key = view.find(r"(?:^|\.)double_blocks\.0\.img_attn\.qkv\.weight$")
    if key is None:
        return None
    prefix = key[: key.index("double_blocks.")]
    return _flux(view, "bfl", prefix + "img_in.weight", prefix + "guidance_in.in_layer.weight",
                 prefix + "double_blocks.", prefix + "single_blocks.", prefix)


def diffusers_flux(view: KeyView) -> Detection | None:
    """A diffusers ``FluxTransformer2DModel`` state dict."""
    return _flux(view, "diffusers", "x_embedder.weight", "time_text_embed.guidance_embedder.linear_1.weight",
                 "transformer_blocks.", "single_transformer_blocks.", "")


def diffusers_sd3(view: KeyView) -> Detection | None:
    """A diffusers ``SD3Transformer2DModel`` state dict."""
    emb = view.shape("pos_embed.proj.weight") or ()
    if len(emb) != 4:
        return None
    depth = emb[0] // 64
    attn2 = view.find(r"^transformer_blocks\.\d+\.attn2\.to_q\.weight$") is not None
    rms = view.has("transformer_blocks.0.attn.norm_q.weight")
    name = _sd3_variant(depth, attn2, rms)
    evidence = [f"pos_embed.proj.weight {list(emb)} and transformer_blocks.0.attn.add_q_proj: diffusers SD3 -> sd3",
                f"depth {depth}, {'attn2' if attn2 else 'no attn2'}, {'qk-norm' if rms else 'no qk-norm'} -> {name}"]
    details = {"layout": "diffusers", "depth": depth, "in_channels": emb[1]}
    return _dit_common(view, "sd3", "standard", {"sd3": name, "depth": depth}, evidence, details)
