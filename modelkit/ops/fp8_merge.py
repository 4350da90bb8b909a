"""Merges of scaled fp8 checkpoints (``merge lora``, ``merge models``): upcast, merge, cast back.

A scaled fp8 weight stores ``q`` (fp8) and a per-tensor float32 ``scale``; its value is
``q.float() * scale`` (``fp8.ScaledWeight``). A merge reads each such weight as that value, in the
compute dtype, and combines it as any other weight. The result is then stored the way the input
was:

* by default, a merged weight of a scaled input is scaled again, with a **new** scale from the
  merged values: ``scale = amax(|w|) / max`` (float32; 1.0 for an all-zero weight) and
  ``q = (w / scale).clamp(-max, max)`` cast to the same fp8 format. That is what
  ``prune --dtype fp8_e4m3fn --fp8 scaled`` writes for the same float values, so a merge of a
  scaled file equals merging its upcast copy and scaling the result. The layer's other
  bookkeeping tensors (``comfy_quant``, ``input_scale``, the ``scaled_fp8`` marker) are kept as
  they are; weights the merge leaves alone keep their bytes and their scale;
* with ``--dtype fp16|bf16|fp32``, every scaled weight is written as its value in that dtype and the
  scales and markers are dropped, as ``prune --dtype`` does.

The merged weight and its new scale are written as two tensors, in whichever order the file has
them, so one ``Requant`` cell computes both once (under a lock: the writer and the compute-ahead
threads may ask for them at the same time) and hands each over once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from .. import numcast
from ..errors import FormatError
from ..model import TensorRef
from .fp8 import ScaledWeight, bookkeeping, scale_value, scaled_weights


class Scaled:
    """The scaled fp8 weights of one input file, with their scales read once."""

    def __init__(self, tensors: Mapping[str, TensorRef], metadata: Mapping[str, str]) -> None:
        self.found: dict[str, ScaledWeight] = scaled_weights(tensors, metadata)
        self.drop: set[str] = bookkeeping(tensors, self.found)
        #: scale tensor name -> its weight's name
        self.scale_of: dict[str, str] = {sw.scale: w for w, sw in self.found.items()}
        self.factors: dict[str, float] = {w: scale_value(tensors, sw) for w, sw in self.found.items()}

    def __bool__(self) -> bool:
        return bool(self.found)

    def factor(self, name: str) -> float | None:
        """The scale to multiply the stored values of ``name`` by, or None for a plain tensor."""
        return self.factors.get(name)


def dequantized(ref: TensorRef, factor: float | None, compute: Any) -> Any:
    """``ref``'s values as a new tensor in the compute dtype, times ``factor`` (a scaled weight).

    The product is taken in float32, as ComfyUI dequantizes (``q.float() * scale``), then widened."""
    import torch

    w = ref.read("torch")
    if factor is None:
        return w.to(compute)
    return w.to(torch.float32).mul_(factor).to(compute)


def requantize(w: Any, fmt: str, name: str) -> tuple[bytes, bytes]:
    """``w`` (compute dtype) as scaled fp8 of format ``fmt``: (the fp8 bytes, the float32 scale's bytes).

    Raises:
        FormatError: the merged weight holds inf or NaN, which no scale can store.
    """
    import numpy as np
    import torch

    fmax = float(numcast.FP8_LIMITS[fmt][0])
    amax = w.abs().max() if w.numel() else w.new_zeros(())
    if not bool(torch.isfinite(amax)):
        raise FormatError(None, f"the merged {name!r} holds inf or NaN, which scaled fp8 cannot store",
                          "Merge with --dtype fp16 (or lower the LoRA ratio)")
    scale = np.float32(float(amax)) / np.float32(fmax)
    if not scale > 0:
        scale = np.float32(1.0)
    q = w.div(float(scale)).clamp_(-fmax, fmax).to(getattr(torch, fmt))
    return q.contiguous().view(torch.uint8).numpy().tobytes(), np.asarray(scale, dtype="<f4").tobytes()


class Requant:
    """One merged scaled weight: computed once, by whichever of its two tensors is written first."""

    def __init__(self, make: Callable[[], Any], fmt: str, name: str) -> None:
        self.make, self.fmt, self.name = make, fmt, name
        self.lock = threading.Lock()
        self.q: bytes | None = None
        self.s: bytes | None = None

    def _done(self) -> None:
        with self.lock:
            if self.s is None:
                self.q, self.s = requantize(self.make(), self.fmt, self.name)

    def weight(self, _slot: int = 0) -> bytes:
        self._done()
        with self.lock:
            q, self.q = self.q, None  # handed over once: the cell keeps no copy of a written weight
        assert q is not None
        return q

    def scale(self) -> bytes:
        self._done()
        assert self.s is not None
        return self.s
