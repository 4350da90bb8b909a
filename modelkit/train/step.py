"""One training step's maths: encode images and captions, add noise, predict, weigh the loss.

Every random draw of a micro-step comes from a generator seeded with ``(seed, micro-step)``, so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import BaseModel
from .config import Config


@dataclass
class Batch:
    """One micro-batch, on the CPU: pixels, or (with a latent cache) the cached latent distribution."""

    pixels: Any  # [B, 3, H, W] in [-1, 1], or None when the latents come from the cache
    captions: list[str]
    original_sizes: list[tuple[int, int]]  # (height, width)
    crops: list[tuple[int, int]]  # (top, left)
    latent_mean: Any = None  # [B, C, H/8, W/8], unscaled
    latent_std: Any = None
    mask: Any = None  # [B, 1, H, W] in [0, 1] (dataset.masked_loss), or None

    def target_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        if self.pixels is not None:
            return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])
        return int(self.latent_mean.shape[-2]) * 8, int(self.latent_mean.shape[-1]) * 8


def load_batch(ds: Any, indices: list[int], config: Config, micro: int, caption: Callable[[str], str],
               latents: Any = None) -> Batch:
    """Read one micro-batch: pixels cropped to the bucket (or their cached latents, from the
    ``LatentCache`` ``latents``), captions processed with the sample's own RNG."""
    import torch

    from . import data

    pixels, captions, sizes, crops, means, stds, masks = [], [], [], [], [], [], []
    for slot, i in enumerate(indices):
        item = ds.items[i]
        rng = data.sample_rng(config.train.seed, micro, slot)
        flip = config.dataset.flip and rng.random() < 0.5
        if latents is not None:
            mean, std, crop = latents.load(item, flip)
            means.append(mean)
            stds.append(std)
        else:
            px, crop = data.load_pixels(item, flip)
            pixels.append(px)
        if config.dataset.masked_loss:
            masks.append(data.load_mask(item, flip))
        captions.append(caption(data.process_caption(item.caption, config.dataset, rng)))
        sizes.append((item.size[1], item.size[0]))
        crops.append(crop)
    mask = torch.stack(masks) if any(ds.items[i].mask for i in indices) else None
    if latents is not None:
        return Batch(None, captions, sizes, crops, torch.stack(means), torch.stack(stds), mask)
    return Batch(torch.stack(pixels), captions, sizes, crops, mask=mask)


def generator(seed: int, micro: int) -> Any:
    """The CPU generator of one micro-step."""
    import torch

    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + micro) % (2**63))


def _final_norm(encoder: Any) -> Any:
    inner = getattr(encoder, "module", encoder)  # unwrap DistributedDataParallel
    inner = getattr(inner, "text_model", inner)
    return inner.final_layer_norm


def encode_text(base: BaseModel, captions: list[str], device: Any, clip_skip: int = 1) -> tuple[Any, Any]:
    """``(encoder_hidden_states, pooled or None)`` for the captions.

    SD1/SD2 use the last layer (or the ``clip_skip``-th last, re-normalised); SDXL concatenates the
    penultimate layers of both encoders and adds the second one's projected pooled output. Flux and
    SD3: ``flow.encode_text``.
    """
    import torch

    if base.prediction == "flow":
        from .flow import encode_text as flow_text

        return flow_text(base, captions, device)
    ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device) for tok in base.tokenizers]
    if base.family != "sdxl":
        te = base.text_encoders[0]
        if clip_skip <= 1:
            return te(ids[0])[0], None
        out = te(ids[0], output_hidden_states=True)
        return _final_norm(te)(out.hidden_states[-clip_skip]), None
    out1 = base.text_encoders[0](ids[0], output_hidden_states=True)
    out2 = base.text_encoders[1](ids[1], output_hidden_states=True)
    states = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
    return states, out2.text_embeds


def time_ids(batch: Batch, device: Any, dtype: Any) -> Any:
    """SDXL's size conditioning: original size, crop corner, target size, per sample."""
    import torch

    h, w = batch.target_size()
    rows = [[*orig, *crop, int(h), int(w)] for orig, crop in zip(batch.original_sizes, batch.crops)]
    return torch.tensor(rows, device=device, dtype=dtype)


def compute_loss(config: Config, base: BaseModel, unet: Any, batch: Batch, micro: int, device: Any,
                 weight_dtype: Any, text_grad: bool, text_cache: Any = None, fixed_t: float | None = None) -> Any:
    """The (min-SNR weighted, masked) diffusion loss of one micro-batch, as a float32 scalar tensor.

    ``fixed_t`` (validation): every sample at that point of the schedule, a fraction in [0, 1] (the
    timestep ``round(fixed_t * (T - 1))``, or the sigma itself for flow matching), instead of a drawn one.

    With a mask (``dataset.masked_loss``) the squared error is multiplied by the mask,
    area-downsampled to the latent size, before the mean (kohya's ``alpha_mask``): where the mask
    is 0 the prediction gets no gradient. ``text_cache``: a ``TextCache`` for frozen text encoders.
    """
    import torch
    import torch.nn.functional as F

    tc = config.train
    gen = generator(tc.seed, micro)
    if base.prediction == "flow":  # Flux / SD3: flow matching (text encoders always frozen)
        from .flow import flow_loss

        return flow_loss(config, base, unet, batch, gen, device, weight_dtype, text_cache, fixed_t)
    vae = base.vae
    with torch.no_grad():
        if batch.latent_mean is not None:
            mean, std = batch.latent_mean.to(device), batch.latent_std.to(device)
        else:
            pixels = batch.pixels.to(device=device, dtype=vae.dtype)
            dist = vae.encode(pixels).latent_dist
            mean, std = dist.mean, dist.std
        latents = mean + std * torch.randn(mean.shape, generator=gen).to(device, mean.dtype)
        latents = (latents * vae.config.scaling_factor).to(weight_dtype)
    noise = torch.randn(latents.shape, generator=gen).to(device, weight_dtype)
    if tc.noise_offset:
        offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
        noise = noise + tc.noise_offset * offset.to(device, weight_dtype)
    sched = base.scheduler
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
    if fixed_t is not None:
        timesteps = torch.full_like(timesteps, round(fixed_t * (sched.config.num_train_timesteps - 1)))
    noisy = sched.add_noise(latents, noise, timesteps)
    if text_cache is not None and not text_grad:
        states, pooled = text_cache.encode(base, batch.captions, device, config.model.clip_skip)
    else:
        with torch.set_grad_enabled(text_grad):
            states, pooled = encode_text(base, batch.captions, device, config.model.clip_skip)
    kwargs: dict[str, Any] = {}
    if base.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(weight_dtype),
                                       "time_ids": time_ids(batch, device, weight_dtype)}
    pred = unet(noisy, timesteps, states.to(weight_dtype), **kwargs).sample
    if base.prediction == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if batch.mask is not None:
        loss = loss * F.interpolate(batch.mask.to(device, torch.float32), size=loss.shape[-2:], mode="area")
    loss = loss.mean(dim=[1, 2, 3])
    if tc.min_snr_gamma:
        loss = loss * snr_weights(sched, timesteps, tc.min_snr_gamma, base.prediction).to(loss.device)
    return loss.mean()


def snr_weights(scheduler: Any, timesteps: Any, gamma: float, prediction: str) -> Any:
    """min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    import torch

    alphas = scheduler.alphas_cumprod.to(torch.float32)
    a = alphas[timesteps.cpu()]
    snr = a / (1.0 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction == "v_prediction" else clipped / snr
