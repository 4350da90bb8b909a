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
    """Full SD 1.x/2.x/SDXL checkpoints: compare with the base's required keys, per component present."""
    from ..detect import keysets

    if det.kind != "checkpoint" or det.base not in keysets.KEYSETS or det.subtype not in keysets.CHECKED_SUBTYPES:
        return []
    name = keysets.KEYSETS[det.base].name
    return [f"{label}: {len(gone)} keys of the {name} architecture are missing (first: {gone[0]})"
            for label, gone in keysets.missing(mf.tensors.keys(), det.base)]


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
