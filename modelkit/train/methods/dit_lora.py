"""LoRA on a Flux.1 or SD3.x transformer (peft on diffusers' modules), written as kohya or diffusers keys.

Targets: the attention projections and feed-forward layers of every double/joint block (image and
text streams) and, for Flux, the attention and MLP projections of every single block; the
modulation layers are left alone, as kohya's sd-scripts do by default. Text encoders are not
trained.

Layouts (``network.layout``):

* ``kohya``: the original (BFL / Stability) module names, ``lora_unet_double_blocks_0_img_attn_qkv``
  with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``, as sd-scripts writes them and
  ComfyUI, Forge and diffusers read them. Where the original fuses modules that diffusers keeps apart
  (``qkv`` = ``to_q``, ``to_k``, ``to_v``; Flux's ``linear1`` = those and ``proj_mlp``), the trained
  modules are fused exactly: the downs stacked, the ups block-diagonal, and the alpha multiplied by
  the number of parts so that alpha / rank, hence every delta, is unchanged.
* ``diffusers``: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` (peft's names, which
  diffusers' ``load_lora_weights`` and ComfyUI read), with alpha / rank folded into ``lora_B``, since
  that layout has no alpha.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ...errors import ConfigError
from ...ops import families as fam
from ..export import Written, save_tensors
from ..optim import component_lr
from . import Method
from .lora import ADAPTER, _num

#: diffusers module names a DiT LoRA adapts (Flux and SD3).
TARGETS = re.compile(
    r"^(?:transformer_blocks\.\d+\.(?:attn2?\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out))$")
#: ModelSpec ``implementation`` of the kohya layout (the original keys' codebase).
IMPLEMENTATION = {"flux": "https://github.com/black-forest-labs/flux",
                  "sd3": "https://github.com/Stability-AI/generative-models"}
#: kohya's ``ss_base_model_version`` and ``ss_network_module``.
SS_BASE = {"flux": "flux1", "sd3": "sd3"}
SS_MODULE = {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}


def targets(transformer: Any) -> list[str]:
    """The transformer's ``Linear`` modules a LoRA adapts, sorted."""
    import torch

    return sorted(n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and TARGETS.match(n))


def layout_of(config: Any, family: str) -> str:
    """``network.layout``, with ``auto`` decided: kohya for Flux, diffusers for SD3."""
    layout = str(config.network.layout)
    if layout == "auto":
        return "kohya" if family == "flux" else "diffusers"
    return layout


def architecture(family: str, transformer_config: dict[str, Any]) -> str:
    """``modelspec.architecture`` of the LoRA, as kohya writes it: ``flux-1-dev/lora``, ``flux-1-schnell/lora``,
    ``stable-diffusion-3-medium/lora``, ``stable-diffusion-3.5-medium/lora``, ``stable-diffusion-3.5-large/lora``
    (``stable-diffusion-3/lora`` when the config is none of those)."""
    if family == "flux":
        return "flux-1-dev/lora" if transformer_config.get("guidance_embeds") else "flux-1-schnell/lora"
    layers, qk = transformer_config.get("num_layers"), transformer_config.get("qk_norm")
    if transformer_config.get("dual_attention_layers"):
        head = "stable-diffusion-3.5-medium"
    elif qk and layers == 38:
        head = "stable-diffusion-3.5-large"
    elif not qk and layers == 24:
        head = "stable-diffusion-3-medium"
    else:
        head = "stable-diffusion-3"
    return head + "/lora"


def fuse(parts: list[tuple[Any, Any, float]]) -> tuple[Any, Any, float]:
    """One LoRA for modules whose weights are row blocks of one weight: ``(down, up, alpha)`` per part
    (same rank and alpha) -> downs stacked, ups block-diagonal, alpha times the number of parts."""
    import torch

    down = torch.cat([d for d, _u, _a in parts], dim=0)
    up = torch.block_diag(*[u for _d, u, _a in parts])
    return down, up, parts[0][2] * len(parts)


class DiTLoRA(Method):
    """LoRA on a Flux/SD3 transformer (``base.unet``)."""

    def __init__(self, config: Any, base: Any):
        super().__init__(config, base)
        self.name = "lora"
        self.adapter = "lora"
        self.modules: list[str] = []
        self.table: dict[str, tuple[tuple[int, ...], str, tuple[str, ...]]] = {}
        self.transformer_config: dict[str, Any] = {}

    def prepare(self) -> list[dict[str, Any]]:
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        net, model = self.config.network, self.base.unet
        self.transformer_config = json.loads(json.dumps(dict(model.config), default=list))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.table = fam.diffusers_weights(shapes, self.base.family)
        self.modules = targets(model)
        if layout_of(self.config, self.base.family) == "kohya":
            self._kohya_groups(self.modules)  # refused now, not at the first save
        torch.manual_seed(self.config.train.seed)
        alpha: Any = net.alpha
        inject_adapter_in_model(LoraConfig(r=net.dim, lora_alpha=alpha, target_modules=self.modules,
                                           lora_dropout=net.dropout, init_lora_weights=True), model, adapter_name=ADAPTER)
        params = []
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.data = p.data.to(torch.float32)
                p.requires_grad_(True)
                params.append(p)
        return [{"params": params, "lr": component_lr(self.config, "unet"), "component": "unet"}]

    def _layer(self, module: str) -> Any:
        return self.base.unet.get_submodule(module)

    def trainable(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for module in self.modules:
            layer = self._layer(module)
            out[f"{module}.lora_down.weight"] = layer.lora_A[ADAPTER].weight
            out[f"{module}.lora_up.weight"] = layer.lora_B[ADAPTER].weight
        return out

    def parts(self) -> dict[str, tuple[Any, Any, float]]:
        """diffusers module -> ``(down, up, alpha)``, detached."""
        out = {}
        for module in self.modules:
            layer = self._layer(module)
            rank = layer.r[ADAPTER]
            out[module] = (layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach(),
                           float(layer.scaling[ADAPTER] * rank))
        return out

    def _kohya_groups(self, trained: list[str]) -> list[tuple[str, list[str]]]:
        """``(original weight path, its trained diffusers modules in row order)`` for the kohya layout.

        Raises:
            ConfigError: a fused original weight has only some of its modules trained, or a trained
                module has no original name.
        """
        have_all, out, done = set(trained), [], set()
        for path, (_shape, split, dpaths) in sorted(self.table.items()):
            have = [d for d in dpaths if d in have_all]
            if not have:
                continue
            if len(have) != len(dpaths) or split == "swap":
                raise ConfigError(None, f"{path} is one weight in the kohya layout but only {have} are trained",
                                  'Use network.layout = "diffusers"')
            out.append((path, list(dpaths)))
            done.update(have)
        left = sorted(have_all - done)
        if left:
            raise ConfigError(None, f"{left[0]} has no name in the kohya layout", 'Use network.layout = "diffusers"')
        return out

    def kohya_state(self) -> dict[str, Any]:
        """The network in kohya's original-key layout (fused where the original fuses); each alpha in
        float32 whatever the weights' dtype (``export``), since a fused alpha (parts x alpha, e.g. 3 x 101)
        may not fit bfloat16 exactly.

        Raises:
            ConfigError: as ``_kohya_groups`` (checked already in ``prepare``).
        """
        import torch

        parts, out = self.parts(), {}
        for path, dpaths in self._kohya_groups(list(parts)):
            down, up, alpha = parts[dpaths[0]] if len(dpaths) == 1 else fuse([parts[d] for d in dpaths])
            name = "lora_unet_" + path.replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return out

    def diffusers_state(self) -> dict[str, Any]:
        """The network in peft/diffusers keys, alpha / rank folded into ``lora_B``."""
        out = {}
        for module, (down, up, alpha) in self.parts().items():
            out[f"transformer.{module}.lora_A.weight"] = down
            out[f"transformer.{module}.lora_B.weight"] = up * (alpha / down.shape[0])
        return out

    def export(self, path: str, metadata: dict[str, str], dtype: Any, force: bool) -> Written:
        family = self.base.family
        layout = layout_of(self.config, family)
        tensors = self.kohya_state() if layout == "kohya" else self.diffusers_state()
        meta = {**metadata, **self.ss_metadata(),
                "modelspec.architecture": architecture(family, self.transformer_config)}
        return save_tensors(path, tensors, meta, dtype=dtype, force=force,
                            implementation=IMPLEMENTATION[family] if layout == "kohya" else None, fp32_alpha=True)

    def ss_metadata(self) -> dict[str, str]:
        """kohya's ``ss_*`` keys of the network and of the flow-matching settings, and ``modelkit.flow.*``
        keys that say exactly how the noise levels were drawn.

        ``ss_timestep_sampling`` is left out where kohya has no name for the settings (uniform timesteps
        with a shift: kohya's ``uniform`` has none); ``ss_network_module`` (kohya's ``networks.lora_flux``
        / ``lora_sd3``, whose own keys they are) is written for the kohya layout only.
        """
        from ..flow import fixed_shift, shift_mode

        net, flow, family = self.config.network, self.config.flow, self.base.family
        sched = dict(self.base.scheduler.config)
        mode = shift_mode(flow, sched)
        layout = layout_of(self.config, family)
        sampling = _kohya_sampling(flow.timestep_sampling, mode)
        out = {
            "ss_network_dim": str(net.dim), "ss_network_alpha": _num(net.alpha),
            "ss_network_args": "null", "ss_network_dropout": _num(net.dropout),
            "ss_base_model_version": SS_BASE[family], "ss_v2": "False", "ss_v_parameterization": "False",
            "ss_network_train_unet_only": "True", "ss_network_train_text_encoder_only": "False",
            "ss_unet_lr": _num(component_lr(self.config, "unet")), "ss_text_encoder_lr": "None",
            "ss_model_prediction_type": "raw", "ss_weighting_scheme": "none",
            "ss_logit_mean": _num(flow.logit_mean), "ss_logit_std": _num(flow.logit_std),
            "ss_discrete_flow_shift": _num(fixed_shift(flow, sched)) if mode == "fixed" else "None",
            "ss_guidance_scale": _num(flow.guidance_scale), "modelkit.flow.layout": layout,
            "modelkit.flow.timestep_sampling": flow.timestep_sampling, "modelkit.flow.shift_mode": mode,
        }
        if mode == "fixed":
            out["modelkit.flow.shift"] = _num(fixed_shift(flow, sched))
        if sampling is not None:
            out["ss_timestep_sampling"] = sampling
        if layout == "kohya":
            out["ss_network_module"] = SS_MODULE[family]
        return out


def _kohya_sampling(sampling: str, mode: str) -> str | None:
    """kohya's ``--timestep_sampling`` name for these settings (``flux_shift``, ``shift``, ``sigmoid``,
    ``uniform``), or None when kohya has none: its ``uniform`` and ``sigmoid`` draw unshifted timesteps,
    and its shifts apply to the logit-normal draw only."""
    if mode == "none":
        return sampling
    if sampling == "sigmoid":
        return "flux_shift" if mode == "resolution" else "shift"
    return None
