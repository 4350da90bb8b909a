"""The one in-memory currency: a lazy map of tensor name -> ``TensorRef``.

A ``ModelFile`` holds an open file descriptor and the tensor records a reader found; no tensor
bytes are read until ``TensorRef.read()`` is called, and then only that tensor's bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import portable
from .dtypes import DType
from .errors import FormatError, TruncatedFileError


class Source:
    """An open file read at offsets (``pread`` or its portable fallback: safe from several threads)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.fd = portable.open_fd(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; raises TruncatedFileError if the file is shorter."""
        done = portable.read_into(self.fd, buf, offset)
        if done < memoryview(buf).nbytes:
            raise TruncatedFileError(self.path, f"the file ends at byte {offset + done}, inside tensor data")

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(size)
        self.read_into(buf, offset)
        return bytes(buf)

    def prefetch(self, spans: Iterable[tuple[int, int]]) -> None:
        """Announce (offset, size) spans about to be read; a remote source fetches them together."""
        return None

    def materialize(self) -> None:
        """Make ``fd`` a local file holding every byte (a remote source downloads it; a file is one)."""
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives in a file, and how to read it.

    Attributes:
        name: the flattened name (see ``modelkit.formats.flatten``).
        dtype: element type.
        shape: sizes per dimension.
        strides: element strides per dimension (a view may be non-contiguous).
        storage_offset: elements from the start of the storage to element [0, 0, ...].
        storage_start: absolute byte offset of the storage in the file.
        storage_nbytes: size of the storage in bytes.
        storage_key: the storage's key inside its container (tensors may share one).
        byteorder: ``"little"`` or ``"big"``.
        compressed: ``(member offset, compressed size, size, CRC-32)`` for a deflated zip member
            (``.npz``, a deflated torch zip).
        inline: the storage's bytes, for the rare storage that is not verbatim in the file
            (protocol-2 plain pickles); ``byte_range`` is then relative to these bytes.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    storage_offset: int
    storage_start: int
    storage_nbytes: int
    storage_key: str | None = None
    byteorder: str = "little"
    compressed: tuple[int, int, int, int] | None = None
    inline: bytes | None = field(default=None, repr=False, compare=False)
    source: Source | None = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's own elements (what a contiguous copy takes)."""
        return self.numel * self.dtype.itemsize

    @property
    def span(self) -> int:
        """Elements of storage the view touches, from its first element to its last."""
        if self.numel == 0:
            return 0
        return 1 + sum((s - 1) * st for s, st in zip(self.shape, self.strides))

    @property
    def byte_range(self) -> tuple[int, int]:
        """Absolute [begin, end) of the bytes this tensor spans in the file."""
        begin = self.storage_start + self.storage_offset * self.dtype.itemsize
        return begin, begin + self.span * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        expect = 1
        for s, st in zip(reversed(self.shape), reversed(self.strides)):
            if s != 1 and st != expect:
                return False
            expect *= s
        return True

    def read_raw(self) -> bytearray:
        """The bytes of the spanned region, in file byte order."""
        if self.inline is not None:
            begin, end = self.byte_range
            if end > len(self.inline):
                raise FormatError(None, f"tensor {self.name!r} runs past the end of its data")
            return bytearray(self.inline[begin:end])
        if self.source is None:
            raise FormatError(None, f"tensor {self.name} is not attached to an open file")
        begin, end = self.byte_range
        if self.compressed is not None:
            data = _inflate(self.source, *self.compressed)
            rel = begin - self.storage_start
            if rel + (end - begin) > len(data):
                raise FormatError(self.source.path, f"tensor {self.name!r} runs past its compressed member")
            return bytearray(data[rel : rel + (end - begin)])
        buf = bytearray(end - begin)
        self.source.read_into(buf, begin)
        return buf

    def read(self, framework: str | None = None) -> Any:
        """Read the tensor.

        Args:
            framework: ``"torch"``, ``"numpy"`` or ``None`` (torch when installed).

        Returns:
            A torch tensor with this shape and these strides, or a numpy array (for dtypes numpy
            lacks, such as bfloat16, the raw bits as unsigned integers).
        """
        buf = self.read_raw()
        if self.byteorder == "big" and self.dtype.itemsize > 1:
            _byteswap(buf, self.dtype)
        if framework is None:
            framework = "torch" if _has_torch() else "numpy"
        if framework == "torch":
            return self._to_torch(buf)
        return self._to_numpy(buf)

    def _to_torch(self, buf: bytearray) -> Any:
        from ._torch import require_torch

        torch = require_torch("reading tensors into torch")

        dt = self.dtype.torch()
        if self.numel == 0:
            return torch.empty(self.shape, dtype=dt)
        flat = torch.frombuffer(buf, dtype=dt)
        if self.is_contiguous:
            return flat.view(self.shape) if self.shape else flat.reshape(())
        return flat.as_strided(self.shape, self.strides, 0)

    def _to_numpy(self, buf: bytearray) -> Any:
        import numpy as np

        code = self.dtype.numpy or f"<u{self.dtype.itemsize}"
        flat = np.frombuffer(buf, dtype=np.dtype(code))
        if self.numel == 0:
            return np.empty(self.shape, dtype=flat.dtype)
        item = flat.itemsize
        return np.lib.stride_tricks.as_strided(flat, self.shape, tuple(s * item for s in self.strides)).copy()


def _has_torch() -> bool:
    from ._torch import have_torch

    return have_torch()


def _byteswap(buf: bytearray, dtype: DType) -> None:
    import numpy as np

    width = dtype.itemsize // 2 if dtype.name.startswith("complex") else dtype.itemsize
    np.frombuffer(buf, dtype=np.dtype(f"u{width}")).byteswap(inplace=True)


def _inflate(source: Source, offset: int, size: int, full: int, crc: int) -> bytes:
    """Inflate a deflated zip member and check it against the size and CRC-32 the archive records
    (raw deflate has no checksum of its own), never holding more than its claimed size + 1."""
    from .formats.zipread import inflate_exact

    return inflate_exact(source, offset, size, full, crc)


@dataclass
class ModelFile(Mapping[str, TensorRef]):
    """A model file opened by a safe reader: ``name -> TensorRef`` plus what else it holds.

    Use it as a context manager so its file descriptor is closed::

        with modelkit.open_model("model.ckpt") as mf:
            w = mf["model.diffusion_model.out.2.weight"].read()

    Attributes:
        path: the file.
        container: ``safetensors``, ``torch-zip``, ``torch-legacy``, ``pickle``, ``npy`` or ``npz``.
        size: file size in bytes.
        tensors: the tensor records, in file order.
        metadata: string metadata (safetensors ``__metadata__``).
        extras: non-tensor values, flattened to dotted names, rendered as plain data.
        placeholders: qualified names of harmless globals loaded as inert placeholders.
        wrappers: container wrappers that were stripped from tensor names (``state_dict``).
        key_paths: for each tensor, the original key path (reverses the flattening).
    """

    path: str
    container: str
    size: int
    tensors: dict[str, TensorRef]
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    placeholders: list[str] = field(default_factory=list)
    wrappers: list[str] = field(default_factory=list)
    key_paths: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    source: Source | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def quantized(self) -> tuple[dict[str, str], dict[str, list[int]]]:
        """A GGUF file's quant type and logical shape per quantized tensor (empty for other files)."""
        g = self.info.get("gguf") or {}
        return g.get("types", {}), g.get("shapes", {})

    @property
    def parameter_count(self) -> int:
        _types, shapes = self.quantized()
        return sum(math.prod(shapes[n]) if n in shapes else t.numel for n, t in self.tensors.items())

    def bytes_by_dtype(self) -> dict[str, int]:
        """Bytes per element type (a GGUF quant type, such as ``Q8_0``, counts as its own type)."""
        types, _shapes = self.quantized()
        out: dict[str, int] = {}
        for n, t in self.tensors.items():
            key = types.get(n, t.dtype.name)
            out[key] = out.get(key, 0) + t.nbytes
        return out


class MemorySource(Source):
    """A Source over bytes already in memory (a decompressed wrapper, a nested blob)."""

    def __init__(self, data: bytes, label: str):  # noqa: D107 - no file to open
        self.path = label
        self.fd = -1
        self.size = len(data)
        self.data = data

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        chunk = self.data[offset : offset + len(view)]
        if len(chunk) < len(view):
            raise TruncatedFileError(self.path, f"the data ends at byte {offset + len(chunk)}")
        view[:] = chunk

    def close(self) -> None:
        return None
