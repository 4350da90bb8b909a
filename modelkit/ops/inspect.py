"""``modelkit inspect``: what a file holds, read from its header/pickle only (no tensor data)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..formats import open_model
from ..model import ModelFile

#: The containers each extension is normally used for; a mismatch is reported, never trusted.
_EXPECTED = {
    ".safetensors": ("safetensors",),
    ".sft": ("safetensors",),
    ".ckpt": ("torch-zip", "torch-legacy", "pickle"),
    ".pt": ("torch-zip", "torch-legacy", "pickle"),
    ".pth": ("torch-zip", "torch-legacy", "pickle"),
    ".bin": ("torch-zip", "torch-legacy", "pickle"),
    ".npy": ("npy",),
    ".npz": ("npz",),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    byte_range: tuple[int, int]
    contiguous: bool
    storage: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "byte_range": list(self.byte_range), "contiguous": self.contiguous, "storage": self.storage,
        }


@dataclass(frozen=True)
class InspectResult:
    """What ``inspect`` reports for one file (schema ``modelkit.inspect/1``)."""

    path: str
    container: str
    size: int
    tensor_count: int
    parameter_count: int
    bytes_by_dtype: dict[str, int]
    wrappers: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    placeholders: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    tensors: tuple[TensorInfo, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "container": self.container,
            "size": self.size,
            "tensor_count": self.tensor_count,
            "parameter_count": self.parameter_count,
            "bytes_by_dtype": dict(self.bytes_by_dtype),
            "wrappers": list(self.wrappers),
            "metadata": dict(self.metadata),
            "extras": dict(self.extras),
            "placeholders": list(self.placeholders),
            "info": dict(self.info),
            "warnings": list(self.warnings),
        }
        if self.tensors is not None:
            out["tensors"] = [t.to_dict() for t in self.tensors]
        return out


def describe(mf: ModelFile, keys: bool = False) -> InspectResult:
    """Summarise an open ModelFile (reads no tensor data)."""
    warnings: list[str] = []
    name = os.path.basename(mf.path).lower()
    for ext, expected in _EXPECTED.items():
        if name.endswith(ext) and mf.container not in expected:
            warnings.append(f"the name ends in {ext} but the content is {mf.container}; modelkit reads it by content")
            break
    tensors = None
    if keys:
        tensors = tuple(
            TensorInfo(t.name, t.dtype.name, t.shape, t.byte_range, t.is_contiguous, t.storage_key)
            for t in mf.tensors.values()
        )
    return InspectResult(
        path=mf.path, container=mf.container, size=mf.size, tensor_count=len(mf),
        parameter_count=mf.parameter_count, bytes_by_dtype=mf.bytes_by_dtype(), wrappers=tuple(mf.wrappers),
        metadata=dict(mf.metadata), extras=dict(mf.extras), placeholders=tuple(mf.placeholders),
        info={k: v for k, v in mf.info.items() if v is not None}, warnings=tuple(warnings), tensors=tensors,
    )


def inspect(path: str | os.PathLike[str], keys: bool = False) -> InspectResult:
    """Describe a model file without reading its tensor data.

    Args:
        path: the file.
        keys: also list every tensor (name, dtype, shape, byte range).

    Returns:
        An InspectResult.

    Raises:
        ModelkitError: the file cannot be read safely (see ``open_model``).

    Example:
        >>> modelkit.inspect("v1-5-pruned-emaonly.safetensors").parameter_count  # doctest: +SKIP
        1066235307
    """
    with open_model(path) as mf:
        return describe(mf, keys)
