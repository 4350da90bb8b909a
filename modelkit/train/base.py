"""The base model, built fully offline: shipped configs + weights read by modelkit's safe reader.

Two sources:

* a single-file LDM checkpoint (``.safetensors`` or ``.ckpt``): ``modelkit.detect`` names the base
  (SD1, SD2 eps/v, SDXL), ``modelkit.load`` reads the tensors (pickles only through the allow-list),
  and diffusers' own single-file conversion functions rename them to diffusers keys;
* a local diffusers folder: each component's ``config.json`` and its weights, again read by
  ``modelkit.load`` (``.safetensors`` or ``.bin``), never by ``torch.load``.

A Flux.1 or SD3.x diffusers folder is built by ``dit_base`` (transformer, VAE, CLIP and T5 encoders).

The configs for SD1.x, SD2.x and SDXL are package data (``configs/<base>/``); ``model.configs`` may
point at another folder of the same layout. Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, FormatError, InputNotFoundError
from .config import ModelConfig
from .tokenizer import build_tokenizer, configs_root, pad_token_of

#: base name -> (family, prediction or None when the base does not fix it)
BASE_FAMILY = {"sd1": ("sd1", "epsilon"), "sd2": ("sd2", "epsilon"), "sd2-v": ("sd2", "v_prediction"),
               "sdxl": ("sdxl", "epsilon")}
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")


@dataclass
class BaseModel:
    """The pieces a training loop needs.

    Attributes:
        family: ``sd1``, ``sd2``, ``sdxl``, ``flux`` or ``sd3``.
        prediction: ``epsilon``, ``v_prediction`` or ``flow`` (Flux, SD3).
        unet, vae, scheduler: diffusers objects (the scheduler is a ``DDPMScheduler``; Flux/SD3: ``unet``
            is the transformer and the scheduler a ``FlowMatchEulerDiscreteScheduler``).
        text_encoders, tokenizers: one each (SD1/SD2), two (SDXL), CLIP-L + T5 (Flux) or CLIP-L,
            CLIP-G + T5 (SD3).
        source: the checkpoint file or folder.
        notes: what was assumed or ignored while loading.
    """

    family: str
    prediction: str
    unet: Any
    vae: Any
    scheduler: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def unet_config(self) -> dict[str, Any]:
        return dict(self.unet.config)


class _Folder:
    """A folder of configs: a user path or the shipped ``Traversable``."""

    def __init__(self, root: Any, label: str):
        self.root = root
        self.label = label

    def json(self, *parts: str) -> dict[str, Any] | None:
        node = self.root.joinpath(*parts)
        if not node.is_file():
            return None
        try:
            data = json.loads(node.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise FormatError(f"{self.label}/{'/'.join(parts)}", f"is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise FormatError(f"{self.label}/{'/'.join(parts)}", "is not a JSON object")
        return data

    def need(self, *parts: str) -> dict[str, Any]:
        data = self.json(*parts)
        if data is None:
            raise ConfigError(self.label, f"has no {'/'.join(parts)}", "Point model.configs at a folder laid out like "
                              "a diffusers model (unet/config.json, vae/config.json, text_encoder/config.json, ...)")
        return data


def _user_folder(path: str) -> _Folder:
    from pathlib import Path

    if not os.path.isdir(path):
        raise InputNotFoundError(path, "no such folder")
    return _Folder(Path(path), path)


def _family_from_keys(keys: Any) -> str | None:
    """The SD family from where the text encoders live in an LDM checkpoint."""
    names = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in names):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in names):
        return "sd1"
    return None


def load_base(cfg: ModelConfig, dtype: Any = None) -> BaseModel:
    """Build the base model that ``cfg`` names, offline.

    Args:
        cfg: the ``[model]`` section.
        dtype: torch dtype for the weights (``None``: as stored).

    Returns:
        A ``BaseModel`` with every module in eval mode and ``requires_grad`` off.

    Raises:
        InputNotFoundError: ``cfg.path`` does not exist.
        ConfigError: the base cannot be decided (SD2 eps vs v) or a config is missing.
        FormatError, UnsafeFileError: from the safe reader, or weights that do not fit the configs.
    """
    path = cfg.path
    if not os.path.exists(path):
        raise InputNotFoundError(path, "no such checkpoint file or diffusers folder")
    dit = _dit_family(cfg)
    if dit is not None:
        from .dit_base import load_dit

        return load_dit(cfg, dit, dtype)
    if os.path.isdir(path):
        family, pred = _folder_base(cfg)
        base = _load_folder(cfg, family, pred, dtype)
    else:
        base = _file_base(cfg, dtype)
    for module in (base.unet, base.vae, *base.text_encoders):
        module.requires_grad_(False)
        module.eval()
    return base


def _dit_family(cfg: ModelConfig) -> str | None:
    """``flux``/``sd3`` for a Flux/SD3 diffusers folder (``dit_base``); refuses a single-file one, and a
    ``model.base`` of flux/sd3 on anything else."""
    from .dit_base import folder_family, refuse_single_file

    if os.path.isdir(cfg.path):
        family = folder_family(cfg.path)
    else:
        from .. import detect

        family = detect(cfg.path).base
        if family in ("flux", "sd3"):
            refuse_single_file(cfg.path, family)
        family = None
    if cfg.base in ("flux", "sd3") and family != cfg.base:
        raise ConfigError(cfg.path, f"model.base = {cfg.base!r} but this is not a diffusers {cfg.base} folder",
                          "Point model.path at a FluxPipeline/StableDiffusion3Pipeline folder, or fix model.base")
    if family is not None and cfg.base not in ("auto", family):
        raise ConfigError(cfg.path, f"is a {family} folder, but model.base = {cfg.base!r}", f'Set model.base = "{family}"')
    return family


def _configs_for(cfg: ModelConfig, family: str, prediction: str | None) -> _Folder:
    if cfg.configs:
        return _user_folder(cfg.configs)
    name = "sd2-v" if family == "sd2" and prediction == "v_prediction" else family
    return _Folder(configs_root().joinpath(name), f"<shipped configs {name}>")


def _choose(cfg: ModelConfig, family: str | None, prediction: str | None, where: str) -> tuple[str, str | None]:
    """Apply ``model.base`` and ``model.prediction`` over what detection found."""
    if cfg.base != "auto":
        family, fixed = BASE_FAMILY[cfg.base]
        prediction = fixed if cfg.base in ("sd2", "sd2-v") else (prediction or fixed)
    if cfg.prediction != "auto":
        prediction = cfg.prediction
    if family is None:
        raise ConfigError(where, "the base model (SD1, SD2 or SDXL) could not be detected",
                          'Set model.base = "sd1", "sd2", "sd2-v" or "sdxl"')
    return family, prediction


def _file_base(cfg: ModelConfig, dtype: Any) -> BaseModel:
    from .. import detect, load

    det = detect(cfg.path)
    notes = [f"detected {det.kind} base={det.base} variant={det.variant}"]
    family = det.base if det.base in ("sd1", "sd2", "sdxl") else None
    pred = {"v": "v_prediction", "eps": "epsilon"}.get(str(det.variant.get("prediction")))
    if det.kind not in ("checkpoint", "unknown"):
        raise FormatError(cfg.path, f"is a {det.kind}, not a full checkpoint", "Train on a full SD checkpoint")
    state = load(cfg.path, dtype=dtype, dequantize=True)
    if family is None:
        family = _family_from_keys(state)
        if family:
            notes.append(f"family {family} from the text-encoder key prefixes (shapes are not a known base)")
    family, pred = _choose(cfg, family, pred, cfg.path)
    folder = _configs_for(cfg, family, pred)
    if pred is None:
        pred = str((folder.json("scheduler", "scheduler_config.json") or {}).get("prediction_type") or "")
        if family == "sd2" and not cfg.configs:
            raise ConfigError(cfg.path, "SD2 eps and v-prediction checkpoints have the same shapes and nothing in "
                              "this file says which it is", 'Set model.base = "sd2-v" (768-v models) or "sd2"')
    from . import convert_ldm

    parts = convert_ldm.convert(state, family, folder.need("unet", "config.json"), folder.need("vae", "config.json"))
    unet = _diffusers_model("UNet2DConditionModel", folder.need("unet", "config.json"))
    _fill(unet, parts.unet, "unet", cfg.path)
    vae = _diffusers_model("AutoencoderKL", folder.need("vae", "config.json"))
    _fill(vae, parts.vae, "vae", cfg.path)
    encoders = []
    for i, sub in enumerate(_encoder_folders(family)):
        te = _clip_model(folder.need(sub, "config.json"))
        _fill(te, convert_ldm.text_encoder(state, family, i, te), sub, cfg.path)
        encoders.append(te)
    del state
    return _assemble(cfg, family, pred or "epsilon", folder, unet, vae, encoders, notes, dtype)


def _encoder_folders(family: str) -> tuple[str, ...]:
    return ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)


def _folder_base(cfg: ModelConfig) -> tuple[str, str | None]:
    folder = _user_folder(cfg.path)
    index = folder.json("model_index.json") or {}
    unet = folder.need("unet", "config.json")
    family: str | None = None
    if "XL" in str(index.get("_class_name", "")) or folder.json("text_encoder_2", "config.json"):
        family = "sdxl"
    elif unet.get("cross_attention_dim") == 1024:
        family = "sd2"
    elif folder.json("text_encoder", "config.json") is not None:
        family = "sd1"
    sched = folder.json("scheduler", "scheduler_config.json") or {}
    pred = sched.get("prediction_type")
    return _choose(cfg, family, pred if isinstance(pred, str) else None, cfg.path)


def _load_folder(cfg: ModelConfig, family: str, pred: str | None, dtype: Any) -> BaseModel:
    folder = _user_folder(cfg.path)
    configs = _user_folder(cfg.configs) if cfg.configs else folder
    unet = _diffusers_model("UNet2DConditionModel", configs.need("unet", "config.json"))
    _fill(unet, _folder_weights(cfg.path, "unet", dtype), "unet", cfg.path)
    vae = _diffusers_model("AutoencoderKL", configs.need("vae", "config.json"))
    _fill(vae, _folder_weights(cfg.path, "vae", dtype), "vae", cfg.path)
    encoders = []
    for sub in _encoder_folders(family):
        te = _clip_model(configs.need(sub, "config.json"))
        _fill(te, _folder_weights(cfg.path, sub, dtype), sub, cfg.path)
        encoders.append(te)
    return _assemble(cfg, family, pred or "epsilon", configs, unet, vae, encoders, [f"diffusers folder {cfg.path}"],
                     dtype)


def _folder_weights(root: str, sub: str, dtype: Any) -> dict[str, Any]:
    """The tensors of one component folder, read by modelkit (single or sharded files)."""
    from .. import load

    folder = os.path.join(root, sub)
    for name in _WEIGHT_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return load(os.path.join(folder, name), dtype=dtype, dequantize=True)
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            out: dict[str, Any] = {}
            for shard in shards:
                out.update(load(os.path.join(folder, os.path.basename(shard)), dtype=dtype, dequantize=True))
            return out
    raise FormatError(folder, "has no weights (diffusion_pytorch_model.safetensors, model.safetensors or .bin)")


def _assemble(cfg: ModelConfig, family: str, pred: str, folder: _Folder, unet: Any, vae: Any, encoders: list[Any],
              notes: list[str], dtype: Any) -> BaseModel:
    from diffusers import DDPMScheduler

    sched_cfg = folder.json("scheduler", "scheduler_config.json")
    if sched_cfg is None:
        shipped = "sd2-v" if family == "sd2" and pred == "v_prediction" else family
        sched_cfg = json.loads(configs_root().joinpath(shipped, "scheduler", "scheduler_config.json").read_text())
    sched_cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    sched_cfg["prediction_type"] = pred
    scheduler = DDPMScheduler.from_config(sched_cfg)
    tokenizers = []
    for i, sub in enumerate(("tokenizer", "tokenizer_2")[: len(encoders)]):
        shipped_cfg = configs_root().joinpath("sd2" if (family == "sd2" or i == 1) else "sd1", "tokenizer")
        pad = pad_token_of(shipped_cfg)
        local = os.path.join(cfg.path, sub) if os.path.isdir(cfg.path) else None
        if cfg.tokenizer:
            tok_dir: str | None = cfg.tokenizer
        elif local and os.path.isfile(os.path.join(local, "vocab.json")):
            tok_dir = local
        else:
            tok_dir = None
        tokenizers.append(build_tokenizer(tok_dir, pad))
    if dtype is not None:
        for m in (unet, vae, *encoders):
            cast(m, dtype)
    return BaseModel(family, pred, unet, vae, scheduler, encoders, tokenizers, cfg.path, notes)


def cast(module: Any, dtype: Any) -> Any:
    """``module.to(dtype)`` only where a parameter has another dtype (diffusers warns on every cast)."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


def _diffusers_model(name: str, config: dict[str, Any]) -> Any:
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, name)
    with init_empty_weights():
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _clip_model(config: dict[str, Any]) -> Any:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if "Projection" in str(config.get("_class_name", "")) or any(
        "Projection" in str(a) for a in config.get("architectures") or ()) else CLIPTextModel
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    with init_empty_weights():
        return cls(CLIPTextConfig(**fields))


def _fill(model: Any, state: dict[str, Any], what: str, source: str) -> None:
    """Load ``state`` into a model built on the meta device; every parameter must be filled.

    Raises:
        FormatError: weights are missing or have the wrong shape.
    """
    own = model.state_dict()
    state = _fit_prefix(own, state)
    for key, tensor in state.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise FormatError(source, f"{what} weight {key!r} has shape {list(tensor.shape)}, the {what} config "
                              f"expects {list(own[key].shape)}", "Check model.base / model.configs")
    result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k in own and own[k].is_meta]
    if missing:
        raise FormatError(source, f"{len(missing)} {what} weights are missing (first: {missing[0]!r})",
                          "The file is not a full checkpoint of this base; check model.base / model.configs")


def _fit_prefix(own: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Add or strip ``text_model.`` so CLIP keys match the installed transformers' layout."""
    pre = "text_model."
    own_pre = any(k.startswith(pre) for k in own)
    state_pre = any(k.startswith(pre) for k in state)
    if state_pre and not own_pre:
        return {k[len(pre):] if k.startswith(pre) else k: v for k, v in state.items()}
    if own_pre and not state_pre:
        return {pre + k if pre + k in own else k: v for k, v in state.items()}
    return state
