"""The weight change each LoRA-family module makes, computed in one compute dtype (fp32 by default).

For a layer weight ``W`` (``[out, in]``, or ``[out, in, kh, kw]`` for a convolution, handled as
``[out, in*kh*kw]``), a module with scale ``s`` (``Module.scale()``) merged at ratio ``r`` gives:

* LoRA / LoCon: ``W + r s up @ down``: one ``addmm_`` into ``W``. With a Tucker ``mid``
  ``[R, R, kh, kw]`` (LoCon's ``lora_mid``): ``ΔW[i, j, k, l] = Σ mid[n, m, k, l] up[i, n] down[m, j]``.
* LoHa: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; with Tucker cores ``t1``/``t2``
  ``[R, R, kh, kw]`` each factor is ``Σ t[i, j, k, l] a[i, p] b[j, q]`` (``a`` ``[R, out]``,
  ``b`` ``[R, in]``).
* LoKr: ``ΔW = w1 ⊗ w2`` (Kronecker), each factor full or a product ``a @ b``, ``w2`` optionally
  Tucker as above; flattened, ``w1 ⊗ w2`` is ``ΔW`` as ``[out, in*kh*kw]``.
* (IA)^3: ``W ⊙ (1 + r v)``, ``v`` along the output rows (or the input columns, ``on_input``).
* DoRA (a LoRA with a magnitude ``m``): ``W' = m (W + s ΔW) / ‖W + s ΔW‖``, the norm taken per
  output row (PEFT, LyCORIS ``wd_on_out``) or per input column (LyCORIS ``dora_scale``
  ``[1, in, ...]``; see ``Module.on_input``); merged at ratio ``r`` as ``W + r (W' - W)``.

Several modules on one weight apply in order, each to the weight the previous left.
"""

from __future__ import annotations

import math
from typing import Any

from .loader import Module

Shape = tuple[int, ...]


def _tucker(t: Any, a: Any, b: Any) -> Any:
    """``Σ t[i, j, ...] a[i, p] b[j, q]`` -> ``[p, q, ...]`` (a Tucker core rebuilt)."""
    import torch

    return torch.einsum("ij...,ip,jq->pq...", t, a, b)


def _flat(t: Any, rows: int) -> Any:
    return t.reshape(rows, -1)


def implied_shape(m: Module) -> tuple[int, int, Shape | None]:
    """``(out, in x kernel, kernel or None)`` the module produces (kernel None: not known)."""
    p = m.parts
    if m.algo == "lora":
        down, up = p["down"], p["up"]
        out = int(up.shape[0])
        if "mid" in p:
            k = tuple(int(s) for s in p["mid"].shape[2:])
            return out, int(down.shape[1]) * math.prod(k), k
        k = tuple(int(s) for s in down.shape[2:])
        return out, math.prod(int(s) for s in down.shape[1:]), k
    if m.algo == "loha":
        if "t1" in p:
            k = tuple(int(s) for s in p["t1"].shape[2:])
            return int(p["w1_a"].shape[1]), int(p["w1_b"].shape[1]) * math.prod(k), k
        return int(p["w1_a"].shape[0]), int(p["w1_b"].shape[1]), None
    if m.algo == "lokr":
        w1 = (p["w1"].shape[0], p["w1"].shape[1]) if "w1" in p else (p["w1_a"].shape[0], p["w1_b"].shape[1])
        if "w2" in p:
            w2 = (p["w2"].shape[0], math.prod(p["w2"].shape[1:]))
        elif "t2" in p:
            w2 = (p["w2_a"].shape[1], p["w2_b"].shape[1] * math.prod(p["t2"].shape[2:]))
        else:
            w2 = (p["w2_a"].shape[0], math.prod(p["w2_b"].shape[1:]))
        return int(w1[0] * w2[0]), int(w1[1] * w2[1]), None
    n = int(p["weight"].numel())
    return (-1, n, None) if m.on_input else (n, -1, None)


def misfit(m: Module, shape: Shape) -> str | None:
    """Why ``m`` cannot adapt a weight of ``shape`` (None when it fits)."""
    if len(shape) < 2:
        return f"the target is {list(shape)}, not a weight matrix"
    out, flat, kernel = implied_shape(m)
    t_out, t_flat = shape[0], math.prod(shape[1:])
    if m.algo == "ia3":
        ok = (flat == shape[1]) if m.on_input else (out == t_out)
    else:
        ok = out == t_out and flat == t_flat
        if ok and kernel and len(shape) == 4 and tuple(shape[2:]) != kernel and math.prod(kernel) != 1:
            ok = False
    if ok and m.dora:
        n = int(m.parts["magnitude"].numel())
        ok = n == (shape[1] if _dora_columns(m) else t_out)
    if ok and m.algo == "lora" and int(m.parts["up"].shape[1]) != int(m.parts["down"].shape[0]):
        return f"its up {list(m.parts['up'].shape)} and down {list(m.parts['down'].shape)} disagree on the rank"
    if ok:
        return None
    return f"it makes {describe(m)} but the weight is {list(shape)}"


def describe(m: Module) -> str:
    """The module's implied shape in words, for messages."""
    out, flat, kernel = implied_shape(m)
    if m.algo == "ia3":
        return f"an (IA)^3 vector of {out if out >= 0 else flat}"
    if kernel and math.prod(kernel) > 1:
        return f"[{out}, {flat // math.prod(kernel)}, {', '.join(map(str, kernel))}]"
    return f"[{out}, {flat}]"


def _dora_columns(m: Module) -> bool:
    """Whether the DoRA norm is per input column (LyCORIS ``[1, in, ...]``) rather than per output row."""
    return m.on_input


def delta(m: Module, shape: Shape, dtype: Any) -> Any:
    """``ΔW`` of a LoRA, LoCon, LoHa or LoKr module, scaled by ``m.scale()``, shaped ``shape``.

    Args:
        m: the module (not (IA)^3 or DoRA, whose change depends on the weight itself).
        shape: the weight's shape.
        dtype: the compute dtype.
    """
    p = {k: v.to(dtype) for k, v in m.parts.items()}
    out = shape[0]
    if m.algo == "lora":
        up, down = _flat(p["up"], out), _flat(p["down"], int(p["down"].shape[0]))
        if "mid" in p:
            d = _tucker(p["mid"], up.t(), down)
        else:
            d = up @ down
    elif m.algo == "loha":
        if "t1" in p:
            d = _tucker(p["t1"], p["w1_a"], p["w1_b"]) * _tucker(p["t2"], p["w2_a"], p["w2_b"])
        else:
            r1, r2 = int(p["w1_b"].shape[0]), int(p["w2_b"].shape[0])
            d = (p["w1_a"] @ _flat(p["w1_b"], r1)) * (p["w2_a"] @ _flat(p["w2_b"], r2))
    elif m.algo == "lokr":
        import torch

        w1 = p["w1"] if "w1" in p else p["w1_a"] @ p["w1_b"]
        if "w2" in p:
            w2 = _flat(p["w2"], int(p["w2"].shape[0]))
        elif "t2" in p:
            w2 = _tucker(p["t2"], p["w2_a"], p["w2_b"])
            w2 = _flat(w2, int(w2.shape[0]))
        else:
            w2 = p["w2_a"] @ _flat(p["w2_b"], int(p["w2_b"].shape[0]))
        d = torch.kron(w1, w2)
    else:
        raise ValueError(f"{m.algo} has no weight-independent delta")
    d = d.reshape(shape)
    s = m.scale()
    return d if s == 1.0 else d.mul_(s)


def apply(m: Module, w: Any, ratio: float) -> None:
    """Merge ``m`` into ``w`` in place, at ``ratio`` (``w`` is in the compute dtype, shaped like the layer).

    Plain LoRA/LoCon is a single ``addmm_`` into ``w``; the others compute their change first.
    """
    if ratio == 0.0:
        return
    dtype = w.dtype
    out = int(w.shape[0])
    if m.algo == "ia3":
        v = m.parts["weight"].to(dtype).reshape(-1)
        view = [1] * w.dim()
        view[1 if m.on_input else 0] = -1
        w.mul_((v * ratio).add_(1.0).reshape(view))  # out of place first: v may be the module's own tensor
        return
    if m.dora:
        _apply_dora(m, w, ratio)
        return
    if m.algo == "lora" and "mid" not in m.parts:
        up = _flat(m.parts["up"].to(dtype), out)
        down = _flat(m.parts["down"].to(dtype), int(m.parts["down"].shape[0]))
        w.view(out, -1).addmm_(up, down, alpha=ratio * m.scale())
        return
    w.add_(delta(m, tuple(w.shape), dtype), alpha=ratio)


def _apply_dora(m: Module, w: Any, ratio: float) -> None:
    import torch

    out = int(w.shape[0])
    full = w.clone()
    if "mid" in m.parts:
        full.add_(delta(m, tuple(w.shape), w.dtype))
    else:
        up = _flat(m.parts["up"].to(w.dtype), out)
        down = _flat(m.parts["down"].to(w.dtype), int(m.parts["down"].shape[0]))
        full.view(out, -1).addmm_(up, down, alpha=m.scale())
    mag = m.parts["magnitude"].to(w.dtype)
    if _dora_columns(m):
        norm = torch.linalg.vector_norm(full.transpose(0, 1).reshape(full.shape[1], -1), dim=1)
        shape = [1, -1] + [1] * (w.dim() - 2)
    else:
        norm = torch.linalg.vector_norm(full.reshape(out, -1), dim=1)
        shape = [-1] + [1] * (w.dim() - 1)
    factor = mag.reshape(-1).div(norm.clamp_min(torch.finfo(w.dtype).tiny)).reshape(shape)
    full.mul_(factor)
    if ratio == 1.0:
        w.copy_(full)
    else:
        w.add_(full.sub_(w), alpha=ratio)
