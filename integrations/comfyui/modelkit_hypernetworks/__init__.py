"""ComfyUI custom node: load a hypernetwork written by modelkit (``.safetensors``), or any
hypernetwork file modelkit reads (A1111 ``.pt`` too, without unpickling code), and apply it as
ComfyUI's own ``HypernetworkLoader`` does (an attn1 and attn2 patch: ``k + mlp_k(k) * strength``).

ComfyUI's loader reads a ``.safetensors`` hypernetwork as flat tensors with no structure fields,
so it builds no layers from it. This node rebuilds A1111's structure (``build_layers``) from the
fields modelkit keeps in the metadata. Needs ``pip install modelkit[torch]`` in ComfyUI's Python.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

JSON_FIELDS = ("layer_structure", "activation_func", "is_layer_norm", "use_dropout", "activate_output",
               "dropout_structure", "last_layer_dropout")
OLD_NAMES = {"linear1": "linear.0", "linear2": "linear.1"}


def _modelkit() -> Any:
    try:
        import modelkit
    except ImportError as exc:
        raise ImportError("loading hypernetworks through modelkit needs it in this Python: "
                          "python -m pip install 'modelkit[torch]'") from exc
    return modelkit


def _activations() -> dict[str, Any]:
    """A1111's names: ``linear``, ``swish`` (Hardswish), and every ``torch.nn`` activation by lower-case name."""
    import inspect

    import torch

    table: dict[str, Any] = {"linear": torch.nn.Identity, "swish": torch.nn.Hardswish}
    for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation":
            table.setdefault(name.lower(), cls)
    return table


def read_fields(path: str) -> tuple[dict[str, Any], dict[int, tuple[dict[str, Any], dict[str, Any]]]]:
    """(structure fields, ``{size: (module_0 tensors, module_1 tensors)}``) of a hypernetwork file."""
    modelkit = _modelkit()
    tensors = modelkit.load(path, dtype="float32")
    with modelkit.open_model(path) as mf:
        fields = {k: v for k, v in mf.extras.items() if k in JSON_FIELDS}
        fields.update({k: json.loads(v) for k, v in mf.metadata.items() if k in JSON_FIELDS})
    pairs: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    for name, tensor in tensors.items():
        size, which, key = name.split(".", 2)
        head, _, tail = key.partition(".")
        key = f"{OLD_NAMES[head]}.{tail}" if head in OLD_NAMES else key
        pairs.setdefault(int(size), (OrderedDict(), OrderedDict()))[int(which)][key] = tensor
    return fields, pairs


def dropout_structure(fields: dict[str, Any]) -> list[float]:
    """The dropout after each layer, as A1111 decides it (the stored structure, else from the flags)."""
    if fields.get("dropout_structure") is not None:
        return [float(p) for p in fields["dropout_structure"]]
    n = len(fields.get("layer_structure") or [1, 2, 1])
    if not fields.get("use_dropout", False):
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if fields.get("last_layer_dropout", False) else 0.0, 0.0]


def build_module(dim: int, state: dict[str, Any], fields: dict[str, Any]) -> Any:
    """One A1111 ``HypernetworkModule.linear`` Sequential, filled from ``state`` (``linear.{i}.*``), in eval mode.

    Raises:
        ValueError: an activation A1111 does not know.
        RuntimeError: the tensors do not fit the structure.
    """
    import torch

    ls = fields.get("layer_structure") or [1, 2, 1]
    act = fields.get("activation_func")
    drops = dropout_structure(fields)
    table = _activations()
    if act is not None and act not in table:
        raise ValueError(f"hypernetwork uses an unsupported activation function: {act}")
    layers: list[Any] = []
    for i in range(len(ls) - 1):
        layers.append(torch.nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
        if act not in (None, "linear") and (i < len(ls) - 2 or fields.get("activate_output", True)):
            layers.append(table[act]())
        if fields.get("is_layer_norm", False):
            layers.append(torch.nn.LayerNorm(int(dim * ls[i + 1])))
        if drops[i + 1] > 0:
            layers.append(torch.nn.Dropout(p=drops[i + 1]))
    seq = torch.nn.Sequential(*layers)
    seq.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return seq.eval().requires_grad_(False)


def build_layers(path: str) -> dict[int, Any]:
    """``{size: ModuleList([mlp_k, mlp_v])}`` for every attention width the file has modules for."""
    import torch

    fields, pairs = read_fields(path)
    return {size: torch.nn.ModuleList([build_module(size, a, fields), build_module(size, b, fields)])
            for size, (a, b) in sorted(pairs.items())}


class HypernetworkPatch:
    """An attn1/attn2 patch: ``k + mlp_k(k) * strength``, ``v + mlp_v(v) * strength`` where the width has modules."""

    def __init__(self, layers: dict[int, Any], strength: float):
        self.layers = layers
        self.strength = strength

    def __call__(self, q: Any, k: Any, v: Any, extra_options: Any) -> tuple[Any, Any, Any]:
        pair = self.layers.get(int(k.shape[-1]))
        if pair is not None:
            k = k + pair[0](k.float()).to(k.dtype) * self.strength
            v = v + pair[1](v.float()).to(v.dtype) * self.strength
        return q, k, v

    def to(self, device: Any) -> HypernetworkPatch:
        self.layers = {size: pair.to(device) for size, pair in self.layers.items()}
        return self


class ModelkitHypernetworkLoader:
    """Like ComfyUI's "Load Hypernetwork", for modelkit ``.safetensors`` (and ``.pt``, read safely)."""

    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_hypernetwork"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # (the name ComfyUI calls)
        import folder_paths

        return {"required": {"model": ("MODEL",),
                             "hypernetwork_name": (folder_paths.get_filename_list("hypernetworks"),),
                             "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    def load_hypernetwork(self, model: Any, hypernetwork_name: str, strength: float) -> tuple[Any]:
        import folder_paths

        path = folder_paths.get_full_path("hypernetworks", hypernetwork_name)
        if path is None:
            raise FileNotFoundError(f"hypernetwork {hypernetwork_name!r} is not in the hypernetworks folder")
        patched = model.clone()
        patch = HypernetworkPatch(build_layers(path), strength)
        patched.set_model_attn1_patch(patch)
        patched.set_model_attn2_patch(patch)
        return (patched,)


NODE_CLASS_MAPPINGS = {"ModelkitHypernetworkLoader": ModelkitHypernetworkLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"ModelkitHypernetworkLoader": "Load Hypernetwork (modelkit)"}
