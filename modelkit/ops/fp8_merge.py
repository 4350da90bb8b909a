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

The merged weight and its new scale are two output tensors, and the writer puts every float32
scale before any fp8 weight; ``Requant`` computes the scale from one merge and the weight from a
second, so no merged weight waits in memory for its turn (see there).
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


def scale_for(w: Any, fmt: str, name: str) -> Any:
    """The float32 scale of merged weights ``w`` (compute dtype) as scaled fp8 of format ``fmt``:
    ``amax(|w|) / max``, 1.0 for an all-zero tensor.

    Raises:
        FormatError: the merged weight holds inf or NaN, which no scale can store.
    """
    import numpy as np
    import torch

    fmax = np.float32(numcast.FP8_LIMITS[fmt][0])
    if not w.numel():
        return np.float32(1.0)
    lo, hi = torch.aminmax(w)
    amax = max(-float(lo), float(hi))
    if not (np.isfinite(amax) and bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise FormatError(None, f"the merged {name!r} holds inf or NaN, which scaled fp8 cannot store",
                          "Merge with --dtype fp16 (or lower the LoRA ratio)")
    scale = np.float32(amax) / fmax
    return scale if scale > 0 else np.float32(1.0)


def quantize(w: Any, fmt: str, scale: Any) -> Any:
    """``(w / scale).clamp(-max, max)`` cast to ``fmt``: the fp8 bytes (a ``uint8`` array)."""
    import torch

    fmax = float(numcast.FP8_LIMITS[fmt][0])
    q = w.div(float(scale)).clamp_(-fmax, fmax).to(getattr(torch, fmt))
    return q.contiguous().view(torch.uint8).numpy()


class Requant:
    """One merged scaled weight, as two output tensors: its new scale and its fp8 values.

    The writer puts a file's float32 tensors before its fp8 ones, so every scale is asked for
    before any weight. Keeping each merged weight from its scale until its own turn would hold
    them all at once; instead ``scale`` merges, keeps the 4-byte scale and drops the values, and
    ``weight`` merges again (the same deterministic computation) and casts with that scale. A
    weight asked for first computes both from one merge.
    """

    def __init__(self, make: Callable[[], Any], fmt: str, name: str) -> None:
        self.make, self.fmt, self.name = make, fmt, name
        self.lock = threading.Lock()
        self.value: Any = None

    def _scale_of(self, w: Any) -> Any:
        with self.lock:
            if self.value is None:
                self.value = scale_for(w, self.fmt, self.name)
            return self.value

    def scale(self) -> bytes:
        import numpy as np

        with self.lock:
            known = self.value
        value = known if known is not None else self._scale_of(self.make())
        return np.asarray(value, dtype="<f4").tobytes()

    def weight(self, _slot: int = 0) -> Any:
        w = self.make()
        return quantize(w, self.fmt, self._scale_of(w))
