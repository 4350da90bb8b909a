"""GGUF files (llama.cpp's format; what the ComfyUI-GGUF loader reads): header, metadata and tensor
table, validated before anything is trusted, and the tensors as lazy refs.

Layout (little-endian): ``GGUF``, version (u32, 2 or 3), tensor count (u64), metadata count (u64),
the metadata key/value pairs, one record per tensor (name, dims in ggml order, innermost first,
quant type, offset into the data section), padding to ``general.alignment`` (32 by default), then
the data section. Every count, length and offset is checked against bounds and the file's size
before it is used; a tensor's bytes must lie inside the data section, aligned, without overlaps.

Tensors of a plain type (F32, F16, BF16, F64, I8-I64) are ordinary refs. A quantized tensor (Q8_0,
Q4_K ...) is a ``uint8`` ref of its packed bytes, shaped as ``gguf`` shapes it (rows, packed bytes
per row); its quant type and logical shape are in ``ModelFile.info["gguf"]``. Dequantizing is the
``gguf`` package's job (``modelkit convert``, the ``[gguf]`` extra).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from ..dtypes import BY_NAME
from ..errors import FormatError, ResourceLimitError, TruncatedFileError
from ..model import ModelFile, Source, TensorRef

MAGIC = b"GGUF"
#: ggml type code -> (name, elements per block, bytes per block); checked against ``gguf`` in tests.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
#: Plain ggml types and their element type.
PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8",
         "I16": "int16", "I32": "int32", "I64": "int64"}

#: Bounds: the header's bytes, entries, one string, one array, dims per tensor.
MAX_HEADER = 256 << 20
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_STRING = 16 << 20
MAX_ARRAY = 1 << 24
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential reads of the header through ``src``, in growing windows, bounded by ``MAX_HEADER``."""

    def __init__(self, path: str, src: Source):
        self.path, self.src = path, src
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            if end > min(self.src.size, MAX_HEADER):
                if end > self.src.size:
                    raise TruncatedFileError(self.path, f"the GGUF header runs past the end of the file (byte {end})")
                raise ResourceLimitError(self.path, f"the GGUF header is larger than {MAX_HEADER} bytes")
            want = min(max(end, 2 * len(self.buf), 1 << 16), self.src.size, MAX_HEADER)
            self.buf = self.src.pread(want, 0)
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q")
        if n > MAX_STRING:
            raise ResourceLimitError(self.path, f"a GGUF {what} claims {n} bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(self.path, f"a GGUF {what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(f"value of {key!r}")
        if vtype == _ARRAY and depth == 0:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count > MAX_ARRAY:
                raise ResourceLimitError(self.path, f"the GGUF array {key!r} claims {count} items")
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype])
                return list(struct.unpack(f"<{count}{_SCALARS[etype][1]}", self.take(size * count)))
            return [self.value(etype, key, depth + 1) for _ in range(count)]
        raise FormatError(self.path, f"the GGUF value of {key!r} has an unknown type {vtype}")


def logical_bytes(path: str, name: str, type_code: int, dims: list[int]) -> int:
    """The bytes a tensor of ggml type ``type_code`` and ggml dims takes.

    Raises:
        FormatError: an unknown type, or a row length that is not a whole number of blocks.
    """
    if type_code not in GGML_TYPES:
        raise FormatError(path, f"GGUF tensor {name!r} has an unknown ggml type {type_code}")
    qname, block, size = GGML_TYPES[type_code]
    if dims[0] % block:
        raise FormatError(path, f"GGUF tensor {name!r} ({qname}) has rows of {dims[0]} values, not a multiple of "
                                f"its block of {block}")
    return math.prod(dims) // block * size


def read_gguf(path: str, src: Source) -> ModelFile:
    """Read a GGUF file's header and tensor table (no tensor data).

    Raises:
        FormatError, TruncatedFileError, ResourceLimitError: the header is invalid, names bytes
            outside the file, or exceeds a bound.
    """
    c = _Cursor(path, src)
    if c.take(4) != MAGIC:
        raise FormatError(path, "not a GGUF file (no GGUF magic)")
    version = c.unpack("<I")
    if version not in (2, 3):
        raise FormatError(path, f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise ResourceLimitError(path, f"the GGUF header claims {n_tensors} tensors and {n_kv} metadata entries")
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        kv[key] = c.value(c.unpack("<I"), key)
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 16:
        raise FormatError(path, f"GGUF general.alignment {alignment!r} is not a power of two")
    records = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        n_dims = c.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(path, f"GGUF tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [c.unpack("<Q") for _ in range(n_dims)]
        if any(d < 1 or d > 1 << 40 for d in dims):
            raise FormatError(path, f"GGUF tensor {name!r} has a dimension out of range: {dims}")
        records.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
    data_start = -(-c.pos // alignment) * alignment
    tensors: dict[str, TensorRef] = {}
    types: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    spans = []
    for name, dims, type_code, offset in records:
        if name in tensors:
            raise FormatError(path, f"GGUF tensor {name!r} appears twice")
        nbytes = logical_bytes(path, name, type_code, dims)
        if offset % alignment:
            raise FormatError(path, f"GGUF tensor {name!r} is not aligned to {alignment} bytes (offset {offset})")
        begin = data_start + offset
        if begin + nbytes > src.size:
            raise TruncatedFileError(path, f"GGUF tensor {name!r} ends at byte {begin + nbytes}, past the end of the "
                                           f"file ({src.size})")
        spans.append((begin, begin + nbytes, name))
        qname, block, size = GGML_TYPES[type_code]
        shape = tuple(reversed(dims))
        if qname in PLAIN:
            dtype = BY_NAME[PLAIN[qname]]
        else:
            dtype = BY_NAME["uint8"]
            shape = (*shape[:-1], dims[0] // block * size)
            types[name] = qname
            shapes[name] = list(reversed(dims))
        strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        tensors[name] = TensorRef(name, dtype, shape, strides, 0, begin, nbytes, storage_key=name, source=src)
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(path, f"GGUF tensors {n0!r} and {n1!r} overlap")
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in kv.items()
                if not (isinstance(v, list) and len(v) > 64)}
    info = {"gguf": {"version": version, "alignment": alignment, "data_start": data_start, "types": types,
                     "shapes": shapes, "long_arrays": sorted(k for k, v in kv.items()
                                                            if isinstance(v, list) and len(v) > 64)}}
    return ModelFile(path, "gguf", src.size, tensors, metadata, info=info, source=src)
