"""Flux.1 and SD3.x bases for training: a local diffusers folder, read by modelkit's safe reader.

The folder has the ``FluxPipeline`` layout (``transformer``, ``vae``, ``text_encoder`` = CLIP-L,
``text_encoder_2`` = T5, ``tokenizer``, ``tokenizer_2``, ``scheduler``) or the
``StableDiffusion3Pipeline`` one (CLIP-L, CLIP-G and T5 as ``text_encoder``, ``_2``, ``_3``). Every
weight goes through ``modelkit.load`` (``.safetensors``, or ``.bin`` through the pickle allow-list);
configs are JSON; the T5 tokenizer is read from its ``tokenizer.json`` or SentencePiece model, never
from a pickle. A single-file Flux/SD3 checkpoint (ComfyUI's layout, or a transformer alone) is
refused in one line: its text encoders and tokenizers are not all in it.

The ``BaseModel`` keeps the transformer in ``unet`` (so the loop treats both alike), ``prediction``
``flow`` and a ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError, FormatError
from .base import BaseModel, _diffusers_model, _fill, _Folder, _folder_weights, _user_folder, cast
from .config import ModelConfig
from .tokenizer import build_tokenizer, configs_root, pad_token_of

DIT_FAMILIES = ("flux", "sd3")
#: family -> (pipeline class, transformer class, text encoder folders).
LAYOUT = {
    "flux": ("FluxPipeline", "FluxTransformer2DModel", ("text_encoder", "text_encoder_2")),
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", ("text_encoder", "text_encoder_2", "text_encoder_3")),
}


def folder_family(path: str) -> str | None:
    """``flux`` or ``sd3`` when ``path`` is a diffusers folder of that family, else None."""
    if not os.path.isdir(path):
        return None
    folder = _user_folder(path)
    index = str((folder.json("model_index.json") or {}).get("_class_name", ""))
    transformer = str((folder.json("transformer", "config.json") or {}).get("_class_name", ""))
    for family, (pipe, cls, _encoders) in LAYOUT.items():
        if index.startswith(pipe) or transformer == cls:
            return family
    return None


def check_channels(cfg: ModelConfig, family: str) -> None:
    """Refuse a transformer that takes more than the noisy latents (Flux Fill, Canny, Depth: ``in_channels``
    384 or 128, the conditioning image's latents concatenated), which this trainer does not feed: Flux takes
    ``4 x`` the VAE's latent channels (2x2 patches), SD3 the latent channels themselves.

    Raises:
        ConfigError: as said, or a missing ``transformer``/``vae`` config.
    """
    configs = _user_folder(cfg.configs) if cfg.configs else _user_folder(cfg.path)
    raw = (_need(configs, "transformer").get("in_channels", 64 if family == "flux" else 16),  # diffusers' defaults
           _need(configs, "vae").get("latent_channels", 4))
    try:
        got, latent = int(raw[0]), int(raw[1])
    except (TypeError, ValueError):
        raise ConfigError(configs.label, f"transformer in_channels {raw[0]!r} or vae latent_channels {raw[1]!r} is "
                          "not a number", "Fix the folder's config.json files") from None
    want = 4 * latent if family == "flux" else latent
    if got != want:
        raise ConfigError(cfg.path, f"its transformer takes {got} input channels, not the {want} of plain {family} "
                          "latents (a Fill, Canny or Depth model conditions on an extra image, which training here "
                          "does not feed)", f"Train on the base {family} model's folder")


def refuse_single_file(path: str, family: str) -> None:
    """Raise the one-line refusal for a single-file Flux/SD3 base.

    Raises:
        ConfigError: always.
    """
    pipe = LAYOUT[family][0]
    raise ConfigError(path, f"is a single-file {family} checkpoint; training a {family} LoRA needs a local diffusers "
                      f"folder ({pipe} layout: transformer, vae, text encoders, tokenizers, scheduler)",
                      "Point model.path at that folder")


def load_dit(cfg: ModelConfig, family: str, dtype: Any) -> BaseModel:
    """The Flux/SD3 base in the diffusers folder ``cfg.path``, every module in eval mode and frozen.

    Raises:
        ConfigError: a component folder or config is missing.
        FormatError, UnsafeFileError: from the safe reader, or weights that do not fit the configs.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    check_channels(cfg, family)
    folder = _user_folder(cfg.path)
    configs = _user_folder(cfg.configs) if cfg.configs else folder
    _pipe, cls, encoder_dirs = LAYOUT[family]
    transformer = _diffusers_model(cls, _need(configs, "transformer"))
    _fill(transformer, _folder_weights(cfg.path, "transformer", dtype), "transformer", cfg.path)
    vae = _diffusers_model("AutoencoderKL", _need(configs, "vae"))
    _fill(vae, _folder_weights(cfg.path, "vae", dtype), "vae", cfg.path)
    encoders = []
    for sub in encoder_dirs:
        config = _need(configs, sub)
        is_t5 = "T5" in " ".join(str(a) for a in config.get("architectures") or ()) or "d_model" in config
        model = _t5_model(config) if is_t5 else _clip(config, family)
        state = _folder_weights(cfg.path, sub, dtype)
        if is_t5 and "shared.weight" in state and "encoder.embed_tokens.weight" not in state:
            state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in T5; often stored once
        _fill(model, state, sub, cfg.path)
        encoders.append(model)
    tokenizers = [_clip_tokenizer(cfg, i) for i in range(len(encoder_dirs) - 1)]
    tokenizers.append(_t5_tokenizer(cfg.path, "tokenizer_2" if family == "flux" else "tokenizer_3"))
    sched_cfg = {k: v for k, v in (folder.json("scheduler", "scheduler_config.json") or {}).items()
                 if not k.startswith("_")}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg)
    if dtype is not None:
        for m in (transformer, vae, *encoders):
            cast(m, dtype)
    for module in (transformer, vae, *encoders):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(family, "flow", transformer, vae, scheduler, encoders, tokenizers, cfg.path,
                     [f"diffusers {family} folder {cfg.path}"])


def _need(folder: _Folder, sub: str) -> dict[str, Any]:
    data = folder.json(sub, "config.json")
    if data is None:
        raise ConfigError(folder.label, f"has no {sub}/config.json", "A Flux/SD3 base is a complete diffusers folder "
                          "(transformer, vae, text_encoder..., tokenizer..., scheduler)")
    return data


def _clip(config: dict[str, Any], family: str) -> Any:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    projection = family == "sd3" or any("Projection" in str(a) for a in config.get("architectures") or ())
    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    with init_empty_weights():
        return model_cls(CLIPTextConfig(**fields))


def _t5_model(config: dict[str, Any]) -> Any:
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    with init_empty_weights():
        return T5EncoderModel(T5Config(**fields))


def _clip_tokenizer(cfg: ModelConfig, index: int) -> Any:
    """CLIP tokenizer ``index``: the folder's own, ``model.tokenizer``, or the shipped BPE."""
    sub = ("tokenizer", "tokenizer_2")[index]
    local = os.path.join(cfg.path, sub)
    pad = pad_token_of(_Folder(_as_path(local), local)) if os.path.isdir(local) else \
        pad_token_of(configs_root().joinpath("sd2" if index else "sd1", "tokenizer"))
    if cfg.tokenizer:
        return build_tokenizer(cfg.tokenizer, pad)
    return build_tokenizer(local if os.path.isfile(os.path.join(local, "vocab.json")) else None, pad)


def _as_path(path: str) -> Any:
    from pathlib import Path

    return Path(path)


def _t5_tokenizer(root: str, sub: str) -> Any:
    """The T5 tokenizer from ``tokenizer.json`` (or ``spiece.model``); never a pickle, never a hub."""
    folder = os.path.join(root, sub)
    if not (os.path.isfile(os.path.join(folder, "tokenizer.json")) or os.path.isfile(os.path.join(folder, "spiece.model"))):
        raise ConfigError(root, f"has no {sub}/tokenizer.json or {sub}/spiece.model (the T5 tokenizer)",
                          "Copy the tokenizer folder of the diffusers model into the base folder")
    import transformers

    cls = getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer  # 5.x: one class
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FormatError(folder, f"is not a usable T5 tokenizer ({exc})") from None


__all__ = ["DIT_FAMILIES", "LAYOUT", "check_channels", "folder_family", "load_dit", "refuse_single_file"]
