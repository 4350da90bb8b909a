"""Diffusers folders: a pipeline (``model_index.json`` with ``unet/`` or ``transformer/``, ``vae/``...)
or a single component (``config.json`` beside its weights).

The denoiser's weights decide, exactly as for a single file; ``model_index.json``,
``config.json`` and ``scheduler_config.json`` only fill in what shapes cannot tell (the prediction
type), and any disagreement with the shapes is reported as a conflict.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from typing import Any

from ..reading import open_model
from . import tables
from .result import Detection, unknown, weakest
from .view import KeyView

_JSON_LIMIT = 1 << 20
_MAX_SHARDS = 64


def _json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(_JSON_LIMIT).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _weight_files(folder: str) -> list[str]:
    for name in tables.DIFFUSERS_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    for name in tables.DIFFUSERS_INDEXES:
        index = _json(os.path.join(folder, name))
        if index and isinstance(index.get("weight_map"), dict):
            shards = sorted({str(v) for v in index["weight_map"].values()})[:_MAX_SHARDS]
            files = [os.path.join(folder, os.path.basename(s)) for s in shards]
            return [f for f in files if os.path.isfile(f)]
    return []


def _component(folder: str) -> Detection | None:
    """Detect the weights of one diffusers component folder (all shards read as one map)."""
    files = _weight_files(folder)
    if not files:
        return None
    from .engine import detect_view

    with contextlib.ExitStack() as stack:
        tensors: dict[str, Any] = {}
        metadata: dict[str, str] = {}
        for f in files:
            mf = stack.enter_context(open_model(f))
            tensors.update(mf.tensors)
            metadata.update(mf.metadata)
        det = detect_view(KeyView(tensors, metadata, path=None))
    names = [os.path.basename(f) for f in files]
    return replace(det, evidence=(f"weights: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}",
                                  *det.evidence))


def detect_folder(path: str | os.PathLike[str]) -> Detection:
    """Detect a diffusers folder.

    Args:
        path: a pipeline folder (``model_index.json``) or one component folder (``config.json``).

    Returns:
        A Detection: for a pipeline, kind ``checkpoint`` with ``details["layout"] ==
        "diffusers-folder"`` and the pipeline's components; ``unknown`` when no weights decide.

    Raises:
        ModelkitError: a weights file cannot be read safely.
    """
    folder = os.fspath(path)
    index = _json(os.path.join(folder, "model_index.json"))
    if index is None:
        if os.path.isfile(os.path.join(folder, "config.json")):
            det = _component(folder)
            if det is not None:
                return replace(det, details={**det.details, "layout": "diffusers-folder"})
        return unknown(["no model_index.json, and no config.json beside weights: not a diffusers folder"])
    pipeline = str(index.get("_class_name", ""))
    parts = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v
                   and v[0] is not None and os.path.isdir(os.path.join(folder, k)))
    denoiser = next((d for d in ("unet", "transformer", "prior") if d in parts), None)
    det = _component(os.path.join(folder, denoiser)) if denoiser else None
    if denoiser is None or det is None or det.kind != "checkpoint":
        return unknown([f"model_index.json names {pipeline or 'no pipeline'}, but no denoiser weights decide"],
                       pipeline=pipeline, components=parts)
    evidence = [f"model_index.json: {pipeline}", *det.evidence]
    conflicts = list(det.details.get("conflicts", []))
    level = det.confidence
    for prefix, base in tables.PIPELINE_BASE:
        if pipeline.startswith(prefix):
            if base and det.base and base != det.base:
                conflicts.append(f"conflict: the pipeline class {pipeline} is {base}, the {denoiser} shapes are {det.base}")
                evidence.append(conflicts[-1])
                level = weakest(level, "medium")
            break
    variant = dict(det.variant)
    sched = _json(os.path.join(folder, "scheduler", "scheduler_config.json")) or {}
    pred = tables.PREDICTION_NAMES.get(str(sched.get("prediction_type", "")).lower())
    if pred and "prediction" in variant:
        variant["prediction"] = pred
        evidence = [e for e in evidence if not e.startswith(("prediction eps assumed", "SD2 eps and v"))]
        evidence.append(f"scheduler/scheduler_config.json prediction_type -> {pred}")
    config = _json(os.path.join(folder, denoiser, "config.json")) or {}
    declared = config.get("cross_attention_dim")
    if isinstance(declared, int) and "context_dim" in det.details and declared != det.details["context_dim"]:
        conflicts.append(f"conflict: {denoiser}/config.json cross_attention_dim {declared}, "
                         f"shapes {det.details['context_dim']} (shapes win)")
        evidence.append(conflicts[-1])
    details = {**det.details, "layout": "diffusers-folder", "pipeline": pipeline, "components": parts,
               "denoiser_layout": det.details.get("layout")}
    if conflicts:
        details["conflicts"] = conflicts
    return Detection("checkpoint", det.subtype, det.base, variant, level, tuple(evidence), details)
