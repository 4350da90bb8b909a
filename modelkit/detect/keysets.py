"""The keys every genuine single-file checkpoint of a base carries, per component.

A base's *required* keys are its architecture's layout (``layouts``: Stability's own release
files) less the keys genuine files may lack. A key is optional when the model never uses it
and the usual round trip through diffusers drops it, or when the library version that wrote the
file decides whether it is saved:

- ``*.embeddings.position_ids`` of a Hugging Face CLIP: a persistent buffer before transformers
  4.31, non-persistent since, so newer exports lack it.
- SD 2.x: the OpenCLIP-H ``text_projection``, ``logit_scale`` and last residual block. SD 2.x
  conditions on the penultimate layer's output, and diffusers' SD 2.x text encoder has 23
  layers and no projection, so files exported from diffusers lack them.
- SDXL: the OpenCLIP-bigG ``logit_scale`` (a CLIP training scalar; diffusers has none).
  bigG's ``text_projection`` is required: SDXL uses the pooled, projected output.

Keys a file has beyond these (EMA copies, schedule buffers, ``logit_scale``...) are never a defect.
Only the variants whose key set is the base's own are checked: standard, inpainting,
instruct-pix2pix and depth UNets differ from it in ``conv_in``'s shape alone; unCLIP, the SDXL
refiner and unknown variants are not checked.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

from . import layouts


@dataclass(frozen=True)
class KeySet:
    """One base's missing-key check.

    Attributes:
        name: how messages name the base (``SD 2.x``).
        components: ``(prefix, label)`` per component, each checked only when the file has it.
        layout: the full-size architecture layout.
        optional: patterns of layout keys that genuine files may lack.
    """

    name: str
    components: tuple[tuple[str, str], ...]
    layout: Callable[[], layouts.Layout]
    optional: tuple[str, ...]


_POSITION_IDS = r"\.embeddings\.position_ids$"
_UNET_VAE = (("model.diffusion_model.", "UNet"), ("first_stage_model.", "VAE"))
_TEXT = "cond_stage_model."
_H, _G = re.escape(layouts.SD2_TEXT_PREFIX), re.escape(layouts.SDXL_BIGG_PREFIX)
_H_LAST = layouts.SD2_TEXT_LAYERS - 1

#: The checked bases, by ``Detection.base``.
KEYSETS: dict[str, KeySet] = {
    "sd1": KeySet("SD 1.x", (*_UNET_VAE, (_TEXT, "text encoder")),
                  lambda: layouts.sd1_layout(schedule=False), (_POSITION_IDS,)),
    "sd2": KeySet("SD 2.x", (*_UNET_VAE, (_TEXT, "text encoder")),
                  lambda: layouts.sd2_layout(schedule=False),
                  (_POSITION_IDS, rf"^{_H}(?:text_projection|logit_scale)$",
                   rf"^{_H}transformer\.resblocks\.{_H_LAST}\.")),
    "sdxl": KeySet("SDXL", (*_UNET_VAE, (layouts.SDXL_CLIP_PREFIX, "text encoder 1 (CLIP-L)"),
                            (layouts.SDXL_BIGG_PREFIX, "text encoder 2 (OpenCLIP-bigG)")),
                   layouts.sdxl_layout, (_POSITION_IDS, rf"^{_G}logit_scale$")),
}
#: Checkpoint subtypes whose key set is their base's (only ``conv_in`` differs in shape).
CHECKED_SUBTYPES = (None, "standard", "inpaint", "instruct-pix2pix", "depth")


@functools.cache
def required_keys(base: str) -> frozenset[str]:
    """Every key a genuine checkpoint of ``base`` has (see the module docstring).

    Args:
        base: a key of ``KEYSETS`` (``sd1``, ``sd2``, ``sdxl``).

    Returns:
        The key names, over all components.

    Raises:
        KeyError: a base without a key set.
    """
    ks = KEYSETS[base]
    optional = re.compile("|".join(f"(?:{p})" for p in ks.optional))
    return frozenset(k for k in ks.layout() if not optional.search(k))


def missing(names: Collection[str], base: str) -> list[tuple[str, list[str]]]:
    """The required keys of ``base`` that ``names`` lacks, per component the file has.

    Args:
        names: the file's tensor names.
        base: a key of ``KEYSETS``.

    Returns:
        ``(component label, sorted missing keys)`` for each component with at least one key in
        ``names`` and at least one required key absent. A component absent entirely (a UNet-only
        file has no VAE) is not reported.
    """
    want = required_keys(base)
    out = []
    for prefix, label in KEYSETS[base].components:
        have = {k for k in names if k.startswith(prefix)}
        if not have:
            continue
        gone = sorted(k for k in want if k.startswith(prefix) and k not in have)
        if gone:
            out.append((label, gone))
    return out
