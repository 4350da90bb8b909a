"""A diffusers folder opened as one lazy ``ModelFile`` in LDM names (what A1111 and ComfyUI load).

Each component's weights (``diffusion_pytorch_model.safetensors``, ``model.safetensors``, sharded
with an ``*.index.json``, or ``.bin`` read by the safe reader behind the scan) are opened lazily and
their tensors renamed with ``modelkit.layout.names``: renames, reshapes and transposes are views of
the component files' tensors; an OpenCLIP ``in_proj`` is the concatenation of q, k and v, read
through a ``ConcatSource`` when the writer reaches it. So every op (convert, prune, merge) works on
a folder as on a single file, streaming, without torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, InputNotFoundError, ModelkitError, UsageError
from ..model import ModelFile, Source, TensorRef
from . import dit, names
from .dit_folder import dit_pipeline, holds, unprojected
from .plan import EXTRA_FILE, Part, has_projection, load_json, parts_of, transposed, view

_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(\.[A-Za-z0-9_-]+)?\.(safetensors|bin)"
                      r"(\.index\.json)?$")
#: model_index.json ``_class_name`` values of the pipelines this reads.
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
             "StableDiffusionInpaintPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def is_diffusers_folder(path: str | os.PathLike[str]) -> bool:
    """A folder with a ``model_index.json`` (a pipeline) or a ``config.json`` (one component)."""
    p = os.fspath(path)
    return os.path.isdir(p) and (os.path.isfile(os.path.join(p, "model_index.json"))
                                 or os.path.isfile(os.path.join(p, "config.json")))


class ConcatSource(Source):
    """A virtual storage: the bytes of several tensors one after the other, read on demand."""

    def __init__(self, parts: Sequence[TensorRef], label: str):  # noqa: D107 - no file of its own
        self.path = label
        self.fd = -1
        self.parts = list(parts)
        self.size = sum(p.nbytes for p in self.parts)

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        view_ = memoryview(buf).cast("B")
        end = offset + len(view_)
        start = 0
        for p in self.parts:
            lo, hi = max(offset, start), min(end, start + p.nbytes)
            if lo < hi:
                view_[lo - offset:hi - offset] = _tensor_bytes(p, lo - start, hi - start)
            start += p.nbytes
        if end > start:
            raise FormatError(self.path, f"read past the end of {self.path}")

    def close(self) -> None:
        return None


def _tensor_bytes(ref: TensorRef, lo: int, hi: int) -> bytes:
    """Bytes ``[lo, hi)`` of ``ref``'s elements, little-endian, C order."""
    if (ref.source is not None and ref.inline is None and ref.compressed is None and ref.is_contiguous
            and (ref.byteorder == "little" or ref.dtype.itemsize == 1)):
        return ref.source.pread(hi - lo, ref.byte_range[0] + lo)
    import numpy as np

    arr = np.ascontiguousarray(ref.read("numpy"))
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()[lo:hi]


def concat(refs: Sequence[TensorRef], name: str, label: str) -> TensorRef:
    """One tensor: ``refs`` concatenated along their first dimension (same dtype, same other sizes).

    Raises:
        FormatError: the parts differ in dtype or trailing shape.
    """
    first = refs[0]
    if any(r.dtype != first.dtype or r.shape[1:] != first.shape[1:] for r in refs):
        raise FormatError(label, f"the parts of {name} differ in dtype or shape: "
                                 + ", ".join(f"{r.name} {r.dtype.name} {list(r.shape)}" for r in refs))
    shape = (sum(r.shape[0] for r in refs), *first.shape[1:])
    strides = tuple(int(_prod(shape[i + 1:])) for i in range(len(shape)))
    src = ConcatSource(refs, f"{label}:{name}")
    return TensorRef(name=name, dtype=first.dtype, shape=shape, strides=strides, storage_offset=0,
                     storage_start=0, storage_nbytes=src.size, source=src)


def _prod(xs: Sequence[int]) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


@dataclass
class FolderModel(ModelFile):
    """A ``ModelFile`` over a diffusers folder; closing it closes every component file."""

    files: list[ModelFile] = field(default_factory=list, repr=False)
    family: str | None = None

    def close(self) -> None:
        for f in self.files:
            f.close()


def weights_file(folder: str) -> str:
    """The weights file of a component folder: unsharded before sharded, safetensors before ``.bin``,
    no variant before a variant (``.fp16``).

    Raises:
        FormatError: the folder holds no weights file.
    """
    try:
        found = [n for n in os.listdir(folder) if _WEIGHTS.match(n)]
    except OSError as exc:
        raise InputNotFoundError(folder, f"cannot be listed ({exc.strerror})") from None

    def rank(n: str) -> tuple[int, int, int, str]:
        m = _WEIGHTS.match(n)
        assert m is not None
        return (m.group(2) is not None, m.group(3) != "safetensors", m.group(4) is not None, n)

    if not found:
        raise FormatError(folder, "holds no weights file (diffusion_pytorch_model.safetensors, model.safetensors, "
                                  "an *.index.json of shards, or a .bin)", "Check that the folder was copied whole")
    return os.path.join(folder, min(found, key=rank))


def open_component(folder: str, ignore_scan: bool = False) -> tuple[dict[str, TensorRef], list[ModelFile], int]:
    """The tensors of one component folder by diffusers name, the open files, and their total size.

    Raises:
        FormatError: a broken index, a shard outside the folder, a tensor missing from its shard.
    """
    from ..reading import open_model

    path = weights_file(folder)
    files: list[ModelFile] = []
    try:
        if not path.endswith(".index.json"):
            mf = open_model(path, ignore_scan=ignore_scan)
            files.append(mf)
            return dict(mf.tensors), files, mf.size
        with open(path, encoding="utf-8") as fh:
            index = load_json(fh.read(), path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(path, "has no weight_map")
        shards: dict[str, ModelFile] = {}
        out: dict[str, TensorRef] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise FormatError(path, f"names a shard outside its folder for {name!r}: {shard!r}")
            if shard not in shards:
                shards[shard] = open_model(os.path.join(folder, shard), ignore_scan=ignore_scan)
                files.append(shards[shard])
            if name not in shards[shard]:
                raise FormatError(os.path.join(folder, shard), f"lacks {name!r}, which {os.path.basename(path)} "
                                                              "puts there")
            out[name] = shards[shard][name]
        return out, files, sum(f.size for f in files)
    except BaseException:
        for opened in files:
            opened.close()
        raise


def _config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return load_json(f.read(), path)
    except FileNotFoundError:
        raise FormatError(folder, "has no config.json", "A diffusers component folder needs its config.json") from None


def pipeline_parts(path: str) -> tuple[str, list[Part]]:
    """The family and components of a pipeline folder, from ``model_index.json`` and the text encoder config.

    Raises:
        FormatError: not a Stable Diffusion pipeline, or a listed component folder is missing.
    """
    index_path = os.path.join(path, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = load_json(f.read(), index_path)
    cls = index.get("_class_name")
    if cls in dit.PIPELINES:
        return dit_pipeline(path, index, dit.PIPELINES[str(cls)])
    if cls not in PIPELINES:
        raise FormatError(path, f"is a {cls} folder; modelkit converts Stable Diffusion 1/2/XL, SD3.x and Flux.1 "
                                "pipelines")
    if "XL" in str(cls):
        family = "sdxl"
    else:
        te = _config(os.path.join(path, "text_encoder")) if os.path.isdir(os.path.join(path, "text_encoder")) else {}
        family = "sd2" if te.get("hidden_act") == "gelu" else "sd1"
    parts = parts_of(family)
    for part in parts:
        entry = index.get(part.folder)
        if not (isinstance(entry, list) and entry and entry[0]):
            raise FormatError(path, f"its model_index.json lists no {part.folder}")
        if not os.path.isdir(os.path.join(path, part.folder)):
            raise FormatError(path, f"has no {part.folder}/ folder, which its model_index.json lists",
                              "Copy the whole pipeline folder")
    return family, parts


def component_part(path: str, want: str | None = None) -> Part:
    """The component a folder with a ``config.json`` holds (``want``: a ``--part`` value, for the
    text encoders: ``te2`` is SDXL's second).

    Raises:
        FormatError: a config of another class.
    """
    cfg = _config(path)
    cls = str(cfg.get("_class_name") or (cfg.get("architectures") or [""])[0])
    if cls == "UNet2DConditionModel":
        return Part("unet", "unet", names.UNET_PREFIX)
    if cls == "AutoencoderKL":
        return Part("vae", "vae", "")
    if cls in dit.TRANSFORMERS:
        return Part("transformer", dit.TRANSFORMERS[cls], "")
    if cls == "T5EncoderModel":
        return Part("text_encoder_2", "t5", "")
    if cls.startswith("CLIPTextModel") and want in ("clip_l", "clip_g"):
        return Part("text_encoder", "clip", "")
    if cls.startswith("CLIPTextModel"):
        if cls.endswith("WithProjection") or want == "te2":
            return Part("text_encoder_2", "openclip", names.TEXT_ENCODERS["sdxl"][1][2])
        if cfg.get("hidden_act") == "gelu":
            return Part("text_encoder", "openclip", names.TEXT_ENCODERS["sd2"][0][2])
        return Part("text_encoder", "clip", names.TEXT_ENCODERS["sd1"][0][2])
    raise FormatError(path, f"holds a {cls or 'model of unknown class'}, not a UNet, transformer, VAE or text encoder")


def open_folder(path: str | os.PathLike[str], *, part: str | None = None, ignore_scan: bool = False) -> FolderModel:
    """Open a diffusers pipeline or component folder as a ``ModelFile`` in LDM names.

    Args:
        path: a folder with ``model_index.json`` (a pipeline) or ``config.json`` (one component).
        part: ``unet``, ``vae``, ``te`` or ``te2``: only that component. The VAE alone gets the bare
            names of a standalone VAE file (``encoder.*``), the others their checkpoint prefixes.
        ignore_scan: read ``.bin`` weights the scan calls unsafe (still only through the allow-list).

    Returns:
        A ``FolderModel`` (``container`` ``diffusers``); its metadata is ``ldm_extra.safetensors``'s.

    Raises:
        FormatError: a component is missing or holds a tensor outside its layout.
    """
    from .plan import PARTS

    p = os.fspath(path)
    if not is_diffusers_folder(p):
        raise FormatError(p, "is not a diffusers folder (no model_index.json or config.json)")
    family: str | None = None
    if os.path.isfile(os.path.join(p, "model_index.json")):
        family, parts = pipeline_parts(p)
        if part is not None:
            want = dit.part_folder(family, part) if family in dit.COMPONENTS else PARTS.get(part)
            parts = [x for x in parts if x.folder == want]
            if not parts:
                raise FormatError(p, f"has no {want or part} ({family} pipelines have no {part})")
            if parts[0].kind == "vae" or family in dit.COMPONENTS:
                parts = [dataclasses.replace(parts[0], prefix="")]
        located = [(x, os.path.join(p, x.folder)) for x in parts]
    else:
        comp = component_part(p, part)
        if part is not None and not holds(comp, part):
            raise UsageError(p, f"holds the {comp.folder}, not the {PARTS.get(part, part)} (--part {part})")
        located = [(comp, p)]
    model = FolderModel(path=p, container="diffusers", size=0, tensors={}, family=family)
    try:
        for comp, folder in located:
            refs, files, size = open_component(folder, ignore_scan)
            model.files.extend(files)
            model.size += size
            _add(model, comp, _config(folder), refs, folder)
        extra = os.path.join(p, EXTRA_FILE)
        if os.path.isfile(extra) and (part is None or located[0][0].prefix):
            from ..reading import open_model

            kept = open_model(extra)
            model.files.append(kept)
            model.size += kept.size
            model.metadata = dict(kept.metadata)
            prefixes = tuple(c.prefix for c, _ in located)
            for k, ref in kept.items():
                if part is None or k.startswith(prefixes):
                    _put(model, k, ref, extra)
    except BaseException:
        model.close()
        raise
    return model


def _put(model: FolderModel, name: str, ref: TensorRef, where: str) -> None:
    if name in model.tensors:
        raise FormatError(where, f"gives {name} a second time")
    model.tensors[name] = ref if ref.name == name else dataclasses.replace(ref, name=name)


def _add(model: FolderModel, part: Part, cfg: dict[str, Any], refs: dict[str, TensorRef], folder: str) -> None:
    try:
        if part.kind == "unet":
            for k, ref in refs.items():
                _put(model, part.prefix + names.unet_ldm_name(k, cfg), ref, folder)
        elif part.kind == "vae":
            levels = len(cfg.get("block_out_channels") or ())
            for k, ref in refs.items():
                name, conv = names.vae_ldm_name(k, levels)
                if conv and len(ref.shape) == 2:
                    ref = view(ref, part.prefix + name, (*ref.shape, 1, 1), (*ref.strides, 1, 1))
                _put(model, part.prefix + name, ref, folder)
        elif part.kind == "clip":
            for k, ref in refs.items():
                if k == "text_projection.weight" and unprojected(model.family, part, ref):
                    continue
                _put(model, part.prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k),
                     ref, folder)
        elif part.kind == "t5":
            for k, ref in refs.items():
                _put(model, part.prefix + k, ref, folder)
        elif part.kind in dit.TRANSFORMERS.values():
            mapped, left = dit.to_original(refs, part.kind, folder)
            if left:
                raise FormatError(folder, f"holds {len(left)} tensors with no place in a {part.kind} single file "
                                          f"(first: {left[0]})")
            for k, ref in mapped.items():
                _put(model, part.prefix + k, ref, folder)
        else:
            _add_openclip(model, part, cfg, refs, folder)
    except ValueError as exc:
        if isinstance(exc, ModelkitError):
            raise
        dit_kind = part.kind in dit.TRANSFORMERS.values()
        raise FormatError(folder, str(exc), "Is this a Flux.1 or SD3.x transformer?" if dit_kind else
                          "Is this a Stable Diffusion component?") from None


def _add_openclip(model: FolderModel, part: Part, cfg: dict[str, Any], refs: dict[str, TensorRef],
                  folder: str) -> None:
    fused: dict[str, list[TensorRef | None]] = {}
    projection = has_projection(part, cfg)
    for k, ref in refs.items():
        name, slot = names.openclip_ldm_name(k)
        if slot >= 0:
            fused.setdefault(name, [None, None, None])[slot] = ref
        elif name == "text_projection":
            if projection:
                _put(model, part.prefix + name, transposed(ref, part.prefix + name), folder)
        else:
            _put(model, part.prefix + name, ref, folder)
    for name, group in fused.items():
        have = [r for r in group if r is not None]
        if len(have) != 3:
            raise FormatError(folder, f"has only {len(have)} of q/k/v for {name}")
        _put(model, part.prefix + name, concat(have, part.prefix + name, folder), folder)


def open_input(path: str | os.PathLike[str], *, allow_hidden_pickles: bool = False) -> ModelFile:
    """What the ops open: a diffusers folder (as a ``FolderModel`` in LDM names) or a model file
    (``modelkit.formats.open_model``)."""
    from ..formats import open_model

    p = os.fspath(path)
    if is_diffusers_folder(p):
        return open_folder(p, ignore_scan=allow_hidden_pickles)
    return open_model(p, allow_hidden_pickles=allow_hidden_pickles)


def folder_sha256(path: str, stop: Any = None) -> str:
    """The sha256 of a folder: of its ``sha256sum``-style listing (``<sha256>  <relative path>\\n`` for
    every regular file, sorted by path, symlinks and hidden files skipped), so that it changes with
    any file's content or name. ``stop`` (a ``threading.Event``) cancels it (returns "")."""
    import hashlib

    lines = []
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            if name.startswith(".") or os.path.islink(full) or not os.path.isfile(full):
                continue
            h = hashlib.sha256()
            with open(full, "rb") as f:
                while chunk := f.read(4 << 20):
                    if stop is not None and stop.is_set():
                        return ""
                    h.update(chunk)
            lines.append(f"{h.hexdigest()}  {os.path.relpath(full, path).replace(os.sep, '/')}\n")
    return hashlib.sha256("".join(sorted(lines, key=lambda x: x[66:])).encode("utf-8", "surrogateescape")).hexdigest()
