"""CLIP tokenizers built offline: from the BPE merges shipped as package data, or from a local folder.

Every Stable Diffusion text encoder (CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14) uses the same
byte-level BPE vocabulary of 49,408 tokens (``modelkit.layout.bpe``). Only its merges are shipped (``configs/clip/merges.txt.gz``,
the first 48,894 merges of OpenAI CLIP's ``bpe_simple_vocab_16e6``, MIT licence; see ``NOTICE`` there):
the vocabulary follows from them, as in CLIP's own tokenizer: the 256 byte symbols, the same with
``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from ..errors import ConfigError
from ..layout.bpe import MAX_LENGTH, VOCAB_SIZE, configs_root, shipped_bpe
from ..layout.bpe import bytes_to_unicode as _bytes_to_unicode

__all__ = ["MAX_LENGTH", "VOCAB_SIZE", "_bytes_to_unicode", "build_tokenizer", "configs_root", "pad_token_of",
           "shipped_bpe"]


def build_tokenizer(folder: str | None = None, pad_token: str = "<|endoftext|>") -> Any:
    """A ``transformers.CLIPTokenizer`` that never touches a hub.

    Args:
        folder: a folder with ``vocab.json`` and ``merges.txt`` (a diffusers ``tokenizer/`` folder
            qualifies); ``None`` uses the shipped CLIP BPE.
        pad_token: ``<|endoftext|>`` for CLIP ViT-L (SD1, SDXL's first encoder), ``!`` for the
            OpenCLIP encoders (SD2, SDXL's second).

    Returns:
        The tokenizer, with ``model_max_length`` 77.

    Raises:
        ConfigError: ``folder`` lacks ``vocab.json`` or ``merges.txt``.
    """
    from transformers import CLIPTokenizer

    if folder is not None:
        vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        for f in (vocab, merges):
            if not os.path.isfile(f):
                raise ConfigError(folder, f"the tokenizer folder has no {os.path.basename(f)}",
                                  "Point model.tokenizer at a folder with vocab.json and merges.txt, or leave it unset")
        return _clip(CLIPTokenizer, vocab, merges, pad_token)
    text, table = shipped_bpe()
    with tempfile.TemporaryDirectory(prefix="modelkit-clip-") as tmp:
        vocab_path, merges_path = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_path, "w", encoding="utf-8") as out:
            json.dump(table, out, ensure_ascii=False)
        with open(merges_path, "w", encoding="utf-8") as out:
            out.write(text)
        return _clip(CLIPTokenizer, vocab_path, merges_path, pad_token)


def _clip(cls: Any, vocab: str, merges: str, pad_token: str) -> Any:
    tok = cls(vocab, merges, pad_token=pad_token, model_max_length=MAX_LENGTH)
    tok.model_max_length = MAX_LENGTH
    return tok


def pad_token_of(config_folder: Any) -> str:
    """The pad token a ``tokenizer_config.json`` names (``<|endoftext|>`` when it names none)."""
    try:
        data = json.loads(config_folder.joinpath("tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "<|endoftext|>"
    pad = data.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    return pad if isinstance(pad, str) else "<|endoftext|>"
