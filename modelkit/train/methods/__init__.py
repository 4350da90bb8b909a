"""Training methods: each decides what is trainable and how its result is written.

A method is built on a loaded ``BaseModel``; the loop asks it for parameter groups, lets it rewrite
captions, and hands it the output path when it is time to save.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError, UsageError
from ..base import BaseModel
from ..config import Config
from ..export import Written


class Method:
    """The interface the loop uses. Subclasses fill in ``prepare``, ``trainable`` and ``export``.

    Attributes:
        name: the method name from the command line.
        adapter: the ``modelspec.architecture`` suffix of its output.
        train_text: per text encoder, whether gradients flow through it.
        latents: the loop's ``LatentCache`` when ``dataset.cache_latents`` is on (for class images).
    """

    name = ""
    adapter = ""

    def __init__(self, config: Config, base: BaseModel):
        self.config = config
        self.base = base
        self.train_text = [False] * len(base.text_encoders)
        self.latents: Any = None

    def prepare(self) -> list[dict[str, Any]]:
        """Make the trainable parameters (fp32) and return the optimizer's parameter groups."""
        raise NotImplementedError

    def trainable(self) -> dict[str, Any]:
        """Every trainable parameter by a stable name (saved in and restored from a resume state)."""
        raise NotImplementedError

    def caption(self, text: str) -> str:
        """The caption as the text encoder should see it."""
        return text

    def prompt(self, text: str) -> str:
        """A sample prompt as the text encoder should see it (no caption options, nothing prepended)."""
        return text

    def export(self, path: str, metadata: dict[str, str], dtype: Any, force: bool) -> Written:
        """Write the trained result as ``.safetensors`` to ``path``."""
        raise NotImplementedError

    def prior_batch(self, micro: int) -> Any:
        """A class-image batch for prior preservation at this micro-step (DreamBooth), else None."""
        return None

    def cache_items(self) -> list[Any]:
        """Dataset items beyond the training set whose latents the cache must hold (class images)."""
        return []

    def modules_in_training(self) -> list[Any]:
        """The modules to put in train mode (the rest stay in eval mode)."""
        mods = [self.base.unet] if self.config.method in ("lora", "locon", "dreambooth") else []
        return mods + [te for te, on in zip(self.base.text_encoders, self.train_text) if on]


def make_method(config: Config, base: BaseModel) -> Method:
    """The method object for ``config.method``.

    Raises:
        UsageError: a method that this version cannot train yet, or (Flux/SD3) a setting it does not support.
    """
    if base.prediction == "flow":
        check_flow(config, base.family)
        from .dit_lora import DiTLoRA

        return DiTLoRA(config, base)
    if config.method in ("lora", "locon"):
        from .lora import LoRA

        return LoRA(config, base)
    if config.method == "ti":
        from .ti import TextualInversion

        return TextualInversion(config, base)
    if config.method == "dreambooth":
        from .dreambooth import DreamBooth

        return DreamBooth(config, base)
    if config.method == "hypernetwork":
        from .hypernetwork import Hypernetwork

        return Hypernetwork(config, base)
    raise UsageError(None, f"unknown method {config.method}", "Use lora, locon, ti, hypernetwork or dreambooth")


def check_flow(config: Config, family: str) -> None:
    """What a Flux/SD3 base cannot do yet, refused in one line each. It needs the settings and the family
    only, so the loop calls it before the base is loaded (``preflight``).

    Raises:
        UsageError: the first unsupported setting.
        ConfigError: an image size (``dataset.resolution``, ``min_bucket``, ``max_bucket``, ``bucket_step``)
            that is not a multiple of 16: the VAE's 8x and the transformer's 2x2 patches.
    """
    fam = family
    refused = (
        (config.method != "lora", f"{config.method} on a {fam} base", "Use modelkit train lora"),
        (config.network.train_text_encoder, f"network.train_text_encoder on a {fam} base (text encoders stay frozen)",
         "Set network.train_text_encoder = false"),
        (config.sample.enabled, f"sample images during a {fam} run", "Set sample.every_steps = 0 and sample.at_start = false"),
        (config.train.attention != "sdpa", f"train.attention = {config.train.attention!r} on a {fam} base "
         "(its own attention processors are used)", 'Set train.attention = "sdpa"'),
        (bool(config.train.min_snr_gamma), f"train.min_snr_gamma on a {fam} base (flow matching has no SNR weighting here)",
         "Set train.min_snr_gamma = 0"),
        (config.train.mixed_precision == "fp16", f"train.mixed_precision = \"fp16\" on a {fam} base (T5 and the "
         "transformer overflow in float16)", 'Set train.mixed_precision = "bf16" (or "no")'),
    )
    for bad, what, hint in refused:
        if bad:
            raise UsageError(None, f"{what} is not supported", hint)
    ds = config.dataset
    sizes = [("dataset.resolution", ds.resolution)]
    if ds.bucketing:
        sizes += [("dataset.min_bucket", ds.min_bucket), ("dataset.max_bucket", ds.max_bucket),
                  ("dataset.bucket_step", ds.bucket_step)]
    for key, size in sizes:
        if size % 16:
            raise ConfigError(None, f"key {key}: must be a multiple of 16 for a {fam} base (the VAE's 8x and the "
                                    f"transformer's 2x2 patches), got {size}")


def preflight(config: Config) -> str | None:
    """``flux``/``sd3`` when ``config.model.path`` is a diffusers folder of that family, after refusing what
    such a base cannot train (``check_flow``, ``dit_base.check_channels``); else None. It reads the folder's
    JSON configs only, so a refusal does not wait for the base to load.

    Raises:
        UsageError, ConfigError: as ``check_flow`` and ``check_channels``.
    """
    import os

    from ..dit_base import check_channels, folder_family

    if not os.path.isdir(config.model.path):
        return None
    family = folder_family(config.model.path)
    if family is not None:
        check_flow(config, family)
        check_channels(config.model, family)
    return family
