"""What ``inspect`` reports beyond the container: junk, known defects and decoded metadata.

Everything here reads names, shapes and metadata; the only tensor data read are the tiny
``position_ids`` tensors (77 values) that are checked for the well-known float/wrong-value defect.
"""

from __future__ import annotations

import json
from typing import Any

from ..model import ModelFile
from .prune import EMA_PREFIX, JUNK_PREFIXES, POSITION_IDS, position_ids_problem


def junk(mf: ModelFile) -> dict[str, dict[str, int]]:
    """Tensors ``prune`` would drop: EMA copies and optimizer/loss/scheduler state."""
    out: dict[str, dict[str, int]] = {}
    for name, t in mf.tensors.items():
        if name.startswith(EMA_PREFIX):
            group = "ema"
        elif name.startswith(JUNK_PREFIXES):
            group = name.split(".", 1)[0]
        else:
            continue
        g = out.setdefault(group, {"tensors": 0, "bytes": 0})
        g["tensors"] += 1
        g["bytes"] += t.nbytes
    return out


def defects(mf: ModelFile, detection: Any | None = None) -> list[str]:
    """Known defects: broken ``position_ids``; missing keys for the detected architecture."""
    import numpy as np

    found: list[str] = []
    for name, t in mf.tensors.items():
        if not name.endswith(POSITION_IDS) or t.numel == 0 or t.numel > 4096:
            continue
        problem = position_ids_problem(t, np.arange(t.numel, dtype="<i8"))
        if problem:
            found.append(f"{name}: {problem} (fix with `modelkit prune`)")
    if detection is not None:
        found.extend(_missing_keys(mf, detection))
    return found


def _missing_keys(mf: ModelFile, det: Any) -> list[str]:
    """SD 1.x full checkpoints: compare with the architecture's own key set, per component present."""
    if det.kind != "checkpoint" or det.base != "sd1" or det.subtype not in (None, "standard"):
        return []
    from ..detect.layouts import sd1_keys

    expected = sd1_keys()
    out = []
    for prefix, label in (("model.diffusion_model.", "UNet"), ("first_stage_model.", "VAE"),
                          ("cond_stage_model.", "text encoder")):
        want = {k for k in expected if k.startswith(prefix)}
        have = {k for k in mf.tensors if k.startswith(prefix)}
        if not have:
            continue
        missing = sorted(want - have)
        if missing:
            out.append(f"{label}: {len(missing)} keys of the SD 1.x architecture are missing (first: {missing[0]})")
    return out


def decode_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """kohya ``ss_*`` and ``modelspec.*`` values with their JSON and numbers decoded."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if not (k.startswith("ss_") or k.startswith("modelspec.") or k.startswith("sshs_")):
            continue
        out[k] = _decode(v)
    return out


def _decode(v: str) -> Any:
    s = v.strip()
    if s[:1] in "{[":
        try:
            return json.loads(s)
        except (ValueError, RecursionError):
            return v
    if s in ("True", "False"):
        return s == "True"
    if s == "None":
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return v
