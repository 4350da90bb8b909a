"""The training config: typed, frozen dataclasses loaded from TOML, with dotted ``--set`` overrides.

A config file has one table per section (``[model]``, ``[dataset]``, ``[network]``, ``[ti]``,
``[optimizer]``, ``[scheduler]``, ``[train]``, ``[output]``, ``[sample]``); every key is a plain value, never a
dotted class name. Unknown keys, wrong types and out-of-range values are refused with one line that
names the key. Relative paths are taken from the config file's folder.

This module needs only the standard library (``tomllib``, or ``tomli`` on Python 3.10).
"""

from __future__ import annotations

import math
import os
import re
import stat
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

from ..errors import ConfigError
from .tomlio import parse_override, read_toml, render_toml

METHODS = ("lora", "locon", "ti", "hypernetwork", "dreambooth")
BASES = ("auto", "sd1", "sd2", "sd2-v", "sdxl", "flux", "sd3")


def _choice(*values: str) -> Any:
    return {"choices": values}


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the base model, fully offline.

    Attributes:
        path: a single-file ``.safetensors``/``.ckpt`` checkpoint, or a local diffusers folder.
        base: ``auto`` (detected from the file), ``sd1``, ``sd2`` (eps), ``sd2-v``, ``sdxl``, or ``flux`` /
            ``sd3`` (a diffusers ``FluxPipeline`` / ``StableDiffusion3Pipeline`` folder; ``lora`` only).
        configs: a folder laid out like a diffusers folder (``unet/config.json``, ...) whose configs
            replace the shipped ones (custom or tiny models).
        tokenizer: a folder with ``vocab.json`` and ``merges.txt``; default: the shipped CLIP BPE.
        prediction: ``auto`` (from the base), ``epsilon`` or ``v_prediction``.
        clip_skip: use the n-th last text-encoder layer (SD1/SD2; 1 is the last).
    """

    path: str = ""
    base: str = field(default="auto", metadata=_choice(*BASES))
    configs: str | None = None
    tokenizer: str | None = None
    prediction: str = field(default="auto", metadata=_choice("auto", "epsilon", "v_prediction"))
    clip_skip: int = 1


@dataclass(frozen=True)
class DatasetConfig:
    """``[dataset]``: images with same-name captions; kohya ``N_name`` folders repeat N times.

    Attributes:
        cache_latents: encode every image with the VAE once, before training, and keep the latent
            distribution (mean and std) on disk as ``.safetensors``; each entry is keyed by the
            image's path, size and mtime, its bucket, the flip and the VAE's weights, so a change to
            any of them rebuilds it. With ``flip`` both orientations are cached.
        cache_dir: where the latent cache lives; default ``<output.dir>/.modelkit-latents``. Several
            runs (or datasets) may share one folder.
        masked_loss: weigh the loss by a mask: ``NAME.mask.png`` beside the image (white: trained,
            black: ignored), else the image's alpha channel (kohya's ``alpha_mask``); resized and
            cropped like the image, then area-downsampled to the latent size. Without it an image
            with transparency is skipped (a fully opaque one is simply RGB).
        cache_text: keep the text encoders' outputs for each caption on disk (``.safetensors``,
            atomic), keyed by the caption, the text encoders' weights, the tokenizer and clip skip;
            only when no text encoder is trained.
        text_cache_dir: where that cache lives; default ``<output.dir>/.modelkit-text``.
        validation_split: hold out this fraction of the images (chosen by ``train.seed``) for the
            validation loss; validation_path: a folder of held-out images instead.
    """

    path: str = ""
    resolution: int = 512
    bucketing: bool = True
    bucket_step: int = 64
    min_bucket: int = 256
    max_bucket: int = 1024
    repeats: int = 1
    caption_extensions: tuple[str, ...] = (".txt", ".caption")
    default_caption: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    flip: bool = False
    min_image_size: int = 64
    cache_latents: bool = False
    cache_dir: str | None = None
    masked_loss: bool = False
    cache_text: bool = False
    text_cache_dir: str | None = None
    validation_split: float = 0.0
    validation_path: str | None = None


@dataclass(frozen=True)
class NetworkConfig:
    """``[network]``: LoRA/LoCon shape. ``conv_dim``/``conv_alpha`` (LoCon) default to ``dim``/``alpha``.

    Attributes:
        layout: the key layout of a Flux/SD3 LoRA: ``kohya`` (the original BFL/Stability module names,
            ``lora_unet_double_blocks_0_img_attn_qkv``, with fused ``qkv``/``linear1``), ``diffusers``
            (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, alpha folded into the
            weights) or ``auto``: ``kohya`` for Flux, ``diffusers`` for SD3 (the only SD3 layout
            diffusers' ``load_lora_weights`` reads). SD1/SD2/SDXL LoRAs are always kohya's.
    """

    dim: int = 8
    alpha: float = 4.0
    conv_dim: int = 0
    conv_alpha: float = 0.0
    dropout: float = 0.0
    train_unet: bool = True
    train_text_encoder: bool = False
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    layout: str = field(default="auto", metadata=_choice("auto", "kohya", "diffusers"))


@dataclass(frozen=True)
class TIConfig:
    """``[ti]``: textual inversion. ``token`` gets ``vectors`` new embeddings initialised from ``init_word``.

    Attributes:
        init_word: a word close to the concept (``dog``, ``painting``); its embedding is where the new
            vectors start. Empty: ``DEFAULT_INIT_WORD``, and the CLI says so.
    """

    token: str = "<concept>"
    init_word: str = ""
    vectors: int = 1
    prepend: bool = True


@dataclass(frozen=True)
class HypernetworkConfig:
    """``[hypernetwork]``: A1111's structure. ``sizes`` empty: the context width and every attention width."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str = field(default="linear", metadata=_choice(
        "linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "gelu", "mish", "silu", "softsign"))
    layer_norm: bool = False
    dropout: bool = False
    last_layer_dropout: bool = False
    activate_output: bool = False
    weight_init: str = field(default="Normal", metadata=_choice(
        "Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"))
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class DreamBoothConfig:
    """``[dreambooth]``: full UNet fine-tuning; class images (``class_path``) add a prior-preservation loss.

    Attributes:
        num_class_images: when ``class_path`` holds fewer usable images, the base model generates
            the rest from ``class_prompt`` before training (``class-NNNNNN.png`` + ``.txt``; seeds
            from ``train.seed`` and the image number), with ``class_steps`` steps of the
            ``[sample] sampler`` at ``class_guidance_scale``, ``dataset.resolution`` square. 0: use
            what is there.
    """

    class_path: str | None = None
    class_prompt: str = ""
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    num_class_images: int = 0
    class_steps: int = 30
    class_guidance_scale: float = 7.5
    class_negative_prompt: str = ""


@dataclass(frozen=True)
class OptimizerConfig:
    """``[optimizer]``: one of ``modelkit.train.optim.OPTIMIZERS``.

    Attributes:
        lr: the learning rate; unset: the method's usual one (``DEFAULT_LR``), or for the LR-free
            optimizers their documented value (Prodigy 1.0; Adafactor none: its relative step).
        weight_decay, betas, eps: unset: the optimizer's documented defaults.
        unet_lr, text_encoder_lr: the rate of the UNet's / text encoders' parameter groups; unset:
            ``lr`` (LoRA: ``network.unet_lr``/``text_encoder_lr`` first).
        args: more keyword arguments of the optimizer's constructor (``[optimizer.args]``, what
            kohya's ``optimizer_args`` gives: Prodigy's ``d_coef``, Adafactor's flags ...): plain
            values or arrays of them, checked against the constructor's parameters before
            anything loads; ``lr``, ``betas``, ``eps`` and ``weight_decay`` have their own keys.
    """

    name: str = field(default="adamw", metadata=_choice("adamw", "adamw8bit", "prodigy", "lion", "lion8bit",
                                                        "adafactor"))
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    max_grad_norm: float = 1.0
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerConfig:
    """``[scheduler]``: the learning-rate schedule, after ``warmup_steps`` of linear warm-up."""

    name: str = field(default="constant", metadata=_choice(
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"))
    warmup_steps: int = 0
    cycles: int = 1
    power: float = 1.0


@dataclass(frozen=True)
class TrainingConfig:
    """``[train]``: steps, batch, precision and the loss options.

    ``max_steps`` counts optimizer steps; with ``epochs`` > 0 training stops at whichever comes first.

    Attributes:
        threads: torch's CPU threads (``torch.set_num_threads``) for the run; 0: on the CPU, the cores
            this process may use (shared among the processes of a multi-process launch), elsewhere
            torch's own choice.
        ema: keep an exponential moving average of the trained weights, written beside each output
            as ``<name>-ema.safetensors`` (same layout) and kept in the resume state.
        ema_decay: ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.
        validation_seed: seeds the held-out split (``dataset.validation_split``) and the validation
            noise, apart from ``seed``, so validation curves of runs with other seeds compare.
        ema_warmup: the decay is ``min(ema_decay, (1 + t) / (10 + t))`` at optimizer step ``t`` (as
            diffusers' ``EMAModel``), so a short run's average is not mostly its starting values.
        validation_every: every this many steps, the loss on the held-out images
            (``dataset.validation_split`` or ``validation_path``) with fixed noise and timesteps; 0: never.
    """

    max_steps: int = 1000
    epochs: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    mixed_precision: str = field(default="no", metadata=_choice("no", "fp16", "bf16"))
    gradient_checkpointing: bool = False
    attention: str = field(default="sdpa", metadata=_choice("sdpa", "eager"))
    seed: int = 0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    device: str = "auto"
    threads: int = 0
    ema: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = True
    validation_seed: int = 0
    validation_every: int = 0


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: where and how often to write. ``resume`` names a state folder written by a save.

    Attributes:
        tensorboard: write TensorBoard logs (loss, learning rate, steps/s, sample images) to
            ``log_dir``; needs ``pip install tensorboard``.
        log_dir: the TensorBoard folder; default ``<output.dir>/logs``.
        log_every: when stderr is not a terminal, the CLI prints a progress line every this many
            steps (and after the last); 0: ``max(1, steps // 20)``.
        wandb: also log to Weights & Biases (``pip install 'modelkit[wandb]'``); ``WANDB_MODE``
            (offline, disabled) is honoured. wandb_project: its project name.
    """

    dir: str = "output"
    name: str = ""
    save_every_steps: int = 0
    save_every_epochs: int = 0
    save_state: bool = True
    dtype: str = field(default="float16", metadata=_choice("float16", "bfloat16", "float32"))
    force: bool = False
    resume: str | None = None
    tensorboard: bool = False
    log_dir: str | None = None
    log_every: int = 0
    wandb: bool = False
    wandb_project: str = "modelkit"


@dataclass(frozen=True)
class FlowConfig:
    """``[flow]``: flow matching for Flux and SD3 bases (ignored by SD1/SD2/SDXL).

    A timestep ``u`` in (0, 1) is drawn per image, then shifted to the noise level ``sigma``; the
    model sees ``(1 - sigma) * latents + sigma * noise`` and learns ``noise - latents``.

    Attributes:
        timestep_sampling: ``sigmoid`` (logit-normal: ``u = sigmoid(logit_mean + logit_std * N(0, 1))``,
            as SD3's paper and kohya's ``sigmoid``) or ``uniform``.
        logit_mean, logit_std: the logit-normal's mean and standard deviation.
        shift_mode: ``fixed``: ``sigma = shift * u / (1 + (shift - 1) * u)``; ``resolution``: Flux's
            resolution-dependent shift, ``sigma = e^mu / (e^mu + 1/u - 1)`` with ``mu`` linear in the
            number of image tokens (``base_shift`` at ``base_image_seq_len``, ``max_shift`` at
            ``max_image_seq_len``, from the base's scheduler config); ``none``: ``sigma = u``;
            ``auto``: ``resolution`` when the scheduler config has ``use_dynamic_shifting`` (Flux-dev),
            else ``fixed``.
        shift: the fixed shift; 0: the scheduler config's ``shift`` (SD3: 3.0).
        guidance_scale: the guidance the transformer is given during training when its config has
            ``guidance_embeds`` (Flux-dev); otherwise not used.
        t5_max_length: T5 tokens per caption; 0: 512 for Flux-dev, 256 for Flux-schnell and SD3.
    """

    timestep_sampling: str = field(default="sigmoid", metadata=_choice("sigmoid", "uniform"))
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift_mode: str = field(default="auto", metadata=_choice("auto", "fixed", "resolution", "none"))
    shift: float = 0.0
    guidance_scale: float = 1.0
    t5_max_length: int = 0


SAMPLERS = ("ddim", "euler", "euler_a", "dpm++")


@dataclass(frozen=True)
class SampleConfig:
    """``[sample]``: images from fixed prompts every ``every_steps`` optimizer steps (0: never).

    Each prompt gives one PNG, ``<output.dir>/samples/<name>-step<NNNNNN>-<II>.png`` (``II``: the
    prompt's index, two digits), made
    by the diffusers pipeline of the base from the modules being trained (the LoRA, embedding or
    hypernetwork in effect), with its own generator (``seed`` + prompt index): the training's random
    state is left exactly as it was.

    Attributes:
        at_start: also sample before the first step (step 0: the base as it is, for comparison);
            not on a resume.
        width, height: image size in pixels, multiples of 8; 0: ``dataset.resolution``.
        sampler: the scheduler, built from the base's scheduler config.
    """

    every_steps: int = 0
    at_start: bool = False
    prompts: tuple[str, ...] = ()
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.0
    seed: int = 0
    width: int = 0
    height: int = 0
    sampler: str = field(default="ddim", metadata=_choice(*SAMPLERS))

    @property
    def enabled(self) -> bool:
        """Whether this run makes any sample images."""
        return bool(self.every_steps or self.at_start)


@dataclass(frozen=True)
class Config:
    """The whole resolved config of one training run."""

    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    ti: TIConfig = field(default_factory=TIConfig)
    hypernetwork: HypernetworkConfig = field(default_factory=HypernetworkConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (tuples as lists), in section order."""
        out: dict[str, Any] = {"method": self.method}
        for f in fields(self)[1:]:
            section = getattr(self, f.name)
            out[f.name] = {k.name: _plain(getattr(section, k.name)) for k in fields(section)}
        return out


SECTIONS: dict[str, type[Any]] = {f.name: f.default_factory for f in fields(Config)[1:]}  # type: ignore[misc]
#: Path-valued keys, resolved against the config file's folder.
PATH_KEYS = {("model", "path"), ("model", "configs"), ("model", "tokenizer"), ("dataset", "path"),
             ("output", "dir"), ("output", "resume"), ("dreambooth", "class_path"), ("dataset", "cache_dir"),
             ("output", "log_dir"), ("dataset", "text_cache_dir"), ("dataset", "validation_path")}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def build_config(method: str, data: Mapping[str, Any], overrides: Iterable[str] = (),
                 base_dir: str | None = None, source: str | None = None) -> Config:
    """Build and validate a ``Config`` from parsed TOML ``data`` and ``--set`` overrides.

    Args:
        method: one of ``METHODS``.
        data: the parsed file (sections of plain values); a top-level ``method`` key is allowed
            and must then agree with ``method``.
        overrides: ``SECTION.KEY=VALUE`` strings, applied after the file.
        base_dir: folder that relative paths are taken from (default: the current folder).
        source: the file name, for messages.

    Returns:
        The frozen config.

    Raises:
        ConfigError: an unknown section or key, a wrong type or an out-of-range value.
    """
    if method not in METHODS:
        raise ConfigError(source, f"unknown method {method!r}", f"Use one of {', '.join(METHODS)}")
    tables: dict[str, dict[str, Any]] = {}
    for name, value in data.items():
        if name == "method":
            if value != method:
                raise ConfigError(source, f"key method: the file says {value!r}, the command says {method!r}")
            continue
        if name not in SECTIONS:
            raise ConfigError(source, f"unknown section [{name}]", f"Known sections: {', '.join(SECTIONS)}")
        if not isinstance(value, Mapping):
            raise ConfigError(source, f"key {name}: expected a table [{name}], got {_tname(value)}")
        tables[name] = {k: (v, source) for k, v in value.items()}
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise ConfigError(None, f"--set {key}: unknown section {section!r}", f"Known sections: {', '.join(SECTIONS)}")
        table, _, sub = name.partition(".")
        if sub:  # --set optimizer.args.d_coef=2: one key of a table-valued key
            was, where = tables.setdefault(section, {}).get(table, ({}, "--set"))
            if not isinstance(was, Mapping):
                raise ConfigError(None, f"--set {key}: {section}.{table} is not a table")
            _coerce_table(f"{section}.{table}", {sub: value}, "--set")  # its own mistakes are --set's
            tables[section][table] = ({**was, sub: value}, where)  # the file's keys stay the file's
            continue
        tables.setdefault(section, {})[name] = (value, "--set")
    built = {}
    for section, cls in SECTIONS.items():
        given = tables.get(section, {})
        known = {f.name: f for f in fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for name, (raw, where) in given.items():
            if name not in known:
                raise ConfigError(where, f"unknown key {section}.{name}", f"Known keys of [{section}]: {', '.join(known)}")
            value = _coerce(f"{section}.{name}", raw, hints[name], where)
            choices = known[name].metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(where, f"key {section}.{name}: {value!r} is not one of {', '.join(choices)}")
            if (section, name) in PATH_KEYS and isinstance(value, str) and value and base_dir:
                value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
            values[name] = value
        built[section] = cls(**values)
    config = Config(method, **built)
    check(config, source)
    return config


#: A TOML config larger than this is not a config file.
MAX_CONFIG_BYTES = 16 << 20


def load_config(path: str | os.PathLike[str] | None, method: str, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML config file (or none) and apply overrides.

    Raises:
        ConfigError: the file cannot be read or parsed, or ``build_config`` refuses it.
    """
    if path is None:
        return build_config(method, {}, overrides, os.getcwd())
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise ConfigError(p, f"cannot be read ({exc.strerror or exc})", "Check the --config path") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
        raise ConfigError(p, "is not a regular file", "Pass a .toml file with --config")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(p, f"is {st.st_size:,} bytes, too big for a config file", "Pass a .toml file with --config")
    try:
        data = read_toml(p)
    except OSError as exc:
        raise ConfigError(p, f"cannot be read ({exc.strerror or exc})", "Check the --config path") from None
    except ValueError as exc:
        raise ConfigError(p, f"is not valid TOML ({exc})", "Fix the syntax") from None
    return build_config(method, data, overrides, os.path.dirname(os.path.abspath(p)), p)


def _tname(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _coerce(key: str, value: Any, hint: Any, where: str | None) -> Any:
    """Check ``value`` against the annotation ``hint`` (int, float, bool, str, X | None, tuples)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            return None
        return _coerce(key, value, args[0], where)
    if origin is tuple:
        parts = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) and parts[-1] is Ellipsis:
            value = [value]  # one value where an array is expected: an array of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"key {key}: expected an array, got {_tname(value)}")
        if parts[-1] is Ellipsis:
            return tuple(_coerce(key, v, parts[0], where) for v in value)
        if len(value) != len(parts):
            raise ConfigError(where, f"key {key}: expected {len(parts)} values, got {len(value)}")
        return tuple(_coerce(key, v, a, where) for v, a in zip(value, parts))
    if origin is dict:
        return _coerce_table(key, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(where, f"key {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(where, f"key {key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(where, f"key {key}: expected a finite number, got {value!r}")
            return number
        raise ConfigError(where, f"key {key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(where, f"key {key}: expected a string, got {_tname(value)}")
    raise ConfigError(where, f"key {key}: unsupported type {hint!r}")  # pragma: no cover


def _coerce_table(key: str, value: Any, where: str | None) -> dict[str, Any]:
    """A table of keyword arguments: names that are identifiers, values that are booleans, finite
    numbers, strings or arrays of those (arrays become tuples)."""
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"key {key}: expected a table [{key}], got {_tname(value)}")
    out: dict[str, Any] = {}
    for name, v in value.items():
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)):
            raise ConfigError(where, f"key {key}.{name}: not an argument name")
        out[name] = _argument(f"{key}.{name}", v, where)
    return out


def _argument(key: str, value: Any, where: str | None, inner: bool = False) -> Any:
    if isinstance(value, (list, tuple)) and not inner:
        return tuple(_argument(key, v, where, inner=True) for v in value)
    if isinstance(value, str) and value in ("True", "False", "None"):  # Python's spelling: a string to TOML
        raise ConfigError(where, f"key {key}: {value!r} is a string here; write {value.lower()}"
                          if value != "None" else f"key {key}: leave it out to keep the optimizer's default")
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(where, f"key {key}: expected a finite number, got {value!r}")
        return value
    raise ConfigError(where, f"key {key}: expected a boolean, a number, a string or an array of them, "
                             f"got {_tname(value)}")


def _bad(source: str | None, key: str, problem: str) -> ConfigError:
    return ConfigError(source, f"key {key}: {problem}")


def check(config: Config, source: str | None = None) -> None:
    """Cross-field and range checks that the types alone cannot express.

    Raises:
        ConfigError: the first problem found, naming its key.
    """
    c = config
    if not c.model.path:
        raise _bad(source, "model.path", "is required (a .safetensors/.ckpt checkpoint or a diffusers folder)")
    if not c.dataset.path:
        raise _bad(source, "dataset.path", "is required (a folder of images with .txt/.caption captions)")
    positive = {
        "dataset.resolution": c.dataset.resolution, "dataset.bucket_step": c.dataset.bucket_step,
        "dataset.repeats": c.dataset.repeats, "network.dim": c.network.dim, "ti.vectors": c.ti.vectors,
        "train.batch_size": c.train.batch_size, "train.grad_accum": c.train.grad_accum,
        "model.clip_skip": c.model.clip_skip, "scheduler.cycles": c.scheduler.cycles,
    }
    for key, value in positive.items():
        if value < 1:
            raise _bad(source, key, f"must be at least 1, got {value}")
    at_least_zero = {
        "train.epochs": c.train.epochs, "train.max_steps": c.train.max_steps,
        "scheduler.warmup_steps": c.scheduler.warmup_steps, "output.save_every_steps": c.output.save_every_steps,
        "output.save_every_epochs": c.output.save_every_epochs, "network.conv_dim": c.network.conv_dim,
        "dataset.keep_tokens": c.dataset.keep_tokens, "train.min_snr_gamma": c.train.min_snr_gamma,
        "train.noise_offset": c.train.noise_offset, "optimizer.weight_decay": c.optimizer.weight_decay or 0.0,
        "train.validation_every": c.train.validation_every,
        "optimizer.max_grad_norm": c.optimizer.max_grad_norm, "dataset.min_image_size": c.dataset.min_image_size,
        "dreambooth.prior_loss_weight": c.dreambooth.prior_loss_weight,
        "dreambooth.num_class_images": c.dreambooth.num_class_images, "sample.every_steps": c.sample.every_steps,
        "sample.width": c.sample.width, "sample.height": c.sample.height, "sample.guidance_scale": c.sample.guidance_scale,
        "dreambooth.class_guidance_scale": c.dreambooth.class_guidance_scale,
        "train.threads": c.train.threads, "output.log_every": c.output.log_every,
        "flow.shift": c.flow.shift, "flow.guidance_scale": c.flow.guidance_scale,
        "flow.t5_max_length": c.flow.t5_max_length,
    }
    for key, num in at_least_zero.items():
        if num < 0:
            raise _bad(source, key, f"must not be negative, got {num}")
    if c.flow.logit_std <= 0:
        raise _bad(source, "flow.logit_std", f"must be positive, got {c.flow.logit_std}")
    if c.train.max_steps == 0 and c.train.epochs == 0:
        raise _bad(source, "train.max_steps", "give max_steps or epochs (both are 0)")
    for key, p in (("dataset.tag_dropout", c.dataset.tag_dropout), ("dataset.caption_dropout", c.dataset.caption_dropout),
                   ("network.dropout", c.network.dropout)):
        if not 0.0 <= p < 1.0:
            raise _bad(source, key, f"must be in [0, 1), got {p}")
    if c.optimizer.lr is not None and c.optimizer.lr <= 0:
        raise _bad(source, "optimizer.lr", f"must be positive, got {c.optimizer.lr}")
    for key, rate in (("optimizer.unet_lr", c.optimizer.unet_lr), ("optimizer.text_encoder_lr", c.optimizer.text_encoder_lr)):
        if rate is not None and rate < 0:  # 0 freezes that group
            raise _bad(source, key, f"must be 0 (frozen) or positive, got {rate}")
    from .optim import OPTIMIZERS

    spec = OPTIMIZERS[c.optimizer.name]
    for key, given, has in (("optimizer.betas", c.optimizer.betas is not None, spec.betas is not None),
                            ("optimizer.eps", c.optimizer.eps is not None, spec.eps is not None)):
        if given and not has:  # it would be ignored without a word
            raise _bad(source, key, f"{c.optimizer.name} has no such setting; remove it")
    for i, beta in enumerate(c.optimizer.betas or ()):
        if not 0.0 <= beta < 1.0:
            raise _bad(source, f"optimizer.betas[{i}]", f"must be in [0, 1), got {beta}")
    if c.dataset.bucketing and not c.dataset.min_bucket <= c.dataset.resolution <= c.dataset.max_bucket:
        raise _bad(source, "dataset.resolution", f"{c.dataset.resolution} is outside [min_bucket, max_bucket] = "
                   f"[{c.dataset.min_bucket}, {c.dataset.max_bucket}]")
    if c.dataset.resolution % 8:
        raise _bad(source, "dataset.resolution", f"must be a multiple of 8, got {c.dataset.resolution}")
    if c.method in ("lora", "locon") and not (c.network.train_unet or c.network.train_text_encoder):
        raise _bad(source, "network.train_unet", "train_unet and train_text_encoder are both false: nothing to train")
    ls = c.hypernetwork.layer_structure
    if c.method == "hypernetwork" and (len(ls) < 2 or ls[0] != 1.0 or ls[-1] != 1.0 or min(ls) <= 0):
        raise _bad(source, "hypernetwork.layer_structure", f"must start and end with 1 and be positive, got {list(ls)}")
    for key, side in (("sample.width", c.sample.width), ("sample.height", c.sample.height)):
        if side % 8:
            raise _bad(source, key, f"must be a multiple of 8 (or 0 for dataset.resolution), got {side}")
    if c.sample.enabled:
        if not any(p.strip() for p in c.sample.prompts):
            raise _bad(source, "sample.prompts", "is empty but sample.every_steps or sample.at_start is set; "
                                                 "give at least one prompt")
        if c.sample.steps < 1:
            raise _bad(source, "sample.steps", f"must be at least 1, got {c.sample.steps}")
    if c.dreambooth.num_class_images and c.method == "dreambooth":
        if not c.dreambooth.class_path:
            raise _bad(source, "dreambooth.class_path", "is required when dreambooth.num_class_images is set "
                       "(the folder that generated class images go to)")
        if not c.dreambooth.class_prompt.strip():
            raise _bad(source, "dreambooth.class_prompt", "is required when dreambooth.num_class_images is set "
                       "(the prompt class images are generated from)")
        if c.dreambooth.class_steps < 1:
            raise _bad(source, "dreambooth.class_steps", f"must be at least 1, got {c.dreambooth.class_steps}")
    _check_new(c, source)
    if c.method == "ti":
        if not c.ti.token.strip() or " " in c.ti.token.strip():
            raise _bad(source, "ti.token", f"must be one word without spaces, got {c.ti.token!r}")


def _check_new(c: Config, source: str | None) -> None:
    """Masks, text cache, EMA, validation and optimizer checks."""
    if not 0.0 < c.train.ema_decay < 1.0:
        raise _bad(source, "train.ema_decay", f"must be in (0, 1), got {c.train.ema_decay}")
    if not 0.0 <= c.dataset.validation_split < 1.0:
        raise _bad(source, "dataset.validation_split", f"must be in [0, 1), got {c.dataset.validation_split}")
    if c.train.validation_every and not (c.dataset.validation_split or c.dataset.validation_path):
        raise _bad(source, "train.validation_every", "needs held-out images: set dataset.validation_split "
                   "or dataset.validation_path")
    if c.dataset.validation_split and not c.train.validation_every:  # images left out for nothing
        raise _bad(source, "dataset.validation_split", "holds images out of training, but train.validation_every "
                   "is 0; set it (validation every N steps) or drop the split")
    if c.dataset.cache_text:
        trained = {"ti": "textual inversion trains the text embeddings",
                   "lora": "network.train_text_encoder is on", "locon": "network.train_text_encoder is on",
                   "dreambooth": "dreambooth.train_text_encoder is on"}
        if c.method == "ti" or (c.method in ("lora", "locon") and c.network.train_text_encoder) or (
                c.method == "dreambooth" and c.dreambooth.train_text_encoder):
            raise _bad(source, "dataset.cache_text", f"the text encoder is trained ({trained[c.method]}); "
                       "its outputs cannot be cached")
        if c.dataset.shuffle_tags or c.dataset.tag_dropout:  # a new caption at nearly every step: an endless cache
            raise _bad(source, "dataset.cache_text", "dataset.shuffle_tags and dataset.tag_dropout make a new caption "
                       "at each step, which a cache cannot hold; turn them off or the cache")
    no_lr = c.optimizer.lr is None and c.optimizer.unet_lr is None and c.optimizer.text_encoder_lr is None
    if c.optimizer.name == "adafactor" and no_lr and (c.scheduler.name != "constant" or c.scheduler.warmup_steps):
        raise _bad(source, "scheduler.name", "Adafactor without optimizer.lr sets its own rate (relative step); "
                   "use scheduler.name = constant without warm-up, or give optimizer.lr")


#: The learning rate of each method when ``optimizer.lr`` is not set.
DEFAULT_LR = {"lora": 1e-4, "locon": 1e-4, "ti": 5e-3, "hypernetwork": 1e-5, "dreambooth": 5e-6}
#: Textual inversion's starting word when ``ti.init_word`` is not set.
DEFAULT_INIT_WORD = "thing"


def resolved(config: Config) -> Config:
    """The config with defaults that depend on the method filled in (LoCon conv rank, output name,
    learning rate, textual inversion's ``init_word``)."""
    net = config.network
    if config.method == "locon":
        net = replace(net, conv_dim=net.conv_dim or net.dim, conv_alpha=net.conv_alpha or net.alpha)
    out = config.output if config.output.name else replace(config.output, name=config.method)
    opt = _resolved_optimizer(config)
    ti = config.ti if config.ti.init_word.strip() else replace(config.ti, init_word=DEFAULT_INIT_WORD)
    return replace(config, network=net, output=out, optimizer=opt, ti=ti)


def _resolved_optimizer(config: Config) -> OptimizerConfig:
    """The optimizer section with its unset rates and hyper-parameters filled in (``optim.OPTIMIZERS``)."""
    from .optim import OPTIMIZERS

    opt = config.optimizer
    spec = OPTIMIZERS[opt.name]
    lr = opt.lr
    if lr is None:
        lr = spec.free_lr if spec.lr_free else DEFAULT_LR[config.method]
    return replace(opt, lr=lr, betas=opt.betas if opt.betas is not None else spec.betas,
                   eps=opt.eps if opt.eps is not None else spec.eps,
                   weight_decay=opt.weight_decay if opt.weight_decay is not None else spec.weight_decay)


__all__ = ["BASES", "DEFAULT_INIT_WORD", "DEFAULT_LR", "METHODS", "SECTIONS", "Config", "DatasetConfig", "DreamBoothConfig",
           "FlowConfig", "HypernetworkConfig",
           "ModelConfig", "NetworkConfig", "OptimizerConfig", "OutputConfig", "SAMPLERS", "SampleConfig", "SchedulerConfig", "TIConfig", "TrainingConfig", "build_config",
           "check", "load_config", "parse_override", "render_toml", "resolved"]
