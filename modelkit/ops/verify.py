"""``modelkit verify`` and ``modelkit diff``: compare two model files tensor by tensor.

Both stream: one tensor of each file is in memory at a time.

* ``verify SRC OUT`` checks that a conversion is exact: every tensor of OUT is bit-equal to its
  source in SRC, after casting the source to OUT's dtype where they differ (the one rounding a
  ``--dtype`` asks for). Names that convert/prune change on purpose are followed (an A1111
  embedding's ``string_to_param.*`` is ``emb_params``, and so is a diffusers embedding's one
  ``<token>`` tensor; a VAE extracted with ``--part vae`` lost ``first_stage_model.``). Tensors
  only in SRC are listed (prune drops some on purpose). An OUT written by ``prune --ema only``
  (its ``modelkit.changes`` say so) holds the EMA copies as its UNet weights: each is compared
  with its ``model_ema.*`` source. fp8 outputs: a weight written with ``--fp8 clamp`` matches
  its source saturated, then cast; a scaled fp8 weight (``--fp8 scaled``) matches its source
  divided by the stored scale, which must equal ``amax / max`` of the source (its scale and
  ``comfy_quant`` tensors are checked with it); a scaled fp8 *source* is compared as weight*scale.
  GGUF: a quantized output tensor must equal the gguf package's quantization of its source (the
  source's ``model.diffusion_model.`` prefix is followed); a tensor dequantized from GGUF must
  equal the package's dequantization, cast to the output's dtype.
* ``diff A B`` lists keys only in one file, shape and dtype changes, and for shared tensors the
  largest absolute difference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .._torch import require_torch
from ..model import ModelFile, TensorRef
from ..reading import open_model
from . import fp8
from .prune import UNET_PREFIX, ema_name

#: the end of the ``modelkit.changes`` entry ``prune --ema only`` writes ("N UNet tensors taken ...")
EMA_CHANGE = " UNet tensors taken from their EMA copies"


@dataclass(frozen=True)
class Mismatch:
    name: str
    source: str | None
    problem: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "problem": self.problem}


@dataclass(frozen=True)
class VerifyResult:
    source: str
    output: str
    checked: int
    cast: int
    mismatches: tuple[Mismatch, ...] = ()
    only_in_source: tuple[str, ...] = ()
    #: UNet tensors compared with their EMA copy (``model_ema.*``): OUT was pruned with ``--ema only``
    ema: int = 0
    #: why the mismatches may be on purpose (empty when nothing is known)
    hint: str = ""

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "modelkit.verify/1", "source": self.source, "output": self.output, "ok": self.ok,
                "checked": self.checked, "cast": self.cast, "mismatches": [m.to_dict() for m in self.mismatches],
                "only_in_source": list(self.only_in_source), "ema_compared": self.ema, "hint": self.hint}


EMA_HINT = ("{out} was written with prune --ema only: its UNet weights are the EMA copies (model_ema.*) "
            "of the source's")


def _ema_only(out: ModelFile) -> bool:
    """Whether ``out``'s provenance says prune took its UNet weights from their EMA copies."""
    try:
        changes = json.loads(out.metadata.get("modelkit.changes", "[]"))
    except ValueError:
        return False
    return isinstance(changes, list) and any(isinstance(c, str) and c.endswith(EMA_CHANGE) for c in changes)


def _is_ema_copy(ref: TensorRef, src: ModelFile, name: str) -> bool:
    """Whether ``ref`` (the output's ``name``) equals the source's EMA copy of that UNet weight."""
    e = src.get(ema_name(name)) if name.startswith(UNET_PREFIX) else None
    return e is not None and e.shape == ref.shape and _same(e, ref)[0]


def _source_name(name: str, src: ModelFile, out: ModelFile) -> str | None:
    """The source tensor ``name`` of the output was written from, following every rename
    ``convert`` and ``prune`` make on purpose (``modelkit.ops.convert`` lists them):

    * kept names: checkpoints whose ``state_dict`` wrapper was removed (the reader already reads
      the source without it), A1111 hypernetworks (``{dim}.{0|1}.linear.{i}.*``, as the reader
      flattens the ``.pt``), SDXL ``clip_l``/``clip_g`` embeddings, LoRAs, VAEs and the rest;
    * ``prune --part vae``: the source's ``first_stage_model.`` prefix is gone;
    * ``convert --to gguf``: the source's ``model.diffusion_model.`` prefix is gone;
    * ``emb_params`` from an A1111 ``.pt`` embedding: its one ``string_to_param.*`` tensor;
    * ``emb_params`` from a diffusers embedding (``{"<token>": vectors}``): that one tensor (whose
      token the output's ``name`` metadata holds, where it has one).
    """
    gguf_unet = [f"{UNET_PREFIX}{name}"] if out.container == "gguf" else []  # a GGUF holds the bare UNet
    for cand in (name, f"first_stage_model.{name}", *gguf_unet):
        if cand in src:
            return cand
    if name == "emb_params":
        params = [k for k in src if k.startswith("string_to_param.")]
        if len(params) == 1:
            return params[0]
        if len(src) == 1:
            (only,) = src
            if out.metadata.get("name") in (None, only):  # convert puts the token there
                return only
    return None


def _same_shape(sref: TensorRef, ref: TensorRef, name: str) -> bool:
    """Equal shapes, or a diffusers embedding's one vector ``[width]`` written as ``emb_params [1, width]``."""
    return sref.shape == ref.shape or (name == "emb_params" and len(sref.shape) == 1 and tuple(ref.shape) ==
                                       (1, *sref.shape))


def _same(a: TensorRef, b: TensorRef) -> tuple[bool, bool]:
    """(equal, needed a cast): compares bits, casting ``a`` to ``b``'s dtype where they differ (with
    ``numcast``, which rounds as torch does; NaN payloads are not compared after a cast)."""
    from .. import numcast

    if a.dtype == b.dtype:
        if a.is_contiguous and b.is_contiguous and a.byteorder == b.byteorder == "little":
            return bytes(a.read_raw()) == bytes(b.read_raw()), False
        return _bits(a) == _bits(b), False
    if numcast.can_cast(a.dtype, b.dtype):
        got = numcast.cast(a.read("numpy"), a.dtype, b.dtype)
        return numcast.same_values(_tobytes(got), _bits(b), b.dtype), True
    torch = require_torch(f"verifying a cast from {a.dtype.name} to {b.dtype.name}")
    ta = a.read("torch").to(b.dtype.torch())
    return _tobytes(ta.contiguous().reshape(-1).view(torch.uint8).numpy()) == _bits(b), True


def _fp8_problem(src: ModelFile, sname: str, scaled_src: dict[str, fp8.ScaledWeight], out: ModelFile, name: str,
                 scaled_out: dict[str, fp8.ScaledWeight]) -> str:
    """Why an fp8 output tensor (or one written from a scaled fp8 source) does not match its source
    ('' when it does): a plain cast, a saturated cast, a scaled cast, or an upcast of weight*scale."""
    import numpy as np

    from .. import dtypes, numcast

    sref, ref = src[sname], out[name]
    got = _bits(ref)
    if sref.dtype == ref.dtype:  # kept as it was (a scaled weight and its scale pass through)
        return "" if numcast.same_values(_bits(sref), got, ref.dtype) else "values differ"
    if sname in scaled_src:  # upcast from scaled fp8: (weight * scale) in the output's dtype
        if ref.dtype.itemsize == 1:
            return "a scaled fp8 source written as fp8 again; modelkit does not write that"
        want = numcast.cast(fp8.dequantized(src.tensors, scaled_src[sname]), dtypes.BY_NAME["float32"], ref.dtype)
        return "" if numcast.same_values(_tobytes(want), got, ref.dtype) else "values differ from weight*scale"
    sw = scaled_out.get(name)
    if sw is not None:
        stored = np.float32(fp8.scale_value(out.tensors, sw))
        expected = fp8.scale_of(sref, ref.dtype)
        if stored != expected:
            return f"scale {float(stored)!r} != amax/max of the source {float(expected)!r}"
        if sw.layout == "comfy_quant" and name[: -len(".weight")] + fp8.QUANT in out:
            marker = bytes(out[name[: -len(".weight")] + fp8.QUANT].read_raw())
            if marker != fp8.quant_marker(ref.dtype.name):
                return f"comfy_quant marker {marker!r} does not name {ref.dtype.name}"
        want = fp8.scaled_cast(sref, ref.dtype, stored)
        return "" if numcast.same_values(_tobytes(want), got, ref.dtype) else "values differ from source/scale"
    if numcast.can_cast(sref.dtype, ref.dtype):
        plain = numcast.cast(sref.read("numpy"), sref.dtype, ref.dtype)
        if numcast.same_values(_tobytes(plain), got, ref.dtype):
            return ""
    if numcast.same_values(_tobytes(fp8.clamp_cast(sref, ref.dtype)), got, ref.dtype):
        return ""  # --fp8 clamp
    return f"values differ after casting {sref.dtype.name} to {ref.dtype.name} (plain or saturated)"


def _gguf_problem(src: ModelFile, sname: str, out: ModelFile, name: str) -> str | None:
    """A GGUF side of a conversion: a quantized output tensor must be what the gguf package makes of
    its source (``convert --to gguf``); a tensor dequantized from GGUF (``convert x.gguf``) what the
    package's dequantizer gives, cast to the output's dtype. Plain tensors compare as usual."""
    from . import gguf_ops

    s_types, s_shapes = src.quantized()
    o_types, o_shapes = out.quantized()
    sref, ref = src[sname], out[name]
    s_shape = tuple(s_shapes.get(sname, sref.shape))
    o_shape = tuple(o_shapes.get(name, ref.shape))
    if s_shape != o_shape:
        return f"shape {list(o_shape)} != source {list(s_shape)}"
    if name in o_types:
        want = gguf_ops.quantized_bytes(sref, o_types[name])
        return None if want == bytes(ref.read_raw()) else f"not the gguf package's {o_types[name]} of the source"
    if sname in s_types:
        want = gguf_ops.dequantized_bytes(sref, s_types[sname], s_shape, ref.dtype)
        return None if want == _bits(ref) else f"values differ from the gguf package's dequantized {s_types[sname]}"
    equal, was_cast = _same(sref, ref)
    return None if equal else "values differ" + (f" after casting {sref.dtype.name} to {ref.dtype.name}"
                                                   if was_cast else "")


def _tobytes(arr: Any) -> bytes:
    import numpy as np

    return bytes(np.ascontiguousarray(arr).tobytes())


def _bits(ref: TensorRef) -> bytes:
    """The tensor's elements in C order, little-endian."""
    return _tobytes(ref.read("numpy"))


def verify(source: str | os.PathLike[str], output: str | os.PathLike[str]) -> VerifyResult:
    """Check that ``output`` holds exactly the tensors of ``source`` (after any requested cast).

    Args:
        source: the file that was converted or pruned.
        output: the file modelkit wrote.

    Returns:
        A VerifyResult; ``ok`` is true when every output tensor matches its source.

    Raises:
        ModelkitError: either file cannot be read safely.

    Example:
        >>> modelkit.verify("model.ckpt", "model.safetensors").ok  # doctest: +SKIP
        True
    """
    mismatches: list[Mismatch] = []
    used: set[str] = set()
    cast = ema = looks_ema = 0
    with open_model(source) as src, open_model(output) as out:
        ema_only = _ema_only(out)
        scaled_out = fp8.scaled_weights(out.tensors, out.metadata)
        scaled_src = fp8.scaled_weights(src.tensors, src.metadata)
        book = fp8.bookkeeping(out.tensors, scaled_out)
        for name, ref in out.items():
            if name in book:
                continue  # a scale or marker: checked with its weight
            sname = _source_name(name, src, out)
            if sname is None:
                mismatches.append(Mismatch(name, None, "not in the source"))
                continue
            used.add(sname)
            if ema_only and name.startswith(UNET_PREFIX) and ema_name(name) in src:
                sname = ema_name(name)  # prune --ema only wrote the EMA copy under the model's name
                used.add(sname)
                ema += 1
            sref = src[sname]
            if src.container == "gguf" or out.container == "gguf":
                problem = _gguf_problem(src, sname, out, name)
                cast += 1
                if problem:
                    mismatches.append(Mismatch(name, sname, problem))
                continue
            if not _same_shape(sref, ref, name):
                mismatches.append(Mismatch(name, sname, f"shape {list(ref.shape)} != source {list(sref.shape)}"))
                continue
            if name in scaled_out or sname in scaled_src or (ref.dtype.name in fp8.FP8_CHOICES.values()
                                                             and sref.dtype != ref.dtype):
                problem = _fp8_problem(src, sname, scaled_src, out, name, scaled_out)
                cast += 1
                if problem:
                    mismatches.append(Mismatch(name, sname, problem))
                continue
            equal, was_cast = _same(sref, ref)
            cast += was_cast
            if not equal:
                how = f" after casting {sref.dtype.name} to {ref.dtype.name}" if was_cast else ""
                mismatches.append(Mismatch(name, sname, f"values differ{how}"))
                looks_ema += not ema_only and _is_ema_copy(ref, src, name)
        only = tuple(k for k in src if k not in used)
        hint = EMA_HINT.format(out=os.path.basename(os.fspath(output))) if looks_ema else ""
        return VerifyResult(os.fspath(source), os.fspath(output), len(out), cast, tuple(mismatches), only, ema, hint)


@dataclass(frozen=True)
class TensorDiff:
    name: str
    change: str  # only-a | only-b | shape | dtype | values | same
    detail: str = ""
    max_abs: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "change": self.change, "detail": self.detail, "max_abs_diff": self.max_abs}


@dataclass(frozen=True)
class DiffResult:
    a: str
    b: str
    entries: tuple[TensorDiff, ...] = field(default=())
    metadata_changed: tuple[str, ...] = ()

    @property
    def identical(self) -> bool:
        return not self.metadata_changed and all(e.change == "same" for e in self.entries)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.change] = out.get(e.change, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "modelkit.diff/1", "a": self.a, "b": self.b, "identical": self.identical,
                "counts": self.counts(), "metadata_changed": list(self.metadata_changed),
                "tensors": [e.to_dict() for e in self.entries if e.change != "same"]}


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str], values: bool = True) -> DiffResult:
    """Key, shape, dtype and value differences between two model files.

    Args:
        a, b: the files.
        values: compare values of tensors with equal names and shapes (reads both; streaming).

    Returns:
        A DiffResult, one entry per tensor name in either file.
    """
    entries: list[TensorDiff] = []
    with open_model(a) as ma, open_model(b) as mb:
        from .gguf_ops import refuse_quantized

        for mf, p in ((ma, os.fspath(a)), (mb, os.fspath(b))):  # packed blocks are no values to compare
            refuse_quantized(mf, p, "diff (use `modelkit verify SOURCE FILE.gguf` to check a quantization)")
        sa, sb = fp8.scaled_weights(ma.tensors, ma.metadata), fp8.scaled_weights(mb.tensors, mb.metadata)
        for name in list(ma) + [k for k in mb if k not in ma]:
            ra, rb = ma.get(name), mb.get(name)
            if rb is None:
                entries.append(TensorDiff(name, "only-a"))
            elif ra is None:
                entries.append(TensorDiff(name, "only-b"))
            elif ra.shape != rb.shape:
                entries.append(TensorDiff(name, "shape", f"{list(ra.shape)} -> {list(rb.shape)}"))
            elif not values:
                entries.append(TensorDiff(name, "dtype" if ra.dtype != rb.dtype else "same",
                                          f"{ra.dtype.name} -> {rb.dtype.name}" if ra.dtype != rb.dtype else ""))
            elif name in sa or name in sb:  # scaled fp8: compare the values, weight * scale
                entries.append(_scaled_diff(name, ma, sa, mb, sb))
            else:
                ta, tb = ra.read("numpy"), rb.read("numpy")
                if ra.dtype == rb.dtype and _tobytes(ta) == _tobytes(tb):
                    entries.append(TensorDiff(name, "same"))
                    continue
                m = _max_abs(ta, ra, tb, rb)
                kind = "dtype" if ra.dtype != rb.dtype else "values"
                detail = f"{ra.dtype.name} -> {rb.dtype.name}" if kind == "dtype" else ""
                entries.append(TensorDiff(name, kind, detail, m))
        meta = tuple(sorted(k for k in set(ma.metadata) | set(mb.metadata) if ma.metadata.get(k) != mb.metadata.get(k)))
    return DiffResult(os.fspath(a), os.fspath(b), tuple(entries), meta)


def _scaled_diff(name: str, ma: ModelFile, sa: dict[str, fp8.ScaledWeight], mb: ModelFile,
                 sb: dict[str, fp8.ScaledWeight]) -> TensorDiff:
    """A diff entry for a tensor that is a scaled fp8 weight on either side: values as weight*scale."""
    import numpy as np

    from .. import numcast

    def vals(mf: ModelFile, found: dict[str, fp8.ScaledWeight]) -> Any:
        if name in found:
            return fp8.dequantized(mf.tensors, found[name]).astype(np.float64)
        ref = mf[name]
        return numcast.values(ref.read("numpy"), ref.dtype).astype(np.float64)

    va, vb = vals(ma, sa), vals(mb, sb)
    kinds = [f"{mf[name].dtype.name}{' scaled' if name in s else ''}" for mf, s in ((ma, sa), (mb, sb))]
    with np.errstate(all="ignore"):
        m = float(np.max(np.abs(va - vb))) if va.size else 0.0
    if kinds[0] == kinds[1]:
        return TensorDiff(name, "same" if m == 0 else "values", "scaled fp8, compared as weight*scale", m)
    return TensorDiff(name, "dtype", f"{kinds[0]} -> {kinds[1]} (compared as weight*scale)", m)


def _max_abs(ta: Any, ra: TensorRef, tb: Any, rb: TensorRef) -> float | None:
    """The largest absolute difference of two arrays of equal shape (``None`` for dtypes that have
    no numeric value here, such as complex32)."""
    import numpy as np

    from .. import numcast

    if not ta.size:
        return 0.0
    known = [r.dtype.numpy is not None or r.dtype.name in numcast.SOURCES for r in (ra, rb)]
    if not all(known):
        return None
    va, vb = numcast.values(ta, ra.dtype), numcast.values(tb, rb.dtype)
    wide = np.complex128 if np.iscomplexobj(va) or np.iscomplexobj(vb) else np.float64
    with np.errstate(all="ignore"):  # inf - inf is NaN, and says so
        return float(np.max(np.abs(va.astype(wide) - vb.astype(wide))))
