"""An LDM single file split into diffusers components, checked against the components' configs.

Every output tensor is a view of an input tensor (renamed; a VAE attention weight reshaped from
``[C, C, 1, 1]`` to ``[C, C]``; a third of an OpenCLIP ``in_proj``; a transposed ``text_projection``),
so the writer streams it from the input file; nothing is computed and nothing needs torch.

What a diffusers folder has no place for is kept, not lost: the schedule buffers, CLIP's
``position_ids``, SD2's ``text_projection``/``logit_scale`` and the last OpenCLIP layer (diffusers'
SD2 text encoder stops one layer early) go to ``ldm_extra.safetensors`` at the folder root, under
their LDM names, with the file's metadata; diffusers ignores that file and ``--to single`` reads it
back, so a round trip is bit-identical. EMA copies (``model_ema.*``) are dropped, as ``prune`` does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..detect.layouts import component_layout
from ..errors import FormatError
from ..formats.safetensors_write import OutTensor
from ..model import ModelFile, TensorRef
from . import names

#: The file at a folder's root that keeps the tensors a diffusers folder has no place for.
EXTRA_FILE = "ldm_extra.safetensors"
#: ``--part`` values -> diffusers subfolders.
PARTS = {"unet": "unet", "vae": "vae", "te": "text_encoder", "te2": "text_encoder_2"}
FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class Part:
    """One diffusers component: its folder, kind (unet, vae, clip, openclip), LDM prefix and weights file."""

    folder: str
    kind: str
    prefix: str

    @property
    def weights(self) -> str:
        return "model.safetensors" if self.kind in ("clip", "openclip", "t5") else "diffusion_pytorch_model.safetensors"


def parts_of(family: str) -> list[Part]:
    """The components of a family's pipeline, in model_index order."""
    out = [Part("unet", "unet", names.UNET_PREFIX), Part("vae", "vae", names.VAE_PREFIX)]
    out += [Part(folder, kind, prefix) for folder, kind, prefix in names.TEXT_ENCODERS[family]]
    return out


def family_of(keys: Sequence[str] | Mapping[str, Any]) -> str | None:
    """``sdxl``, ``sd2`` or ``sd1`` from the text encoders' LDM prefixes, else None."""
    ks = list(keys)
    for family, prefix in (("sdxl", "conditioner.embedders.1.model."), ("sd2", "cond_stage_model.model."),
                           ("sd1", "cond_stage_model.transformer.")):
        if any(k.startswith(prefix) for k in ks):
            return family
    return None


def view(ref: TensorRef, name: str, shape: tuple[int, ...], strides: tuple[int, ...], offset: int = 0) -> TensorRef:
    """A view of ``ref`` (same storage): new shape and strides, ``offset`` more elements in.

    The view must stay inside ``ref``'s storage: the writer reads a view's bytes by their place in
    the file, so one that ran past its storage would silently copy a neighbouring tensor's bytes.

    Raises:
        FormatError: the view starts before the storage or ends past it (names the file and ``ref``).
    """
    out = dataclasses.replace(ref, name=name, shape=shape, strides=strides, storage_offset=ref.storage_offset + offset)
    if (out.storage_offset < 0 or any(n < 0 for n in shape) or any(st < 0 for st in strides)
            or (out.storage_offset + out.span) * ref.dtype.itemsize > ref.storage_nbytes):
        where = ref.source.path if ref.source is not None else None
        raise FormatError(where, f"{name} would be a {list(shape)} view of {ref.name} at element {out.storage_offset}, "
                                 f"outside its {ref.storage_nbytes}-byte storage",
                          "The tensor's shape does not fit the layout; check the file")
    return out


def transposed(ref: TensorRef, name: str) -> TensorRef:
    return view(ref, name, tuple(reversed(ref.shape)), tuple(reversed(ref.strides)))


def _int(cfg: Mapping[str, Any], key: str, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{key} is {v!r}, not a number")
    return v


def expected(kind: str, cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The LDM names (without prefix) and shapes a component with this diffusers config has.

    Raises:
        ValueError: the config lacks a key or describes a model outside the SD families.
    """
    if kind == "t5":
        from .dit import t5_expected

        return t5_expected(cfg)
    if kind == "unet":
        boc = [int(b) for b in cfg["block_out_channels"]]
        mc = boc[0]
        if any(b % mc for b in boc):
            raise ValueError(f"block_out_channels {boc} are not multiples of {mc}")
        levels = len(boc)
        depth = cfg.get("transformer_layers_per_block", 1)
        depths = [int(d) for d in depth] if isinstance(depth, list) else [int(depth)] * levels
        adm = cfg.get("projection_class_embeddings_input_dim") if cfg.get("addition_embed_type") == "text_time" else None
        settings: dict[str, Any] = dict(
            mc=mc, mult=[b // mc for b in boc], nrb=_int(cfg, "layers_per_block", 2),
            attn=[i for i, t in enumerate(cfg["down_block_types"]) if str(t).startswith("CrossAttn")],
            heads=1, context=_int(cfg, "cross_attention_dim"), cin=_int(cfg, "in_channels", 4),
            cout=_int(cfg, "out_channels", 4), depth=depths, linear=bool(cfg.get("use_linear_projection", False)),
            adm=int(adm) if adm else None)
    elif kind == "vae":
        boc = [int(b) for b in cfg["block_out_channels"]]
        ch = boc[0]
        if any(b % ch for b in boc):
            raise ValueError(f"block_out_channels {boc} are not multiples of {ch}")
        z = _int(cfg, "latent_channels", 4)
        settings = dict(ch=ch, mult=[b // ch for b in boc], nrb=_int(cfg, "layers_per_block", 2), z=z, embed=z,
                        rgb=_int(cfg, "in_channels", 3))
    elif kind == "clip":
        settings = dict(width=_int(cfg, "hidden_size"), layers=_int(cfg, "num_hidden_layers"),
                        ff=_int(cfg, "intermediate_size"), vocab=_int(cfg, "vocab_size"))
    else:
        settings = dict(width=_int(cfg, "hidden_size"), layers=_int(cfg, "num_hidden_layers"),
                        embed=_int(cfg, "projection_dim", _int(cfg, "hidden_size")), vocab=_int(cfg, "vocab_size"),
                        ff=_int(cfg, "intermediate_size"))
    layout = component_layout(kind, **settings)
    if kind == "clip":
        out = {"text_model." + k: shape for k, (shape, _) in layout.items()}
        if any(str(a).endswith("WithProjection") for a in cfg.get("architectures") or [cfg.get("_class_name")]):
            out["text_projection.weight"] = (_int(cfg, "projection_dim"), settings["width"])
        return out
    if kind == "vae":  # Flux and SD3 VAEs have no quant_conv / post_quant_conv
        drop = tuple(f"{n}." for n in ("quant_conv", "post_quant_conv") if cfg.get(f"use_{n}") is False)
        return {k: shape for k, (shape, _) in layout.items() if not (drop and k.startswith(drop))}
    return {k: shape for k, (shape, _) in layout.items()}


def has_projection(part: Part, cfg: Mapping[str, Any]) -> bool:
    """Whether the text encoder is a ``CLIPTextModelWithProjection`` (SDXL's second)."""
    arch = cfg.get("architectures") or [cfg.get("_class_name")]
    return any(str(a).endswith("WithProjection") for a in arch) if any(arch) else part.folder == "text_encoder_2"


@dataclass
class Split:
    """The output of an LDM -> diffusers split.

    Attributes:
        components: subfolder -> the tensors of its weights file, in diffusers names.
        leftovers: tensors with no place in a diffusers folder (LDM names; for ``ldm_extra.safetensors``).
        dropped: names not carried over (EMA copies).
        problems: shape or name mismatches against the configs (the split is refused if any).
    """

    components: dict[str, list[OutTensor]] = field(default_factory=dict)
    leftovers: list[OutTensor] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def split(mf: ModelFile, parts: Sequence[Part], configs: Callable[[str], Mapping[str, Any]],
          *, whole: bool = True) -> Split:
    """Map ``mf``'s tensors (LDM names) to the diffusers components ``parts``.

    Args:
        mf: the open single file.
        parts: the components to produce.
        configs: subfolder -> its diffusers ``config.json`` (as a dict).
        whole: the whole pipeline is converted, so tensors outside ``parts`` are leftovers (kept);
            for one ``--part`` they are simply not part of the output.

    Returns:
        Split (``problems`` lists what does not fit; the caller refuses then).
    """
    out = Split()
    claimed: set[str] = set()
    for part in parts:
        cfg = configs(part.folder)
        try:
            want = expected(part.kind, cfg)
        except (KeyError, ValueError, TypeError) as exc:
            out.problems.append(f"the {part.folder} config cannot be read ({type(exc).__name__}: {exc})")
            continue
        present = {k[len(part.prefix):]: mf[k] for k in mf if k.startswith(part.prefix)
                   and not (part.prefix == "" and _foreign(k))}
        claimed.update(part.prefix + k for k in present)
        tensors: list[OutTensor] = []
        _map(part, cfg, want, present, tensors, out)
        out.components[part.folder] = tensors
    for k in mf:
        if k in claimed:
            continue
        if k.startswith("model_ema."):
            out.dropped.append(k)
        elif whole:
            out.leftovers.append(OutTensor.of(mf[k]))
    return out


def _foreign(key: str) -> bool:
    """A key a bare VAE file may carry beside its own (``model_ema``, a loss)."""
    return key.startswith(("model_ema.", "loss."))


def _map(part: Part, cfg: Mapping[str, Any], want: dict[str, tuple[int, ...]], present: dict[str, TensorRef],
         tensors: list[OutTensor], out: Split) -> None:
    levels = len(cfg.get("block_out_channels") or ())
    te_layers = int(cfg.get("num_hidden_layers") or 0)
    projection = part.kind in ("clip", "openclip") and has_projection(part, cfg)
    for rest, ref in present.items():
        full = part.prefix + rest
        spare = _spare(part, rest, te_layers, projection)
        shape = want.get(rest)
        if spare:
            out.leftovers.append(OutTensor.of(ref))
            continue
        if shape is None:
            out.problems.append(f"{full} has no place in the {part.folder} config")
            continue
        if ref.shape != shape and not (part.kind == "vae" and ref.shape == shape[:2] and shape[2:] == (1, 1)):
            out.problems.append(f"{full} is {list(ref.shape)}, the {part.folder} config needs {list(shape)}")
            continue
        try:
            tensors.extend(_convert(part, cfg, rest, ref, levels))
        except ValueError as exc:
            out.problems.append(str(exc))
    for rest in want:
        if rest not in present and not _spare(part, rest, te_layers, projection):
            out.problems.append(f"{part.prefix}{rest} is missing")


def _spare(part: Part, rest: str, te_layers: int, projection: bool) -> bool:
    """A tensor of this component that its diffusers model has no place for."""
    if part.kind == "clip":  # a CLIP-L without projection may still carry one (ComfyUI saves it)
        return rest == "text_model.embeddings.position_ids" or (rest == "text_projection.weight" and not projection)
    if part.kind == "t5":
        return rest == "encoder.embed_tokens.weight"
    if part.kind == "openclip":
        if rest == "logit_scale" or (rest == "text_projection" and not projection):
            return True
        layer = names.openclip_layer(rest)
        return layer is not None and layer >= te_layers
    return False


def _convert(part: Part, cfg: Mapping[str, Any], rest: str, ref: TensorRef, levels: int) -> list[OutTensor]:
    if part.kind == "unet":
        return [OutTensor.of(ref, names.unet_diffusers_name(rest, cfg))]
    if part.kind == "vae":
        name, conv = names.vae_diffusers_name(rest, levels)
        if conv and len(ref.shape) == 4:
            v = view(ref, name, ref.shape[:2], ref.strides[:2])
            return [OutTensor(name, ref.dtype, v.shape, v)]
        return [OutTensor.of(ref, name)]
    if part.kind in ("clip", "t5"):
        return [OutTensor.of(ref, rest)]
    targets = names.openclip_diffusers_names(rest)
    if len(targets) == 3:
        rows = ref.shape[0] // 3
        if rows * 3 != ref.shape[0]:
            raise ValueError(f"{part.prefix}{rest} has {ref.shape[0]} rows, not 3 equal parts")
        shape = (rows, *ref.shape[1:])
        outs = []
        for k, name in enumerate(targets):
            v = view(ref, name, shape, ref.strides, k * rows * ref.strides[0])
            outs.append(OutTensor(name, ref.dtype, shape, v))
        return outs
    (name,) = targets
    if rest == "text_projection":
        v = transposed(ref, name)
        return [OutTensor(name, ref.dtype, v.shape, v)]
    return [OutTensor.of(ref, name)]


def load_json(text: str, where: str) -> dict[str, Any]:
    """A JSON object from ``text``.

    Raises:
        FormatError: not a JSON object.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FormatError(where, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FormatError(where, "is not a JSON object")
    return data
