"""LoRA and LoCon through peft, written in kohya's key layout.

Targets follow kohya's ``networks.lora``: every ``Linear`` and 1x1 ``Conv2d`` inside the UNet's
transformer blocks (``proj_in``/``proj_out``, attention projections, feed-forward); LoCon adds the
resnets, downsamplers and upsamplers, with ``conv_dim``/``conv_alpha`` for 3x3 convolutions. Text
encoders: the attention and MLP projections of every CLIP layer.

The output names each module ``lora_unet_<module>`` / ``lora_te[1|2]_<module>`` (dots become
underscores) with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``; SD1/SD2 UNet modules
keep their diffusers names and SDXL modules take their LDM names, as kohya writes them, so A1111,
ComfyUI and diffusers' ``load_lora_weights`` read the file.
"""

from __future__ import annotations

import json
from typing import Any

from ...ops import modelspec as ms
from ..export import Written, save_tensors
from ..ldm_names import unet_ldm_name
from ..optim import component_lr
from . import Method

ADAPTER = "modelkit"
UNET_BLOCKS = ("Transformer2DModel",)
LOCON_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def unet_targets(unet: Any, locon: bool) -> tuple[list[str], list[str]]:
    """``(module names, the 3x3 convolutions among them)`` that a LoRA (or LoCon) adapts."""
    import torch

    blocks = UNET_BLOCKS + (LOCON_BLOCKS if locon else ())
    names: list[str] = []
    convs: list[str] = []
    for block_name, block in unet.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_name, child in block.named_modules():
            full = f"{block_name}.{child_name}" if child_name else block_name
            if isinstance(child, torch.nn.Linear):
                names.append(full)
            elif isinstance(child, torch.nn.Conv2d):
                if tuple(child.kernel_size) == (1, 1):
                    names.append(full)
                elif locon:
                    names.append(full)
                    convs.append(full)
    return sorted(set(names)), sorted(set(convs))


def text_targets(encoder: Any) -> list[str]:
    """The CLIP attention and MLP projections of every encoder layer."""
    import torch

    return [n for n, m in encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n and n.rsplit(".", 1)[-1] in TEXT_LAYERS]


def kohya_name(component: str, module: str, family: str, unet_config: dict[str, Any]) -> str:
    """The kohya module name: ``lora_unet_...``, ``lora_te_...`` (SD1/SD2) or ``lora_te1_/lora_te2_...`` (SDXL)."""
    if component == "unet":
        name = unet_ldm_name(module, unet_config) if family == "sdxl" else module
        return "lora_unet_" + name.replace(".", "_")
    if not module.startswith("text_model."):
        module = "text_model." + module
    return f"lora_{component}_" + module.replace(".", "_")


class LoRA(Method):
    """LoRA (``lora``) or LoCon (``locon``) on the UNet and, optionally, the text encoders."""

    def __init__(self, config: Any, base: Any):
        super().__init__(config, base)
        self.name = config.method
        self.adapter = "lora"
        self.modules: dict[str, tuple[Any, str, str]] = {}  # kohya name -> (owner, component, module name)

    def _inject(self, model: Any, targets: list[str], convs: list[str]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        net = self.config.network
        alpha: Any = net.alpha  # kohya alphas are floats; peft only divides by the rank
        cfg = LoraConfig(r=net.dim, lora_alpha=alpha, target_modules=targets, lora_dropout=net.dropout,
                         rank_pattern={n: net.conv_dim for n in convs}, alpha_pattern={n: net.conv_alpha for n in convs},
                         init_lora_weights=True)
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)

    def prepare(self) -> list[dict[str, Any]]:
        import torch

        net = self.config.network
        family, ucfg = self.base.family, self.base.unet_config
        groups: list[dict[str, Any]] = []
        torch.manual_seed(self.config.train.seed)
        if net.train_unet:
            targets, convs = unet_targets(self.base.unet, self.config.method == "locon")
            self._inject(self.base.unet, targets, convs)
            for t in targets:
                self.modules[kohya_name("unet", t, family, ucfg)] = (self.base.unet, "unet", t)
            groups.append({"params": self._params(self.base.unet), "lr": component_lr(self.config, "unet"),
                           "component": "unet"})
        if net.train_text_encoder:
            for i, te in enumerate(self.base.text_encoders):
                component = f"te{i + 1}" if family == "sdxl" else "te"
                targets = text_targets(te)
                self._inject(te, targets, [])
                for t in targets:
                    self.modules[kohya_name(component, t, family, ucfg)] = (te, component, t)
                self.train_text[i] = True
                groups.append({"params": self._params(te), "lr": component_lr(self.config, "text_encoder"),
                               "component": "text_encoder"})
        return groups

    @staticmethod
    def _params(model: Any) -> list[Any]:
        import torch

        out = []
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.data = p.data.to(torch.float32)
                p.requires_grad_(True)
                out.append(p)
        return out

    def trainable(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kname, (owner, _component, module) in sorted(self.modules.items()):
            layer = owner.get_submodule(module)
            out[f"{kname}.lora_down.weight"] = layer.lora_A[ADAPTER].weight
            out[f"{kname}.lora_up.weight"] = layer.lora_B[ADAPTER].weight
        return out

    def kohya_state(self) -> dict[str, Any]:
        """The network in kohya keys: down, up and alpha per module."""
        import torch

        out = dict(self.trainable())
        for kname, (owner, _component, module) in self.modules.items():
            layer = owner.get_submodule(module)
            rank = layer.r[ADAPTER]
            alpha = layer.scaling[ADAPTER] * rank
            out[f"{kname}.alpha"] = torch.tensor(float(alpha))
        return out

    def export(self, path: str, metadata: dict[str, str], dtype: Any, force: bool) -> Written:
        return save_tensors(path, self.kohya_state(), {**metadata, **self.ss_metadata()}, dtype=dtype, force=force)

    def ss_metadata(self) -> dict[str, str]:
        """The kohya ``ss_*`` keys that describe the network (the loop adds the training ones)."""
        net, family = self.config.network, self.base.family
        args: dict[str, str] = {}
        if self.config.method == "locon":
            args = {"conv_dim": str(net.conv_dim), "conv_alpha": _num(net.conv_alpha)}
        return {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(net.dim),
            "ss_network_alpha": _num(net.alpha),
            "ss_network_args": json.dumps(args) if args else "null",
            "ss_network_dropout": _num(net.dropout),
            **ms.kohya_tags(family, self.base.prediction),
            "ss_network_train_unet_only": str(not net.train_text_encoder),
            "ss_network_train_text_encoder_only": str(not net.train_unet),
            "ss_unet_lr": _num(component_lr(self.config, "unet")),
            "ss_text_encoder_lr": _num(component_lr(self.config, "text_encoder")),
        }


def _num(value: float | None) -> str:
    """Numbers as kohya writes them: ``4.0`` -> ``4``, ``0.0001`` stays."""
    if value is None:
        return "None"
    return str(int(value)) if float(value).is_integer() else repr(float(value))
