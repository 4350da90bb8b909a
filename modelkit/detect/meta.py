"""Metadata and ``.yaml`` hints, and how they are reconciled with what the shapes say.

Shapes decide; metadata fills in only what shapes cannot tell, and a disagreement between the two
is reported as a conflict (shapes win).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import tables

_YAML_LIMIT = 1 << 16


@dataclass
class Hints:
    """What metadata says, each fact with the evidence string that names its source."""

    base: str | None = None
    base_from: str = ""
    prediction: str | None = None
    prediction_from: str = ""
    resolution: int | None = None
    resolution_from: str = ""
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)


def read_hints(md: Mapping[str, str]) -> Hints:
    """Interpret the well-known metadata keys (SAI model spec, kohya ``ss_*``).

    Args:
        md: safetensors string metadata.

    Returns:
        The hints found; fields stay None when metadata is silent.
    """
    h = Hints()
    arch = md.get("modelspec.architecture", "").strip().lower()
    if arch:
        head, _, adapter = arch.partition("/")
        h.adapter = adapter or None
        for prefix, base, pred in tables.MODELSPEC_ARCH:
            if head.startswith(prefix):
                h.base, h.base_from = base, f"metadata modelspec.architecture={arch}"
                if pred:
                    h.prediction, h.prediction_from = pred, f"metadata modelspec.architecture={arch}"
                break
    version = md.get("ss_base_model_version", "").strip().lower()
    if version and h.base is None:
        for prefix, base in tables.SS_BASE_VERSION:
            if version.startswith(prefix):
                h.base, h.base_from = base, f"metadata ss_base_model_version={version}"
                break
    if h.base is None and md.get("ss_v2", "").strip().lower() == "true":
        h.base, h.base_from = "sd2", "metadata ss_v2=True"
    spec_pred = tables.PREDICTION_NAMES.get(md.get("modelspec.prediction_type", "").strip().lower())
    if spec_pred:
        h.prediction, h.prediction_from = spec_pred, f"metadata modelspec.prediction_type={spec_pred}"
    elif md.get("ss_v_parameterization", "").strip().lower() == "true":
        h.prediction, h.prediction_from = "v", "metadata ss_v_parameterization=True"
    res = re.match(r"^\s*(\d+)\s*x\s*(\d+)\s*$", md.get("modelspec.resolution", ""))
    if res and res.group(1) == res.group(2):
        h.resolution, h.resolution_from = int(res.group(1)), f"metadata modelspec.resolution={res.group(0).strip()}"
    return h


def yaml_prediction(path: str | None) -> tuple[str | None, str]:
    """The prediction a ``.yaml`` beside the checkpoint configures (how A1111 finds configs).

    Args:
        path: the checkpoint file; ``stem.yaml`` beside it is read (at most 64 KiB), never parsed
            as YAML objects, only scanned for the ``parameterization`` line or SGM scaling class.

    Returns:
        ``("v" | "eps" | None, evidence)``.
    """
    if not path:
        return None, ""
    cfg = os.path.splitext(path)[0] + ".yaml"
    try:
        with open(cfg, "rb") as f:
            text = f.read(_YAML_LIMIT).decode("utf-8", "replace")
    except OSError:
        return None, ""
    name = os.path.basename(cfg)
    m = re.search(tables.YAML_PARAMETERIZATION, text, re.MULTILINE)
    if m and m.group(1) in ("v", "eps"):
        return m.group(1), f"{name} beside the file: parameterization {m.group(1)}"
    for marker, pred in tables.YAML_SGM_SCALING:
        if marker in text:
            return pred, f"{name} beside the file: {marker}"
    if m is None and "LatentDiffusion" in text:
        return "eps", f"{name} beside the file: no parameterization line (eps is the LDM default)"
    return None, ""


def reconcile(shape_base: str | None, hints: Hints, evidence: list[str], conflicts: list[str],
              compatible: tuple[str, ...] = ()) -> tuple[str | None, bool]:
    """Combine the base the shapes give with the base metadata names.

    Args:
        shape_base: the base decided from shapes, or None.
        hints: ``read_hints`` of the file's metadata.
        evidence: appended to.
        conflicts: appended to when metadata disagrees with the shapes.
        compatible: bases metadata may name without a conflict (for shapes shared by several).

    Returns:
        ``(base, from_metadata_only)``.
    """
    if hints.base is None:
        return shape_base, False
    if shape_base is None:
        evidence.append(hints.base_from)
        return hints.base, True
    if hints.base != shape_base and hints.base not in compatible:
        msg = f"conflict: {hints.base_from} says {hints.base}, shapes say {shape_base} (shapes win)"
        conflicts.append(msg)
        evidence.append(msg)
    return shape_base, False
