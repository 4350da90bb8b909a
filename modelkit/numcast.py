"""Exact float casts and decodes in numpy, so the core needs no torch to change a precision.

numpy has ``float64``, ``float32`` and ``float16`` but no ``bfloat16`` or fp8 types; modelkit
reads those as unsigned integers of their width (``TensorRef.read("numpy")``). This module
turns such bits into values and back, with the rounding torch uses:

* every fp8 and bf16 value is exactly a float32, so decoding (a lookup table of the 256 fp8
  codes, a shift for bf16) is exact;
* float32 -> bfloat16 rounds to nearest, ties to even (torch's ``round_to_nearest_even``);
* float32 -> float16 is numpy's own cast, which also rounds to nearest even, with overflow to inf;
* float64 goes to float16/bfloat16 through float32, as torch's ``Half(float)`` and
  ``BFloat16(float)`` constructors do (so the double rounding matches torch's bit for bit).

* float32 -> float8_e4m3fn / float8_e5m2 rounds to nearest even as torch's CPU kernels do:
  e4m3fn *saturates* (anything past 448, inf included, becomes +-448; NaN stays NaN), e5m2 does
  not (past its largest finite value 57344 a value rounds to inf, as IEEE does); float16/bfloat16
  go there through float32, which is exact.

NaN stays NaN, with its sign; its payload bits are not promised to match torch's (torch itself
writes different NaN bits from its scalar and vector kernels). Scaling and clamping for fp8
(``prune --fp8 scaled|clamp``) are in ``modelkit.ops.fp8``; this module only rounds.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np

from .dtypes import BY_NAME, DType

#: dtypes this module can produce
TARGETS = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})

#: fp8 layouts: (exponent bits, mantissa bits, bias, NaN rule, has inf, has negative zero)
_FP8: dict[str, tuple[int, int, int, str, bool, bool]] = {
    "float8_e4m3fn": (4, 3, 7, "all-ones", False, True),
    "float8_e5m2": (5, 2, 15, "ieee", True, True),
    "float8_e4m3fnuz": (4, 3, 8, "neg-zero", False, False),
    "float8_e5m2fnuz": (5, 2, 16, "neg-zero", False, False),
}

#: sources this module can decode
SOURCES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e8m0fnu", *_FP8})


def installed_torch() -> bool:
    """Whether torch is installed (then the writer casts with it; this module is the reference
    without it)."""
    from ._torch import have_torch

    return have_torch()


def can_cast(src: DType, dst: DType) -> bool:
    """Whether ``cast`` converts ``src`` to ``dst`` exactly as torch does."""
    return src.name in SOURCES and dst.name in TARGETS


@cache
def _fp8_table(name: str) -> Any:
    """The float32 value of each of the 256 codes of an fp8 type."""
    out = np.empty(256, dtype=np.float32)
    if name == "float8_e8m0fnu":  # exponent only: 2**(e - 127), 0xFF is NaN
        for code in range(256):
            out[code] = np.float32(np.nan) if code == 255 else np.ldexp(np.float32(1.0), code - 127)
        return out
    ebits, mbits, bias, nan_rule, _, _ = _FP8[name]
    emax = (1 << ebits) - 1
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e, m = (code >> mbits) & emax, code & ((1 << mbits) - 1)
        if nan_rule == "neg-zero" and code == 0x80:
            value = float("nan")
        elif nan_rule == "all-ones" and e == emax and m == (1 << mbits) - 1:
            value = math.copysign(float("nan"), sign)
        elif nan_rule == "ieee" and e == emax:
            value = sign * float("inf") if m == 0 else math.copysign(float("nan"), sign)
        elif e == 0:
            value = sign * m * 2.0 ** (1 - bias - mbits)
        else:
            value = sign * (1 + m / (1 << mbits)) * 2.0 ** (e - bias)
        out[code] = np.float32(value)
    return out


def values(arr: Any, dtype: DType) -> Any:
    """The values of ``arr`` (as ``TensorRef.read("numpy")`` gives them) in a numpy float type:
    float64/float32/float16 as they are, bfloat16 and fp8 exactly as float32. Other dtypes are
    returned unchanged."""
    if dtype.name == "bfloat16":
        return (np.asarray(arr, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype.name in _FP8 or dtype.name == "float8_e8m0fnu":
        return _fp8_table(dtype.name)[np.asarray(arr, dtype=np.uint8)]
    return arr


def _to_bf16_bits(f32: Any) -> Any:
    """float32 -> bfloat16 bits, round to nearest even; NaN keeps its sign and becomes quiet."""
    u = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def cast(arr: Any, src: DType, dst: DType) -> Any:
    """``arr`` (of dtype ``src``, in ``TensorRef.read("numpy")``'s representation) cast to ``dst``,
    in the same representation (bfloat16 as ``uint16`` bits). Raises ValueError where
    ``can_cast`` is false."""
    if not can_cast(src, dst):
        raise ValueError(f"numpy cannot cast {src.name} to {dst.name} as torch does")
    if src == dst:
        return np.array(arr, copy=True)
    with np.errstate(all="ignore"):  # overflow to inf and NaN are results here, not errors
        vals = values(arr, src)
        if dst.name == "float64":
            return vals.astype(np.float64)
        if dst.name == "float32":
            return vals.astype(np.float32)
        if vals.dtype == np.float64:  # through float32, as torch's Half(float)/BFloat16(float) do
            vals = vals.astype(np.float32)
        if dst.name == "float16":
            return vals.astype(np.float16)
        if dst.name in FP8_LIMITS:
            return to_fp8_bits(vals, dst.name)
        return _to_bf16_bits(vals)


#: fp8 targets: (largest finite value, the magnitude past which a value overflows: it would round
#: above the largest finite value, to inf in e5m2, saturated to 448 by e4m3fn)
FP8_LIMITS: dict[str, tuple[float, float]] = {"float8_e4m3fn": (448.0, 464.0), "float8_e5m2": (57344.0, 61440.0)}
#: per fp8 target: (mantissa bits, exponent bias, float32 bits of the smallest normal)
_FP8_ROUND = {"float8_e4m3fn": (3, 7, 121 << 23), "float8_e5m2": (2, 15, 113 << 23)}


def to_fp8_bits(f32: Any, name: str) -> Any:
    """float32 values -> bits of ``float8_e4m3fn``/``float8_e5m2`` (``uint8``), as torch rounds them:
    to nearest even; subnormals through one float32 add; e4m3fn saturates to +-448 (inf too), e5m2
    overflows to inf; NaN -> the quiet NaN of its sign."""
    mbits, bias, min_normal = _FP8_ROUND[name]
    f = np.ascontiguousarray(f32, dtype=np.float32)
    u = f.view(np.uint32)
    sign = ((u >> np.uint32(24)) & np.uint32(0x80)).astype(np.uint8)
    a = u & np.uint32(0x7FFFFFFF)
    shift = np.uint32(23 - mbits)
    # normals: rebias the exponent, round the dropped bits to nearest even
    odd = (a >> shift) & np.uint32(1)
    adj = np.uint32(((bias - 127) & 0x1FF) << 23) + np.uint32((1 << (22 - mbits)) - 1)
    normal = (a + adj + odd) >> shift
    # subnormals: adding 2**k leaves exactly the fp8 subnormal's mantissa bits in the low bits
    magic = np.array([(127 + 24 - bias - mbits) << 23], dtype=np.uint32)  # 2**(24 - bias - mbits):
    # its float32 ulp is the fp8's smallest subnormal
    fm = magic.view(np.float32)[0]
    with np.errstate(all="ignore"):  # NaN and inf pass through the add; only the normal path uses them
        sub = (np.abs(f) + fm).view(np.uint32) - magic[0]
    out = np.where(a < np.uint32(min_normal), sub, normal)
    if name == "float8_e4m3fn":
        out = np.minimum(out, np.uint32(0x7E))  # saturate: the rounding past 448 and inf
        out = np.where(a > np.uint32(0x7F800000), np.uint32(0x7F), out)
    else:
        big = a >= np.uint32(0x47800000)  # 65536.0 and up: inf (NaN stays NaN)
        out = np.where(big, np.where(a > np.uint32(0x7F800000), np.uint32(0x7F), np.uint32(0x7C)), out)
    return out.astype(np.uint8) | sign


@cache
def fp8_table16(src: str, dst: str) -> tuple[Any, int, int]:
    """The cast of every 16-bit code of ``src`` (float16 or bfloat16) to the fp8 type ``dst``, as a
    lookup table (``uint8[65536]``, ``to_fp8_bits``' results), with the overflow test in bits:
    ``(limit, inf)``: a code whose magnitude bits (``code & 0x7FFF``) are above ``limit`` and below
    ``inf`` is a finite value that overflows."""
    codes = np.arange(1 << 16, dtype=np.uint16)
    vals = values(codes, BY_NAME[src]) if src == "bfloat16" else codes.view(np.float16).astype(np.float32)
    table = to_fp8_bits(vals, dst)
    mag = codes & np.uint16(0x7FFF)
    finite = np.isfinite(vals)
    over = finite & _past(np.abs(np.where(finite, vals, 0)), dst)
    limit = int(mag[finite & ~over].max())
    inf = int(mag[~finite].min())
    return table, limit, inf


def _past(mag: Any, name: str) -> Any:
    """Where magnitudes ``mag`` overflow ``name``: 61440 ties up to inf in e5m2; 464 ties down to 448."""
    limit = FP8_LIMITS[name][1]
    return (mag >= limit) if name == "float8_e5m2" else (mag > limit)


def fp8_overflow(src_vals: Any, name: str) -> int:
    """How many finite values of ``src_vals`` overflow ``name`` (past ``FP8_LIMITS``' bound)."""
    mag = np.abs(np.asarray(src_vals, dtype=np.float32))
    return int(np.count_nonzero(_past(mag, name) & np.isfinite(mag)))


def overflowed(src_vals: Any, dst: Any, dst_dtype: DType) -> int:
    """How many finite values of ``src_vals`` became infinite in ``dst`` (cast's result); for fp8,
    how many overflowed (``fp8_overflow``: e4m3fn saturates, so its result cannot tell)."""
    if dst_dtype.name in FP8_LIMITS:
        return fp8_overflow(src_vals, dst_dtype.name)
    out = values(dst, dst_dtype)
    inf = np.isinf(out)
    if not inf.any():
        return 0
    return int(np.count_nonzero(inf & np.isfinite(src_vals)))


def same_values(a_bits: bytes, b_bits: bytes, dtype: DType) -> bool:
    """Whether two buffers of ``dtype`` hold the same elements: equal bits, or NaN in both at
    each place they differ (NaN payloads are not portable, not even within torch)."""
    if a_bits == b_bits:
        return True
    if not dtype.is_float or len(a_bits) != len(b_bits):
        return False
    code = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
    ua, ub = np.frombuffer(a_bits, dtype=code), np.frombuffer(b_bits, dtype=code)
    if dtype.numpy is not None:
        va, vb = ua.view(np.dtype(dtype.numpy)), ub.view(np.dtype(dtype.numpy))
    else:
        va, vb = values(ua, dtype), values(ub, dtype)
    differ = ua != ub
    return bool(np.all(np.isnan(va[differ]) & np.isnan(vb[differ])))
