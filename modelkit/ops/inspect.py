"""``modelkit inspect``: what a file holds, read from its header/pickle only (no tensor data)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..model import ModelFile
from ..reading import open_model

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
    #: A GGUF quantized tensor's stored shape (rows, packed bytes per row, uint8); ``dtype`` and
    #: ``shape`` are then its quant type (``Q8_0``) and logical shape. None for every other tensor.
    packed_shape: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "byte_range": list(self.byte_range), "contiguous": self.contiguous, "storage": self.storage,
        }
        if self.packed_shape is not None:
            out["packed_shape"] = list(self.packed_shape)
        return out


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
    detection: dict[str, Any] | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    metadata_decoded: dict[str, Any] = field(default_factory=dict)
    junk: dict[str, dict[str, int]] = field(default_factory=dict)
    defects: tuple[str, ...] = ()
    quantization: dict[str, Any] = field(default_factory=dict)

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
            "detection": self.detection,
            "hashes": dict(self.hashes),
            "metadata_decoded": dict(self.metadata_decoded),
            "junk": {k: dict(v) for k, v in self.junk.items()},
            "defects": list(self.defects),
        }
        if self.quantization:  # only for files with fp8 tensors
            out["quantization"] = dict(self.quantization)
        if self.tensors is not None:
            out["tensors"] = [t.to_dict() for t in self.tensors]
        return out


def describe(mf: ModelFile, keys: bool = False, hashes: bool = False) -> InspectResult:
    """Summarise an open ModelFile: container, detection, junk, defects, and cheap hashes.

    Reads no tensor data except the tiny ``position_ids`` check and the 64 KiB AutoV1 window;
    ``hashes`` adds the full-file hashes (one streaming read of the file).
    """
    from ..detect import detect
    from .fp8 import summary as fp8_summary
    from .hashes import hash_file
    from .health import decode_metadata, defects, junk

    warnings: list[str] = []
    name = os.path.basename(mf.path).lower()
    for ext, expected in _EXPECTED.items():
        if name.endswith(ext) and mf.container not in expected:
            warnings.append(f"the name ends in {ext} but the content is {mf.container}; modelkit reads it by content")
            break
    tensors = None
    if keys:
        types, shapes = mf.quantized()
        tensors = tuple(
            TensorInfo(t.name, types[t.name], tuple(shapes[t.name]), t.byte_range, t.is_contiguous, t.storage_key,
                       t.shape) if t.name in types and t.name in shapes else
            TensorInfo(t.name, t.dtype.name, t.shape, t.byte_range, t.is_contiguous, t.storage_key)
            for t in mf.tensors.values()
        )
    det = detect(mf)
    algos = ("sha256", "autov1", "autov2", "autov3", "crc32") if hashes else ("autov1",)
    digests = {k: v for k, v in hash_file(mf.path, algos).hashes.items() if k != "autov3_full"}
    return InspectResult(
        path=mf.path, container=mf.container, size=mf.size, tensor_count=len(mf),
        parameter_count=mf.parameter_count, bytes_by_dtype=mf.bytes_by_dtype(), wrappers=tuple(mf.wrappers),
        metadata=dict(mf.metadata), extras=dict(mf.extras), placeholders=tuple(mf.placeholders),
        info={k: v for k, v in mf.info.items() if v is not None}, warnings=tuple(warnings), tensors=tensors,
        detection=det.to_dict(), hashes=digests, metadata_decoded=decode_metadata(mf.metadata), junk=junk(mf),
        defects=tuple(defects(mf, det)), quantization=fp8_summary(mf.tensors, mf.metadata),
    )


def inspect(path: str | os.PathLike[str], keys: bool = False, hashes: bool = False) -> InspectResult:
    """Describe a model file without reading its tensor data.

    Args:
        path: the file.
        keys: also list every tensor (name, dtype, shape, byte range).
        hashes: also compute sha256, AutoV2, AutoV3 and CRC32 (one streaming read of the file);
            AutoV1 is always shown (it reads 64 KiB).

    Returns:
        An InspectResult.

    Raises:
        ModelkitError: the file cannot be read safely (see ``open_model``).

    Example:
        >>> modelkit.inspect("v1-5-pruned-emaonly.safetensors").detection["base"]  # doctest: +SKIP
        'sd1'
    """
    with open_model(path) as mf:
        return describe(mf, keys, hashes)
