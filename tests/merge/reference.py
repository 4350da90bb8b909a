"""Float64 references for the merge tests, written out plainly (loops over kernel positions and
Kronecker blocks rather than the einsum/kron calls modelkit uses), and the 1-ulp comparison."""

from __future__ import annotations

import math

import torch

MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


def d(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def lora_scale(parts: dict[str, torch.Tensor], rank: int | None) -> float:
    if "alpha" not in parts or rank is None:
        return 1.0
    return float(parts["alpha"]) / rank


def delta(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW (alpha/rank included) of one module, as kohya/LyCORIS/A1111 define it, in float64."""
    out = shape[0]
    kernel = shape[2:]
    if "lora_mid.weight" in parts:
        up, mid, down = d(parts["lora_up.weight"]), d(parts["lora_mid.weight"]), d(parts["lora_down.weight"])
        rank = down.shape[0]
        up2, down2 = up.reshape(out, rank), down.reshape(rank, -1)
        w = torch.zeros(shape, dtype=torch.float64)
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                w[:, :, i, j] = up2 @ mid[:, :, i, j] @ down2
        return w * lora_scale(parts, rank)
    if "lora_down.weight" in parts or "lora_A.weight" in parts:
        down = d(parts.get("lora_down.weight", parts.get("lora_A.weight")))
        up = d(parts.get("lora_up.weight", parts.get("lora_B.weight")))
        rank = down.shape[0]
        return (up.reshape(out, rank) @ down.reshape(rank, -1)).reshape(shape) * lora_scale(parts, rank)
    if "hada_t1" in parts:
        w = torch.zeros(shape, dtype=torch.float64)
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                f1 = d(parts["hada_w1_a"]).T @ d(parts["hada_t1"])[:, :, i, j] @ d(parts["hada_w1_b"])
                f2 = d(parts["hada_w2_a"]).T @ d(parts["hada_t2"])[:, :, i, j] @ d(parts["hada_w2_b"])
                w[:, :, i, j] = f1 * f2
        return w * lora_scale(parts, parts["hada_w1_b"].shape[0])
    if "hada_w1_a" in parts:
        f1 = d(parts["hada_w1_a"]) @ d(parts["hada_w1_b"])
        f2 = d(parts["hada_w2_a"]) @ d(parts["hada_w2_b"])
        return (f1 * f2).reshape(shape) * lora_scale(parts, parts["hada_w1_b"].shape[0])
    if any(k.startswith("lokr") for k in parts):
        return _lokr(parts, shape)
    raise ValueError(sorted(parts))


def _lokr(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    kernel = shape[2:]
    w1 = d(parts["lokr_w1"]) if "lokr_w1" in parts else d(parts["lokr_w1_a"]) @ d(parts["lokr_w1_b"])
    if "lokr_w2" in parts:
        w2 = d(parts["lokr_w2"])
    elif "lokr_t2" in parts:
        t2, a, b = d(parts["lokr_t2"]), d(parts["lokr_w2_a"]), d(parts["lokr_w2_b"])
        w2 = torch.zeros((a.shape[1], b.shape[1], *kernel), dtype=torch.float64)
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                w2[:, :, i, j] = a.T @ t2[:, :, i, j] @ b
    else:
        a, b = d(parts["lokr_w2_a"]), d(parts["lokr_w2_b"])
        w2 = (a @ b.reshape(b.shape[0], -1)).reshape(a.shape[0], -1, *kernel)
    ob, ib = w2.shape[0], w2.shape[1]
    w = torch.zeros(shape, dtype=torch.float64)
    for p in range(w1.shape[0]):
        for q in range(w1.shape[1]):
            w[p * ob:(p + 1) * ob, q * ib:(q + 1) * ib] = w1[p, q] * w2
    rank = next((parts[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in parts), None)
    return w * lora_scale(parts, rank)


def merged(w: torch.Tensor, parts: dict[str, torch.Tensor], ratio: float) -> torch.Tensor:
    """The float64 weight after merging one module at ``ratio``."""
    w = d(w)
    shape = tuple(w.shape)
    if "on_input" in parts:
        v = d(parts["weight"])
        if int(parts["on_input"]):
            return w * (1 + ratio * v.reshape(1, -1, *[1] * (w.dim() - 2)))
        return w * (1 + ratio * v.reshape(-1, *[1] * (w.dim() - 1)))
    mag = parts.get("dora_scale", parts.get("lora_magnitude_vector"))
    if mag is not None:
        full = w + delta(parts, shape)
        if "dora_scale" in parts:  # LyCORIS: a norm per input column
            norm = torch.sqrt((full ** 2).sum(dim=[i for i in range(full.dim()) if i != 1], keepdim=True))
            target = full * d(mag).reshape(norm.shape) / norm
        else:  # PEFT: a norm per output row
            norm = torch.sqrt((full ** 2).reshape(shape[0], -1).sum(dim=1))
            target = full * (d(mag) / norm).reshape(-1, *[1] * (w.dim() - 1))
        return w + ratio * (target - w)
    return w + ratio * delta(parts, shape)


def assert_within_ulp(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Every element of ``got`` is within one ulp (of ``got``'s dtype) of the float64 ``ref``."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    fi = torch.finfo(got.dtype)
    mant = MANTISSA[got.dtype]
    e = torch.floor(torch.log2(ref.abs().clamp_min(fi.tiny)))
    ulp = torch.pow(2.0, e - mant).clamp_min(fi.tiny * 2.0 ** -mant)
    err = (got.to(torch.float64) - ref).abs()
    bad = err > ulp
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} of {got.numel()} values off by more than 1 ulp " \
                                f"(worst {float((err / ulp).max()):.2f} ulp)"


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def assert_all_within_ulp(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``assert_within_ulp`` for many tensors at once (concatenated per dtype; per key on failure)."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k, (got, ref) in pairs.items():
        assert got.shape == ref.shape, (k, got.shape, ref.shape)
        by_dtype.setdefault(got.dtype, []).append(k)
    for keys in by_dtype.values():
        try:
            assert_within_ulp(torch.cat([pairs[k][0].reshape(-1) for k in keys]),
                              torch.cat([pairs[k][1].reshape(-1) for k in keys]), "all")
        except AssertionError:
            for k in keys:
                assert_within_ulp(pairs[k][0], pairs[k][1], k)
            raise
