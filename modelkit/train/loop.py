"""The training loop (accelerate): mixed precision, accumulation, saves, resume, NaN stop.

``accelerate launch -m modelkit train ...`` runs the same loop on several GPUs or nodes: each
process takes its share of every epoch's batches, and only the main process writes files.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import OutputExistsError, OutputWriteError, TrainingError, UsageError
from ..paths import atomic_output, check_output
from . import data, validation
from .config import Config, resolved
from .ema import EMA, ema_path
from .export import common_metadata
from .logs import TensorBoard, WandB, log_dir, require_tensorboard, require_wandb
from .optim import OPTIMIZERS, check_optimizer, make_optimizer, make_scheduler
from .sample import sample_images, sample_paths
from .state import Counters, load_extra, load_state, save_state
from .step import compute_loss, load_batch
from .tomlio import render_toml

#: ``progress(step, total, loss, lr)`` after every optimizer step.
Progress = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class RunStart:
    """What a run is about to do, given to ``train``'s ``on_start`` just before the first step."""

    method: str
    base: str
    model: str
    images: int
    buckets: int
    steps: int
    start: int
    output: str
    config_file: str
    device: str
    threads: int


@dataclass(frozen=True)
class TrainResult:
    """What a run did."""

    method: str
    base: str
    prediction: str
    output: str
    steps: int
    epochs: float
    loss: float
    seconds: float
    saved: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    images: int = 0
    skipped: tuple[data.Skipped, ...] = ()
    notes: tuple[str, ...] = ()
    losses: tuple[float, ...] = field(default=(), repr=False)
    samples: tuple[str, ...] = ()
    class_images: tuple[str, ...] = ()
    #: False in the other processes of ``accelerate launch``/``torchrun``: they write nothing and report nothing.
    main: bool = True
    #: The resolved config, saved beside the output (``<name>.config.toml``).
    config_file: str = ""
    #: ``train.ema``: the EMA outputs written (``<name>-ema.safetensors`` last).
    ema_saved: tuple[str, ...] = ()
    #: ``train.validation_every``: ``(step, validation loss)`` pairs.
    validation: tuple[tuple[int, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "base": self.base, "prediction": self.prediction, "output": self.output,
                "steps": self.steps, "epochs": self.epochs, "loss": self.loss, "seconds": round(self.seconds, 3),
                "saved": list(self.saved), "states": list(self.states), "images": self.images,
                "skipped": [s.to_dict() for s in self.skipped], "notes": list(self.notes),
                "samples": list(self.samples), "class_images": list(self.class_images), "config": self.config_file,
                "ema": list(self.ema_saved), "validation": [{"step": s, "loss": v} for s, v in self.validation]}


def _weight_dtype(precision: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def _accelerator(config: Config) -> Any:
    from accelerate import Accelerator

    tc = config.train
    try:
        return Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.device == "cpu")
    except (ValueError, RuntimeError) as exc:
        raise UsageError(None, f"key train.mixed_precision={tc.mixed_precision}: {exc}",
                         "Use bf16 or no on this device") from None


#: DreamBooth keys a resume may change: where class images are and how missing ones are generated.
_DB_FREE = ("class_path", "num_class_images", "class_steps", "class_guidance_scale", "class_negative_prompt")


def _ss_optimizer(o: Any) -> str:
    """``ss_optimizer`` as kohya writes it: the class, and its extra arguments in brackets."""
    args = ",".join(f"{k}={v}" for k, v in o.args.items())
    return OPTIMIZERS[o.name].kohya + (f"({args})" if args else "")


def _fingerprint(config: Config) -> dict[str, Any]:
    """Settings a resume must keep (the rest may change, e.g. max_steps or the save cadence)."""
    c = config
    d = c.to_dict()
    network = {k: v for k, v in d["network"].items() if k != "layout"}  # the layout only changes the export
    return {"method": c.method, "network": network, "ti": d["ti"], "hypernetwork": d["hypernetwork"],
            "dreambooth": {k: v for k, v in d["dreambooth"].items() if k not in _DB_FREE}, "seed": c.train.seed,
            "batch_size": c.train.batch_size, "grad_accum": c.train.grad_accum, "optimizer": c.optimizer.name,
            **({"ema": c.train.ema_decay, "ema_warmup": c.train.ema_warmup} if c.train.ema else {}),
            # the state's param_groups bring back the arguments it was saved with: a change would be lost
            "optimizer_args": d["optimizer"]["args"]}


def _threads(cfg: Config, device: Any) -> int:
    """``train.threads``, or on the CPU the usable cores shared among this machine's processes; 0: leave torch alone."""
    if cfg.train.threads:
        return cfg.train.threads
    if getattr(device, "type", str(device)) != "cpu":
        return 0
    from ..portable import usable_cpus

    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, usable_cpus() // local)


def _save_config(cfg: Config) -> str:
    """Write the resolved config beside the output, atomically; a new run replaces an old one."""
    path = os.path.join(cfg.output.dir, f"{cfg.output.name}.config.toml")
    with atomic_output(path, force=True) as fd:
        os.write(fd, render_toml(cfg).encode("utf-8"))
    return path


def train(config: Config, progress: Progress | None = None,
          on_skip: Callable[[data.Skipped], None] | None = None,
          on_start: Callable[[RunStart], None] | None = None) -> TrainResult:
    """Train ``config.method`` on ``config.dataset`` and write ``.safetensors`` outputs.

    torch's CPU thread count is set to ``train.threads`` (see ``TrainingConfig``) for the run and
    put back after it.

    Args:
        config: the run (``modelkit.train.load_config``).
        progress: called after each optimizer step.
        on_skip: called for each dataset image that is skipped.
        on_start: called once, in the main process, just before the first step.

    Returns:
        A ``TrainResult``.

    Raises:
        ConfigError, UsageError: a bad setting. OutputExistsError: the output exists (no ``force``).
        TrainingError: the loss became NaN/inf, or the resume state does not fit.
    """
    import torch

    before = torch.get_num_threads()
    try:
        return _train(config, progress, on_skip, on_start)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _train(config: Config, progress: Progress | None, on_skip: Callable[[data.Skipped], None] | None,
           on_start: Callable[[RunStart], None] | None) -> TrainResult:
    import torch

    from .base import load_base
    from .methods import make_method, preflight

    started = time.monotonic()
    cfg = resolved(config)
    preflight(cfg)  # Flux/SD3: what cannot be trained is refused before anything is loaded or written
    oc = cfg.output
    if oc.tensorboard:
        require_tensorboard()
    check_optimizer(cfg)  # the package, and optimizer.args against its constructor
    if oc.wandb:
        require_wandb()
    os.makedirs(oc.dir, exist_ok=True)
    final = os.path.join(oc.dir, f"{oc.name}.safetensors")
    final_state = os.path.join(oc.dir, f"{oc.name}-state")
    check_output(final, force=oc.force)
    if cfg.train.ema:
        check_output(ema_path(final), force=oc.force)
    if cfg.method == "dreambooth" and os.path.isdir(cfg.model.path) and not oc.force \
            and os.path.lexists(final[: -len(".safetensors")]):  # DreamBooth on a diffusers folder writes a folder
        raise OutputExistsError(final[: -len(".safetensors")], "already exists")
    if cfg.train.ema and cfg.method == "dreambooth" and os.path.isdir(cfg.model.path) and not oc.force \
            and os.path.lexists(ema_path(final)[: -len(".safetensors")]):  # ... and its EMA a folder too
        raise OutputExistsError(ema_path(final)[: -len(".safetensors")], "already exists")
    _check_cache_folders(cfg)
    if oc.save_state and os.path.abspath(final_state) != os.path.abspath(oc.resume or ""):
        check_output(os.path.join(final_state, "state.safetensors"), force=oc.force)
    # Saves past the resumed step belong to the abandoned run: a resume may replace them.
    replace_saves = oc.force or oc.resume is not None
    if cfg.sample.enabled and not replace_saves:
        _check_samples(cfg)
    accelerator = _accelerator(cfg)
    threads = _threads(cfg, accelerator.device)
    if threads:
        torch.set_num_threads(threads)
        cfg = replace(cfg, train=replace(cfg.train, threads=threads))
    config_file = _save_config(cfg) if accelerator.is_main_process else ""
    weight_dtype = _weight_dtype(cfg.train.mixed_precision)
    # wandb first: a login problem is one line before the base is loaded, not a traceback after it
    wandb_run = WandB(cfg, log_dir(cfg)) if oc.wandb and accelerator.is_main_process else None
    try:
        ds = data.scan(cfg.dataset, on_skip)
        held = validation.split(cfg, ds, on_skip)
        base = load_base(cfg.model, dtype=weight_dtype)
        generated: list[str] = []
        if cfg.method == "dreambooth" and cfg.dreambooth.num_class_images:
            generated = _class_images(cfg, base, accelerator)
        method = make_method(cfg, base)
        if base.prediction == "flow":
            from .flow import t5_length

            base.tokenizers[-1].model_max_length = t5_length(cfg, base)
        groups = method.prepare()
        _configure(cfg, base, method, weight_dtype)
        optimizer = make_optimizer(cfg, groups)
        world, rank = accelerator.num_processes, accelerator.process_index
        per_epoch = len(ds.batches(cfg.train.batch_size, cfg.train.seed, 0)) // world
        if per_epoch < 1:
            raise UsageError(cfg.dataset.path, f"{len(ds.items)} images make fewer batches than processes ({world})")
        steps_per_epoch = max(1, per_epoch // cfg.train.grad_accum)
        total = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
        if cfg.train.epochs:
            total = min(total, steps_per_epoch * cfg.train.epochs)
        scheduler = make_scheduler(cfg, optimizer, total)
        unet = accelerator.prepare(base.unet) if method.name != "ti" else base.unet
        for i, on in enumerate(method.train_text):
            if on:  # wrapped for multi-GPU gradient sync; the method keeps references to the inner module
                base.text_encoders[i] = accelerator.prepare(base.text_encoders[i])
        optimizer = accelerator.prepare(optimizer)
        params = method.trainable()
        counters = Counters(0, 0)
        if oc.resume:
            counters = load_state(oc.resume, params, optimizer, scheduler, accelerator.scaler, _fingerprint(cfg))
        for m in method.modules_in_training():
            m.train()
        device = accelerator.device
        for m in (base.vae, *base.text_encoders):
            m.to(device)
        base.unet.to(device)
        notes = list(base.notes)
        if cfg.dataset.cache_latents:
            method.latents = _cache_latents(cfg, base, ds, method, accelerator, notes, held)
        text_cache = _text_cache(cfg, base, notes)
        if text_cache is not None:
            _build_text_cache(cfg, text_cache, base, ds, method, accelerator, held)
        ema = EMA(params, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema else None
        if ema is not None and oc.resume:
            ema.load(load_extra(oc.resume, "ema."))
        ema_saved: list[str] = []
        validated: list[tuple[int, float]] = []
        text_grad = any(method.train_text)
        meta = _metadata(cfg, base, ds, method.adapter)
        saved: list[str] = []
        states: list[str] = []
        losses: list[float] = []
        samples: list[str] = []
        epoch_batches: dict[int, list[list[int]]] = {}
        step, micro = counters.step, counters.micro
        running = 0.0
        trainable = [p for g in groups for p in g["params"]]
        board = TensorBoard(log_dir(cfg)) if oc.tensorboard and accelerator.is_main_process else None
        if on_start is not None and accelerator.is_main_process:
            on_start(RunStart(cfg.method, base.family, cfg.model.path, len(ds.items), len({i.bucket for i in ds.items}),
                              total, step, final, config_file, str(device), torch.get_num_threads()))
        if cfg.sample.at_start and step == 0 and accelerator.is_main_process:
            samples.extend(sample_images(cfg, base, method, 0, replace_saves, accelerator.autocast,
                                         board.writer if board is not None else None))
            if board is not None:
                board.resume_clock()
    except BaseException:
        if wandb_run is not None:
            wandb_run.close()
        raise
    try:
        if held and cfg.train.validation_every and step == 0:  # where the curve starts: the untrained model
            value = validation.validation_loss(cfg, base, unet, method, held, device, weight_dtype,
                                               accelerator.autocast, text_cache)
            validated.append((0, value))
            for sink in (board, wandb_run):
                if sink is not None:
                    sink.scalar("validation/loss", value, 0)
        while step < total:
            epoch, index = divmod(micro, per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: ds.batches(cfg.train.batch_size, cfg.train.seed, epoch)}
            # This process's micro-batch, numbered across all processes: its random draws (noise,
            # timesteps, caption shuffles, flips) are those micro-batch ``sample`` gets in a single
            # process with ``grad_accum`` x ``world``, so N processes train like one, and no two
            # processes share noise.
            sample = micro * world + rank
            batch = load_batch(ds, epoch_batches[epoch][index * world + rank], cfg, sample, method.caption,
                               method.latents)
            prior = method.prior_batch(sample)
            with accelerator.autocast():
                loss = compute_loss(cfg, base, unet, batch, sample, device, weight_dtype, text_grad, text_cache)
                if prior is not None:  # DreamBooth's prior preservation, with its own noise stream
                    loss = loss + cfg.dreambooth.prior_loss_weight * compute_loss(
                        cfg, base, unet, prior, -1 - sample, device, weight_dtype, text_grad, text_cache)
            if not torch.isfinite(loss):
                raise TrainingError(None, f"the loss became {loss.detach().item()} at step {step + 1} (micro-batch {micro})",
                                    "Lower optimizer.lr, use bf16 rather than fp16, or check the images and captions")
            accelerator.backward(loss / cfg.train.grad_accum)
            running += float(loss.detach()) / cfg.train.grad_accum
            micro += 1
            if micro % cfg.train.grad_accum:
                continue
            if cfg.optimizer.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, cfg.optimizer.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(step)
            step += 1
            losses.append(running)
            if progress is not None and accelerator.is_main_process:
                progress(step, total, running, float(scheduler.get_last_lr()[0]))
            if board is not None:
                board.step(step, running, [float(x) for x in scheduler.get_last_lr()], micro / per_epoch)
            if wandb_run is not None:
                wandb_run.step(step, running, [float(x) for x in scheduler.get_last_lr()], micro / per_epoch)
            running = 0.0
            if held and cfg.train.validation_every and step % cfg.train.validation_every == 0:
                value = validation.validation_loss(cfg, base, unet, method, held, device, weight_dtype,
                                                   accelerator.autocast, text_cache)
                validated.append((step, value))
                for sink in (board, wandb_run):
                    if sink is not None:
                        sink.scalar("validation/loss", value, step)
            if cfg.sample.every_steps and step % cfg.sample.every_steps == 0 and accelerator.is_main_process:
                samples.extend(sample_images(cfg, base, method, step, replace_saves, accelerator.autocast,
                                             board.writer if board is not None else None))
            epoch_done = micro // per_epoch > (micro - cfg.train.grad_accum) // per_epoch
            due = (oc.save_every_steps and step % oc.save_every_steps == 0) or (
                oc.save_every_epochs and epoch_done and (micro // per_epoch) % oc.save_every_epochs == 0)
            if due and step < total and accelerator.is_main_process:
                tag = f"{oc.name}-step{step:06d}"
                out = os.path.join(oc.dir, tag + ".safetensors")
                saved.append(_export(method, out, meta, cfg, step, micro / per_epoch, replace_saves))
                if ema is not None:
                    ema_saved.append(_export_ema(ema, method, ema_path(out), meta, cfg, step, micro / per_epoch,
                                                 replace_saves))
                if oc.save_state:
                    states.append(save_state(os.path.join(oc.dir, tag + "-state"), Counters(step, micro), params, optimizer,
                                             scheduler, accelerator.scaler, _fingerprint(cfg), force=replace_saves,
                                             extra=ema.state() if ema is not None else None))
            for sink in (board, wandb_run):
                if sink is not None:
                    sink.resume_clock()
    finally:
        for sink in (board, wandb_run):
            if sink is not None:
                sink.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        saved.append(_export(method, final, meta, cfg, step, micro / per_epoch, oc.force))
        if ema is not None:
            ema_saved.append(_export_ema(ema, method, ema_path(final), meta, cfg, step, micro / per_epoch, oc.force))
        if oc.save_state:
            states.append(save_state(final_state, Counters(step, micro), params, optimizer, scheduler,
                                     accelerator.scaler, _fingerprint(cfg), force=True,
                                     extra=ema.state() if ema is not None else None))
    if text_cache is not None:
        notes.append(f"text cache {text_cache.folder}: {text_cache.built} encoded, {text_cache.reused} reused, "
                     f"{text_cache.rebuilt} rebuilt")
    return TrainResult(cfg.method, base.family, base.prediction, saved[-1] if saved else final, step,
                       round(micro / per_epoch, 3), losses[-1] if losses else float("nan"),
                       time.monotonic() - started, tuple(saved), tuple(states), len(ds.items), tuple(ds.skipped),
                       tuple(notes), tuple(losses), tuple(samples), tuple(generated), accelerator.is_main_process,
                       config_file, tuple(ema_saved), tuple(validated))


def _check_samples(cfg: Config) -> None:
    """Refuse to start when sample images of this output name exist (they would be replaced).

    Raises:
        OutputExistsError: one does, and neither ``output.force`` nor ``output.resume`` is set.
    """
    folder = os.path.dirname(sample_paths(cfg, 0)[0])
    prefix = f"{cfg.output.name}-step"
    found = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".png")) \
        if os.path.isdir(folder) else []
    if found:
        raise OutputExistsError(os.path.join(folder, found[0]), f"exists ({len(found)} sample images of an earlier run)",
                                "Pass --force (output.force = true) to replace them, or choose another output.dir or output.name")


def _class_images(cfg: Config, base: Any, accelerator: Any) -> list[str]:
    """DreamBooth: generate the missing class images with the base, before anything is trained
    (main process; the others wait)."""
    from .sample import generate_class_images

    written: list[str] = []
    if accelerator.is_main_process:
        for m in (base.unet, base.vae, *base.text_encoders):
            m.to(accelerator.device)
        written = generate_class_images(cfg, base, accelerator.autocast)
        base.notes.append(f"generated {len(written)} class images in {cfg.dreambooth.class_path}")
    accelerator.wait_for_everyone()
    return written


def _check_cache_folders(cfg: Config) -> None:
    """The latent and text cache folders in use: created now, and writable, or one line before anything loads.

    Raises:
        OutputWriteError: a file is in the way, or the folder cannot be created or written.
    """
    from . import latents, textcache

    for on, folder, key in ((cfg.dataset.cache_latents, latents.cache_folder(cfg), "dataset.cache_dir"),
                            (cfg.dataset.cache_text, textcache.cache_folder(cfg), "dataset.text_cache_dir")):
        if not on:
            continue
        try:
            os.makedirs(folder, exist_ok=True)
            writable = os.access(folder, os.W_OK | os.X_OK)
        except OSError as exc:
            raise OutputWriteError(folder, f"key {key}: cannot use it as the cache folder ({exc.strerror or exc})",
                                   f"Set {key} to a folder you can write to") from None
        if not writable:
            raise OutputWriteError(folder, f"key {key}: the cache folder is not writable",
                                   f"Set {key} to a folder you can write to")


def _text_cache(cfg: Config, base: Any, notes: list[str]) -> Any:
    """The text-encoder output cache (``dataset.cache_text``), or None."""
    if not cfg.dataset.cache_text:
        return None
    from .textcache import TextCache, cache_folder, text_identity

    return TextCache(cache_folder(cfg), text_identity(base, cfg.model.clip_skip), notes.append)


def run_captions(cfg: Config, ds: data.Dataset, method: Any, held: list[data.Item] | None) -> list[str]:
    """Every caption the run can give the text encoders (with ``dataset.cache_text``, whose options make
    no new captions at a step: caption dropout gives the empty one): training, class and held-out images."""
    captions = [method.caption(item.caption) for item in ds.items]
    if cfg.dataset.caption_dropout:
        captions.append(method.caption(""))
    captions += [item.caption for item in method.cache_items()]  # DreamBooth's class images, as prior_batch reads them
    if cfg.dataset.caption_dropout and method.cache_items():
        captions.append("")
    captions += [method.caption(item.caption) for item in held or []]
    return captions


def _build_text_cache(cfg: Config, cache: Any, base: Any, ds: data.Dataset, method: Any, accelerator: Any,
                      held: list[data.Item] | None) -> None:
    """Encode every caption of the run once (main process; the others wait), then move the text encoders off
    the GPU when nothing else needs them (samples do)."""
    import torch

    if accelerator.is_main_process:
        cache.build(base, run_captions(cfg, ds, method, held), accelerator.device, cfg.model.clip_skip)
    accelerator.wait_for_everyone()
    if not cfg.sample.enabled:
        for te in base.text_encoders:
            te.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _export_ema(ema: EMA, method: Any, path: str, meta: dict[str, str], cfg: Config, step: int, epoch: float,
                force: bool) -> str:
    """The EMA weights through the method's own exporter (same layout as the main output)."""
    return ema.swapped(lambda: _export(method, path, {**meta, "modelkit.ema_decay": repr(cfg.train.ema_decay)},
                                       cfg, step, epoch, force))


def _cache_latents(cfg: Config, base: Any, ds: data.Dataset, method: Any, accelerator: Any, notes: list[str],
                   held: list[data.Item] | None = None) -> Any:
    """Build the latent cache (main process; the others wait), then move the VAE off the GPU if
    nothing else needs it."""
    from .latents import LatentCache, cache_folder, vae_identity

    cache = LatentCache(cache_folder(cfg), vae_identity(base.vae))
    if accelerator.is_main_process:
        stats = cache.build([*ds.items, *method.cache_items(), *(held or [])], cfg.dataset.flip, base.vae,
                            accelerator.autocast)
        notes.append(f"latent cache {cache.folder}: {stats.built} encoded, {stats.reused} reused, "
                     f"{stats.removed} stale removed")
    accelerator.wait_for_everyone()
    if not cfg.sample.enabled:
        base.vae.to("cpu")
    return cache


def _configure(cfg: Config, base: Any, method: Any, weight_dtype: Any) -> None:
    """Attention processor, gradient checkpointing and the SDXL VAE's fp32 upcast."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if base.prediction != "flow":  # Flux/SD3 keep their own processors (SDPA)
        base.unet.set_attn_processor(AttnProcessor2_0() if cfg.train.attention == "sdpa" else AttnProcessor())
    if cfg.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for te, on in zip(base.text_encoders, method.train_text):
            if on:
                te.gradient_checkpointing_enable()
    if base.family == "sdxl" and weight_dtype == torch.float16:
        base.vae.to(torch.float32)  # the SDXL VAE overflows in fp16


def _metadata(cfg: Config, base: Any, ds: data.Dataset, adapter: str) -> dict[str, str]:
    import json

    d, t, o = cfg.dataset, cfg.train, cfg.optimizer
    images = sum(i.repeats for i in ds.items)
    dirs: dict[str, dict[str, int]] = {}
    for item in ds.items:
        group = os.path.relpath(os.path.dirname(item.path), d.path).split(os.sep)[0]
        entry = dirs.setdefault(group, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    meta = common_metadata(cfg.output.name, base.family, base.prediction, adapter, d.resolution)
    if cfg.method not in ("lora", "locon"):
        return meta
    meta.update({
        "ss_session_id": str(random.Random(t.seed).randint(0, 2**31)), "ss_output_name": cfg.output.name,
        "ss_training_comment": "modelkit train", "ss_sd_model_name": os.path.basename(cfg.model.path.rstrip("/")),
        "ss_learning_rate": repr(o.lr), "ss_optimizer": _ss_optimizer(o), "ss_lr_scheduler": cfg.scheduler.name, "ss_lr_warmup_steps": str(cfg.scheduler.warmup_steps),
        "ss_max_train_steps": str(t.max_steps), "ss_num_epochs": str(t.epochs), "ss_batch_size_per_device": str(t.batch_size),
        "ss_gradient_accumulation_steps": str(t.grad_accum), "ss_mixed_precision": t.mixed_precision,
        "ss_gradient_checkpointing": str(t.gradient_checkpointing), "ss_seed": str(t.seed),
        "ss_min_snr_gamma": str(t.min_snr_gamma or None), "ss_noise_offset": str(t.noise_offset or None),
        "ss_clip_skip": str(cfg.model.clip_skip), "ss_max_grad_norm": str(o.max_grad_norm),
        "ss_resolution": f"({d.resolution}, {d.resolution})", "ss_enable_bucket": str(d.bucketing),
        "ss_min_bucket_reso": str(d.min_bucket), "ss_max_bucket_reso": str(d.max_bucket),
        "ss_keep_tokens": str(d.keep_tokens), "ss_shuffle_caption": str(d.shuffle_tags),
        "ss_caption_dropout_rate": str(d.caption_dropout), "ss_caption_tag_dropout_rate": str(d.tag_dropout),
        "ss_flip_aug": str(d.flip), "ss_num_train_images": str(images), "ss_num_reg_images": "0",
        "ss_masked_loss": str(d.masked_loss),
        "ss_tag_frequency": json.dumps(ds.tag_frequency, ensure_ascii=False), "ss_dataset_dirs": json.dumps(dirs),
        "ss_training_started_at": str(time.time()),
    })
    return meta


def _export(method: Any, path: str, meta: dict[str, str], cfg: Config, step: int, epoch: float, force: bool) -> str:
    import torch

    dtype = getattr(torch, cfg.output.dtype)
    extra = {"modelkit.step": str(step)}
    if cfg.method in ("lora", "locon"):
        extra.update({"ss_steps": str(step), "ss_epoch": str(math.ceil(epoch)), "ss_training_finished_at": str(time.time())})
    return str(method.export(path, {**meta, **extra}, dtype, force).path)


__all__ = ["Progress", "RunStart", "TrainResult", "make_optimizer", "train"]
