"""fp8 outputs (``prune --dtype fp8_e4m3fn|fp8_e5m2``) and fp8 inputs, plain or scaled.

**Which tensors become fp8.** The weight matrices of linear and convolution layers: tensors named
``*.weight`` with two or more dimensions. Everything else keeps its dtype, as in the fp8
checkpoints ComfyUI publishes and loads: biases, norm weights and scales (1-D), embeddings
(names holding ``embed``), norms (``norm``), and the input/output layers of a Flux/SD3-style
transformer (``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``final_layer``),
whose few parameters carry most of the error when rounded. A transformer in diffusers' keys gets the
same choice under its names (``proj_out``/``norm_out`` kept, the ``norm1.linear`` modulation layers
cast like BFL's ``img_mod.lin``). With ``scaled``, only 2-D weights
(linear layers) are cast: ComfyUI applies a per-tensor scale to linear layers only.

**Out of range.** e4m3fn holds +-448, e5m2 +-57344. A value beyond (past the rounding boundary:
464 for e4m3fn, which torch saturates to 448; 61440 for e5m2, which becomes inf) is an overflow:

* by default the write is refused (``CastOverflowError``; ``allow_overflow`` writes torch's own
  result: saturated for e4m3fn, inf for e5m2);
* ``clamp``: ``t.clamp(-max, max).to(fp8)``, saturating every tensor to the largest finite value;
* ``scaled``: each cast weight is stored as ``q = (t.float() / scale).clamp(-max, max).to(fp8)``
  with ``scale = amax(|t|).float() / max`` (float32; 1.0 for an all-zero tensor), so the largest
  value maps to the largest fp8 value and nothing overflows; reading it back, ``q.float() * scale``.

**The scaled layout** is ComfyUI's native quantization format, which its current loader reads
(``comfy.ops`` mixed-precision ops; older files are converted to it by ``comfy.utils.convert_old_quants``):
for a layer ``L``, ``L.weight`` (fp8), ``L.weight_scale`` (float32, a scalar) and ``L.comfy_quant``
(uint8: the UTF-8 JSON ``{"format": "float8_e4m3fn"}``, or ``float8_e5m2``). The older layout
(a ``scaled_fp8`` marker tensor, ``L.scale_weight`` and ``L.scale_input``) is read, not written:
ComfyUI's converter takes every such file for e4m3fn, so it cannot carry e5m2.

All rounding is ``modelkit.numcast``'s (numpy, bit-exact with torch's casts) or, where torch is
installed, torch's own casts, so none of this needs torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .. import dtypes, numcast
from ..dtypes import DType
from ..errors import FormatError, UsageError
from ..formats.safetensors_write import OutTensor, Pieces
from ..model import TensorRef

#: ``--dtype`` spellings of the fp8 targets -> dtype names
FP8_CHOICES = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
#: ``--fp8``: what to do with values out of the fp8 range (``refuse`` is the default)
FP8_MODES = ("refuse", "clamp", "scaled")
SCALE = ".weight_scale"
QUANT = ".comfy_quant"
LEGACY_MARKER = "scaled_fp8"
LEGACY_SCALE = ".scale_weight"
LEGACY_INPUT = ".scale_input"
QUANT_METADATA = "_quantization_metadata"
#: name parts of tensors that stay in their precision
KEEP = ("embed", "norm", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer",
        # the same layers in diffusers' Flux/SD3 keys (final_layer.adaLN_modulation; the embedders hold "embed")
        "norm_out")
#: elements converted at a time (bounds the temporaries)
CHUNK = 1 << 20


def fp8_target(name: str | None) -> DType | None:
    """The fp8 DType a ``--dtype`` value names, or None when it names no fp8 type."""
    if name is None:
        return None
    key = name.lower()
    full = FP8_CHOICES.get(key, key)
    return dtypes.BY_NAME[full] if full in FP8_CHOICES.values() else None


def check_mode(mode: str | None, target: DType | None) -> str:
    """Validate ``--fp8``; returns the mode (``refuse`` when None).

    Raises:
        UsageError: an unknown mode, or a mode without an fp8 ``--dtype``.
    """
    if mode is None:
        return "refuse"
    if mode not in FP8_MODES:
        raise UsageError(None, f"--fp8 must be one of {', '.join(FP8_MODES)}, not {mode!r}")
    if target is None and mode != "refuse":
        raise UsageError(None, f"--fp8 {mode} needs --dtype {' or '.join(FP8_CHOICES)}")
    return mode


def casts_to_fp8(name: str, shape: tuple[int, ...], scaled: bool) -> bool:
    """Whether the tensor ``name`` becomes fp8 (see the module's docstring)."""
    if not name.endswith(".weight") or len(shape) < 2 or (scaled and len(shape) != 2):
        return False
    low = name.lower()
    if low == "proj_out.weight":  # a diffusers-keys Flux/SD3 transformer's final_layer.linear (not a UNet's proj_out)
        return False
    if low.endswith(".linear.weight") and ".norm" in low and "norm_out" not in low:
        return True  # diffusers' norm1.linear / norm.linear: the modulation layers BFL's keys call img_mod.lin
    return not any(part in low for part in KEEP)


def plan(out: dict[str, OutTensor], target: DType, mode: str) -> int:
    """Replace the tensors of ``out`` that become fp8 (in place); returns how many.

    ``refuse``: the writer casts them (and counts overflow); ``clamp`` and ``scaled``: computed
    here when the writer reaches them. ``scaled`` adds ``.weight_scale`` and ``.comfy_quant``.

    Raises:
        FormatError: an output name that ``scaled`` needs is already taken.
    """
    scaled = mode == "scaled"
    picked = [(n, t) for n, t in out.items()
              if t.data is None and t.compute is None and t.ref is not None and t.ref.dtype.is_float
              and t.ref.dtype != target and casts_to_fp8(n, t.shape, scaled)]
    for n, t in picked:
        ref = t.ref
        assert ref is not None
        if mode == "refuse":
            out[n] = OutTensor(n, target, t.shape, ref)
        elif mode == "clamp":
            out[n] = OutTensor(n, target, t.shape, compute=_bind_clamp(ref, target))
        else:
            layer = n[: -len(".weight")]
            for extra in (layer + SCALE, layer + QUANT):
                if extra in out:
                    raise FormatError(None, f"cannot write scaled fp8: {extra!r} already exists in the input",
                                      "Drop --fp8 scaled, or remove that tensor first")
            cell = _Scale(ref, target)
            out[n] = OutTensor(n, target, t.shape, compute=cell.weight)
            out[layer + SCALE] = OutTensor(layer + SCALE, dtypes.BY_NAME["float32"], (), compute=cell.scale_bytes)
            marker = quant_marker(target.name)
            out[layer + QUANT] = OutTensor(layer + QUANT, dtypes.UINT8, (len(marker),), data=marker)
    return len(picked)


def quant_marker(fmt: str) -> bytes:
    """The bytes of a ``.comfy_quant`` tensor, as ComfyUI writes them (``json.dumps``' spacing)."""
    return json.dumps({"format": fmt}).encode("utf-8")


def _plain(ref: TensorRef) -> bool:
    """Whether ``ref``'s bytes sit in its file as they are (read piece by piece)."""
    return (ref.source is not None and ref.inline is None and ref.compressed is None and ref.is_contiguous
            and (ref.byteorder == "little" or ref.dtype.itemsize == 1) and ref.source.fd >= 0)


def _raw(ref: TensorRef) -> Iterator[memoryview]:
    """The bytes of a ``_plain`` tensor, ``CHUNK`` elements at a time, in one reused buffer."""
    assert ref.source is not None
    n, item = ref.numel, ref.dtype.itemsize
    buf = bytearray(min(n, CHUNK) * item)
    begin = ref.byte_range[0]
    for s in range(0, n, CHUNK):
        view = memoryview(buf)[: min(CHUNK, n - s) * item]
        ref.source.read_into(view, begin + s * item)
        yield view


def chunks(ref: TensorRef) -> Iterator[Any]:
    """``ref``'s values as float32 numpy arrays of at most ``CHUNK`` elements, in C order (a
    tensor stored plainly in its file is read piece by piece; any other whole)."""
    import numpy as np

    def f32(values: Any) -> Any:
        with np.errstate(over="ignore"):  # float64 beyond float32: inf, which the callers refuse or clamp
            return numcast.values(values, ref.dtype).astype(np.float32)

    n = ref.numel
    if not _plain(ref) or n <= CHUNK:
        flat = np.asarray(ref.read("numpy")).reshape(-1)
        for s in range(0, n, CHUNK):
            yield f32(flat[s:s + CHUNK])
        return
    code = np.dtype(ref.dtype.numpy or f"<u{ref.dtype.itemsize}")
    for view in _raw(ref):
        yield f32(np.frombuffer(view, dtype=code))


#: IEEE float dtypes -> (bits type, sign mask off, the bits of +inf): with the sign bit cleared, the
#: bits of finite values order as their magnitudes, and inf/NaN sort above every finite value.
_MAGNITUDE = {"float16": ("<u2", 0x7FFF, 0x7C00), "bfloat16": ("<u2", 0x7FFF, 0x7F80),
              "float32": ("<u4", 0x7FFF_FFFF, 0x7F80_0000),
              "float64": ("<u8", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000)}


def fp8_bits(f32: Any, name: str) -> Any:
    """float32 values (numpy) -> their fp8 bits (``uint8``): torch's cast where torch is installed (the
    reference, and a single fast pass), else ``numcast.to_fp8_bits``, which rounds the same bit for bit."""
    from .._torch import have_torch

    if not have_torch():
        return numcast.to_fp8_bits(f32, name)
    import numpy as np
    import torch

    t = torch.from_numpy(np.ascontiguousarray(f32, dtype=np.float32))
    return t.to(getattr(torch, name)).view(torch.uint8).numpy()


def _bind_clamp(ref: TensorRef, target: DType) -> Any:
    return lambda: clamp_cast(ref, target)


def clamp_cast(ref: TensorRef, target: DType) -> Any:
    """``ref`` saturated to the fp8 range and cast: the fp8 bits (``uint8``, C order)."""
    import numpy as np

    fmax = np.float32(numcast.FP8_LIMITS[target.name][0])
    out = np.empty(ref.numel, dtype=np.uint8)
    s = 0
    for part in chunks(ref):
        out[s:s + part.size] = fp8_bits(np.clip(part, -fmax, fmax), target.name)
        s += part.size
    return out


def scale_of(ref: TensorRef, target: DType) -> Any:
    """The per-tensor scale of ``ref`` for ``target``: ``amax(|t|) / max`` in float32 (1.0 when
    the tensor is all zeros, or its scale would underflow float32).

    A tensor of an IEEE float type stored plainly is read as integers: its largest magnitude is the
    largest of its bits with the sign cleared (one integer pass, no conversion to float).

    Raises:
        FormatError: the tensor holds inf or NaN (or float64 values beyond float32), which no scale can represent.
    """
    import numpy as np

    def bad() -> FormatError:
        return FormatError(None, f"tensor {ref.name!r} holds inf or NaN, which scaled fp8 cannot store",
                           "Use --fp8 clamp, or fix the weights first")

    amax = np.float32(0)
    mag = _MAGNITUDE.get(ref.dtype.name)
    if mag is not None and _plain(ref) and ref.numel:
        code, mask, inf = mag
        top = 0
        for view in _raw(ref):
            top = max(top, int(np.bitwise_and(np.frombuffer(view, dtype=code), mask).max()))
        if top >= inf:
            raise bad()
        with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf: refused below
            amax = numcast.values(np.array([top], dtype=code).view(ref.dtype.numpy or code),
                                  ref.dtype).astype(np.float32)[0]
        if not np.isfinite(amax):
            raise bad()
    else:
        for part in chunks(ref):
            if part.size:
                m = np.max(np.abs(part))
                if not np.isfinite(m):
                    raise bad()
                amax = max(amax, m)
    scale = np.float32(amax) / np.float32(numcast.FP8_LIMITS[target.name][0])
    return scale if scale > 0 else np.float32(1.0)  # all zeros (or too small for a float32 scale)


def scaled_bits(ref: TensorRef, target: DType, scale: Any) -> Iterator[Any]:
    """``(t.float() / scale).clamp(-max, max)`` cast to ``target``, as fp8 bits (``uint8`` numpy arrays),
    ``CHUNK`` elements at a time: in torch where it is installed and the tensor is stored plainly (one
    vectorised pass per step: the same float32 division, clamp and cast, bit for bit), else in numpy."""
    import numpy as np

    from .._torch import have_torch

    fmax = np.float32(numcast.FP8_LIMITS[target.name][0])
    if have_torch() and _plain(ref) and ref.dtype.name in _MAGNITUDE:
        import torch

        src, dst = ref.dtype.torch(), getattr(torch, target.name)
        div = torch.tensor(np.float32(scale), dtype=torch.float32)
        for view in _raw(ref):
            t = torch.frombuffer(view, dtype=src).to(torch.float32)
            yield t.div_(div).clamp_(-float(fmax), float(fmax)).to(dst).view(torch.uint8).numpy()
        return
    for part in chunks(ref):
        yield fp8_bits(np.clip(part / np.float32(scale), -fmax, fmax), target.name)


def scaled_cast(ref: TensorRef, target: DType, scale: Any) -> Any:
    """``scaled_bits`` as one ``uint8`` array of the whole tensor."""
    import numpy as np

    out = np.empty(ref.numel, dtype=np.uint8)
    s = 0
    for part in scaled_bits(ref, target, scale):
        out[s:s + part.size] = part
        s += part.size
    return out


class _Scale:
    """One scaled weight: its scale is computed once, by whichever tensor the writer reaches first."""

    def __init__(self, ref: TensorRef, target: DType):
        self.ref, self.target = ref, target
        self.value: Any = None

    def get(self) -> Any:
        if self.value is None:
            self.value = scale_of(self.ref, self.target)
        return self.value

    def scale_bytes(self) -> bytes:
        import numpy as np

        return np.asarray(self.get(), dtype="<f4").tobytes()

    def weight(self) -> Pieces:
        return Pieces(scaled_bits(self.ref, self.target, self.get()))


# ---- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaledWeight:
    """An fp8 weight stored with a per-tensor scale.

    Attributes:
        weight: the fp8 weight's name.
        scale: the name of its float32 scale (value = weight * scale).
        format: the fp8 dtype name.
        layout: ``comfy_quant`` (ComfyUI's native layout, also from ``_quantization_metadata``) or
            ``scaled_fp8`` (the older marker layout).
        extras: the bookkeeping tensors of this layer (scale, ``comfy_quant``, input scale).
    """

    weight: str
    scale: str
    format: str
    layout: str
    extras: tuple[str, ...]


def scaled_weights(tensors: Mapping[str, TensorRef], metadata: Mapping[str, str] | None = None) -> dict[
        str, ScaledWeight]:
    """The scaled fp8 weights of a file (weight name -> ScaledWeight); empty for other files."""
    layers: dict[str, str] = {}
    for name, ref in tensors.items():
        if name.endswith(QUANT) and ref.dtype.itemsize == 1 and len(ref.shape) == 1 and ref.numel <= 4096:
            conf = _json(bytes(ref.read_raw()))
            if isinstance(conf, dict) and isinstance(conf.get("format"), str):
                layers[name[: -len(QUANT)]] = conf["format"]
    meta = _json((metadata or {}).get(QUANT_METADATA, "").encode())
    if isinstance(meta, dict) and isinstance(meta.get("layers"), dict):
        for layer, conf in meta["layers"].items():
            fmt = conf.get("format") if isinstance(conf, dict) else conf
            if isinstance(layer, str) and isinstance(fmt, str):
                layers.setdefault(layer, fmt)
    found: dict[str, ScaledWeight] = {}
    for layer, fmt in layers.items():
        w, sc = layer + ".weight", layer + SCALE
        if fmt in FP8_CHOICES.values() and w in tensors and sc in tensors:
            if tensors[w].dtype.name != fmt:  # read as the marker says, it would be other values, silently
                raise FormatError(getattr(tensors[w].source, "path", None),
                                  f"the scaled fp8 marker of {layer!r} says {fmt}, but its weight is "
                                        f"{tensors[w].dtype.name}", "The file is inconsistent; re-export it")
            extras = tuple(x for x in (sc, layer + QUANT, layer + ".input_scale") if x in tensors)
            found[w] = ScaledWeight(w, sc, fmt, "comfy_quant", extras)
    markers = [n for n in tensors if n == LEGACY_MARKER or n.endswith("." + LEGACY_MARKER)]
    if markers:
        for name in tensors:
            if not name.endswith(LEGACY_SCALE):
                continue
            layer = name[: -len(LEGACY_SCALE)]
            w = layer + ".weight"
            if w in tensors and w not in found and tensors[w].dtype.name in FP8_CHOICES.values():
                extras = tuple(x for x in (name, layer + LEGACY_INPUT) if x in tensors)
                found[w] = ScaledWeight(w, name, tensors[w].dtype.name, "scaled_fp8", extras)
    return found


def bookkeeping(tensors: Mapping[str, TensorRef], found: Mapping[str, ScaledWeight]) -> set[str]:
    """The names that only describe the scaling (scales, markers), not model weights."""
    names = {x for s in found.values() for x in s.extras}
    names.update(n for n in tensors if n == LEGACY_MARKER or n.endswith("." + LEGACY_MARKER))
    return names


def _json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def scale_value(tensors: Mapping[str, TensorRef], sw: ScaledWeight) -> float:
    """The float32 per-tensor scale of a scaled weight.

    Raises:
        FormatError: the scale is not one float value (per-channel or block scales are not read).
    """
    import numpy as np

    ref = tensors[sw.scale]
    if ref.numel != 1 or not ref.dtype.is_float:
        raise FormatError(None, f"{sw.scale!r} is not a per-tensor scale (shape {list(ref.shape)}, {ref.dtype.name})",
                          "Only per-tensor scaled fp8 is supported")
    return float(np.float32(numcast.values(np.asarray(ref.read("numpy")).reshape(-1), ref.dtype)[0]))


def dequantized(tensors: Mapping[str, TensorRef], sw: ScaledWeight) -> Any:
    """The float32 values of a scaled weight: ``weight.float() * scale`` (numpy, the weight's shape)."""
    import numpy as np

    ref = tensors[sw.weight]
    scale = np.float32(scale_value(tensors, sw))
    vals = numcast.values(np.asarray(ref.read("numpy")), ref.dtype).astype(np.float32)
    return vals * scale


def plan_dequantize(out: dict[str, OutTensor], tensors: Mapping[str, TensorRef], metadata: Mapping[str, str],
                    target: DType) -> int:
    """Write each scaled fp8 weight of ``out`` as ``(weight.float() * scale).to(target)`` and drop
    the scales and markers (in place); returns how many weights. Used by a cast to a wider dtype,
    which must not take the stored fp8 values for the weights."""
    found = scaled_weights(tensors, metadata)
    if not found:
        return 0
    drop = bookkeeping(tensors, found)
    done = 0
    for n, t in list(out.items()):
        src = t.ref.name if t.ref is not None else None
        if src in drop:
            del out[n]
        elif src in found:
            out[n] = OutTensor(n, target, t.shape, compute=_bind_dequantize(tensors, found[src], target))
            done += 1
    return done


def _bind_dequantize(tensors: Mapping[str, TensorRef], sw: ScaledWeight, target: DType) -> Any:
    return lambda: numcast.cast(dequantized(tensors, sw), dtypes.BY_NAME["float32"], target)


def refuse_scaled(tensors: Mapping[str, TensorRef], metadata: Mapping[str, str], path: str, what: str) -> None:
    """Raise for a file with scaled fp8 weights, which ``what`` would read without their scales.

    Raises:
        UnsupportedFormatError: the file has scaled fp8 weights.
    """
    from ..errors import UnsupportedFormatError

    found = scaled_weights(tensors, metadata)
    if found:
        raise UnsupportedFormatError(
            path, f"has {len(found)} scaled fp8 weights ({next(iter(found.values())).layout} layout), which {what} "
                  "does not read as weight*scale",
            "Upcast it first: `modelkit prune IN --dtype fp16` writes weight*scale")


def summary(tensors: Mapping[str, TensorRef], metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A file's fp8 tensors (empty without any): how many, which formats, how many are scaled and
    in which layout, and ``text``, one line saying so."""
    fp8 = [n for n, r in tensors.items() if r.dtype.name.startswith("float8") and r.numel]
    if not fp8:
        return {}
    kinds = sorted({tensors[n].dtype.name for n in fp8})
    found = scaled_weights(tensors, metadata)
    layouts = sorted({s.layout for s in found.values()})
    text = f"fp8 ({', '.join(kinds)}): {len(fp8)} tensors, " + (
        f"{len(found)} scaled per tensor ({' and '.join(layouts)} layout)" if found else "unscaled")
    return {"fp8_tensors": len(fp8), "formats": kinds, "scaled": len(found), "layouts": layouts, "text": text}
