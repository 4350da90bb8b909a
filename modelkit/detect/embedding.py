"""Textual-inversion embeddings (A1111, DreamArtist, ``emb_params``, SDXL, diffusers) and aesthetic gradients."""

from __future__ import annotations

import os
import re
from typing import Any

from . import tables
from .meta import read_hints, reconcile
from .result import Detection
from .view import KeyView


def _vectors(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(vectors, width) of an embedding tensor, or None when the shape cannot be one."""
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2 and 1 <= shape[0] <= tables.MAX_VECTORS:
        return shape[0], shape[1]
    return None


def _finish(view: KeyView, subtype: str, key: str, vectors: int, width: int, confidence: str,
            evidence: list[str], details: dict[str, Any]) -> Detection:
    base = tables.EMBEDDING_WIDTH_BASE.get(width)
    if base is None:
        evidence.append(f"width {width} is no SD text-encoder width")
        confidence = "low"
    else:
        evidence.append(f"{key} width {width} -> {base}")
    conflicts: list[str] = []
    base, _ = reconcile(base, read_hints(view.metadata), evidence, conflicts)
    details.update({"vectors": vectors, "width": width})
    if conflicts:
        details["conflicts"] = conflicts
    _name(view, details, evidence)
    return Detection("embedding", subtype, base, {}, confidence, tuple(evidence), details)


def _name(view: KeyView, details: dict[str, Any], evidence: list[str]) -> None:
    name = view.extras.get("name")
    if isinstance(name, str) and name:
        details["name"] = name
        if view.path:
            stem = os.path.splitext(os.path.basename(view.path))[0]
            details["name_matches_file"] = stem == name
            if stem != name:
                evidence.append(f"internal name {name!r} differs from the file name")
    for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
        if view.extras.get(key) is not None:
            details[key] = view.extras[key]
    if view.metadata.get("modelspec.is_negative_embedding", "").lower() == "true":
        details["negative"] = True


def a1111(view: KeyView) -> Detection | None:
    """``{"string_to_token": {"*": 265}, "string_to_param": {"*": [n, w]}, "name": ...}``; DreamArtist
    writes the same layout, its negative half named ``<name>-neg``."""
    keys = view.find_all(r"^string_to_param\.")
    if len(keys) != 1:
        return None
    shape = view.shape(keys[0]) or ()
    vw = _vectors(shape)
    if vw is None:
        return None
    evidence = [f"{keys[0]} {list(shape)} (A1111 string_to_param)"]
    details: dict[str, Any] = {"token": keys[0].rsplit(".", 1)[1] if keys[0].startswith("string_to_param._parameters.")
                               else keys[0].split(".", 1)[1]}
    subtype = "a1111"
    name = view.extras.get("name")
    if isinstance(name, str) and name.endswith("-neg"):
        subtype = "dreamartist"
        details["negative"] = True
        evidence.append(f"internal name {name!r} ends in -neg (DreamArtist's negative embedding)")
    return _finish(view, subtype, keys[0], *vw, "high", evidence, details)


def emb_params(view: KeyView) -> Detection | None:
    """``{"emb_params": [n, w]}`` in ``.pt`` or ``.safetensors`` (kohya sd-scripts, A1111 exports)."""
    shape = view.shape("emb_params") or ()
    vw = _vectors(shape)
    if vw is None:
        return None
    return _finish(view, "emb_params", "emb_params", *vw, "high", [f"emb_params {list(shape)}"], {})


def sdxl(view: KeyView) -> Detection | None:
    """``{"clip_l": [n, 768], "clip_g": [n, 1280]}``: one embedding per SDXL text encoder."""
    sl, sg = view.shape("clip_l") or (), view.shape("clip_g") or ()
    vl, vg = _vectors(sl), _vectors(sg)
    if vl is None or vg is None:
        return None
    evidence = [f"clip_l {list(sl)} and clip_g {list(sg)} (SDXL embedding)"]
    ok = vl[1] == 768 and vg[1] == 1280 and vl[0] == vg[0]
    if not ok:
        evidence.append("widths or vector counts are not SDXL's 768/1280 pair")
    conflicts: list[str] = []
    base, _ = reconcile("sdxl" if ok else None, read_hints(view.metadata), evidence, conflicts)
    details: dict[str, Any] = {"vectors": vl[0], "width": {"clip_l": vl[1], "clip_g": vg[1]}}
    if conflicts:
        details["conflicts"] = conflicts
    _name(view, details, evidence)
    return Detection("embedding", "sdxl", base, {}, "high" if ok else "low", tuple(evidence), details)


def single(view: KeyView) -> Detection | None:
    """One tensor: a diffusers ``learned_embeds`` (``{"<token>": [w]}``) or an aesthetic-gradient
    embedding (a bare ``[1, 768]`` tensor, the mean CLIP ViT-L/14 image feature)."""
    key = view.names[0]
    shape = view.shape(key) or ()
    if view.key_paths.get(key) == () and shape == (1, 768):
        evidence = ["a bare [1, 768] tensor, the layout of an aesthetic-gradient embedding (CLIP ViT-L/14 image feature)"]
        return Detection("embedding", "aesthetic-gradient", "sd1", {}, "medium", tuple(evidence),
                         {"vectors": 1, "width": 768})
    vw = _vectors(shape)
    if vw is None or vw[1] not in tables.EMBEDDING_WIDTH_BASE or "." in key or key in ("tensor", "emb_params"):
        return None
    looks_like_token = bool(re.fullmatch(r"<[^<>]+>", key))
    confidence = "high" if looks_like_token else "medium"
    evidence = [f"one tensor {key!r} {list(shape)} (diffusers learned_embeds: token -> vector)"]
    if not looks_like_token:
        evidence.append("the key is not a <token>: medium confidence")
    return _finish(view, "diffusers", key, *vw, confidence, evidence, {"token": key})
