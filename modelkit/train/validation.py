"""Validation loss on held-out images (``train.validation_every``), comparable across runs.

The held-out images are ``dataset.validation_path`` (a folder), or a fraction
``dataset.validation_split`` of the dataset chosen by ``train.seed`` and left out of training.
Every validation pass computes the loss of each held-out image alone, with no flip and no caption
augmentation, with the noise and timestep of its own fixed generator (the same seeds at every
pass and in every run with the same ``train.seed``), under ``no_grad`` with the trained modules in
eval mode, then restores them: a run with validation trains the same weights as one without. The
result is the mean over the images.
"""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from ..errors import ConfigError
from . import data

#: Validation image ``i`` draws its noise from ``step.generator(seed, VALIDATION_MICRO - i)``,
#: far from any training micro-step and from DreamBooth's prior stream.
VALIDATION_MICRO = -(1 << 40)


def split(config: Any, ds: data.Dataset, on_skip: Any = None) -> list[data.Item]:
    """The held-out items; with ``validation_split`` they are removed from ``ds.items`` in place.

    Raises:
        ConfigError: nothing would be left to train on, or the validation folder has no image.
    """
    dc = config.dataset
    if dc.validation_path:
        held = data.scan(replace(dc, path=dc.validation_path, repeats=1), on_skip)
        return held.items
    if not dc.validation_split:
        return []
    n = max(1, round(len(ds.items) * dc.validation_split))
    if n >= len(ds.items):
        raise ConfigError(dc.path, f"key dataset.validation_split={dc.validation_split}: holding out {n} of "
                          f"{len(ds.items)} images leaves none to train on", "Lower it or add images")
    chosen = set(random.Random(config.train.seed).sample(range(len(ds.items)), n))
    held_items = [item for i, item in enumerate(ds.items) if i in chosen]
    ds.items = [item for i, item in enumerate(ds.items) if i not in chosen]
    return held_items


def validation_loss(config: Any, base: Any, unet: Any, method: Any, items: list[data.Item], device: Any,
                    weight_dtype: Any, autocast: Any, text_cache: Any = None) -> float:
    """The mean loss over ``items``, each with its fixed noise and timestep (see the module)."""
    import torch

    from .step import compute_loss, load_batch

    plain = replace(config, dataset=replace(config.dataset, flip=False, shuffle_tags=False, tag_dropout=0.0,
                                            caption_dropout=0.0))
    held = SimpleNamespace(items=items)
    modules = method.modules_in_training()
    modes = [m.training for m in modules]
    total = 0.0
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            for i in range(len(items)):
                batch = load_batch(held, [i], plain, 0, method.caption, method.latents)
                with autocast():
                    loss = compute_loss(plain, base, unet, batch, VALIDATION_MICRO - i, device, weight_dtype, False,
                                        text_cache)
                total += float(loss.detach())
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return total / max(1, len(items))


__all__ = ["VALIDATION_MICRO", "split", "validation_loss"]
