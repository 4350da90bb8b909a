"""The Flux / SD3 parts of opening a diffusers folder (``modelkit.layout.folder``): which components a
pipeline lists, which component a ``--part`` names, and SD3's CLIP-L projection that has no place in a
single file."""

from __future__ import annotations

import os
from typing import Any

from ..errors import FormatError
from ..model import TensorRef
from . import dit
from .plan import EXTRA_FILE, Part


def dit_pipeline(path: str, index: dict[str, Any], family: str) -> tuple[str, list[Part]]:
    """A Flux or SD3 pipeline's components: those its model_index.json lists (a null one is skipped)."""
    vprefix = None
    extra = os.path.join(path, EXTRA_FILE)
    if os.path.isfile(extra):
        from ..reading import open_model

        with open_model(extra) as kept:
            vprefix = kept.metadata.get("modelkit.layout.vae_prefix")
    parts = []
    for part in dit.parts_of(family, vprefix if vprefix in dit.VAE_PREFIXES else None):
        entry = index.get(part.folder)
        if not (isinstance(entry, list) and entry and entry[0]):
            if part.folder == "transformer":
                raise FormatError(path, "its model_index.json lists no transformer")
            continue
        if not os.path.isdir(os.path.join(path, part.folder)):
            raise FormatError(path, f"has no {part.folder}/ folder, which its model_index.json lists",
                              "Copy the whole pipeline folder")
        parts.append(part)
    return family, parts


def holds(comp: Part, part: str) -> bool:
    """Whether a component folder's ``comp`` is what ``--part`` asks for."""
    from .plan import PARTS

    if part in PARTS and comp.kind not in ("t5", *dit.TRANSFORMERS.values()) and comp.prefix:
        return PARTS[part] == comp.folder
    kinds = {"transformer": dit.TRANSFORMERS.values(), "unet": (*dit.TRANSFORMERS.values(), "unet"), "vae": ("vae",),
             "t5xxl": ("t5",), "clip_l": ("clip",), "clip_g": ("clip",), "te": ("clip",), "te2": ("clip",)}
    return comp.kind in kinds.get(part, ())


def unprojected(family: str | None, part: Part, ref: TensorRef) -> bool:
    """SD3's CLIP-L pools without a projection: the identity diffusers gives it has no place in a single file."""
    if (family != "sd3" or part.folder != "text_encoder" or len(ref.shape) != 2 or ref.shape[0] != ref.shape[1]
            or ref.dtype.st not in dit.ONE):
        return False
    from .folder import _tensor_bytes

    return _tensor_bytes(ref, 0, ref.nbytes) == dit.identity_bytes(str(ref.dtype.st), ref.shape[0])
