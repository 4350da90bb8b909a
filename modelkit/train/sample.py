"""Images from the model being trained: sample prompts every N steps, and DreamBooth class images
(``generate_class_images``, from the untouched base before training starts).

The pipeline is diffusers' own (``StableDiffusionPipeline`` for SD1/SD2,
``StableDiffusionXLPipeline`` for SDXL) assembled from the modules in memory, so whatever is being
trained is in effect: LoRA layers injected by peft, the hypernetwork wrapped around ``to_k``/``to_v``,
the textual-inversion rows in the text encoder's embedding. The sampler is built from the base's
scheduler config (the shipped one, or ``model.configs``); nothing is downloaded.

Sampling never changes training: it runs under ``torch.no_grad`` in eval mode, with its own
generators, inside ``torch.random.fork_rng`` (and with Python's and NumPy's random states saved),
and every module's train/eval flag is put back as it was. A run with samples trains the same
weights as one without.

Images are PNG, written atomically, with A1111's ``parameters`` text chunk.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..paths import atomic_output
from .base import BaseModel

SAMPLER_CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                   "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler"}


@dataclass(frozen=True)
class ImageSpec:
    """One image to make."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    sampler: str


def make_scheduler(base: BaseModel, sampler: str) -> Any:
    """The sampler ``sampler`` (``ddim``, ``euler``, ``euler_a``, ``dpm++``) from the base's scheduler config."""
    import diffusers

    cls = getattr(diffusers, SAMPLER_CLASSES[sampler])
    with _quiet_numpy_copy():
        return cls.from_config({k: v for k, v in dict(base.scheduler.config).items() if not k.startswith("_")})


@contextlib.contextmanager
def _quiet_numpy_copy() -> Iterator[None]:
    """diffusers' Euler schedulers call ``np.array`` on torch tensors, which NumPy 2 answers with a
    DeprecationWarning about torch's ``__array__``; it is harmless and not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        yield


def _unwrap(module: Any) -> Any:
    return getattr(module, "module", module)  # DistributedDataParallel


def build_pipeline(base: BaseModel, sampler: str) -> Any:
    """The diffusers pipeline of the base's family over the in-memory modules (no safety checker)."""
    scheduler = make_scheduler(base, sampler)
    unet, encoders = _unwrap(base.unet), [_unwrap(te) for te in base.text_encoders]
    pipe: Any
    if base.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=unet,
                                         scheduler=scheduler, add_watermarker=False)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=encoders[0], tokenizer=base.tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def untouched_training(base: BaseModel, extra: Sequence[Any] = ()) -> Iterator[None]:
    """Eval mode, no gradients, and every random state and train flag restored on the way out."""
    import numpy as np
    import torch

    roots = [_unwrap(base.unet), base.vae, *(_unwrap(te) for te in base.text_encoders), *extra]
    flags = [(m, m.training) for root in roots for m in root.modules()]
    devices = sorted({p.device.index or 0 for root in roots for p in root.parameters() if p.device.type == "cuda"})
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for root in roots:
                root.eval()
            yield
    finally:
        for module, training in flags:
            module.training = training
        random.setstate(py_state)
        np.random.set_state(np_state)


def generate(pipe: Any, spec: ImageSpec, family: str, clip_skip: int = 1,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> Any:
    """One PIL image; the noise comes from a CPU generator seeded with ``spec.seed`` (same on any device)."""
    import torch

    kwargs: dict[str, Any] = {}
    if family != "sdxl" and clip_skip > 1:
        kwargs["clip_skip"] = clip_skip - 1  # diffusers counts the layers skipped after the last
    with autocast(), _quiet_numpy_copy():
        out = pipe(prompt=spec.prompt, negative_prompt=spec.negative_prompt or None, num_inference_steps=spec.steps,
                   guidance_scale=spec.guidance_scale, width=spec.width, height=spec.height,
                   generator=torch.Generator(device="cpu").manual_seed(spec.seed), output_type="pil", **kwargs)
    return out.images[0]


def parameters_text(spec: ImageSpec, model: str, step: int | None = None) -> str:
    """A1111's ``parameters`` PNG text: prompt, negative prompt, then ``Key: value`` pairs."""
    text = spec.prompt + (f"\nNegative prompt: {spec.negative_prompt}" if spec.negative_prompt else "")
    pairs = [f"Steps: {spec.steps}", f"Sampler: {spec.sampler}", f"CFG scale: {spec.guidance_scale:g}",
             f"Seed: {spec.seed}", f"Size: {spec.width}x{spec.height}", f"Model: {model}"]
    if step is not None:
        pairs.append(f"Training step: {step}")
    return text + "\n" + ", ".join(pairs)


def write_png(path: str, image: Any, parameters: str, force: bool) -> str:
    """Write ``image`` as PNG (with a ``parameters`` text chunk) atomically.

    Raises:
        OutputExistsError: the file exists and ``force`` is false.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    write_bytes(path, buf.getvalue(), force)
    return path


def write_bytes(path: str, data: bytes, force: bool) -> None:
    """Write ``data`` to ``path`` through the core's atomic writer."""
    view = memoryview(data)
    with atomic_output(path, force=force) as fd:
        while view:
            view = view[os.write(fd, view):]


def sample_specs(config: Any) -> list[ImageSpec]:
    """One spec per ``[sample]`` prompt (seed ``sample.seed`` + prompt index)."""
    s, res = config.sample, config.dataset.resolution
    return [ImageSpec(p, s.negative_prompt, s.steps, s.guidance_scale, s.seed + i, s.width or res, s.height or res,
                      s.sampler) for i, p in enumerate(s.prompts) if p.strip()]


def sample_paths(config: Any, step: int) -> list[str]:
    """``<output.dir>/samples/<name>-step<NNNNNN>-<II>.png`` for each prompt (``II``: its index, two digits)."""
    folder = os.path.join(config.output.dir, "samples")
    return [os.path.join(folder, f"{config.output.name}-step{step:06d}-{i:02d}.png")
            for i in range(len(sample_specs(config)))]


def sample_images(config: Any, base: BaseModel, method: Any, step: int, force: bool,
                  autocast: Callable[[], Any] = contextlib.nullcontext, writer: Any = None) -> list[str]:
    """Make the ``[sample]`` images of ``step`` with the model as it is now; training is left untouched.

    Args:
        config: the resolved config.
        base: the base model, with the trained parts in place.
        method: the training method (its ``prompt`` hook expands a textual-inversion token).
        step: the optimizer step, for the file names.
        force: replace existing images.
        autocast: the training's autocast context (mixed precision).
        writer: a TensorBoard ``SummaryWriter`` to log the images to, or None.

    Returns:
        The PNG paths written.

    Raises:
        OutputExistsError: an image exists and ``force`` is false.
    """
    import numpy as np

    paths = sample_paths(config, step)
    os.makedirs(os.path.join(config.output.dir, "samples"), exist_ok=True)
    with untouched_training(base, method.modules_in_training()):
        pipe = build_pipeline(base, config.sample.sampler)
        for i, (spec, path) in enumerate(zip(sample_specs(config), paths)):
            spec = replace(spec, prompt=method.prompt(spec.prompt))
            image = generate(pipe, spec, base.family, config.model.clip_skip, autocast)
            write_png(path, image, parameters_text(spec, config.output.name, step), force)
            if writer is not None:
                writer.add_image(f"samples/{i:02d}", np.asarray(image), step, dataformats="HWC")
    return paths


def usable_images(folder: str, min_size: int) -> list[str]:
    """The images under ``folder`` that training would use (same walk and checks as the dataset)."""
    from .data import _walk, check_image

    if not os.path.isdir(folder):
        return []
    return [path for path, _, _ in _walk(folder, 1) if check_image(path, min_size)[1] is None]


def class_seed(seed: int, index: int) -> int:
    """The seed of class image number ``index``: a pure function of ``train.seed`` and the number."""
    return (seed * 1_000_003 + 7_919 * (index + 1)) % (2**63)


def generate_class_images(config: Any, base: BaseModel, autocast: Callable[[], Any] = contextlib.nullcontext,
                          force: bool = False) -> list[str]:
    """Fill ``dreambooth.class_path`` up to ``num_class_images`` usable images, from ``class_prompt``.

    Each new image is ``class-NNNNNN.png`` (the first free numbers) with a ``.txt`` caption holding
    the class prompt, written atomically (caption first); image ``N`` is seeded by ``class_seed``,
    so the same settings give the same pictures. Nothing is generated when the folder already
    holds enough images.

    Returns:
        The PNG paths written.
    """
    db = config.dreambooth
    folder = db.class_path
    have = len(usable_images(folder, config.dataset.min_image_size))
    missing = db.num_class_images - have
    if missing <= 0:
        return []
    os.makedirs(folder, exist_ok=True)
    res, written = config.dataset.resolution, []
    numbers = (i for i in range(10**6) if not any(os.path.exists(os.path.join(folder, f"class-{i:06d}{ext}"))
                                                  for ext in (".png", ".txt")))
    with untouched_training(base):
        pipe = build_pipeline(base, config.sample.sampler)
        for _, index in zip(range(missing), numbers):
            spec = ImageSpec(db.class_prompt, db.class_negative_prompt, db.class_steps, db.class_guidance_scale,
                             class_seed(config.train.seed, index), res, res, config.sample.sampler)
            image = generate(pipe, spec, base.family, config.model.clip_skip, autocast)
            stem = os.path.join(folder, f"class-{index:06d}")
            write_bytes(stem + ".txt", (db.class_prompt + "\n").encode("utf-8"), force)
            written.append(write_png(stem + ".png", image, parameters_text(spec, "class image"), force))
    return written


__all__ = ["SAMPLER_CLASSES", "ImageSpec", "build_pipeline", "class_seed", "generate", "generate_class_images",
           "make_scheduler", "parameters_text", "sample_images", "sample_paths", "sample_specs", "untouched_training",
           "usable_images", "write_bytes", "write_png"]
