"""Validation loss on held-out images (``train.validation_every``), comparable across runs.

The held-out images are ``dataset.validation_path`` (a folder), or a fraction
``dataset.validation_split`` of the dataset chosen by ``train.validation_seed`` (not the training
seed) and left out of training. Every validation pass computes the loss of each held-out image
alone, with no flip and no caption augmentation, at each of the fixed points ``VALIDATION_T`` of
the schedule (timesteps 10%..90% of the way, or those sigmas for flow matching, as kohya evaluates
at fixed timesteps), with the noise of its own generator seeded by ``train.validation_seed``, under
``no_grad`` with the trained modules in eval mode, then restores them: a run with validation trains
the same weights as one without. The result is the mean over images and points, the same draw at
every pass and in every run, whatever its ``train.seed``: curves of different runs compare. The
first value is taken before the first step (step 0).
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
#: Where on the schedule each held-out image is evaluated (fractions of it; sigmas for flow matching).
VALIDATION_T = (0.1, 0.3, 0.5, 0.7, 0.9)


def split(config: Any, ds: data.Dataset, on_skip: Any = None) -> list[data.Item]:
    """The held-out items; with ``validation_split`` they are removed from ``ds.items`` in place.

    Raises:
        ConfigError: nothing would be left to train on, or the validation folder has no image.
    """
    from ..errors import ModelkitError

    dc = config.dataset
    if dc.validation_path:
        try:
            held = data.scan(replace(dc, path=dc.validation_path, repeats=1), on_skip)
        except ModelkitError as exc:  # data.scan speaks of dataset.path: here it is the validation folder
            exc.problem = exc.problem.replace("dataset.path", "dataset.validation_path")
            exc.args = (exc.message,)
            raise
        return held.items
    if not dc.validation_split:
        return []
    n = max(1, round(len(ds.items) * dc.validation_split))
    if n >= len(ds.items):
        raise ConfigError(dc.path, f"key dataset.validation_split={dc.validation_split}: holding out {n} of "
                          f"{len(ds.items)} images leaves none to train on", "Lower it or add images")
    chosen = set(random.Random(config.train.validation_seed).sample(range(len(ds.items)), n))
    held_items = [item for i, item in enumerate(ds.items) if i in chosen]
    ds.items = [item for i, item in enumerate(ds.items) if i not in chosen]
    return held_items


def validation_loss(config: Any, base: Any, unet: Any, method: Any, items: list[data.Item], device: Any,
                    weight_dtype: Any, autocast: Any, text_cache: Any = None) -> float:
    """The mean loss over ``items``, each with its fixed noise and timestep (see the module)."""
    import torch

    from .step import compute_loss, load_batch

    plain = replace(config, dataset=replace(config.dataset, flip=False, shuffle_tags=False, tag_dropout=0.0,
                                            caption_dropout=0.0),
                    train=replace(config.train, seed=config.train.validation_seed))
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
                for t in VALIDATION_T:
                    with autocast():
                        loss = compute_loss(plain, base, unet, batch, VALIDATION_MICRO - i, device, weight_dtype,
                                            False, text_cache, fixed_t=t)
                    total += float(loss.detach())
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return total / max(1, len(items) * len(VALIDATION_T))


__all__ = ["VALIDATION_MICRO", "VALIDATION_T", "split", "validation_loss"]
