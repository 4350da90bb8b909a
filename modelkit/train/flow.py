"""Flow matching for Flux.1 and SD3.x: timestep sampling, text encoding, latents and the loss.

Rectified flow (SD3's paper): for clean latents ``x0``, noise ``n`` and a noise level ``sigma`` in
[0, 1], the transformer sees ``(1 - sigma) * x0 + sigma * n`` and predicts the velocity ``n - x0``.
``sigma`` is a timestep ``u`` drawn uniformly or logit-normally, then shifted (``[flow]`` in the
config; ``FlowConfig``). Flux's transformer takes ``sigma`` as its timestep (it multiplies by 1000
itself); SD3's takes ``1000 * sigma``.

Every random draw comes from the micro-step's generator (``step.generator``): latent sample, noise,
noise offset, then the timesteps, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import UsageError
from .config import Config, FlowConfig

#: The noise levels' resolution-dependent shift (Flux): scheduler keys and their defaults.
_RES_DEFAULTS = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def shift_mode(flow: FlowConfig, scheduler_config: dict[str, Any]) -> str:
    """``fixed``, ``resolution`` or ``none``: ``flow.shift_mode`` with ``auto`` decided by the scheduler config."""
    if flow.shift_mode != "auto":
        return flow.shift_mode
    return "resolution" if scheduler_config.get("use_dynamic_shifting") else "fixed"


def fixed_shift(flow: FlowConfig, scheduler_config: dict[str, Any]) -> float:
    """``flow.shift``, or the scheduler config's ``shift`` (1.0 when it has none)."""
    return float(flow.shift or scheduler_config.get("shift") or 1.0)


def resolution_mu(image_tokens: int, scheduler_config: dict[str, Any]) -> float:
    """Flux's ``mu``: linear in the number of image tokens, ``base_shift`` to ``max_shift``."""
    c = {k: float(scheduler_config.get(k) or v) for k, v in _RES_DEFAULTS.items()}
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return c["base_shift"] + slope * (image_tokens - c["base_image_seq_len"])


def sample_sigmas(flow: FlowConfig, scheduler_config: dict[str, Any], n: int, generator: Any,
                  image_tokens: int) -> Any:
    """``n`` noise levels in [0, 1] (float32, on the CPU), drawn from ``generator``.

    ``u``: ``uniform`` on [0, 1), or ``sigmoid`` of a normal with ``logit_mean`` and ``logit_std``;
    then ``fixed``: ``s u / (1 + (s - 1) u)``; ``resolution``: ``e^mu u / (e^mu u + 1 - u)``, the
    same map with ``s = e^mu`` (``resolution_mu`` of ``image_tokens``); ``none``: ``u``.
    """
    import torch

    if flow.timestep_sampling == "uniform":
        u = torch.rand(n, generator=generator, dtype=torch.float32)
    else:
        u = torch.sigmoid(flow.logit_mean + flow.logit_std * torch.randn(n, generator=generator, dtype=torch.float32))
    mode = shift_mode(flow, scheduler_config)
    if mode == "none":
        return u
    s = fixed_shift(flow, scheduler_config) if mode == "fixed" else math.exp(resolution_mu(image_tokens,
                                                                                           scheduler_config))
    return s * u / (1.0 + (s - 1.0) * u)


def t5_length(config: Config, base: Any) -> int:
    """T5 tokens per caption: ``flow.t5_max_length``, else 512 for Flux-dev and 256 for Flux-schnell and SD3."""
    if config.flow.t5_max_length:
        return config.flow.t5_max_length
    return 512 if base.family == "flux" and guidance_embeds(base) else 256


def guidance_embeds(base: Any) -> bool:
    """Whether the transformer takes a guidance value (Flux-dev)."""
    inner = getattr(base.unet, "module", base.unet)
    return bool(getattr(inner.config, "guidance_embeds", False))


def _ids(tok: Any, captions: list[str], device: Any) -> Any:
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device)


def encode_text(base: Any, captions: list[str], device: Any) -> tuple[Any, Any]:
    """``(encoder_hidden_states, pooled)``.

    Flux: T5's last hidden state, and CLIP-L's pooled output. SD3: the penultimate hidden states of
    CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5's tokens after them; the
    pooled output is both CLIPs' projected pooled outputs side by side (as diffusers' pipelines do).
    The T5 tokenizer's ``model_max_length`` is the caption length (``t5_length``).
    """
    import torch
    import torch.nn.functional as F

    encoders, toks = base.text_encoders, base.tokenizers
    t5 = encoders[-1](_ids(toks[-1], captions, device))[0]
    if base.family == "flux":
        pooled = encoders[0](_ids(toks[0], captions, device)).pooler_output
        return t5, pooled
    outs = [encoders[i](_ids(toks[i], captions, device), output_hidden_states=True) for i in range(2)]
    clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    pooled = torch.cat([o.text_embeds for o in outs], dim=-1)
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), pooled


def pack(latents: Any) -> Any:
    """Flux's 2x2 patches: ``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: Any, height: int, width: int) -> Any:
    """The inverse of ``pack`` for latents of ``height`` x ``width``."""
    b, _n, d = packed.shape
    x = packed.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: Any, dtype: Any) -> Any:
    """Flux's image position ids: ``(0, row, column)`` per 2x2 patch."""
    import torch

    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flow_loss(config: Config, base: Any, transformer: Any, batch: Any, gen: Any, device: Any, weight_dtype: Any,
              text_cache: Any = None, fixed_t: float | None = None) -> Any:
    """The (masked) flow-matching loss of one micro-batch, a float32 scalar tensor (``fixed_t``: every
    sample at that sigma instead of a drawn one; validation)."""
    import torch
    import torch.nn.functional as F

    vae = base.vae
    with torch.no_grad():
        if batch.latent_mean is not None:
            mean, std = batch.latent_mean.to(device), batch.latent_std.to(device)
        else:
            dist = vae.encode(batch.pixels.to(device=device, dtype=vae.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        x0 = mean + std * torch.randn(mean.shape, generator=gen).to(device, mean.dtype)
        x0 = ((x0 - float(vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).to(weight_dtype)
    noise = torch.randn(x0.shape, generator=gen).to(device, weight_dtype)
    if config.train.noise_offset:
        offset = torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        noise = noise + config.train.noise_offset * offset.to(device, weight_dtype)
    b, _c, h, w = x0.shape
    flux = base.family == "flux"
    if flux and (h % 2 or w % 2):
        raise UsageError(config.dataset.path, f"latents of {h}x{w} do not split into Flux's 2x2 patches",
                         "Use image sizes (dataset.resolution, bucket_step) that are multiples of 16")
    inner = getattr(transformer, "module", transformer)
    patch = 2 if flux else int(inner.config.patch_size)
    sched_cfg = dict(base.scheduler.config)
    sigmas = sample_sigmas(config.flow, sched_cfg, b, gen, (h // patch) * (w // patch)).to(device)
    if fixed_t is not None:
        sigmas = torch.full_like(sigmas, fixed_t)
    s = sigmas.view(-1, 1, 1, 1).to(weight_dtype)
    noisy = (1.0 - s) * x0 + s * noise
    target = noise - x0
    if text_cache is not None:
        states, pooled = text_cache.encode(base, batch.captions, device, 1)
    else:
        with torch.no_grad():
            states, pooled = encode_text(base, batch.captions, device)
    states, pooled = states.to(weight_dtype), pooled.to(weight_dtype)
    if flux:
        kwargs: dict[str, Any] = {"txt_ids": torch.zeros(states.shape[1], 3, device=device, dtype=weight_dtype),
                                  "img_ids": image_ids(h, w, device, weight_dtype)}
        if guidance_embeds(base):
            kwargs["guidance"] = torch.full((b,), config.flow.guidance_scale, device=device, dtype=torch.float32)
        out = transformer(hidden_states=pack(noisy), timestep=sigmas.to(weight_dtype), encoder_hidden_states=states,
                          pooled_projections=pooled, return_dict=False, **kwargs)[0]
        pred = unpack(out, h, w)
    else:
        pred = transformer(hidden_states=noisy, timestep=(sigmas * 1000.0).to(weight_dtype),
                           encoder_hidden_states=states, pooled_projections=pooled, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if batch.mask is not None:
        loss = loss * F.interpolate(batch.mask.to(device, torch.float32), size=loss.shape[-2:], mode="area")
    return loss.mean(dim=[1, 2, 3]).mean()


__all__ = ["encode_text", "flow_loss", "image_ids", "pack", "resolution_mu", "sample_sigmas", "shift_mode",
           "t5_length", "unpack"]
