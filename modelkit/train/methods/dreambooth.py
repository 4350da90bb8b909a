"""DreamBooth: fine-tune the whole UNet (optionally the text encoders), with prior preservation.

Class images (``dreambooth.class_path``, captioned with ``class_prompt`` or their own captions) add
``prior_loss_weight`` times their own diffusion loss at every micro-step. With
``num_class_images`` the loop first fills the folder up to that many with images the base model
generates from ``class_prompt`` (``modelkit.train.sample.generate_class_images``).

Output, from a single-file base: a single-file checkpoint in the original LDM layout, A1111-loadable:
every tensor of the base file is streamed through unchanged except the trained ones, which take
their LDM names (``ldm_names``); EMA copies (``model_ema.*``) are dropped, being stale. From a
diffusers-folder base: a complete diffusers pipeline folder (``model_index.json``, scheduler,
tokenizers, text encoders, UNet, VAE; weights ``.safetensors``) that ``from_pretrained`` loads offline,
published all at once (built in a temp folder beside it, then renamed).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from typing import Any

from ...errors import FormatError, OutputExistsError
from ...ops import modelspec as ms
from ..convert_ldm import TEXT_ENCODERS
from ..export import Written, out_tensor, save_tensors
from ..ldm_names import openclip_ldm_state, unet_ldm_name
from . import Method


class DreamBooth(Method):
    """Full fine-tuning of the UNet (and the text encoders with ``dreambooth.train_text_encoder``)."""

    name = "dreambooth"
    adapter = "checkpoint"

    def __init__(self, config: Any, base: Any):
        super().__init__(config, base)
        self.class_data: Any = None
        self.class_batches: list[list[int]] = []

    def prepare(self) -> list[dict[str, Any]]:
        import torch

        from .. import data
        from ..base import cast

        groups = []
        cast(self.base.unet, torch.float32).requires_grad_(True)
        groups.append({"params": [p for p in self.base.unet.parameters()], "lr": self.config.optimizer.lr,
                       "component": "unet"})
        if self.config.dreambooth.train_text_encoder:
            for i, te in enumerate(self.base.text_encoders):
                cast(te, torch.float32).requires_grad_(True)
                self.train_text[i] = True
                groups.append({"params": list(te.parameters()), "lr": self.config.optimizer.lr,
                               "component": "text_encoder"})
        db = self.config.dreambooth
        if db.class_path:
            cfg = replace(self.config.dataset, path=db.class_path, repeats=1, default_caption=db.class_prompt)
            self.class_data = data.scan(cfg)
            if db.class_prompt:
                self.class_data.items = [replace(i, caption=db.class_prompt) for i in self.class_data.items]
        return groups

    def trainable(self) -> dict[str, Any]:
        out = {f"unet.{k}": p for k, p in self.base.unet.named_parameters()}
        for i, (te, on) in enumerate(zip(self.base.text_encoders, self.train_text)):
            if on:
                out.update({f"te{i}.{k}": p for k, p in te.named_parameters()})
        return out

    def prior_batch(self, micro: int) -> Any:
        if self.class_data is None:
            return None
        from ..step import load_batch

        tc = self.config.train
        if not self.class_batches:
            self.class_batches = self.class_data.batches(tc.batch_size, tc.seed + 1, 0)
        indices = self.class_batches[micro % len(self.class_batches)]
        return load_batch(self.class_data, indices, self.config, -1 - micro, lambda text: text, self.latents)

    def cache_items(self) -> list[Any]:
        return list(self.class_data.items) if self.class_data is not None else []

    def ldm_state(self) -> dict[str, Any]:
        """The trained tensors under their LDM names."""
        out = {"model.diffusion_model." + unet_ldm_name(k, self.base.unet_config): v.detach()
               for k, v in _unwrap(self.base.unet).state_dict().items()}
        for i, (te, on) in enumerate(zip(self.base.text_encoders, self.train_text)):
            if not on:
                continue
            kind, prefix = TEXT_ENCODERS[self.base.family][i]
            state = {k: v.detach() for k, v in _unwrap(te).state_dict().items() if not k.endswith("position_ids")}
            if kind == "clip":
                out.update({prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()})
            else:
                out.update(openclip_ldm_state(state, prefix))
        return out

    def export(self, path: str, metadata: dict[str, str], dtype: Any, force: bool) -> Written:
        source = self.config.model.path
        if os.path.isdir(source):
            return self._export_folder(path[: -len(".safetensors")], metadata, dtype, force)
        from ... import open_model
        from ...formats.safetensors_write import OutTensor, write_stream
        from ...paths import atomic_output

        trained = self.ldm_state()
        with open_model(source) as mf:
            missing = [k for k in trained if k not in mf]
            if missing:
                raise FormatError(source, f"the trained model has {len(missing)} tensors the base file lacks "
                                  f"(first: {missing[0]!r})", "DreamBooth writes LDM files only for LDM bases")
            records: list[OutTensor] = []
            for name, ref in mf.items():
                if name.startswith("model_ema."):
                    continue
                if name in trained:
                    t = trained[name].reshape(ref.shape)
                    records.append(out_tensor(name, t, ref.dtype.torch() if ref.dtype.is_float else None))
                else:
                    records.append(OutTensor.of(ref))
            meta = {**ms.carried(mf.metadata), **ms.settled(metadata, [r.name for r in records])}
            with atomic_output(path, force=force, inputs=[source]) as fd:
                stats = write_stream(fd, records, meta, path=path)
        return Written(path, len(records), stats.size)

    def _export_folder(self, folder: str, metadata: dict[str, str], dtype: Any, force: bool) -> Written:
        """A complete diffusers pipeline folder (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
        ``.from_pretrained`` loads it): ``model_index.json``, scheduler, tokenizer(s), text encoder(s),
        UNet and VAE, every weight file ``.safetensors``. Built in a temp folder beside ``folder`` and
        renamed onto it at the end, so a failure leaves no partial folder.

        Raises:
            OutputExistsError: ``folder`` exists and ``force`` is false.
        """
        import shutil

        from ...paths import refuse_windows_name, temp_path
        from ...tempfiles import writer_token

        folder = os.path.abspath(folder)
        if os.path.lexists(folder) and not force:
            raise OutputExistsError(folder, "already exists")
        refuse_windows_name(folder)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = temp_path(folder, writer_token())
        os.mkdir(tmp)
        try:
            tensors, size = self._write_pipeline(tmp, metadata, dtype)
            _publish_folder(tmp, folder, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Written(folder, tensors, size)

    def _write_pipeline(self, root: str, metadata: dict[str, str], dtype: Any) -> tuple[int, int]:
        """Every component into ``root`` (a new, empty folder); returns (tensors, weight bytes)."""
        import diffusers

        parts: dict[str, Any] = {"unet": self.base.unet, "vae": self.base.vae}
        for i, te in enumerate(self.base.text_encoders):
            parts["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te
        xl = self.base.family == "sdxl"
        index: dict[str, Any] = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
                                 "_diffusers_version": diffusers.__version__}
        tensors = size = 0
        for sub, model in parts.items():
            model = _unwrap(model)
            where = os.path.join(root, sub)
            os.mkdir(where)
            text = sub.startswith("text")
            weights = "model.safetensors" if text else "diffusion_pytorch_model.safetensors"
            written = save_tensors(os.path.join(where, weights), model.state_dict(), metadata, dtype=dtype)
            tensors, size = tensors + written.tensors, size + written.size
            if text:
                config = copy.deepcopy(model.config)
                config.architectures = [type(model).__name__]
                config.save_pretrained(where)
            else:
                model.save_config(where)
            index[sub] = ["transformers" if text else "diffusers", type(model).__name__]
        scheduler = self._scheduler()
        scheduler.save_pretrained(os.path.join(root, "scheduler"))
        index["scheduler"] = ["diffusers", type(scheduler).__name__]
        for i, tok in enumerate(self.base.tokenizers):
            sub = "tokenizer" if i == 0 else f"tokenizer_{i + 1}"
            tok.save_pretrained(os.path.join(root, sub))
            index[sub] = ["transformers", type(tok).__name__]
        index.update({"feature_extractor": [None, None], "image_encoder": [None, None]})
        if xl:
            index["force_zeros_for_empty_prompt"] = True
        else:
            index.update({"safety_checker": [None, None], "requires_safety_checker": False})
        with open(os.path.join(root, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(dict(sorted(index.items())), f, indent=2)
        return tensors, size


    def _scheduler(self) -> Any:
        """The base folder's own scheduler (its class and settings, the prediction type trained with),
        else the training scheduler (DDPM)."""
        import diffusers

        path = os.path.join(self.config.model.path, "scheduler", "scheduler_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return self.base.scheduler
        cls = getattr(diffusers, str(config.get("_class_name")), None) if isinstance(config, dict) else None
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            return self.base.scheduler
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        return cls.from_config({**config, "prediction_type": self.base.prediction})


def _publish_folder(tmp: str, folder: str, force: bool) -> None:
    """Rename the finished ``tmp`` onto ``folder``; with ``force`` an existing ``folder`` is replaced
    (moved aside first, removed once the new one is in place).

    Raises:
        OutputExistsError: ``folder`` appeared meanwhile and ``force`` is false.
    """
    import shutil

    from ...paths import temp_path
    from ...tempfiles import writer_token

    old = None
    if os.path.lexists(folder):
        if not force:
            raise OutputExistsError(folder, "appeared while modelkit was writing it")
        old = temp_path(folder, writer_token())
        os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except BaseException:
        if old is not None:
            os.rename(old, folder)
        raise
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)
