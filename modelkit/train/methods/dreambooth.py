"""DreamBooth: fine-tune the whole UNet (optionally the text encoders), with prior preservation.

Class images (``dreambooth.class_path``, captioned with ``class_prompt`` or their own captions) add
``prior_loss_weight`` times their own diffusion loss at every micro-step. With
``num_class_images`` the loop first fills the folder up to that many with images the base model
generates from ``class_prompt`` (``modelkit.train.sample.generate_class_images``).

Output, from a single-file base: a single-file checkpoint in the original LDM layout, A1111-loadable:
every tensor of the base file is streamed through unchanged except the trained ones, which take
their LDM names (``ldm_names``); EMA copies (``model_ema.*``) are dropped, being stale. From a
diffusers-folder base: a diffusers folder with ``.safetensors`` weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

from ...errors import FormatError
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
        groups.append({"params": [p for p in self.base.unet.parameters()], "lr": self.config.optimizer.lr})
        if self.config.dreambooth.train_text_encoder:
            for i, te in enumerate(self.base.text_encoders):
                cast(te, torch.float32).requires_grad_(True)
                self.train_text[i] = True
                groups.append({"params": list(te.parameters()), "lr": self.config.optimizer.lr})
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
            meta = {**mf.metadata, **metadata}
            with atomic_output(path, force=force, inputs=[source]) as fd:
                stats = write_stream(fd, records, meta, path=path)
        return Written(path, len(records), stats.size)

    def _export_folder(self, folder: str, metadata: dict[str, str], dtype: Any, force: bool) -> Written:
        """A diffusers folder: each component's weights as safetensors beside its config."""
        from ...paths import write_text_atomic

        parts = {"unet": self.base.unet, "vae": self.base.vae}
        for i, te in enumerate(self.base.text_encoders):
            parts["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te
        total = 0
        for sub, model in parts.items():
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
            model = _unwrap(model)
            weights = "model.safetensors" if sub.startswith("text") else "diffusion_pytorch_model.safetensors"
            written = save_tensors(os.path.join(folder, sub, weights), model.state_dict(), metadata, dtype=dtype,
                                   force=force)
            total += written.size
            config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
            write_text_atomic(os.path.join(folder, sub, "config.json"), json.dumps(config, indent=2, default=str))
        os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
        write_text_atomic(os.path.join(folder, "scheduler", "scheduler_config.json"),
                          json.dumps(dict(self.base.scheduler.config), indent=2, default=str))
        for i, tok in enumerate(self.base.tokenizers):
            tok.save_pretrained(os.path.join(folder, "tokenizer" if i == 0 else f"tokenizer_{i + 1}"))
        index = {"_class_name": "StableDiffusionXLPipeline" if self.base.family == "sdxl" else "StableDiffusionPipeline"}
        write_text_atomic(os.path.join(folder, "model_index.json"), json.dumps(index, indent=2))
        return Written(folder, len(parts), total)


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)
