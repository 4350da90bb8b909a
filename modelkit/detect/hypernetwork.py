"""A1111 hypernetworks, and the ``.optim`` optimizer-state sidecars A1111 writes beside them.

A hypernetwork file is ``{768: (module_k, module_v), 320: ..., "layer_structure": [1, 2, 1],
"activation_func": ..., "is_layer_norm": ..., "use_dropout": ...}``; each module is a
``torch.nn.Sequential`` saved as ``linear.<i>.weight``. Our flattening names the tensors
``768.0.linear.0.weight``. NovelAI's original format names them ``linear1``/``linear2``.
"""

from __future__ import annotations

from typing import Any

from . import tables
from .meta import read_hints, reconcile
from .result import Detection
from .view import KeyView

_KEY = r"^(\d+)\.([01])\.(linear(?:\.\d+|[12]))\.(weight|bias)$"
_SETTINGS = ("layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "use_dropout",
             "dropout_structure", "activate_output", "last_layer_dropout", "name", "step", "sd_checkpoint",
             "sd_checkpoint_name", "optional_info")


def hypernetwork(view: KeyView) -> Detection | None:
    """Detect an A1111/NovelAI hypernetwork from its size-keyed module pairs."""
    from .view import rx

    pattern = rx(_KEY)
    sizes: set[int] = set()
    weights: dict[tuple[int, str], tuple[int, ...]] = {}
    old = False
    embedded_optimizer = False
    for name in view.names:
        if name.startswith("optimizer_state_dict."):
            embedded_optimizer = True
            continue
        m = pattern.search(name)
        if m is None:
            return None
        sizes.add(int(m.group(1)))
        old = old or m.group(3) in ("linear1", "linear2")
        if m.group(2) == "0" and m.group(4) == "weight":
            weights[(int(m.group(1)), m.group(3))] = view.shape(name) or ()
    size = min(sizes)
    layers = {layer: shape for (s, layer), shape in weights.items() if s == size}
    if view.key_paths and not all(isinstance(p[0], int) for p in view.key_paths.values() if p):
        evidence_keys = "string size keys (a converted file)"
    else:
        evidence_keys = "integer size keys"
    ordered = sorted(layers.items(), key=lambda kv: int(kv[0].rsplit(".", 1)[-1].replace("linear", "")))
    linears = [s for _, s in ordered if len(s) == 2]
    norms = [s for _, s in ordered if len(s) == 1]
    structure = [1.0] + [round(s[0] / size, 4) for s in linears]
    evidence = [f"{len(sizes)} module pairs keyed by size {sorted(sizes)} ({evidence_keys}), "
                f"{'linear1/linear2' if old else 'linear.N'} tensors"]
    details: dict[str, Any] = {
        "sizes": sorted(sizes), "layer_structure_from_shapes": structure, "layer_norm_from_shapes": bool(norms),
        "format": "novelai" if old else "a1111",
    }
    if embedded_optimizer:
        details["embedded_optimizer_state"] = True
        evidence.append("also holds optimizer_state_dict.* (older A1111 saved it inside the file)")
    for key in _SETTINGS:
        if key in view.extras:
            details[key] = view.extras[key]
    context = sorted(s for s in sizes if s in tables.HYPERNET_CONTEXT_BASE)
    base = None
    if len(context) == 1:
        base = tables.HYPERNET_CONTEXT_BASE[context[0]]
        evidence.append(f"module for context width {context[0]} -> {base}")
    elif context:
        evidence.append(f"modules for both context widths {context}: base cannot be told")
    else:
        evidence.append("no module for a context width (768 or 1024)")
    conflicts: list[str] = []
    base, from_meta = reconcile(base, read_hints(view.metadata), evidence, conflicts)
    if conflicts:
        details["conflicts"] = conflicts
    declared = view.extras.get("layer_structure")
    if isinstance(declared, list) and [float(x) for x in declared if isinstance(x, (int, float))] != structure:
        evidence.append(f"declared layer_structure {declared} differs from the shapes {structure}")
    subtype = "novelai" if old else "a1111"
    return Detection("hypernetwork", subtype, base, {}, "high" if base and not from_meta else "medium",
                     tuple(evidence), details)


def optimizer_state(view: KeyView) -> Detection | None:
    """An A1111 ``.optim`` sidecar: ``{"hash", "optimizer_name", "optimizer_state_dict"}``. It holds
    optimizer moments, not weights, so its kind is ``unknown`` with subtype ``optimizer-state``."""
    states = view.indices(r"^optimizer_state_dict\.state\.(\d+)\.")
    if not states and "optimizer_name" not in view.extras:
        return None
    if any(not n.startswith("optimizer_state_dict.") for n in view.names):
        return None
    moments = view.find_all(r"^optimizer_state_dict\.state\.\d+\.exp_avg$")
    shapes = [view.shape(n) for n in moments]
    likely = None
    if len(shapes) == 1 and shapes[0] and len(shapes[0]) == 2 and shapes[0][1] in tables.EMBEDDING_WIDTH_BASE:
        likely = "embedding"
    elif len(shapes) > 1:
        likely = "hypernetwork"
    details: dict[str, Any] = {"parameters": len(states), "optimizer": view.extras.get("optimizer_name"),
                               "for_hash": view.extras.get("hash"), "likely_for": likely}
    evidence = [f"optimizer_state_dict.state.* for {len(states)} parameters: optimizer moments, not model weights"]
    if likely:
        evidence.append(f"moment shapes fit a {likely} ({shapes[0]})")
    return Detection("unknown", "optimizer-state", None, {}, "high", tuple(evidence), details)
