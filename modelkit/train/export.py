"""Every training output goes out here: in-memory tensors -> the core's atomic safetensors writer.

No ``torch.save`` and no pickle: tensors become ``OutTensor`` records with their bytes, and
``modelkit.paths.atomic_output`` publishes the file only once it is complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import __version__, dtypes
from ..formats.safetensors_write import OutTensor, write_stream
from ..ops import modelspec as ms
from ..paths import atomic_output

#: kohya ``ss_base_model_version`` per family (``modelkit.ops.modelspec`` owns it).
SS_VERSION = ms.SS_VERSION


def architecture(family: str, prediction: str, adapter: str) -> str:
    """``modelspec.architecture`` for an adapter (``lora``, ``textual-inversion`` ...) of a base, or for a
    whole model (``checkpoint``)."""
    return ms.architecture(family, adapter, prediction)


def common_metadata(title: str, family: str, prediction: str, adapter: str, resolution: int) -> dict[str, str]:
    """The ``modelspec.*`` and ``modelkit.*`` keys every training output carries (the implementation is
    settled from the tensor names when the file is written: ``save_tensors``)."""
    out = ms.modelspec_block(kind=adapter, base=family, prediction=prediction, title=title, resolution=resolution,
                             date=True)
    out["modelkit.version"] = __version__
    return out


def _dtype_of(tensor: Any) -> dtypes.DType:
    name = str(tensor.dtype).removeprefix("torch.")
    return dtypes.BY_NAME[name]


def out_tensor(name: str, tensor: Any, dtype: Any = None) -> OutTensor:
    """An ``OutTensor`` holding a copy of ``tensor``'s bytes (cast to ``dtype`` when it is floating point)."""
    import torch

    t = tensor.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    t = t.contiguous().cpu()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return OutTensor(name, _dtype_of(t), tuple(int(s) for s in t.shape), None, raw)


@dataclass(frozen=True)
class Written:
    """One file written."""

    path: str
    tensors: int
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "tensors": self.tensors, "size": self.size}


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                 *, dtype: Any = None, force: bool = False, implementation: str | None = None,
                 fp32_alpha: bool = False) -> Written:
    """Write ``{name: torch.Tensor}`` as ``.safetensors``, atomically.

    Args:
        path: the output file.
        tensors: the tensors (any device; copied to the CPU).
        metadata: ``__metadata__`` strings.
        dtype: cast floating-point tensors to this torch dtype.
        force: replace an existing file.
        implementation: ``modelspec.implementation`` to write instead of the one the tensor names give
            (a Flux/SD3 LoRA in the original keys names BFL's or Stability's codebase).
        fp32_alpha: write the ``.alpha`` tensors in float32 whatever ``dtype`` (a fused alpha, parts x
            alpha, may not fit float16/bfloat16 exactly; loaders read it with ``.item()``).

    Returns:
        What was written.

    Raises:
        OutputExistsError: the file exists and ``force`` is false.
        OutputWriteError: the file system refused.
    """
    target = os.fspath(path)
    import torch

    records = [out_tensor(k, v, torch.float32 if fp32_alpha and k.endswith(".alpha") else dtype)
               for k, v in tensors.items()]
    meta = ms.settled(metadata or {}, [r.name for r in records])
    if implementation is not None and "modelspec.architecture" in meta:
        meta["modelspec.implementation"] = implementation
    with atomic_output(target, force=force) as fd:
        stats = write_stream(fd, records, meta, path=target)
    return Written(target, len(records), stats.size)
