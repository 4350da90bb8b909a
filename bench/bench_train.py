"""LoRA training speed and peak GPU memory: ``modelkit train lora`` beside a plain diffusers + peft loop, one run.

Target: the SD-1.5 UNet (the shipped ``configs/sd1`` configs, random weights; nothing is
downloaded) at 512 px (64x64 latents), batch 1, bf16 (``--precision fp16`` for fp16 with a grad
scaler) mixed precision, SDPA attention, LoRA rank 16 / alpha 16 on kohya's targets (every Linear
and 1x1 conv inside the transformer blocks, 192 modules), AdamW (lr 1e-4, weight decay 1e-2),
grad-norm clip 1.0, no gradient checkpointing. The base is written once as a diffusers folder
(``.safetensors``) under ``--out``; both loops read it.

Both loops do the same work per step: latents drawn from a VAE distribution encoded once before
training (modelkit: ``dataset.cache_latents``; the peer: kept in memory), the frozen text encoder on
the caption, noise and timestep, the UNet forward and backward, clip, AdamW step, and the loss read
back (``.item()``). ``modelkit`` is the real ``modelkit.train.train`` (accelerate, the data loader,
the latent cache read from disk); the peer is a plain loop over diffusers' ``UNet2DConditionModel``
with peft's LoRA (``unet.add_adapter``), LoRA weights in fp32, frozen weights in the mixed
precision dtype, ``torch.autocast``. The LoRA targets of the peer are the same module names.

steps/s are over the steps after ``--warmup``; peak memory is ``torch.cuda.max_memory_allocated``
over those same steps (reset at the end of the warm-up), so the one-off VAE encoding is not in it.

Without CUDA, or with ``--tiny``, the same comparison runs on the tiny test model at 64 px on the
CPU in fp32: it checks that the script works; its figures say nothing about the target. The tiny
mode then runs each issue-19 training feature once, and a Flux.1 and an SD3 LoRA once on tiny
diffusers folders (``fixtures/dit_train.py``).

Usage: ``python bench/bench_train.py [--tiny] [--steps 30] [--warmup 5] [--precision bf16|fp16] [--out bench/out]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

RANK = 16
CAPTION = "a photo of a red circle on a grey background"
#: The tiny model of tests/train/tiny.py (64 px images, 8x8 latents).
TINY = {
    "unet": {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "layers_per_block": 2,
             "cross_attention_dim": 32, "attention_head_dim": 2, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "sample_size": 8, "norm_num_groups": 32},
    "vae": {"_class_name": "AutoencoderKL", "block_out_channels": [32, 64, 32, 32], "layers_per_block": 2,
            "latent_channels": 4, "norm_num_groups": 32, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 64, "scaling_factor": 0.18215},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 12,
                     "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
}


def _configs(tiny: bool) -> dict[str, dict[str, Any]]:
    if tiny:
        return TINY
    from modelkit.train.tokenizer import configs_root

    root = configs_root().joinpath("sd1")
    return {sub: json.loads(root.joinpath(sub, "config.json").read_text()) for sub in ("unet", "vae", "text_encoder")}


def build_base(folder: str, tiny: bool) -> str:
    """A random-weight SD1 diffusers folder (safetensors), written once."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modelkit.train.tokenizer import configs_root

    cfg = _configs(tiny)
    torch.manual_seed(0)
    plain = {k: {n: v for n, v in c.items() if not n.startswith("_") and n not in ("architectures", "model_type")}
             for k, c in cfg.items()}
    dtype = torch.float32 if tiny else torch.float16  # fp16 on disk halves the 1.7 GB UNet; both loops cast anyway
    UNet2DConditionModel.from_config(plain["unet"]).to(dtype).save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL.from_config(plain["vae"]).to(dtype).save_pretrained(os.path.join(folder, "vae"))
    CLIPTextModel(CLIPTextConfig(**plain["text_encoder"])).to(dtype).save_pretrained(os.path.join(folder, "text_encoder"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        f.write(configs_root().joinpath("sd1", "scheduler", "scheduler_config.json").read_text())
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return folder


def build_images(folder: str, size: int, count: int = 4) -> str:
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        path = os.path.join(folder, f"img{i}.png")
        if not os.path.exists(path):
            im = Image.new("RGB", (size, size), (120, 120, 120))
            ImageDraw.Draw(im).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(200, 30 + 40 * i, 30))
            im.save(path)
            with open(os.path.join(folder, f"img{i}.txt"), "w") as f:
                f.write(CAPTION)
    return folder


class Clock:
    """Time stamps of optimizer steps; resets the CUDA peak at the end of the warm-up."""

    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda = warmup, cuda
        self.stamps: dict[int, float] = {}

    def __call__(self, step: int, *_: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps[step] = time.perf_counter()
        if step == self.warmup and self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def result(self) -> tuple[float, float | None]:
        last = max(self.stamps)
        rate = (last - self.warmup) / (self.stamps[last] - self.stamps[self.warmup])
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        return rate, peak


def run_modelkit(base: str, images: str, work: str, args: Any, device: str, tiny: bool) -> tuple[float, float | None]:
    from modelkit.train.config import build_config
    from modelkit.train.loop import train

    res = 64 if tiny else 512
    cfg = build_config("lora", {
        "model": {"path": base, "base": "sd1"},
        "dataset": {"path": images, "resolution": res, "bucketing": False, "min_bucket": res, "max_bucket": res,
                    "cache_latents": True, "cache_dir": os.path.join(work, "latents")},
        "network": {"dim": RANK, "alpha": float(RANK)},
        "optimizer": {"lr": 1e-4, "max_grad_norm": 1.0},
        "train": {"max_steps": args.warmup + args.steps, "batch_size": 1, "mixed_precision": args.precision,
                  "attention": "sdpa", "device": device, "seed": 0},
        "output": {"dir": os.path.join(work, "modelkit"), "save_state": False, "force": True},
    })
    clock = Clock(args.warmup, device == "cuda")
    train(cfg, progress=clock)
    return clock.result()


#: The features of issue 19, each run once in the tiny CPU mode: (label, config overrides).
FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("masked loss (alpha + NAME.mask.png)", ("dataset.masked_loss=true",)),
    ("optimizer adamw8bit", ("optimizer.name=adamw8bit",)),
    ("optimizer prodigy (lr 1)", ("optimizer.name=prodigy", "optimizer.lr=none")),
    ("optimizer lion", ("optimizer.name=lion",)),
    ("optimizer lion8bit", ("optimizer.name=lion8bit",)),
    ("optimizer adafactor (relative step)", ("optimizer.name=adafactor", "optimizer.lr=none")),
    ("per-component lrs", ("network.train_text_encoder=true", "optimizer.unet_lr=2e-4", "optimizer.text_encoder_lr=5e-5")),
    ("EMA", ("train.ema=true", "train.ema_decay=0.9")),
    ("text-encoder cache", ("dataset.cache_text=true",)),
    ("validation loss + tensorboard", ("dataset.validation_split=0.25", "train.validation_every=1", "output.tensorboard=true")),
    ("wandb (offline)", ("output.wandb=true",)),
)


def run_features(base: str, images: str, work: str) -> None:
    """Tiny CPU mode: each new training feature once, 2 steps, on the CPU; prints ok / skipped / FAILED."""
    from PIL import Image

    from modelkit.errors import ModelkitError
    from modelkit.train.config import build_config
    from modelkit.train.loop import train

    masked = os.path.join(work, "masked-images")
    os.makedirs(masked, exist_ok=True)
    for name in os.listdir(images):
        with open(os.path.join(images, name), "rb") as src, open(os.path.join(masked, name), "wb") as dst:
            dst.write(src.read())
    with Image.open(os.path.join(masked, "img0.png")) as im:
        rgba = im.convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)  # the left half is ignored by the loss
    alpha.paste(255, (rgba.width // 2, 0, rgba.width, rgba.height))
    rgba.putalpha(alpha)
    rgba.save(os.path.join(masked, "img0.png"))
    Image.new("L", rgba.size, 255).save(os.path.join(masked, "img1.mask.png"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    print("\nissue-19 features, once each (tiny model, 2 steps, CPU):")
    for i, (label, overrides) in enumerate(FEATURES):
        cfg = build_config("lora", {
            "model": {"path": base, "base": "sd1"},
            "dataset": {"path": masked if "masked" in label else images, "resolution": 64, "bucketing": False,
                        "min_bucket": 64, "max_bucket": 64},
            "network": {"dim": 4, "alpha": 4.0}, "optimizer": {"lr": 1e-4},
            "train": {"max_steps": 2, "device": "cpu", "seed": 0},
            "output": {"dir": os.path.join(work, f"feature{i}"), "save_state": False, "force": True},
        }, overrides)
        started = time.perf_counter()
        try:
            result = train(cfg)
        except ModelkitError as exc:  # a package that is not installed: its one-line message
            print(f"  skipped  {label}: {exc}")
            continue
        extra = f", validation {result.validation[-1][1]:.4f}" if result.validation else ""
        extra += f", EMA {os.path.basename(result.ema_saved[-1])}" if result.ema_saved else ""
        print(f"  ok       {label}: loss {result.loss:.4f}{extra} ({time.perf_counter() - started:.1f} s)")


def run_peer(base: str, images: str, args: Any, device: str, tiny: bool) -> tuple[float, float | None]:
    """diffusers + peft, written plainly: the loop of diffusers' train_text_to_image_lora.py, latents encoded once."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel

    from modelkit.train.methods.lora import unet_targets
    from modelkit.train.tokenizer import build_tokenizer

    wdtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision, torch.float32)
    dev = torch.device(device)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=wdtype).to(dev)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=wdtype).to(dev)
    te = CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder"), torch_dtype=wdtype).to(dev)
    sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    tok = build_tokenizer()
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    targets, _ = unet_targets(unet, False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=True, target_modules=targets))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device, enabled=args.precision == "fp16")
    autocast = torch.autocast(dev.type, dtype=wdtype, enabled=args.precision != "no")
    dists = []
    with torch.no_grad(), autocast:
        for name in sorted(n for n in os.listdir(images) if n.endswith(".png")):
            with Image.open(os.path.join(images, name)) as im:
                px = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
            d = vae.encode(px.permute(2, 0, 1)[None].to(dev, wdtype)).latent_dist
            dists.append((d.mean, d.std))
    sf = vae.config.scaling_factor
    clock = Clock(args.warmup, device == "cuda")
    gen = torch.Generator().manual_seed(0)
    for step in range(1, args.warmup + args.steps + 1):
        mean, std = dists[step % len(dists)]
        ids = tok([CAPTION], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(dev)
        with autocast:
            latents = ((mean + std * torch.randn(mean.shape, generator=gen).to(dev, mean.dtype)) * sf).to(wdtype)
            noise = torch.randn(latents.shape, generator=gen).to(dev, wdtype)
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=gen).to(dev)
            noisy = sched.add_noise(latents, noise, t)
            with torch.no_grad():
                states = te(ids)[0]
            pred = unet(noisy, t, states.to(wdtype)).sample
            loss = F.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        clock(step)
    return clock.result()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model at 64 px (automatic without CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30; 20 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 3 with --tiny)")
    ap.add_argument("--precision", choices=("bf16", "fp16", "no"), default=None,
                    help="mixed precision (default bf16 on CUDA, no on the CPU)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two loops N times; report each one's best")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--no-features", action="store_true", help="tiny mode: skip running each issue-19 feature once")
    args = ap.parse_args()
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device = "cuda" if cuda and not args.tiny else "cpu"
    args.steps = args.steps or (20 if tiny else 30)
    args.warmup = args.warmup or (3 if tiny else 5)
    args.precision = args.precision or ("bf16" if device == "cuda" else "no")
    if device == "cpu" and args.precision != "no":
        ap.error("--precision bf16/fp16 needs CUDA here; the CPU run is fp32 (--precision no)")
    name = "tiny" if tiny else "sd15"
    print(f"building the {name} base in {args.out} (once) ...", flush=True)
    base = build_base(os.path.join(args.out, f"train-{name}-base"), tiny)
    images = build_images(os.path.join(args.out, f"train-{name}-images"), 64 if tiny else 512)
    if tiny:
        print("NOTE: CPU tiny mode (the tiny test UNet, 64 px, fp32). This only checks that the bench runs; "
              "the real target (SD-1.5 UNet, 512 px, bf16/fp16) needs a CUDA GPU: run it there without --tiny.")
    mks, peers = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-train-") as work:
            _free(device)
            mks.append(run_modelkit(base, images, work, args, device, tiny))
            _free(device)
            peers.append(run_peer(base, images, args, device, tiny))
    mk, peer = (max(r[0] for r in rs) for rs in (mks, peers))
    mk_peak, peer_peak = (max((r[1] for r in rs if r[1] is not None), default=None) for rs in (mks, peers))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\nLoRA rank {RANK}, {'tiny UNet, 64 px' if tiny else 'SD-1.5 UNet, 512 px'}, batch 1, precision "
          f"{args.precision}, SDPA, {args.steps} steps after {args.warmup} warm-up, best of {args.rounds} alternating "
          f"round(s), on {gpu} (torch {torch.__version__})")
    print(f"| {'loop':<26} | {'steps/s':>8} | {'peak GPU memory':>15} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 17}|")
    for label, rate, peak in (("modelkit train lora", mk, mk_peak), ("diffusers + peft (plain)", peer, peer_peak)):
        mem = f"{peak:.2f} GiB" if peak is not None else "n/a (CPU)"
        print(f"| {label:<26} | {rate:8.2f} | {mem:>15} |")
    ratio_mem = f"{mk_peak / peer_peak:.2f}x" if mk_peak and peer_peak else "-"
    print(f"| {'ratio modelkit / peer':<26} | {mk / peer:7.2f}x | {ratio_mem:>15} |")
    if tiny and not args.no_features:
        with tempfile.TemporaryDirectory(prefix="bench-train-features-") as work:
            run_features(base, images, work)
            for family in ("flux", "sd3"):
                run_flux(work, family=family)


def run_flux(work: str, steps: int = 10, family: str = "flux") -> None:
    """Tiny CPU mode: a Flux (or SD3) LoRA once, on the tiny folder of ``fixtures/dit_train.py`` (32 px,
    kohya layout); prints ok with the loss and steps/s, or FAILED."""
    from fixtures import dit_train
    from modelkit.errors import ModelkitError
    from modelkit.train.config import build_config
    from modelkit.train.loop import train

    label = {"flux": "Flux.1 LoRA, once (tiny Flux-dev folder", "sd3": "SD3 LoRA, once (tiny SD3 folder"}[family]
    print(f"\n{label}, 32 px, {steps} steps, CPU):")
    base = dit_train.write_folder(family, os.path.join(work, f"{family}-base"))
    images = dit_train.write_images(os.path.join(work, f"{family}-images"), count=4)
    cfg = build_config("lora", {
        "model": {"path": base},
        "dataset": {"path": images, "resolution": 32, "bucketing": False, "min_bucket": 32, "max_bucket": 32,
                    "min_image_size": 16},
        "network": {"dim": 4, "alpha": 4.0}, "optimizer": {"lr": 1e-3}, "flow": {"t5_max_length": 8},
        "train": {"max_steps": steps, "device": "cpu", "seed": 0, "threads": 1},
        "output": {"dir": os.path.join(work, f"{family}-out"), "save_state": False, "force": True},
    }, ())
    clock = Clock(1, False)
    started = time.perf_counter()
    try:
        result = train(cfg, progress=clock)
    except ModelkitError as exc:
        print(f"  FAILED   {family} lora: {exc}")
        return
    rate, _peak = clock.result()
    print(f"  ok       {family} lora: loss {result.losses[0]:.4f} -> {result.loss:.4f}, {rate:.1f} steps/s after 1 "
          f"warm-up step, {os.path.basename(result.output)} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
