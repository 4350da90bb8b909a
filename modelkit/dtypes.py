"""The one dtype table: safetensors code, torch dtype name, numpy dtype, itemsize, CLI name.

Everything that needs to translate between dtype spellings (safetensors headers, torch storage
classes, ``torch.float16`` globals in pickles, ``.npy`` descriptors, CLI flags) looks it up here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    """One element type.

    Attributes:
        name: the CLI/JSON name (``float16``); equal to torch's attribute name.
        st: the safetensors code (``F16``), or ``None`` where safetensors has none.
        itemsize: bytes per element.
        numpy: numpy dtype string (little-endian), or ``None`` where numpy has no type.
        storage: the legacy torch storage class name (``HalfStorage``), or ``None``.
        is_float: a floating-point type (cast by ``--dtype``); bool/int/complex are not.
    """

    name: str
    st: str | None
    itemsize: int
    numpy: str | None
    storage: str | None
    is_float: bool

    def torch(self) -> Any:
        """The torch dtype (imports torch; a MissingExtraError where it is not installed)."""
        from ._torch import require_torch

        return getattr(require_torch(f"reading {self.name} tensors into torch"), self.name)

    def __str__(self) -> str:
        return self.name


_TABLE = [
    DType("float64", "F64", 8, "<f8", "DoubleStorage", True),
    DType("float32", "F32", 4, "<f4", "FloatStorage", True),
    DType("float16", "F16", 2, "<f2", "HalfStorage", True),
    DType("bfloat16", "BF16", 2, None, "BFloat16Storage", True),
    DType("float8_e4m3fn", "F8_E4M3", 1, None, None, True),
    DType("float8_e5m2", "F8_E5M2", 1, None, None, True),
    DType("float8_e4m3fnuz", "F8_E4M3FNUZ", 1, None, None, True),
    DType("float8_e5m2fnuz", "F8_E5M2FNUZ", 1, None, None, True),
    DType("float8_e8m0fnu", "F8_E8M0", 1, None, None, True),
    DType("int64", "I64", 8, "<i8", "LongStorage", False),
    DType("int32", "I32", 4, "<i4", "IntStorage", False),
    DType("int16", "I16", 2, "<i2", "ShortStorage", False),
    DType("int8", "I8", 1, "|i1", "CharStorage", False),
    DType("uint64", "U64", 8, "<u8", None, False),
    DType("uint32", "U32", 4, "<u4", None, False),
    DType("uint16", "U16", 2, "<u2", None, False),
    DType("uint8", "U8", 1, "|u1", "ByteStorage", False),
    DType("bool", "BOOL", 1, "|b1", "BoolStorage", False),
    DType("complex64", "C64", 8, "<c8", "ComplexFloatStorage", False),
    DType("complex128", None, 16, "<c16", "ComplexDoubleStorage", False),
    DType("complex32", None, 4, None, None, False),
]

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
BY_ST: dict[str, DType] = {d.st: d for d in _TABLE if d.st}
BY_STORAGE: dict[str, DType] = {d.storage: d for d in _TABLE if d.storage}
BY_NUMPY: dict[str, DType] = {d.numpy[1:]: d for d in _TABLE if d.numpy}

# CLI spellings users type.
ALIASES: dict[str, DType] = {
    **BY_NAME,
    "fp64": BY_NAME["float64"],
    "fp32": BY_NAME["float32"],
    "fp16": BY_NAME["float16"],
    "half": BY_NAME["float16"],
    "bf16": BY_NAME["bfloat16"],
    "float": BY_NAME["float32"],
}

UINT8 = BY_NAME["uint8"]


def from_numpy_descr(descr: str) -> DType | None:
    """Map a numpy type string (``<f4``, ``|u1``, ``>i8``) to a DType; ``None`` if unsupported.

    Only the type code and size are used; byte order is the caller's concern.
    """
    if len(descr) < 2:
        return None
    return BY_NUMPY.get(descr[1:])
