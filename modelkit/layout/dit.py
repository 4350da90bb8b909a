"""Flux.1 and SD3.x: single files (BFL / Stability / ComfyUI keys) <-> diffusers components, as views.

The transformer's fused weights (``qkv``, Flux's ``linear1``) become row views of the original tensor;
the modulations stored ``shift, scale`` become a ``ConcatSource`` of their two halves in diffusers'
``scale, shift`` order; everything else is a rename (``modelkit.ops.families.RULES`` and ``NORMS``
here). The way back reads the same table the other way. The VAE is the SD ``AutoencoderKL`` layout
with 16 latent channels and no ``quant_conv``; CLIP-L and CLIP-G are stored in Hugging Face names
under ``text_encoders.clip_l.transformer.`` / ``text_encoders.clip_g.transformer.``; T5-XXL in
``T5EncoderModel`` names under ``text_encoders.t5xxl.transformer.``. The diffusers config of the
transformer follows from the shapes (``derived_config``), so a file is checked against its config.
No torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..model import TensorRef
from ..ops import families as fam
from .plan import Part, view

TRANSFORMER_PREFIX = fam.TRANSFORMER_PREFIX
#: model_index.json ``_class_name`` of the pipelines read, and their family.
PIPELINES = {"FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "FluxInpaintPipeline": "flux",
             "FluxFillPipeline": "flux", "FluxControlPipeline": "flux", "FluxKontextPipeline": "flux",
             "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
             "StableDiffusion3InpaintPipeline": "sd3"}
#: Transformer config classes and their family.
TRANSFORMERS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
#: family -> the pipeline's components: (diffusers folder, kind, single-file prefix, --part name).
COMPONENTS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "flux": (("transformer", "flux", TRANSFORMER_PREFIX, "transformer"), ("vae", "vae", "vae.", "vae"),
             ("text_encoder", "clip", "text_encoders.clip_l.transformer.", "clip_l"),
             ("text_encoder_2", "t5", "text_encoders.t5xxl.transformer.", "t5xxl")),
    "sd3": (("transformer", "sd3", TRANSFORMER_PREFIX, "transformer"), ("vae", "vae", "first_stage_model.", "vae"),
            ("text_encoder", "clip", "text_encoders.clip_l.transformer.", "clip_l"),
            ("text_encoder_2", "clip", "text_encoders.clip_g.transformer.", "clip_g"),
            ("text_encoder_3", "t5", "text_encoders.t5xxl.transformer.", "t5xxl")),
}
#: --part aliases for Flux/SD3 (the SD names ``unet``, ``te``, ``te2`` also work).
ALIASES = {"unet": "transformer", "te": "clip_l", "te2": "clip_g"}
PART_NAMES = ("transformer", "vae", "clip_l", "clip_g", "t5xxl")
#: The other prefix a VAE may carry in a single file (Flux files from some tools use SD3's).
VAE_PREFIXES = ("vae.", "first_stage_model.")

#: Tensors outside ``families.RULES`` (norm scales, SD3's position table): diffusers <-> original.
NORMS: dict[str, tuple[tuple[str, str], ...]] = {
    "flux": (("transformer_blocks.{i}.attn.norm_q.weight", "double_blocks.{i}.img_attn.norm.query_norm.scale"),
             ("transformer_blocks.{i}.attn.norm_k.weight", "double_blocks.{i}.img_attn.norm.key_norm.scale"),
             ("transformer_blocks.{i}.attn.norm_added_q.weight", "double_blocks.{i}.txt_attn.norm.query_norm.scale"),
             ("transformer_blocks.{i}.attn.norm_added_k.weight", "double_blocks.{i}.txt_attn.norm.key_norm.scale"),
             ("single_transformer_blocks.{i}.attn.norm_q.weight", "single_blocks.{i}.norm.query_norm.scale"),
             ("single_transformer_blocks.{i}.attn.norm_k.weight", "single_blocks.{i}.norm.key_norm.scale")),
    "sd3": (("pos_embed.pos_embed", "pos_embed"),
            ("transformer_blocks.{i}.attn.norm_q.weight", "joint_blocks.{i}.x_block.attn.ln_q.weight"),
            ("transformer_blocks.{i}.attn.norm_k.weight", "joint_blocks.{i}.x_block.attn.ln_k.weight"),
            ("transformer_blocks.{i}.attn.norm_added_q.weight", "joint_blocks.{i}.context_block.attn.ln_q.weight"),
            ("transformer_blocks.{i}.attn.norm_added_k.weight", "joint_blocks.{i}.context_block.attn.ln_k.weight"),
            ("transformer_blocks.{i}.attn2.norm_q.weight", "joint_blocks.{i}.x_block.attn2.ln_q.weight"),
            ("transformer_blocks.{i}.attn2.norm_k.weight", "joint_blocks.{i}.x_block.attn2.ln_k.weight")),
}


def parts_of(family: str, vae_prefix: str | None = None) -> list[Part]:
    """The components of a Flux or SD3 pipeline, in model_index order (``vae_prefix``: the one the file uses)."""
    return [Part(folder, kind, vae_prefix if kind == "vae" and vae_prefix else prefix)
            for folder, kind, prefix, _ in COMPONENTS[family]]


def part_folder(family: str, part: str) -> str | None:
    """The diffusers folder of a ``--part`` value in a family's pipeline (None: it has no such part)."""
    name = ALIASES.get(part, part)
    return next((folder for folder, _, _, p in COMPONENTS[family] if p == name), None)


def part_name(family: str, folder: str) -> str:
    """The ``--part`` name of a diffusers folder of the family (``text_encoder_2`` -> ``t5xxl`` in Flux)."""
    return next(p for f, _, _, p in COMPONENTS[family] if f == folder)


def single_family(keys: Sequence[str]) -> tuple[str, str] | None:
    """``(family, transformer prefix)`` of a Flux or SD3 file in the original keys (a full single file:
    ``model.diffusion_model.``; a transformer-only file: ""), else None."""
    family = fam.family_of(k for k in keys if not k.startswith("text_encoders."))
    if family is None:
        return None
    prefix = TRANSFORMER_PREFIX if any(k.startswith(TRANSFORMER_PREFIX) for k in keys) else ""
    probe = "double_blocks." if family == "flux" else "joint_blocks."
    if not any(k.startswith(prefix + probe) for k in keys):
        return None  # diffusers keys, not the original ones
    return family, prefix


def vae_prefix(keys: Sequence[str], family: str) -> str:
    """The VAE prefix a single file uses (the family's usual one when it has no VAE)."""
    for p in VAE_PREFIXES:
        if any(k.startswith(p + "encoder.") for k in keys):
            return p
    return "vae." if family == "flux" else "first_stage_model."


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def _rows(ref: TensorRef, a: int, b: int, name: str) -> TensorRef:
    """Rows ``[a, b)`` of ``ref`` as a view (``ref`` itself when that is all of it).

    Raises:
        ValueError: the rows are not inside ``ref`` (a view past them would read another tensor's bytes).
    """
    if not ref.shape or not 0 <= a < b <= ref.shape[0]:
        raise ValueError(f"{name} would be rows {a}..{b} of {ref.name}, which is {list(ref.shape)}")
    if a == 0 and b == ref.shape[0]:
        return ref
    return view(ref, name, (b - a, *ref.shape[1:]), ref.strides, a * ref.strides[0])


def _joined(parts: list[TensorRef], name: str, label: str) -> TensorRef:
    from .folder import concat

    if len(parts) == 1:
        return parts[0]
    return concat(parts, name, label)


def to_diffusers(refs: Mapping[str, TensorRef], family: str, label: str) -> tuple[dict[str, TensorRef], list[str], list[str]]:
    """A transformer in the original keys (no prefix) -> ``(diffusers name -> tensor, names used, problems)``.

    Names not used have no place in the diffusers model (the caller reports them). A fused weight
    whose rows do not split as its rule says, or a bias that is not one value per row of its weight,
    is a problem (nothing of it is mapped).
    """
    shapes = {k: r.shape for k, r in refs.items()}
    out: dict[str, TensorRef] = {}
    used: list[str] = []
    problems: list[str] = []
    for path, (shape, split, dpaths) in fam.original_weights(shapes, family, "").items():
        width = shapes.get(path.replace("linear1", "linear2") + ".weight")
        if split == "head3" and width:  # q, k, v are one hidden width each: linear2's rows
            shape = (shape[0], width[0])
        for suffix in (".weight", ".bias"):
            ref = refs.get(path + suffix)
            if ref is None:
                continue
            used.append(path + suffix)
            if suffix == ".bias" and ref.shape != shape[:1]:
                problems.append(f"{path}.bias is {list(ref.shape)}, not one value per row of its "
                                f"{list(shapes[path + '.weight'])} weight")
                continue
            try:
                segs = fam.segments(split, dpaths, shape)
                pieces: dict[str, list[tuple[int, TensorRef]]] = {}
                for a, b, dpath, da, *_ in segs:
                    pieces.setdefault(dpath, []).append((da, _rows(ref, a, b, dpath + suffix)))
            except (ValueError, IndexError) as exc:
                problems.append(f"{path}{suffix}: {exc}")
                continue
            for dpath, got in pieces.items():
                name = dpath + suffix
                out[name] = _joined([r for _, r in sorted(got, key=lambda x: x[0])], name, label)
    for k, name in _norms(refs, family, to_diffusers=True):
        out[name] = refs[k]
        used.append(k)
    return out, used, problems


def to_original(refs: Mapping[str, TensorRef], family: str, label: str) -> tuple[dict[str, TensorRef], list[str]]:
    """A diffusers transformer -> ``(original name -> tensor, diffusers names with no original place)``.

    Raises:
        ValueError: a fused weight whose parts do not fit together (rows that do not make the
            original's row blocks, other trailing sizes); the message names the tensors.
    """
    shapes = {k: r.shape for k, r in refs.items()}
    out: dict[str, TensorRef] = {}
    used: set[str] = set()
    try:
        table = fam.diffusers_weights(shapes, family)
    except IndexError:  # a part with no dimensions
        raise ValueError("a transformer weight has no dimensions: "
                         + ", ".join(k for k, v in shapes.items() if not v and k.endswith(".weight"))) from None
    for path, (shape, split, dpaths) in table.items():
        for suffix in (".weight", ".bias"):
            if any(d + suffix not in refs for d in dpaths):
                continue
            try:
                segs = fam.segments(split, dpaths, shape)
            except (ValueError, IndexError) as exc:
                have = ", ".join(f"{d}{suffix} {list(shapes[d + suffix])}" for d in dpaths)
                raise ValueError(f"{have} cannot make {path}{suffix}: {exc}") from None
            _check_parts(refs, segs, suffix, path + suffix)
            parts = [_rows(refs[dpath + suffix], da, db, path + suffix) for _a, _b, dpath, da, db, _n in segs]
            used.update(d + suffix for d in dpaths)
            out[path + suffix] = _joined(parts, path + suffix, label)
    for k, name in _norms(refs, family, to_diffusers=False):
        out[name] = refs[k]
        used.add(k)
    return out, sorted(set(refs) - used)


def _norms(refs: Mapping[str, TensorRef], family: str, to_diffusers: bool) -> list[tuple[str, str]]:
    """``(key, its name in the other layout)`` for each tensor of ``refs`` that ``NORMS`` maps."""
    out = []
    for dtemplate, otemplate in NORMS[family]:
        src, dst = (otemplate, dtemplate) if to_diffusers else (dtemplate, otemplate)
        pat = _pattern(src)
        for k in refs:
            m = pat.match(k)
            if m is not None:
                out.append((k, dst.format(i=m.group(1)) if m.groups() else dst))
    return out


def _check_parts(refs: Mapping[str, TensorRef], segs: Sequence[fam.Segment], suffix: str, name: str) -> None:
    """Each diffusers part of ``name`` has the rows its segment says and the others' trailing sizes
    (a bias: one dimension).

    Raises:
        ValueError: a part that does not fit, named.
    """
    first = refs[segs[0][2] + suffix].shape
    for _a, _b, dpath, _da, _db, rows in segs:
        shape = refs[dpath + suffix].shape
        if not shape or shape[0] != rows or shape[1:] != first[1:] or (suffix == ".bias" and len(shape) != 1):
            want = [rows] if suffix == ".bias" else [rows, *first[1:]]
            raise ValueError(f"{dpath}{suffix} {list(shape)} does not fit {name}, which needs {want} there")


#: The bytes of 1.0 in the float types an identity matrix is written in.
ONE = {"F32": b"\x00\x00\x80\x3f", "F16": b"\x00\x3c", "BF16": b"\x80\x3f", "F64": b"\x00" * 6 + b"\xf0\x3f"}


def identity_bytes(st: str, width: int) -> bytes:
    """The ``[width, width]`` identity matrix in the safetensors float type ``st`` (a key of ``ONE``)."""
    one, zero = ONE[st], b"\x00" * len(ONE[st])
    return b"".join(zero * i + one + zero * (width - i - 1) for i in range(width))


# --- the transformer's config, from its shapes ---------------------------------------------------

def _count(keys: Sequence[str], block: str) -> int:
    pat = re.compile(rf"^{block}\.(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pat.match(k))]
    return max(found) + 1 if found else 0


def _size(shapes: Mapping[str, tuple[int, ...]], key: str, dim: int) -> int:
    """Size ``dim`` of ``shapes[key]``, which must be there and positive.

    Raises:
        KeyError: no ``key``.
        ValueError: ``key`` has no such dimension, or it is empty.
    """
    shape = shapes[key]
    if len(shape) <= dim:
        raise ValueError(f"{key} is {list(shape)}, with no dimension {dim}")
    if shape[dim] <= 0:
        raise ValueError(f"{key} is {list(shape)}, empty")
    return int(shape[dim])


def derived_config(shapes: Mapping[str, tuple[int, ...]], family: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers config keys a transformer's shapes (original keys, no prefix) decide.

    ``base`` gives what shapes cannot tell (SD3's ``attention_head_dim`` when there is no qk norm).

    Raises:
        KeyError: a tensor every transformer of the family has is missing.
        ValueError: such a tensor lacks a dimension or is empty, or ``base`` gives a head size that is
            not a positive number.
    """
    keys = list(shapes)
    if family == "flux":
        hidden, cin = _size(shapes, "img_in.weight", 0), _size(shapes, "img_in.weight", 1)
        norm = ("double_blocks.0.img_attn.norm.query_norm.scale" if _count(keys, "double_blocks")
                else "single_blocks.0.norm.query_norm.scale")
        head = _size(shapes, norm, 0)
        return {"in_channels": cin, "out_channels": _size(shapes, "final_layer.linear.weight", 0),
                "num_layers": _count(keys, "double_blocks"), "num_single_layers": _count(keys, "single_blocks"),
                "attention_head_dim": head, "num_attention_heads": hidden // head,
                "joint_attention_dim": _size(shapes, "txt_in.weight", 1),
                "pooled_projection_dim": _size(shapes, "vector_in.in_layer.weight", 1),
                "guidance_embeds": "guidance_in.in_layer.weight" in shapes}
    hidden, cin, patch = (_size(shapes, "x_embedder.proj.weight", d) for d in range(3))
    layers = _count(keys, "joint_blocks")
    qk = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    head = _size(shapes, "joint_blocks.0.x_block.attn.ln_q.weight", 0) if qk else base.get("attention_head_dim") or 64
    if not isinstance(head, int) or isinstance(head, bool) or head <= 0:
        raise ValueError(f"attention_head_dim is {head!r}, not a positive number")
    side = int(round(_size(shapes, "pos_embed", 1) ** 0.5))
    return {"in_channels": cin, "patch_size": patch,
            "out_channels": _size(shapes, "final_layer.linear.weight", 0) // (patch * patch),
            "num_layers": layers, "attention_head_dim": head, "num_attention_heads": hidden // head,
            "joint_attention_dim": _size(shapes, "context_embedder.weight", 1),
            "caption_projection_dim": _size(shapes, "context_embedder.weight", 0),
            "pooled_projection_dim": _size(shapes, "y_embedder.mlp.0.weight", 1), "pos_embed_max_size": side,
            "dual_attention_layers": [i for i in range(layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes],
            "qk_norm": "rms_norm" if qk else None}


def shipped_variant(family: str, derived: Mapping[str, Any]) -> str:
    """The shipped config folder closest to a transformer: ``flux-dev``, ``flux-schnell``, ``sd3-medium``,
    ``sd3.5-medium`` or ``sd3.5-large``."""
    if family == "flux":
        return "flux-dev" if derived["guidance_embeds"] else "flux-schnell"
    if derived["dual_attention_layers"]:
        return "sd3.5-medium"
    return "sd3.5-large" if derived["qk_norm"] else "sd3-medium"


#: Config keys a shipped config takes from the file (Flux Fill and others change the channels).
ADAPTED = {"flux": ("in_channels", "out_channels"), "sd3": ()}
_DEFAULTS: dict[str, Any] = {"out_channels": None, "dual_attention_layers": [], "qk_norm": None, "guidance_embeds": False,
             "patch_size": 1}


def config_problems(cfg: Mapping[str, Any], derived: Mapping[str, Any]) -> list[str]:
    """Where a transformer config disagrees with what the shapes say."""
    out = []
    for k, v in derived.items():
        have = cfg.get(k, _DEFAULTS.get(k))
        if k == "out_channels" and have is None:
            have = cfg.get("in_channels")
        if isinstance(have, tuple):
            have = list(have)
        if have != v:
            out.append(f"the transformer's shapes say {k} = {v!r}, the config {have!r}")
    return out


def adapted(cfg: Mapping[str, Any], family: str, derived: Mapping[str, Any]) -> dict[str, Any]:
    """A shipped transformer config with the keys in ``ADAPTED`` taken from the file."""
    out = dict(cfg)
    for k in ADAPTED[family]:
        out[k] = derived[k]
    if family == "flux" and out.get("out_channels") == out.get("in_channels"):
        out["out_channels"] = None
    return out


# --- T5 -------------------------------------------------------------------------------------------

def t5_expected(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a ``T5EncoderModel`` with this config (``shared.weight`` holds the
    embedding; ``encoder.embed_tokens.weight``, the tied copy, is optional).

    Raises:
        KeyError, ValueError: the config lacks a size.
    """
    d, ff, kv, heads = int(cfg["d_model"]), int(cfg["d_ff"]), int(cfg["d_kv"]), int(cfg["num_heads"])
    inner = kv * heads
    gated = bool(cfg.get("is_gated_act")) or str(cfg.get("feed_forward_proj", "")).startswith("gated-")
    out: dict[str, tuple[int, ...]] = {"shared.weight": (int(cfg["vocab_size"]), d),
                                       "encoder.final_layer_norm.weight": (d,)}
    for i in range(int(cfg["num_layers"])):
        b = f"encoder.block.{i}.layer."
        for n in "qkv":
            out[f"{b}0.SelfAttention.{n}.weight"] = (inner, d)
        out[f"{b}0.SelfAttention.o.weight"] = (d, inner)
        if i == 0:
            out[f"{b}0.SelfAttention.relative_attention_bias.weight"] = (int(cfg.get("relative_attention_num_buckets", 32)), heads)
        out[f"{b}0.layer_norm.weight"] = (d,)
        for n in (("wi_0", "wi_1") if gated else ("wi",)):
            out[f"{b}1.DenseReluDense.{n}.weight"] = (ff, d)
        out[f"{b}1.DenseReluDense.wo.weight"] = (d, ff)
        out[f"{b}1.layer_norm.weight"] = (d,)
    return out
