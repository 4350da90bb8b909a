"""GGUF out and in, one tensor at a time.

* ``to_gguf``: a checkpoint's denoiser (UNet or transformer) as the GGUF file the ComfyUI-GGUF
  loader reads: ``general.architecture`` one of its image architectures (``flux``, ``sd3``,
  ``sdxl``, ``sd1``), the state-dict names without ``model.diffusion_model.``, ggml dims
  (innermost first), 32-byte alignment. Which tensors are quantized follows ComfyUI-GGUF's own
  converter: 1-D tensors, the small and 1x1/3x3 convolutions, embeddings and the final layer
  stay at full precision (F16 from F16 sources, else F32), as do tensors whose rows are not a
  whole number of quant blocks (32 values, or 256 for the K-quants: ComfyUI-GGUF's patched
  ``llama-quantize`` falls back to F16 there, not to upstream llama.cpp's Q4_0/Q5_0/Q5_1/Q8_0).
  A K-quant file is "pure": every quantized tensor has the one type (no Q4_K_M-style mixing).
* ``from_gguf``: a GGUF file back to ``.safetensors``, every tensor dequantized to one float dtype.

The ``gguf`` package (what llama.cpp and ComfyUI-GGUF use) quantizes and dequantizes, so the
values are its own, bit for bit. It has no quantizer for the K-quants (Q2_K ... Q6_K); those come
from ``kquants``, which gives the bytes of llama.cpp's reference quantizer (``llama-quantize``
without an importance matrix); the package dequantizes them. modelkit lays the file out and writes it
atomically: the header (every tensor's type, shape and offset known up front), then each
tensor's bytes as it is quantized.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, numcast, portable
from ..dtypes import BY_NAME, DType
from ..errors import MissingExtraError, UsageError
from ..formats.gguf_file import DEFAULT_ALIGNMENT, GGML_TYPES
from ..formats.safetensors_write import OutTensor
from ..model import ModelFile, TensorRef

#: The K-quants, which ``kquants`` makes (the gguf package only reads them).
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
#: What ``--quant`` takes.
QUANTS = ("Q8_0", *K_QUANTS, "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16", "F32")
#: detection's base -> ComfyUI-GGUF's architecture name (it lists sd1, sdxl, sd3, flux ...;
#: ComfyUI then tells SD1 from SD2 by the shapes, as for any UNet).
ARCH = {"flux": "flux", "sd3": "sd3", "sdxl": "sdxl", "sd1": "sd1", "sd2": "sd1"}
UNET_PREFIX = "model.diffusion_model."
#: Name parts ComfyUI-GGUF's converter keeps at full precision (with ``.weight``).
KEEP = ("time_embedding.", "add_embedding.", "time_in.", "txt_in.", "vector_in.", "img_in.", "guidance_in.",
        "final_layer.", "time_embed.", "label_emb.", "input_blocks.0.", "out.2.",
        # SD3 (ComfyUI-GGUF's lcpp_sd3 patch keeps these)
        "context_embedder.", "t_embedder.", "y_embedder.", "x_embedder.")
#: Tensors kept at full precision whatever their suffix (SD3's positional embedding).
KEEP_ANY = ("pos_embed",)
#: Key starts of diffusers' own layouts, which ComfyUI-GGUF does not load (its converter bans them).
DIFFUSERS_KEYS = ("down_blocks.", "up_blocks.", "mid_block.", "transformer_blocks.", "single_transformer_blocks.",
                  "conv_in.", "time_embedding.linear")
_CODES = {name: code for code, (name, _b, _s) in GGML_TYPES.items()}
#: llama.cpp's ``general.file_type`` for the file's main quant type (a K-quant as its "_S" file
#: type, the one mostly of that type: Q3_K_S, Q4_K_S, Q5_K_S).
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
             "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "BF16": 32}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingExtraError(None, "GGUF quantizing and dequantizing need the gguf package",
                                "Install it: pip install 'modelkit[gguf]'") from None
    return gguf


def check_quant(quant: str) -> str:
    """``quant`` upper-cased, or a UsageError naming what is possible."""
    q = quant.upper()
    if q not in QUANTS:
        raise UsageError(None, f"--quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    return q


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF output: its name, logical shape, ggml type and how to get its bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    compute: Callable[[], bytes] = field(repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        _n, block, size = GGML_TYPES[_CODES[self.qtype]]
        return math.prod(self.shape) // block * size


def _kv(key: str, value: str | int) -> bytes:
    k = key.encode()
    out = struct.pack("<Q", len(k)) + k
    if isinstance(value, str):
        v = value.encode()
        return out + struct.pack("<IQ", 8, len(v)) + v
    return out + struct.pack("<II", 4, value)


def gguf_header(tensors: list[GgufTensor], kv: Mapping[str, str | int]) -> tuple[bytes, list[int]]:
    """The header bytes (padded to the alignment) and each tensor's offset in the data section."""
    body = b"".join(_kv(k, v) for k, v in kv.items())
    offsets, pos, infos = [], 0, b""
    for t in tensors:
        name = t.name.encode()
        dims = list(reversed(t.shape))
        infos += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", _CODES[t.qtype], pos)
        offsets.append(pos)
        pos += -(-t.nbytes // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + body + infos
    return head + b"\0" * (-len(head) % DEFAULT_ALIGNMENT), offsets


def write_gguf(fd: int, tensors: list[GgufTensor], kv: Mapping[str, str | int],
               progress: Callable[[str, int], None] | None = None) -> int:
    """Write a GGUF file to ``fd``: the header, then each tensor's bytes as ``compute`` gives them.

    Returns:
        The bytes written.
    """
    head, _offsets = gguf_header(tensors, kv)
    portable.write_all(fd, head)
    total = len(head)
    for t in tensors:
        data = t.compute()
        if len(data) != t.nbytes:
            raise ValueError(f"{t.name}: {len(data)} bytes for a {t.qtype} tensor of {t.nbytes}")
        pad = -len(data) % DEFAULT_ALIGNMENT
        portable.write_all(fd, bytes(data) + b"\0" * pad)
        total += len(data) + pad
        if progress is not None:
            progress(t.name, len(data))
    return total


def _float32(ref: TensorRef) -> Any:
    import numpy as np

    arr = numcast.values(ref.read("numpy"), ref.dtype)
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(ref.shape)


def quantized_bytes(ref: TensorRef, qtype: str) -> bytes:
    """The bytes of ``ref`` in ``qtype`` (what ``to_gguf`` writes and ``verify`` recomputes): the gguf
    package's quantizer, or for a K-quant ``kquants`` (llama.cpp's reference quantizer's bytes)."""
    if qtype in K_QUANTS:
        from . import kquants

        return bytes(kquants.quantize(_float32(ref), qtype).tobytes())
    gguf = _gguf()
    return bytes(gguf.quantize(_float32(ref), gguf.GGMLQuantizationType[qtype]).tobytes())


def dequantized_bytes(ref: TensorRef, qtype: str, shape: tuple[int, ...], dtype: DType) -> bytes:
    """The bytes of a quantized GGUF tensor dequantized by the gguf package and cast to ``dtype``."""
    import numpy as np

    gguf = _gguf()
    raw = np.frombuffer(bytes(ref.read_raw()), np.uint8).reshape(ref.shape)
    vals = gguf.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32).reshape(shape)
    return bytes(np.ascontiguousarray(numcast.cast(vals, BY_NAME["float32"], dtype)).tobytes())


def choose_qtype(name: str, ref: TensorRef, quant: str) -> str:
    """The ggml type one tensor gets (see the module notes)."""
    full = {"float16": "F16", "bfloat16": "BF16"}.get(ref.dtype.name, "F32")  # as ComfyUI-GGUF keeps them
    if quant in ("F32", "F16", "BF16"):
        return quant
    if any(k in name for k in KEEP_ANY):
        return full
    shape = ref.shape
    if len(shape) < 2 or len(shape) > 4:
        return full
    if len(shape) == 4 and (min(shape[:2]) == 4 or shape[-1] in (1, 3)):
        return full
    if name.endswith(".weight") and any(k in name for k in KEEP):
        return full
    _n, block, _s = GGML_TYPES[_CODES[quant]]
    return quant if shape[-1] % block == 0 else full


def plan_to_gguf(mf: ModelFile, base: str | None, quant: str) -> tuple[list[GgufTensor], dict[str, str | int], int]:
    """The tensors and metadata of ``mf``'s denoiser as GGUF, and how many other tensors are left out.

    Raises:
        UsageError: no denoiser, an architecture ComfyUI-GGUF does not load, a non-float tensor.
    """
    _gguf()  # the package is needed for every tensor: say so before anything else
    arch = ARCH.get(base or "")
    if arch is None:
        raise UsageError(mf.path, f"GGUF holds the denoiser of {', '.join(sorted(set(ARCH)))} models; this is "
                                  f"{base or 'a model modelkit cannot place'}")
    names = [n for n in mf if n.startswith(UNET_PREFIX)] or list(mf)
    prefix = UNET_PREFIX if names[0].startswith(UNET_PREFIX) else ""
    out: list[GgufTensor] = []
    for n in names:
        ref = mf[n]
        if not ref.dtype.is_float:
            raise UsageError(mf.path, f"tensor {n} is {ref.dtype.name}; GGUF takes float tensors here")
        qtype = choose_qtype(n, ref, quant)

        def compute(ref: TensorRef = ref, qtype: str = qtype) -> bytes:
            return quantized_bytes(ref, qtype)

        out.append(GgufTensor(n[len(prefix):], tuple(ref.shape), qtype, compute))
    kv: dict[str, str | int] = {"general.architecture": arch, "general.quantization_version": 2,
                                "general.file_type": FILE_TYPE[quant], "general.name": os.path.basename(mf.path),
                                "modelkit.version": __version__}
    return out, kv, len(mf) - len(names)


def refuse_quantized(mf: ModelFile, path: str, what: str) -> None:
    """A GGUF file with quantized tensors is refused in one line by a command that reads float weights (its
    quantized tensors are packed blocks, not values).

    Raises:
        UsageError: naming the quant types and how to dequantize the file first.
    """
    types = (mf.info.get("gguf") or {}).get("types") or {}
    if mf.container == "gguf" and types:
        kinds = ", ".join(sorted(set(types.values())))
        raise UsageError(path, f"is a GGUF file with {len(types)} quantized tensors ({kinds}); {what} reads "
                               "float weights", "Dequantize it first: modelkit convert FILE.gguf -o FILE.safetensors")


def dequantized_torch(mf: ModelFile, name: str) -> Any:
    """Tensor ``name`` of a GGUF file as float32 torch values (dequantized by gguf when quantized)."""
    import numpy as np
    import torch

    info = mf.info.get("gguf") or {}
    qtype = (info.get("types") or {}).get(name)
    if qtype is None:
        return None
    gguf = _gguf()
    ref = mf[name]
    raw = np.frombuffer(bytes(ref.read_raw()), np.uint8).reshape(ref.shape)
    vals = gguf.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(vals.reshape(tuple(info["shapes"][name]))))


def plan_from_gguf(mf: ModelFile, dtype: DType) -> list[OutTensor]:
    """Every tensor of a GGUF file as an ``OutTensor`` of ``dtype`` (quantized ones dequantized by gguf)."""
    import numpy as np

    gguf = _gguf()
    info = mf.info.get("gguf") or {}
    types, shapes = info.get("types", {}), info.get("shapes", {})
    out = []
    for name, ref in mf.items():
        if name in types:
            qt = gguf.GGMLQuantizationType[types[name]]
            shape = tuple(shapes[name])

            def compute(ref: TensorRef = ref, qt: Any = qt, shape: tuple[int, ...] = shape) -> Any:
                raw = np.frombuffer(bytes(ref.read_raw()), np.uint8).reshape(ref.shape)
                vals = gguf.dequantize(raw, qt).astype(np.float32).reshape(shape)
                return np.ascontiguousarray(numcast.cast(vals, BY_NAME["float32"], dtype))

            out.append(OutTensor(name, dtype, shape, compute=compute))
        elif ref.dtype.is_float:
            out.append(OutTensor(name, dtype, ref.shape, ref))
        else:
            out.append(OutTensor(name, ref.dtype, ref.shape, ref))
    return out


@dataclass(frozen=True)
class GgufResult:
    """What ``to_gguf`` wrote."""

    source: str
    output: str
    status: str
    arch: str
    quant: str
    tensors: int
    quantized: int
    left_out: int
    size: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "output": self.output, "status": self.status, "arch": self.arch,
                "quant": self.quant, "tensors": self.tensors, "quantized": self.quantized,
                "left_out": self.left_out, "size": self.size, "seconds": round(self.seconds, 3)}


def to_gguf(src: str | os.PathLike[str], out: str | os.PathLike[str], *, quant: str = "Q8_0",
            base: str | None = None, force: bool = False, dry_run: bool = False, ignore_scan: bool = False,
            progress: Callable[[str, int], None] | None = None) -> GgufResult:
    """Write the denoiser of ``src`` as a GGUF file ComfyUI-GGUF loads.

    Args:
        src: a checkpoint, or a UNet/transformer file (any container modelkit reads).
        out: the ``.gguf`` file to write (atomically).
        quant: the main quant type (``QUANTS``).
        base: ``flux``, ``sd3``, ``sdxl``, ``sd1`` or ``sd2`` where detection cannot tell.
        force, dry_run, ignore_scan: as elsewhere.

    Returns:
        GgufResult.

    Raises:
        UsageError: an unknown quant type, a model without a GGUF architecture.
        MissingExtraError: the gguf package is missing.
        OutputExistsError, OutputWriteError: see ``paths.atomic_output``.
    """
    from ..detect import detect
    from ..paths import atomic_output, check_output
    from ..reading import open_model
    from .fp8 import refuse_scaled

    t0 = time.perf_counter()
    q = check_quant(quant)
    s, target = os.fspath(src), os.fspath(out)
    if not target.lower().endswith(".gguf"):
        raise UsageError(target, "a GGUF output's name ends in .gguf")
    check_output(target, force=force, inputs=[s])
    with open_model(s, ignore_scan=ignore_scan) as mf:
        refuse_scaled(mf.tensors, mf.metadata, s, "convert --to gguf")
        refuse_quantized(mf, s, "convert --to gguf")
        det = detect(mf)
        if det.kind not in ("checkpoint", "unknown"):  # unknown: a bare denoiser detection cannot place (--base)
            raise UsageError(s, f"is a {det.kind}, not a checkpoint or a UNet/transformer; GGUF holds a denoiser",
                             "Convert the checkpoint (or its UNet/transformer file) instead")
        from .layout_dit import diffusers_transformer

        diffusers_transformer(mf, s)  # a Flux/SD3 transformer in diffusers keys: in its original keys
        if any(n.startswith(DIFFUSERS_KEYS) for n in mf):
            raise UsageError(s, "holds a UNet/transformer in diffusers' keys, which ComfyUI-GGUF does not load",
                             "Convert the diffusers folder --to single first, then that file --to gguf")
        tensors, kv, left = plan_to_gguf(mf, base or det.base, q)
        head, _ = gguf_header(tensors, kv)
        size = len(head) + sum(-(-t.nbytes // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT for t in tensors)
        if not dry_run:
            with atomic_output(target, force=force, inputs=[s]) as fd:
                size = write_gguf(fd, tensors, kv, progress)
    quantized = sum(1 for t in tensors if t.qtype == q and q not in ("F32", "F16", "BF16"))
    return GgufResult(s, target, "dry-run" if dry_run else "written", str(kv["general.architecture"]), q,
                      len(tensors), quantized, left, size, time.perf_counter() - t0)


def from_gguf(src: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "fp16",
              force: bool = False, dry_run: bool = False) -> tuple[str, int, int]:
    """Write a GGUF file's tensors as ``.safetensors``, dequantized to ``dtype`` (fp16, bf16, fp32).

    Returns:
        (output, tensors, bytes written).

    Raises:
        UsageError: the input is not GGUF, or an unknown dtype.
        MissingExtraError: the gguf package is missing (for a quantized tensor).
    """
    from ..reading import open_model
    from . import metadata as md
    from .streaming import float_dtype, write_output

    s, target = os.fspath(src), os.fspath(out)
    want = float_dtype(dtype, ("fp16", "bf16", "fp32"), "--dtype")
    assert want is not None
    with open_model(s) as mf:
        if mf.container != "gguf":
            raise UsageError(s, f"is {mf.container}, not GGUF")
        tensors = plan_from_gguf(mf, want)
        meta = md.combine({k: v for k, v in mf.metadata.items() if k.startswith("general.")},
                          md.provenance(s, [f"GGUF -> safetensors, dequantized to {want.name}"]))
        header, _meta, _stats = write_output(target, tensors, meta, source=s, inputs=[s], force=force,
                                             dry_run=dry_run)
    return target, len(tensors), header.size
