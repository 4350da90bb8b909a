"""Standalone text encoders (CLIP, OpenCLIP, T5) and ESRGAN-family upscalers."""

from __future__ import annotations

import math
import re
from typing import Any

from . import tables
from .result import Detection
from .view import KeyView

_WRAP = r"^((?:params_ema\.|params\.)?)"


def _encoder_result(view: KeyView, found: list[tuple[str, str, int, int]], layout: str) -> Detection:
    """``found``: (prefix, family, width, layers) per encoder in the file."""
    evidence: list[str] = []
    encoders: list[dict[str, Any]] = []
    for prefix, family, width, layers in found:
        evidence.append(f"{prefix or '(no prefix)'}: {layout} text encoder, width {width}, {layers} layers -> "
                        f"{family} (used by {tables.TEXT_FAMILY_USERS.get(family, 'no SD base')})")
        encoders.append({"prefix": prefix, "family": family, "width": width, "layers": layers})
    families = sorted({f for _, f, _, _ in found})
    bases = {tables.TEXT_FAMILY_BASE.get(f) for f in families}
    base = bases.pop() if len(bases) == 1 else None
    level = "high" if all(f in tables.TEXT_FAMILY_BASE for f in families) else "medium"
    layout_bases = {b for p, b in tables.TEXT_PREFIX_BASE for prefix, _, _, _ in found if prefix == p}
    if base is None and len(layout_bases) == 1:
        base, level = layout_bases.pop(), "medium"
        evidence.append(f"the key prefix is where {base} checkpoints keep this encoder -> {base}")
    elif base is None:
        evidence.append("this encoder alone does not tie the file to one base model")
    details: dict[str, Any] = {"layout": layout, "encoders": encoders}
    if view.find(r"(?:^|\.)vision_model\.|(?:^|\.)visual\."):
        details["vision_tower"] = True
    return Detection("text-encoder", "+".join(families), base, {}, level, tuple(evidence), details)


def clip(view: KeyView) -> Detection | None:
    """A Hugging Face ``CLIPTextModel`` (``text_model.encoder.layers.N``), maybe prefixed."""
    found = []
    for key in view.find_all(r"(?:^|\.)text_model\.encoder\.layers\.0\.self_attn\.q_proj\.weight$"):
        prefix = key[: key.index("text_model.")]
        width = (view.shape(key) or (0, 0))[1]
        layers = len(view.indices("^" + re.escape(prefix) + r"text_model\.encoder\.layers\.(\d+)\."))
        found.append((prefix, tables.TEXT_WIDTH_FAMILY.get(width, "clip"), width, layers))
    return _encoder_result(view, found, "clip") if found else None


def openclip(view: KeyView) -> Detection | None:
    """An OpenCLIP text tower (``transformer.resblocks.N.attn.in_proj_weight``)."""
    found = []
    for key in view.find_all(r"^(?!.*visual\.)(?:.*\.)?transformer\.resblocks\.0\.attn\.in_proj_weight$"):
        prefix = key[: key.index("transformer.resblocks.")]
        shape = view.shape(key) or (0, 0)
        layers = len(view.indices("^" + re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
        found.append((prefix, tables.TEXT_WIDTH_FAMILY.get(shape[1], "openclip"), shape[1], layers))
    return _encoder_result(view, found, "openclip") if found else None


def t5(view: KeyView) -> Detection | None:
    """A T5 encoder (``encoder.block.N.layer.0.SelfAttention.q``): T5-XXL at d_model 4096."""
    key = view.find(r"(?:^|\.)encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$")
    if key is None:
        return None
    prefix = key[: key.index("encoder.block.")]
    width = (view.shape(key) or (0, 0))[1]
    layers = len(view.indices("^" + re.escape(prefix) + r"encoder\.block\.(\d+)\."))
    return _encoder_result(view, [(prefix, tables.T5_WIDTH_FAMILY.get(width, "t5"), width, layers)], "t5")


def _upscaler(subtype: str, evidence: list[str], details: dict[str, Any]) -> Detection:
    return Detection("upscaler", subtype, None, {"scale": details.get("scale")}, "high", tuple(evidence), details)


def esrgan_old(view: KeyView) -> Detection | None:
    """The original ESRGAN layout: ``model.0`` conv, ``model.1.sub.N.RDBk`` trunk, then upsampling."""
    first = view.shape("model.0.weight") or ()
    if len(first) != 4:
        return None
    blocks = len(view.indices(r"^model\.1\.sub\.(\d+)\.RDB1\."))
    convs = view.indices(r"^model\.(\d+)\.weight$")
    stages = max(0, (convs[-1] - 4) // 3)
    last = view.shape(f"model.{convs[-1]}.weight") or (0,)
    details = {"in_channels": first[1], "out_channels": last[0], "features": first[0], "blocks": blocks,
               "scale": 2 ** stages}
    evidence = [f"model.0.weight {list(first)} and model.1.sub.*.RDB1 ({blocks} RRDB blocks): original ESRGAN layout",
                f"{stages} upsampling stages (last conv model.{convs[-1]}) -> x{2 ** stages}"]
    return _upscaler("esrgan-old", evidence, details)


def _rrdb(view: KeyView, subtype: str, trunk: str, up: str) -> Detection | None:
    m = re.match(_WRAP, view.names[0])
    p = m.group(1) if m else ""
    first = view.shape(p + "conv_first.weight") or ()
    if len(first) != 4:
        return None
    blocks = len(view.indices("^" + re.escape(p) + trunk))
    ups = len(view.indices("^" + re.escape(p) + up))
    unshuffle = {3: 1, 12: 2, 48: 4}.get(first[1], 1)
    scale = 2 ** ups / unshuffle
    details: dict[str, Any] = {"in_channels": first[1], "features": first[0], "blocks": blocks,
                               "scale": int(scale) if scale == int(scale) else scale}
    if p:
        details["wrapper"] = p.rstrip(".")
    evidence = [f"{p}conv_first.weight {list(first)} and {blocks} RRDB blocks ({subtype} layout)",
                f"{ups} upsampling convs" + (f", pixel-unshuffle by {unshuffle}" if unshuffle > 1 else "")
                + f" -> x{details['scale']}"]
    return _upscaler(subtype, evidence, details)


def esrgan(view: KeyView) -> Detection | None:
    """The BasicSR ESRGAN layout (``conv_first``, ``RRDB_trunk.N``, ``upconv1``...)."""
    return _rrdb(view, "esrgan", r"RRDB_trunk\.(\d+)\.", r"upconv(\d)\.weight$")


def real_esrgan(view: KeyView) -> Detection | None:
    """The newer BasicSR/Real-ESRGAN layout (``body.N.rdb1``, ``conv_up1``; often under ``params_ema``)."""
    return _rrdb(view, "real-esrgan", r"body\.(\d+)\.rdb1\.", r"conv_up(\d)\.weight$")


def compact(view: KeyView) -> Detection | None:
    """Real-ESRGAN's SRVGGNetCompact: only ``body.N`` convolutions and PReLUs."""
    m = re.match(_WRAP, view.names[0])
    p = m.group(1) if m else ""
    convs = [i for i in view.indices("^" + re.escape(p) + r"body\.(\d+)\.weight$")
             if len(view.shape(f"{p}body.{i}.weight") or ()) == 4]
    if len(convs) < 2:
        return None
    first, last = view.shape(f"{p}body.{convs[0]}.weight") or (), view.shape(f"{p}body.{convs[-1]}.weight") or ()
    ratio = last[0] / first[1] if first[1] else 0
    scale = math.isqrt(int(ratio)) if ratio == int(ratio) and math.isqrt(int(ratio)) ** 2 == ratio else None
    if scale is None:
        return None
    details = {"in_channels": first[1], "features": first[0], "convolutions": len(convs) - 2, "scale": scale}
    evidence = [f"only body.N convolutions and activations; body.{convs[-1]}.weight {list(last)} -> "
                f"pixel-shuffle x{scale} (SRVGGNetCompact)"]
    return _upscaler("compact", evidence, details)
