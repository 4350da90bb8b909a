"""GGUF K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) made in numpy, byte for byte as llama.cpp makes them.

The ``gguf`` package reads K-quants but cannot write them; llama.cpp's ``llama-quantize`` (what
ComfyUI-GGUF's K-quant files come from) uses ggml's reference quantizers when it has no importance
matrix. This module computes the same bytes. Each 256-value super-block is cut into sub-blocks
(16 of 16 values, or 8 of 32); every sub-block gets a scale (and, for Q2_K/Q4_K/Q5_K, a minimum)
found by a small search, those are quantized once more against one fp16 super-scale, and the values
are then rounded against the stored scales and bit-packed.

Equality with C is a matter of float32 arithmetic done in the same order:

* element-wise steps run on whole arrays at once (IEEE float32 is the same in numpy and C);
* every sum is accumulated element by element in C's order (a loop over the 16 or 32 positions of
  a sub-block, vectorised across all sub-blocks), never with numpy's pairwise ``sum``;
* ggml's ``nearest_int`` (adding 1.5 * 2**23 and reading the mantissa bits) is reproduced bit for
  bit, and comparisons keep C's strictness and first-match order.

The reference is ggml compiled without fused multiply-add contraction (ggml's portable build, as
on x86-64); ``tests/ops/data`` holds the vectors the tests compare against. Inputs with NaN or
infinity are quantized but are outside that check.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

QK_K = 256
F32 = np.float32
_EPS = F32(1e-15)  # ggml's GROUP_MAX_EPS
_MAGIC = F32(12582912.0)  # 1.5 * 2**23
#: Super-blocks quantized at once by one thread: its temporaries stay at a few MB each.
CHUNK = 1024

Arr = Any  # numpy arrays; numpy's typing of ufunc results is too loose to help here


def _nearest(v: Arr) -> Arr:
    """ggml's ``nearest_int`` on a float32 array: round half to even through the float mantissa."""
    bits = np.add(v, _MAGIC, dtype=F32).view(np.int32)
    bits &= 0x7FFFFF
    bits -= 0x400000
    return bits


def _acc(terms: Arr) -> Arr:
    """``terms`` (n, M) summed over the first axis one row after another from 0.0f, in float32, as a
    C loop does (numpy's own ``sum`` adds pairwise, which rounds differently)."""
    total = np.zeros(terms.shape[1], F32)
    for row in terms:
        total += row
    return total


def _pick(cond: Arr, new: Arr, old: Arr) -> Arr:
    return np.where(cond, new, old)


def _absmax(x: Arr) -> tuple[Arr, Arr]:
    """The first value of largest magnitude per column of ``x`` (n, M), and that magnitude."""
    ax = np.abs(x)
    i = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    return x[i, cols], ax[i, cols]


def _f16_round(v: Arr) -> tuple[Arr, Arr]:
    """``v`` as ggml stores a scale: the fp16 value, and it read back as float32."""
    h = np.asarray(v, F32).astype(np.float16)
    return h, h.astype(F32)


def _make_qx(x: Arr, nmax: int) -> tuple[Arr, Arr]:
    """ggml's ``make_qx_quants`` with rmse_type 1 and no weights (Q6_K's sub-block search).

    Returns (levels 0..2*nmax-1 as int32 (n, M), scale (M,)).
    """
    mx, amax = _absmax(x)
    zero = amax < _EPS
    mx = _pick(zero, F32(1), mx)
    w = x * x
    wx = w * x

    def trial(iscale: Arr) -> tuple[Arr, Arr, Arr]:
        lv = np.clip(_nearest(iscale * x), -nmax, nmax - 1)
        lf = lv.astype(F32)
        return lv, _acc(wx * lf), _acc(w * lf * lf)

    lv, sumlx, suml2 = trial(F32(-nmax) / mx)
    levels = lv + nmax
    scale = _pick(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = _pick(better, lv + nmax, levels)
        scale = _pick(better, sumlx / suml2, scale)
        best = _pick(better, scale * sumlx, best)
    return _pick(zero, 0, levels), _pick(zero, F32(0), scale)


def _make_q3(x: Arr, nmax: int) -> tuple[Arr, Arr]:
    """ggml's ``make_q3_quants`` with its refinement (Q3_K's sub-block search)."""
    mx, amax = _absmax(x)
    zero = amax < _EPS
    mx = _pick(zero, F32(1), mx)
    lv = np.clip(_nearest((F32(-nmax) / mx) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = lv.astype(F32)
    sumlx, suml2 = _acc(wx * lf), _acc(w * lf * lf)
    # C stops once a pass changes nothing; a further pass would change nothing either.
    for _ in range(5):
        for i in range(x.shape[0]):
            li = lv[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = np.clip(_nearest(x[i] * sl2 / slx), -nmax, nmax - 1)
            nf = new.astype(F32)
            slx2 = slx + wx[i] * nf
            sl22 = sl2 + w[i] * nf * nf
            take = (slx > 0) & (new != lv[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lv[i] = _pick(take, new, lv[i])
            sumlx = _pick(take, slx2, sumlx)
            suml2 = _pick(take, sl22, suml2)
    scale = _pick(suml2 > 0, sumlx / suml2, F32(0))
    return _pick(zero, 0, lv + nmax), _pick(zero, F32(0), scale)


def _make_qkx2(x: Arr, w: Arr, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[Arr, Arr, Arr]:
    """ggml's ``make_qkx2_quants``: levels 0..nmax with a scale and a minimum, by a grid search.

    Returns (levels int32 (n, M), scale (M,), the minimum to subtract, >= 0 (M,)).
    """
    lo, hi = x[0].copy(), x[0].copy()
    sum_w, sum_x = w[0].copy(), w[0] * x[0]
    for i in range(1, x.shape[0]):
        lo = _pick(x[i] < lo, x[i], lo)
        hi = _pick(x[i] > hi, x[i], hi)
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = _pick(lo > 0, F32(0), lo)
    flat = hi == lo
    buf = np.empty_like(x)

    def levels_at(iscale: Arr, mn: Arr) -> Arr:
        """Levels for (iscale, minimum), as int32 in ``buf``'s memory (valid until its next use)."""
        np.multiply(np.subtract(x, mn, out=buf), iscale, out=buf)
        np.add(buf, _MAGIC, out=buf)  # _nearest, in place
        bits = buf.view(np.int32)
        bits &= 0x7FFFFF
        bits -= 0x400000
        return np.clip(bits, 0, nmax, out=bits)

    def err(scale: Arr, mn: Arr, lf: Arr) -> Arr:
        np.subtract(np.add(np.multiply(scale, lf, out=buf), mn, out=buf), x, out=buf)
        if use_mad:
            np.abs(buf, out=buf)
        else:
            np.multiply(buf, buf, out=buf)
        return _acc(np.multiply(buf, w, out=buf))

    # The levels are a function of (iscale, minimum): keep the winning pair, make them once at the end.
    best_iscale = F32(nmax) / _pick(flat, F32(1), hi - lo)
    best_lo = lo
    scale = F32(1) / best_iscale
    best = err(scale, lo, levels_at(best_iscale, lo).astype(F32))
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / _pick(flat, F32(1), hi - lo)
        lf = levels_at(iscale, lo).astype(F32)
        wl = w * lf
        sum_l, sum_xl = _acc(wl), _acc(wl * x)
        wl *= lf
        sum_l2 = _acc(wl)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_min = _pick(pos, F32(0), this_min)
        this_scale = _pick(pos, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, this_min, lf)
        better = (det > 0) & (cur < best) & ~flat
        best_iscale = _pick(better, iscale, best_iscale)
        best_lo = _pick(better, lo, best_lo)
        best = _pick(better, cur, best)
        scale = _pick(better, this_scale, scale)
        lo = _pick(better, this_min, lo)
    levels = levels_at(best_iscale, best_lo)
    return _pick(flat, 0, levels), _pick(flat, F32(0), scale), -lo


def _running_max(v: Arr, absolute: bool = False) -> tuple[Arr, Arr]:
    """Per row of ``v`` (nb, j): C's ``if (s > best) best = s`` from 0 (or on ``fabsf(s)``).

    Returns (the value kept, its magnitude) -- the same array twice unless ``absolute``.
    """
    keep = np.zeros(v.shape[0], F32)
    mag = np.zeros(v.shape[0], F32)
    for j in range(v.shape[1]):
        m = np.abs(v[:, j]) if absolute else v[:, j]
        take = m > mag
        keep = _pick(take, v[:, j], keep)
        mag = _pick(take, m, mag)
    return keep, mag


def _subblocks(x: Arr, size: int) -> Arr:
    """(nb, 256) -> (size, nb * 256/size): position in the sub-block first, sub-blocks in order."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _requant(x: Arr, levels: Arr, d: Arr, dm: Arr | None, lo: int, hi: int, size: int) -> Arr:
    """C's final pass: each sub-block with a non-zero ``d`` (nb, j) is rounded again against it.

    ``levels`` (nb, 256) keep the search's values where ``d`` is zero; the result is offset by ``-lo``.
    """
    nb = x.shape[0]
    xs = x.reshape(nb, -1, size)
    dd = d[:, :, None]
    num = xs + dm[:, :, None] if dm is not None else xs
    new = np.clip(_nearest(num / _pick(dd != 0, dd, F32(1))), lo, hi) - lo
    return _pick(dd != 0, new, levels.reshape(nb, -1, size)).reshape(nb, QK_K)


def _pack2(levels: Arr) -> Arr:
    """2-bit levels (nb, 256) as ggml packs them: 4 quarters of each 128 into one byte."""
    q = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _scales_k4(ls: Arr, lm: Arr) -> Arr:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit minimums."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] = lm[:, 0:4] | (lm[:, 4:8] >> 4) << 6
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | (lm[:, 4:8] & 0xF) << 4
    return out


def _q2_k(x: Arr) -> Arr:
    nb = x.shape[0]
    xs = _subblocks(x, 16)
    levels, sc, mn = _make_qkx2(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    levels = levels.T.reshape(nb, QK_K)
    sc, mn = sc.reshape(nb, 16), mn.reshape(nb, 16)
    max_scale, _ = _running_max(sc)
    max_min, _ = _running_max(mn)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = _pick(has_s[:, None], _nearest((F32(15) / _pick(has_s, max_scale, F32(1)))[:, None] * sc), 0)
    lm = _pick(has_m[:, None], _nearest((F32(15) / _pick(has_m, max_min, F32(1)))[:, None] * mn), 0)
    scales = ((ls & 0xFF) | (lm << 4)) & 0xFF
    d16, d = _f16_round(_pick(has_s, max_scale / F32(15), F32(0)))
    m16, m = _f16_round(_pick(has_m, max_min / F32(15), F32(0)))
    levels = _requant(x, levels, d[:, None] * (scales & 0xF).astype(F32),
                      m[:, None] * (scales >> 4).astype(F32), 0, 3, 16)
    return np.concatenate([scales.astype(np.uint8), _pack2(levels), d16.view(np.uint8).reshape(nb, 2),
                           m16.view(np.uint8).reshape(nb, 2)], axis=1)


def _q3_k(x: Arr) -> Arr:
    nb = x.shape[0]
    levels, sc = _make_q3(_subblocks(x, 16), 4)
    levels, sc = levels.T.reshape(nb, QK_K), sc.reshape(nb, 16)
    max_scale, _ = _running_max(sc, absolute=True)
    has = max_scale != 0
    iscale = F32(-32) / _pick(has, max_scale, F32(1))
    l8 = ((_nearest(iscale[:, None] * sc) + 128) & 0xFF) - 128  # C stores it in an int8_t first
    ls = _pick(has[:, None], np.clip(l8, -32, 31) + 32, 0)
    d16, d = _f16_round(_pick(has, F32(1) / iscale, F32(0)))
    levels = _requant(x, levels, d[:, None] * (ls - 32).astype(F32), None, -4, 3, 16)
    hbits = (levels > 3).reshape(nb, 8, 32).astype(np.uint8)
    hmask = np.zeros((nb, 32), np.uint8)
    for b in range(8):
        hmask |= hbits[:, b] << b
    levels = levels - 4 * (levels > 3)
    ls8 = ls.astype(np.uint8)
    scales = np.zeros((nb, 12), np.uint8)
    scales[:, 0:8] = (ls8[:, 0:8] & 0xF) | (ls8[:, 8:16] & 0xF) << 4
    high = ls8 >> 4
    scales[:, 8:12] = high[:, 0:4] | high[:, 4:8] << 2 | high[:, 8:12] << 4 | high[:, 12:16] << 6
    return np.concatenate([hmask, _pack2(levels), scales, d16.view(np.uint8).reshape(nb, 2)], axis=1)


def _q45_k(x: Arr, nmax: int, rmin: float, nstep: int) -> tuple[Arr, Arr]:
    """Q4_K and Q5_K share everything but the level count: (levels (nb, 256), the 16-byte head)."""
    nb = x.shape[0]
    xs = _subblocks(x, 32)
    av = np.sqrt(_acc(xs * xs) / F32(32))
    levels, sc, mn = _make_qkx2(xs, av + np.abs(xs), nmax, rmin, 0.1, nstep, False)
    levels = levels.T.reshape(nb, QK_K)
    sc, mn = sc.reshape(nb, 8), mn.reshape(nb, 8)
    max_scale, _ = _running_max(sc)
    max_min, _ = _running_max(mn)
    inv_s = _pick(max_scale > 0, F32(63) / _pick(max_scale > 0, max_scale, F32(1)), F32(0))
    inv_m = _pick(max_min > 0, F32(63) / _pick(max_min > 0, max_min, F32(1)), F32(0))
    ls = np.minimum(_nearest(inv_s[:, None] * sc) & 0xFF, 63).astype(np.uint8)  # uint8_t, then MIN(63, .)
    lm = np.minimum(_nearest(inv_m[:, None] * mn) & 0xFF, 63).astype(np.uint8)
    d16, d = _f16_round(max_scale / F32(63))
    m16, m = _f16_round(max_min / F32(63))
    levels = _requant(x, levels, d[:, None] * ls.astype(F32), m[:, None] * lm.astype(F32), 0, nmax, 32)
    head = np.concatenate([d16.view(np.uint8).reshape(nb, 2), m16.view(np.uint8).reshape(nb, 2),
                           _scales_k4(ls, lm)], axis=1)
    return levels, head


def _q4_k(x: Arr) -> Arr:
    levels, head = _q45_k(x, 15, -1.0, 20)
    q = levels.reshape(-1, 4, 2, 32).astype(np.uint8)
    return np.concatenate([head, (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)], axis=1)


def _q5_k(x: Arr) -> Arr:
    levels, head = _q45_k(x, 31, -0.5, 15)
    q = levels.reshape(-1, 4, 2, 32).astype(np.uint8)
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for n in range(4):
        qh |= (q[:, n, 0] >> 4) << (2 * n) | (q[:, n, 1] >> 4) << (2 * n + 1)
    ql = ((q[:, :, 0] & 0xF) | (q[:, :, 1] & 0xF) << 4).reshape(-1, 128)
    return np.concatenate([head, qh, ql], axis=1)


def _q6_k(x: Arr) -> Arr:
    nb = x.shape[0]
    levels, sc = _make_qx(_subblocks(x, 16), 32)
    levels, sc = levels.T.reshape(nb, QK_K), sc.reshape(nb, 16)
    max_scale, max_abs = _running_max(sc, absolute=True)
    zero = max_abs < _EPS
    iscale = F32(-128) / _pick(zero, F32(1), max_scale)
    s8 = ((np.minimum(127, _nearest(iscale[:, None] * sc)) + 128) & 0xFF) - 128
    s8 = _pick(zero[:, None], 0, s8)
    d16, d = _f16_round(_pick(zero, F32(0), F32(1) / iscale))
    levels = _requant(x, levels, d[:, None] * s8.astype(F32), None, -32, 31, 16)
    levels = _pick(zero[:, None], 0, levels)
    q = levels.reshape(nb, 2, 4, 32).astype(np.uint8)
    lo = q & 0xF
    ql = np.concatenate([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], axis=2)
    hi = q >> 4
    qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), s8.astype(np.int8).view(np.uint8),
                           d16.view(np.uint8).reshape(nb, 2)], axis=1)


#: type -> (bytes per super-block, quantizer of (nb, 256) float32 to (nb, bytes) uint8)
TYPES: dict[str, tuple[int, Callable[[Arr], Arr]]] = {
    "Q2_K": (84, _q2_k), "Q3_K": (110, _q3_k), "Q4_K": (144, _q4_k), "Q5_K": (176, _q5_k), "Q6_K": (210, _q6_k),
}


def quantize(values: Arr, qtype: str, threads: int | None = None) -> Arr:
    """``values`` in a K-quant type, as ggml's reference quantizer (llama-quantize without an imatrix).

    Args:
        values: a float array whose last dimension is a whole number of 256-value super-blocks.
        qtype: ``Q2_K``, ``Q3_K``, ``Q4_K``, ``Q5_K`` or ``Q6_K``.
        threads: chunks of ``CHUNK`` super-blocks quantized at once (default ``default_threads()``);
            the bytes do not depend on it.

    Returns:
        uint8 array shaped ``(*values.shape[:-1], row_bytes)``, as ``gguf.quantize`` shapes its output.

    Raises:
        ValueError: an unknown type, or rows that are not whole super-blocks.

    Example:
        >>> quantize(np.zeros((2, 256), np.float32), "Q4_K").shape
        (2, 144)
    """
    if qtype not in TYPES:
        raise ValueError(f"{qtype} is not a K-quant type ({', '.join(TYPES)})")
    arr = np.asarray(values, dtype=F32)
    if arr.ndim == 0 or arr.shape[-1] % QK_K:
        raise ValueError(f"rows of {arr.shape[-1] if arr.ndim else 0} values are not whole {QK_K}-value "
                         f"super-blocks")
    size, fn = TYPES[qtype]
    flat = arr.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], size), np.uint8)

    def part(start: int) -> None:
        with np.errstate(all="ignore"):  # C's float arithmetic, inf and nan included, without warnings
            out[start:start + CHUNK] = fn(flat[start:start + CHUNK])

    starts = range(0, flat.shape[0], CHUNK)
    workers = min(len(starts), threads if threads is not None else default_threads())
    if workers <= 1:
        for start in starts:
            part(start)
    else:  # numpy lets go of the GIL inside each array operation: the chunks run side by side
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(part, starts))
    return out.reshape(*arr.shape[:-1], arr.shape[-1] // QK_K * size)


def default_threads() -> int:
    """Threads ``quantize`` uses: the CPUs this process may run on, at most 8."""
    from ..portable import usable_cpus

    return max(1, min(8, usable_cpus()))
