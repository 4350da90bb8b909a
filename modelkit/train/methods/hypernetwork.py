"""Hypernetworks in AUTOMATIC1111's structure.

For each width in ``sizes`` there are two small MLPs, one for the keys and one for the values of
every attention layer whose key/value input has that width (the text context for cross-attention,
the hidden states for self-attention): ``k = to_k(c + mlp_k(c))``, ``v = to_v(c + mlp_v(c))``.
Each MLP is A1111's ``HypernetworkModule``: per step of ``layer_structure`` a ``Linear``, then the
activation (not after the last layer unless ``activate_output``), a ``LayerNorm`` if asked, and a
``Dropout`` where A1111's dropout structure puts one, so the tensor names match A1111's
``linear.<i>.weight``. Here the MLPs wrap the UNet's ``to_k``/``to_v`` layers, so any attention
processor (SDPA or not) runs them.

Output: the layout ``modelkit convert`` gives an A1111 hypernetwork: ``<size>.<0|1>.linear.<i>.<weight|bias>``
with ``modelkit.layout = a1111-hypernetwork/1`` and the structure fields as JSON metadata. No UI reads
a hypernetwork ``.safetensors`` on its own (A1111 lists ``*.pt`` only; ComfyUI builds no layers from
flat keys): the repository's ``integrations/`` folder has the A1111 extension and ComfyUI node that do.
"""

from __future__ import annotations

import json
from typing import Any

from ..export import Written, save_tensors
from . import Method

LAYOUT = "a1111-hypernetwork/1"


def dropout_structure(layers: tuple[float, ...], use_dropout: bool, last_layer: bool) -> list[float]:
    """A1111's dropout probability after each layer: 0.3 between hidden layers when dropout is on."""
    if not use_dropout:
        return [0.0] * len(layers)
    return [0.0] + [0.3] * (len(layers) - 3) + [0.3 if last_layer else 0.0] + [0.0]


def _activation(name: str) -> Any:
    import torch

    table = {"relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU, "swish": torch.nn.Hardswish,
             "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU, "mish": torch.nn.Mish,
             "silu": torch.nn.SiLU, "softsign": torch.nn.Softsign}
    return table[name]()


def build_module(width: int, cfg: Any) -> Any:
    """One A1111 ``HypernetworkModule`` (its ``linear`` Sequential), freshly initialised."""
    import torch

    ls = cfg.layer_structure
    drops = dropout_structure(ls, cfg.dropout, cfg.last_layer_dropout)
    layers: list[Any] = []
    for i in range(len(ls) - 1):
        linear = torch.nn.Linear(int(width * ls[i]), int(width * ls[i + 1]))
        _init(linear, cfg.weight_init, cfg.activation)
        layers.append(linear)
        if cfg.activation != "linear" and (i < len(ls) - 2 or cfg.activate_output):
            layers.append(_activation(cfg.activation))
        if cfg.layer_norm:
            layers.append(torch.nn.LayerNorm(int(width * ls[i + 1])))
        if drops[i + 1] > 0:
            layers.append(torch.nn.Dropout(p=drops[i + 1]))
    module = torch.nn.Module()
    module.linear = torch.nn.Sequential(*layers)
    return module


def _init(linear: Any, scheme: str, activation: str) -> None:
    import torch

    w, b = linear.weight.data, linear.bias.data
    nonlinearity: Any = "leaky_relu" if activation == "leakyrelu" else "relu"
    if scheme == "Normal":
        torch.nn.init.normal_(w, mean=0.0, std=0.01)
    elif scheme == "XavierUniform":
        torch.nn.init.xavier_uniform_(w)
    elif scheme == "XavierNormal":
        torch.nn.init.xavier_normal_(w)
    elif scheme == "KaimingUniform":
        torch.nn.init.kaiming_uniform_(w, nonlinearity=nonlinearity)
    else:
        torch.nn.init.kaiming_normal_(w, nonlinearity=nonlinearity)
    torch.nn.init.zeros_(b)


def _wrapper() -> Any:
    import torch

    class Hypernetworked(torch.nn.Module):
        """``to_k``/``to_v`` fed with ``x + mlp(x)`` (A1111's ``HypernetworkModule.forward`` at multiplier 1)."""

        def __init__(self, base: Any, mlp: Any):
            super().__init__()
            self.base = base
            self.mlp = mlp

        def forward(self, x: Any) -> Any:
            h = x.to(torch.float32)
            return self.base(x + self.mlp.linear(h).to(x.dtype))

    return Hypernetworked


class Hypernetwork(Method):
    """Train A1111-style hypernetwork modules; the UNet and the text encoders stay frozen."""

    name = "hypernetwork"
    adapter = "hypernetwork"

    def __init__(self, config: Any, base: Any):
        super().__init__(config, base)
        self.pairs: dict[int, tuple[Any, Any]] = {}

    def sizes(self) -> list[int]:
        """The widths to build modules for: as configured, else every key/value input width of the UNet."""
        if self.config.hypernetwork.sizes:
            return sorted(set(self.config.hypernetwork.sizes))
        return sorted({int(m.to_k.in_features) for m in self._attentions()})

    def _attentions(self) -> list[Any]:
        return [m for _, m in self.base.unet.named_modules() if type(m).__name__ == "Attention" and hasattr(m, "to_k")]

    def prepare(self) -> list[dict[str, Any]]:
        import torch

        cfg = self.config.hypernetwork
        torch.manual_seed(self.config.train.seed)
        for size in self.sizes():
            self.pairs[size] = (build_module(size, cfg), build_module(size, cfg))
        wrap = _wrapper()
        device = next(self.base.unet.parameters()).device
        for attn in self._attentions():
            pair = self.pairs.get(int(attn.to_k.in_features))
            if pair is not None:
                attn.to_k = wrap(attn.to_k, pair[0].to(device))
                attn.to_v = wrap(attn.to_v, pair[1].to(device))
        params = [p for pair in self.pairs.values() for m in pair for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return [{"params": params, "lr": self.config.optimizer.lr, "component": "unet"}]

    def trainable(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for size, pair in sorted(self.pairs.items()):
            for j, module in enumerate(pair):
                for name, p in module.named_parameters():
                    out[f"{size}.{j}.{name}"] = p
        return out

    def modules_in_training(self) -> list[Any]:
        return [m for pair in self.pairs.values() for m in pair]

    def export(self, path: str, metadata: dict[str, str], dtype: Any, force: bool) -> Written:
        cfg = self.config.hypernetwork
        fields = {
            "layer_structure": list(cfg.layer_structure), "activation_func": cfg.activation,
            "is_layer_norm": cfg.layer_norm, "weight_initialization": cfg.weight_init, "use_dropout": cfg.dropout,
            "activate_output": cfg.activate_output, "last_layer_dropout": cfg.last_layer_dropout,
            "dropout_structure": dropout_structure(cfg.layer_structure, cfg.dropout, cfg.last_layer_dropout),
            "sd_checkpoint": None, "sd_checkpoint_name": None,
        }
        meta = {**metadata, **{k: json.dumps(v, separators=(",", ":")) for k, v in fields.items()}, "modelkit.layout": LAYOUT,
                "name": self.config.output.name}
        if "modelkit.step" in metadata:
            meta["step"] = metadata["modelkit.step"]
        return save_tensors(path, self.trainable(), meta, dtype=dtype, force=force)
