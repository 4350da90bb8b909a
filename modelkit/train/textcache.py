"""Text-encoder output caching (``dataset.cache_text``) for runs whose text encoders are frozen.

Each caption the UNet sees is encoded once; its output (``states``, and SDXL's, Flux's and SD3's ``pooled``) is one
``.safetensors`` file, written atomically by the core's writer, named by a hash of the caption and
of everything the output depends on: each text encoder's config, dtype and weights, the tokenizers
(class, vocabulary size, maximum length), the base family and ``model.clip_skip``. A changed
caption or model gives another file. The full key is in the file's metadata and is checked, with
the tensors' names, before a file is used; a file that cannot be read or does not match is
encoded again and replaced, and the run gets a one-line note.

Captions are encoded one at a time, so a cached output is exactly what the encoder gives for that
caption alone: at ``train.batch_size = 1`` a cached run equals an uncached one bit for bit; with
larger batches the uncached run encodes the captions together and may differ by float rounding.

Every caption a run can feed the encoders is known before it starts (the caption options that make
new captions at each step, tag shuffling and tag dropout, are refused with the cache), so ``build``
encodes them all before step 1; the training loop then moves the text encoders off the GPU, which is
what lets a large model (SDXL, Flux's T5) train in less memory. A caption that shows up anyway is
encoded where the encoders are and its output moved to the training device.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from ..errors import ModelkitError
from .export import save_tensors

LAYOUT = "modelkit-text/1"
#: The default cache folder, inside ``output.dir``.
FOLDER = ".modelkit-text"


def cache_folder(config: Any) -> str:
    """``dataset.text_cache_dir``, or ``<output.dir>/.modelkit-text``."""
    return str(config.dataset.text_cache_dir or os.path.join(config.output.dir, FOLDER))


def text_identity(base: Any, clip_skip: int) -> str:
    """A hash of the text encoders (config, dtype, weights), the tokenizers, the family and clip skip."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"layout": LAYOUT, "family": base.family, "clip_skip": clip_skip}).encode())
    for tok in base.tokenizers:
        h.update(f"{type(tok).__name__}|{len(tok)}|{tok.model_max_length}|".encode())
    for te in base.text_encoders:
        inner = getattr(te, "module", te)
        config = {k: v for k, v in inner.config.to_dict().items() if not k.startswith("_")}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in inner.state_dict().items():
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TextCache:
    """The cache of one set of text encoders in one folder.

    Args:
        folder: where the entries live (created when needed).
        identity: ``text_identity`` of the encoders.
        note: called with a one-line message when a corrupt or foreign entry is rebuilt.
    """

    def __init__(self, folder: str, identity: str, note: Callable[[str], None] | None = None):
        self.folder = folder
        self.identity = identity
        self.note = note
        self.built = self.reused = self.rebuilt = 0

    def entry(self, caption: str) -> tuple[str, str]:
        """``(file, key)`` of a caption's entry."""
        key = hashlib.sha256(json.dumps({"id": self.identity, "caption": caption}).encode()).hexdigest()
        return os.path.join(self.folder, f"{key[:32]}.safetensors"), key

    def _read(self, file: str, key: str, pooled: bool) -> tuple[Any, Any] | str:
        """The entry's tensors, or why it cannot be used."""
        from .. import load, open_model

        try:
            with open_model(file) as mf:
                meta, names = dict(mf.metadata), set(mf)
            if meta.get("modelkit.text.key") != key:
                return "its key does not match"
            if names != ({"states", "pooled"} if pooled else {"states"}):
                return f"it holds {sorted(names)}"
            tensors = load(file)
        except (ModelkitError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return tensors["states"], tensors.get("pooled")

    def build(self, base: Any, captions: list[str], device: Any, clip_skip: int) -> None:
        """Encode and write every caption of ``captions`` the cache does not hold yet."""
        for caption in dict.fromkeys(captions):
            self.encode(base, [caption], device, clip_skip)

    def encode(self, base: Any, captions: list[str], device: Any, clip_skip: int) -> tuple[Any, Any]:
        """``(encoder_hidden_states, pooled or None)`` for the captions, as ``step.encode_text``
        gives them, from the cache where possible (missing entries are encoded and written)."""
        import torch

        from .step import encode_text

        pooled_wanted = base.family in ("sdxl", "flux", "sd3")
        states, pools = [], []
        for caption in captions:
            file, key = self.entry(caption)
            got: tuple[Any, Any] | str = "missing"
            if os.path.isfile(file):
                got = self._read(file, key, pooled_wanted)
                if isinstance(got, str) and self.note is not None:
                    self.note(f"text cache entry {file} is unusable ({got}); encoded again")
            if isinstance(got, str):
                where = next(getattr(base.text_encoders[0], "module", base.text_encoders[0]).parameters()).device
                with torch.no_grad():  # where the encoders are (on the CPU once the cache is built)
                    s, p = encode_text(base, [caption], where, clip_skip)
                tensors = {"states": s[0].detach().cpu().contiguous()}
                if p is not None:
                    tensors["pooled"] = p[0].detach().cpu().contiguous()
                save_tensors(file, tensors, {"modelkit.layout": LAYOUT, "modelkit.text.key": key}, force=True)
                if got == "missing":
                    self.built += 1
                else:
                    self.rebuilt += 1
                states.append(tensors["states"])
                pools.append(tensors.get("pooled"))
            else:
                self.reused += 1
                states.append(got[0])
                pools.append(got[1])
        out_states = torch.stack(states).to(device)
        out_pooled = torch.stack([p for p in pools if p is not None]).to(device) if pooled_wanted else None
        return out_states, out_pooled


__all__ = ["FOLDER", "LAYOUT", "TextCache", "cache_folder", "text_identity"]
