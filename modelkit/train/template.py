"""A commented TOML template of one method's defaults (``modelkit train METHOD --print-config``
without ``--config``).

The template is valid TOML; with ``model.path`` and ``dataset.path`` filled in, ``build_config``
gives exactly the defaults.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .config import DEFAULT_INIT_WORD, PATH_KEYS, Config, _resolved_optimizer
from .tomlio import _toml_value

#: The sections each method reads besides the common ones.
_OWN = {"lora": ("network", "flow"), "locon": ("network",), "ti": ("ti",), "hypernetwork": ("hypernetwork",),
        "dreambooth": ("dreambooth",)}
_METHOD_SECTIONS = {"network", "ti", "hypernetwork", "dreambooth", "flow"}

#: One-line notes for keys whose default needs saying.
_NOTES = {
    "model.path": "required: a .safetensors/.ckpt checkpoint or a local diffusers folder",
    "model.configs": "a folder laid out like a diffusers folder (unet/config.json, ...) replacing the shipped configs",
    "model.tokenizer": "a folder with vocab.json + merges.txt; default: the shipped CLIP BPE",
    "model.clip_skip": "use the n-th last text-encoder layer (1: the last)",
    "dataset.path": "required: images + same-name .txt/.caption; \"10_name\" folders repeat 10x",
    "dataset.cache_dir": "default: <output.dir>/.modelkit-latents",
    "network.conv_dim": "LoCon convolutions; 0: network.dim",
    "network.conv_alpha": "0: network.alpha",
    "network.unet_lr": "default: optimizer.lr",
    "network.text_encoder_lr": "default: optimizer.lr",
    "ti.init_word": f"a word close to the concept (dog, painting); empty: {DEFAULT_INIT_WORD!r}",
    "hypernetwork.sizes": "empty: the context width and every attention width",
    "dreambooth.class_path": "class images for the prior-preservation loss",
    "dreambooth.num_class_images": "fill class_path up to this many images before training; 0: use what is there",
    "optimizer.lr": "this method's usual rate (prodigy: 1; adafactor: unset, its relative step)",
    "optimizer.weight_decay": "unset: the optimizer's default",
    "optimizer.betas": "unset: the optimizer's default",
    "optimizer.eps": "unset: the optimizer's default",
    "optimizer.unet_lr": "default: lr",
    "optimizer.text_encoder_lr": "default: lr",
    "optimizer.args": "more constructor arguments, as kohya's optimizer_args: prodigy {d_coef = 2.0}",
    "dataset.masked_loss": "weigh the loss by NAME.mask.png or the image's alpha",
    "dataset.cache_text": "cache the frozen text encoders' outputs on disk",
    "dataset.text_cache_dir": "default: <output.dir>/.modelkit-text",
    "dataset.validation_split": "fraction of images held out for train.validation_every",
    "dataset.validation_path": "a folder of held-out images instead",
    "train.ema": "also write <name>-ema.safetensors",
    "train.ema_warmup": "the decay ramps up as (1 + step) / (10 + step) to ema_decay",
    "train.validation_every": "validation loss every N steps; 0: never",
    "train.validation_seed": "seeds the held-out split and the validation noise (not train.seed)",
    "output.wandb": "pip install 'modelkit[wandb]'",
    "train.max_steps": "optimizer steps; with epochs > 0 whichever comes first",
    "train.device": "auto (accelerate's choice) | cpu",
    "train.threads": "torch CPU threads; 0: the usable cores when on the CPU",
    "output.name": "empty: the method name",
    "output.force": "replace existing outputs (the CLI's --force)",
    "output.resume": "a state folder written by a save",
    "output.log_dir": "default: <output.dir>/logs",
    "output.log_every": "off a terminal, a progress line every N steps; 0: steps // 20",
    "network.layout": "Flux/SD3 LoRAs; auto: kohya for Flux, diffusers for SD3",
    "flow.shift": "0: the scheduler config's shift",
    "flow.guidance_scale": "Flux-dev (guidance_embeds) only",
    "flow.t5_max_length": "0: 512 for Flux-dev, 256 for Flux-schnell and SD3",
    "sample.every_steps": "0: never",
    "sample.width": "0: dataset.resolution",
    "sample.height": "0: dataset.resolution",
}


def defaults(method: str) -> Config:
    """The default config of ``method``, before the paths are given (so not validated).

    Raises:
        KeyError: an unknown method.
    """
    from dataclasses import replace

    config = Config(method)
    return replace(config, optimizer=_resolved_optimizer(config))


def render_template(method: str) -> str:
    """The commented TOML template of ``method``'s defaults.

    Args:
        method: one of ``METHODS``.

    Returns:
        TOML text: every key of the sections this method reads, with its default; unset keys are
        commented out.

    Example:
        >>> "[network]" in render_template("lora")
        True
    """
    config = defaults(method)
    lines = [f"# modelkit train {method}: the defaults. Fill in model.path and dataset.path, then run",
             f"#   modelkit train {method} --config THIS_FILE",
             "# Relative paths are taken from this file's folder; delete any key to keep its default.",
             f"method = {_toml_value(method)}"]
    for f in fields(config)[1:]:
        if f.name in _METHOD_SECTIONS and f.name not in _OWN[method]:
            continue
        section = getattr(config, f.name)
        doc = (type(section).__doc__ or "").strip().splitlines()[0].replace("``", "")
        lines += ["", f"# {doc}", f"[{f.name}]"]
        for key in fields(section):
            value: Any = getattr(section, key.name)
            notes = []
            choices = key.metadata.get("choices")
            if choices:
                notes.append(" | ".join(choices))
            note = _NOTES.get(f"{f.name}.{key.name}")
            if note:
                notes.append(note)
            comment = f"  # {'; '.join(notes)}" if notes else ""
            if value is None:
                example = '""' if (f.name, key.name) in PATH_KEYS else "0.0"
                lines.append(f"# {key.name} = {example}{comment or '  # not set'}")
            else:
                lines.append(f"{key.name} = {_toml_value(list(value) if isinstance(value, tuple) else value)}{comment}")
    return "\n".join(lines) + "\n"


__all__ = ["defaults", "render_template"]
