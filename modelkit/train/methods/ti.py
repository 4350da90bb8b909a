"""Textual inversion: a new token with ``vectors`` embeddings, initialised from a word.

The token becomes ``vectors`` tokenizer entries (``<tok>``, ``<tok>_1`` ...). Each text encoder's
token embedding is wrapped so that the new rows are one small trainable parameter beside the
frozen table: nothing else can change, and the optimizer state stays tiny. Captions that lack the
token get it prepended (``ti.prepend``); the token is expanded to all its vectors.

Output: ``emb_params`` ``[vectors, width]`` (SD1/SD2), or ``clip_l`` + ``clip_g`` (SDXL), the
layouts A1111, ComfyUI and kohya read.
"""

from __future__ import annotations

import re
from typing import Any

from ...errors import ConfigError
from ..export import Written, save_tensors
from . import Method


def _embedding_module() -> Any:
    import torch

    class ExtendedEmbedding(torch.nn.Module):
        """A frozen embedding table plus trainable rows appended after its last id."""

        def __init__(self, base: Any, extra: Any):
            super().__init__()
            self.base = base
            self.extra = torch.nn.Parameter(extra)

        @property
        def weight(self) -> Any:
            return torch.cat([self.base.weight, self.extra.to(self.base.weight.dtype)], dim=0)

        def forward(self, ids: Any) -> Any:
            return torch.nn.functional.embedding(ids, self.weight)

    return ExtendedEmbedding


class TextualInversion(Method):
    """Train new token embeddings in every text encoder of the base."""

    name = "ti"
    adapter = "textual-inversion"

    def __init__(self, config: Any, base: Any):
        super().__init__(config, base)
        ti = config.ti
        self.token = ti.token.strip()
        self.words = [self.token] + [f"{self.token}_{i}" for i in range(1, ti.vectors)]
        self.extras: list[Any] = []

    def prepare(self) -> list[dict[str, Any]]:
        import torch

        ti = self.config.ti
        cls = _embedding_module()
        params = []
        for i, (tok, te) in enumerate(zip(self.base.tokenizers, self.base.text_encoders)):
            table = te.get_input_embeddings()
            first = int(table.weight.shape[0])
            init = tok(ti.init_word, add_special_tokens=False).input_ids
            if not init:
                raise ConfigError(None, f"key ti.init_word: {ti.init_word!r} gives no token")
            if len(tok) != first:
                raise ConfigError(None, f"tokenizer {i + 1} has {len(tok)} tokens but its text encoder has {first} "
                                  "embeddings", "Use the tokenizer that belongs to this model (model.tokenizer)")
            if tok.add_tokens(self.words) != len(self.words):
                raise ConfigError(None, f"key ti.token: {self.token!r} (or {self.token}_N) is already a token",
                                  "Choose a token that is not a word, such as <my-concept>")
            ids = tok.convert_tokens_to_ids(self.words)
            if list(ids) != list(range(first, first + len(self.words))):  # pragma: no cover - tokenizer invariant
                raise ConfigError(None, "the new token ids are not contiguous after the vocabulary")
            with torch.no_grad():
                rows = table.weight[[init[k % len(init)] for k in range(len(self.words))]].detach().float().clone()
            wrapped = cls(table, rows)
            te.set_input_embeddings(wrapped)
            self.extras.append(wrapped.extra)
            self.train_text[i] = True
            params.append(wrapped.extra)
        return [{"params": params, "lr": self.config.optimizer.lr, "weight_decay": 0.0, "component": "text_encoder"}]

    def trainable(self) -> dict[str, Any]:
        return {f"embedding_{i}": p for i, p in enumerate(self.extras)}

    def caption(self, text: str) -> str:
        expanded = " ".join(self.words)
        if self.token in text:
            return re.sub(re.escape(self.token) + r"(?!_\d)", expanded, text)
        if self.config.ti.prepend:
            return f"{expanded}, {text}" if text else expanded
        return text

    def prompt(self, text: str) -> str:
        expanded = " ".join(self.words)
        return re.sub(re.escape(self.token) + r"(?!_\d)", lambda _: expanded, text)

    def export(self, path: str, metadata: dict[str, str], dtype: Any, force: bool) -> Written:
        if self.base.family == "sdxl":
            tensors = {"clip_l": self.extras[0], "clip_g": self.extras[1]}
        else:
            tensors = {"emb_params": self.extras[0]}
        meta = {**metadata, "modelkit.ti.token": self.token, "modelkit.ti.init_word": self.config.ti.init_word}
        return save_tensors(path, tensors, meta, dtype=dtype, force=force)
