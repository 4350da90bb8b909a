"""The CLIP byte-level BPE every Stable Diffusion text encoder uses, rebuilt from the shipped merges.

Every Stable Diffusion text encoder (CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14) uses the same
byte-level BPE vocabulary of 49,408 tokens. Only its merges are shipped (``configs/clip/merges.txt.gz``,
the first 48,894 merges of OpenAI CLIP's ``bpe_simple_vocab_16e6``, MIT licence; see ``NOTICE`` there):
the vocabulary follows from them, as in CLIP's own tokenizer: the 256 byte symbols, the same with
``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Pure Python: the core
writes a diffusers ``tokenizer/`` folder with it, the training extra builds a ``CLIPTokenizer``.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from typing import Any

VOCAB_SIZE = 49408
MAX_LENGTH = 77


def configs_root() -> Any:
    """The shipped config folder (a ``Traversable``): ``sd1``, ``sd2``, ``sd2-v``, ``sdxl`` (diffusers
    folders without weights) and ``clip`` (the BPE merges)."""
    return resources.files("modelkit.layout").joinpath("configs")


def bytes_to_unicode() -> list[str]:
    """CLIP's reversible map of the 256 byte values to printable characters, in byte order of the table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@lru_cache(maxsize=1)
def shipped_bpe() -> tuple[str, dict[str, int]]:
    """``(merges.txt text, vocab)`` of the CLIP BPE, rebuilt from the shipped merges."""
    raw = configs_root().joinpath("clip", "merges.txt.gz").read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    merges = [line for line in text.split("\n")[1:] if line]
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:  # pragma: no cover - the shipped file is fixed
        raise RuntimeError(f"the shipped CLIP merges give {len(tokens)} tokens, not {VOCAB_SIZE}")
    return text, {t: i for i, t in enumerate(tokens)}
