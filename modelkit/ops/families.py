"""Flux.1 and SD3.x as data: components and their key prefixes, per-block merge names, and the map
between the original (BFL / Stability, also ComfyUI) transformer keys and diffusers' keys.

Layouts users meet:

* a single file (ComfyUI / Stability): the transformer under ``model.diffusion_model.``, the VAE under
  ``vae.`` (Flux) or ``first_stage_model.`` (SD3), text encoders under ``text_encoders.clip_l.``,
  ``text_encoders.clip_g.`` (SD3) and ``text_encoders.t5xxl.``;
* a transformer-only file in the original keys (``double_blocks.N.img_attn.qkv``,
  ``joint_blocks.N.x_block.attn.qkv``), with no prefix;
* a diffusers ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` (``transformer_blocks.N.attn.to_q``).

The original keys fuse what diffusers keeps apart: ``qkv`` holds diffusers' ``to_q``/``to_k``/``to_v``
(or ``add_q_proj``... for the text stream) as three equal row blocks; Flux's ``single_blocks.N.linear1``
holds ``attn.to_q``, ``attn.to_k``, ``attn.to_v`` (one hidden width each) then ``proj_mlp``; the final
modulation (and SD3's last context-block modulation) stores ``shift, scale`` where diffusers stores
``scale, shift``. ``RULES`` says so per family; ``segments`` turns a rule and a shape into row ranges.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

Shape = tuple[int, ...]

DIT_FAMILIES = ("flux", "sd3")
#: family -> component -> key prefixes in a single file. Keys under none of them are the transformer's.
COMPONENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "flux": {"transformer": ("model.diffusion_model.",), "vae": ("vae.", "first_stage_model."),
             "clip_l": ("text_encoders.clip_l.",), "t5xxl": ("text_encoders.t5xxl.",)},
    "sd3": {"transformer": ("model.diffusion_model.",), "vae": ("first_stage_model.", "vae."),
            "clip_l": ("text_encoders.clip_l.",), "clip_g": ("text_encoders.clip_g.",),
            "t5xxl": ("text_encoders.t5xxl.",)},
}
#: ``prune --part`` on a Flux/SD3 single file: part -> (components kept, prefix removed so the part
#: loads on its own as ComfyUI's separate files do, or None to keep the keys).
PARTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "unet": (("transformer",), "model.diffusion_model."), "transformer": (("transformer",), "model.diffusion_model."),
    "vae": (("vae",), "vae."), "te": (("clip_l", "clip_g", "t5xxl"), None),
    "clip_l": (("clip_l",), "text_encoders.clip_l.transformer."),
    "clip_g": (("clip_g",), "text_encoders.clip_g.transformer."),
    "t5xxl": (("t5xxl",), "text_encoders.t5xxl.transformer."),
}
#: The ModelSpec kind of each part.
PART_KINDS = {"unet": "unet", "transformer": "unet", "vae": "vae", "te": "text-encoder", "clip_l": "text-encoder",
              "clip_g": "text-encoder", "t5xxl": "text-encoder"}
TRANSFORMER_PREFIX = "model.diffusion_model."

#: Per-block merge weights: (block name prefix, key pattern in either key style) per family.
BLOCKS = {
    "flux": (("D", r"(?:double_blocks|transformer_blocks)\.(\d+)\."),
             ("S", r"(?:single_blocks|single_transformer_blocks)\.(\d+)\.")),
    "sd3": (("J", r"(?:joint_blocks|transformer_blocks)\.(\d+)\."),),
}
#: Keys that mark a family's transformer, original or diffusers (searched anywhere in a key).
MARKERS = {
    "flux": (r"(?:^|\.)double_blocks\.\d+\.img_attn\.qkv\.weight$", r"^single_transformer_blocks\.\d+\."),
    "sd3": (r"(?:^|\.)joint_blocks\.\d+\.(?:x|context)_block\.attn\.qkv\.weight$", r"^pos_embed\.proj\.weight$"),
}
#: Original path (``{i}``: block number) -> diffusers path(s), and how their rows sit in the original:
#: ``one`` (a rename), ``equal`` (equal row blocks), ``head3`` (three hidden-width blocks, the rest
#: last), ``swap`` (halves swapped).
RULES: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {
    "flux": (
        ("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                            "transformer_blocks.{i}.attn.to_v"), "equal"),
        ("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                            "transformer_blocks.{i}.attn.add_k_proj",
                                            "transformer_blocks.{i}.attn.add_v_proj"), "equal"),
        ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), "one"),
        ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), "one"),
        ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",), "one"),
        ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",), "one"),
        ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",), "one"),
        ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",), "one"),
        ("double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",), "one"),
        ("double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",), "one"),
        ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                       "single_transformer_blocks.{i}.attn.to_v",
                                       "single_transformer_blocks.{i}.proj_mlp"), "head3"),
        ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",), "one"),
        ("single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",), "one"),
        ("img_in", ("x_embedder",), "one"), ("txt_in", ("context_embedder",), "one"),
        ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), "one"),
        ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), "one"),
        ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), "one"),
        ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), "one"),
        ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), "one"),
        ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), "one"),
        ("final_layer.linear", ("proj_out",), "one"),
        ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    ),
    "sd3": (
        ("joint_blocks.{i}.x_block.attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                               "transformer_blocks.{i}.attn.to_v"), "equal"),
        ("joint_blocks.{i}.context_block.attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                                     "transformer_blocks.{i}.attn.add_k_proj",
                                                     "transformer_blocks.{i}.attn.add_v_proj"), "equal"),
        ("joint_blocks.{i}.x_block.attn2.qkv", ("transformer_blocks.{i}.attn2.to_q", "transformer_blocks.{i}.attn2.to_k",
                                                "transformer_blocks.{i}.attn2.to_v"), "equal"),
        ("joint_blocks.{i}.x_block.attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), "one"),
        ("joint_blocks.{i}.x_block.attn2.proj", ("transformer_blocks.{i}.attn2.to_out.0",), "one"),
        ("joint_blocks.{i}.context_block.attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), "one"),
        ("joint_blocks.{i}.x_block.mlp.fc1", ("transformer_blocks.{i}.ff.net.0.proj",), "one"),
        ("joint_blocks.{i}.x_block.mlp.fc2", ("transformer_blocks.{i}.ff.net.2",), "one"),
        ("joint_blocks.{i}.context_block.mlp.fc1", ("transformer_blocks.{i}.ff_context.net.0.proj",), "one"),
        ("joint_blocks.{i}.context_block.mlp.fc2", ("transformer_blocks.{i}.ff_context.net.2",), "one"),
        ("joint_blocks.{i}.x_block.adaLN_modulation.1", ("transformer_blocks.{i}.norm1.linear",), "one"),
        ("joint_blocks.{i}.context_block.adaLN_modulation.1", ("transformer_blocks.{i}.norm1_context.linear",), "one"),
        ("x_embedder.proj", ("pos_embed.proj",), "one"), ("context_embedder", ("context_embedder",), "one"),
        ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), "one"),
        ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), "one"),
        ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), "one"),
        ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), "one"),
        ("final_layer.linear", ("proj_out",), "one"),
        ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    ),
}
#: SD3 stores the last joint block's context modulation as ``shift, scale`` (the block ends there).
SD3_LAST_CONTEXT_SWAP = "joint_blocks.{i}.context_block.adaLN_modulation.1"

#: One row range of an original weight: (begin, end, diffusers path, its begin, its end, its rows).
Segment = tuple[int, int, str, int, int, int]


def family_of(keys: Iterable[str]) -> str | None:
    """``flux`` or ``sd3`` when these keys hold that family's transformer (any layout), else None."""
    pats = {fam: [re.compile(p) for p in ps] for fam, ps in MARKERS.items()}
    for k in keys:
        for fam, ps in pats.items():
            if any(p.search(k) for p in ps):
                return fam
    return None


def component_of(key: str, family: str) -> str:
    """The component of a key in a ``family`` file: ``transformer``, ``vae``, ``clip_l``, ``clip_g``, ``t5xxl``."""
    for comp, prefixes in COMPONENTS[family].items():
        if comp != "transformer" and key.startswith(prefixes):
            return comp
    return "transformer"


def block_names(keys: Iterable[str], family: str) -> list[str]:
    """Per-block weight names of a Flux (``D00.., S00..``) or SD3 (``J00..``) transformer, from its keys."""
    found: dict[str, set[int]] = {}
    for k in keys:
        if component_of(k, family) != "transformer":
            continue
        rest = k.removeprefix(TRANSFORMER_PREFIX)
        for name, pat in BLOCKS[family]:
            m = re.match(pat, rest)
            if m is not None:
                found.setdefault(name, set()).add(int(m.group(1)))
                break
    return [f"{name}{i:02d}" for name, _ in BLOCKS[family] for i in range(max(found.get(name, {-1})) + 1)]


def block_of(key: str, family: str) -> str | None:
    """The block weight name a key takes (None: BASE, everything outside the numbered blocks)."""
    if component_of(key, family) != "transformer":
        return None
    rest = key.removeprefix(TRANSFORMER_PREFIX)
    for name, pat in BLOCKS[family]:
        m = re.match(pat, rest)
        if m is not None:
            return f"{name}{int(m.group(1)):02d}"
    return None


def segments(split: str, paths: tuple[str, ...], shape: Shape) -> list[Segment]:
    """The row ranges of an original weight of ``shape`` that each diffusers path holds.

    Raises:
        ValueError: the rows do not divide as the rule says.
    """
    rows = shape[0]
    if split == "one":
        return [(0, rows, paths[0], 0, rows, rows)]
    if split == "swap":
        if rows % 2:
            raise ValueError(f"{rows} rows do not halve")
        h = rows // 2
        return [(0, h, paths[0], h, rows, rows), (h, rows, paths[0], 0, h, rows)]
    if split == "equal":
        n = len(paths)
        if rows % n:
            raise ValueError(f"{rows} rows do not split in {n}")
        w = rows // n
        return [(i * w, (i + 1) * w, p, 0, w, w) for i, p in enumerate(paths)]
    w = shape[1]  # head3: q, k, v one hidden width each, then the MLP input
    if rows <= 3 * w:
        raise ValueError(f"{rows} rows leave no MLP after q, k, v of {w}")
    sizes = (w, w, w, rows - 3 * w)
    out, at = [], 0
    for p, n in zip(paths, sizes):
        out.append((at, at + n, p, 0, n, n))
        at += n
    return out


def original_weights(shapes: Mapping[str, Shape], family: str, prefix: str) -> dict[str, tuple[Shape, str, tuple[str, ...]]]:
    """Original path -> (shape, split, diffusers paths) for a checkpoint in the original keys under ``prefix``."""
    return _expand(family, lambda p: shapes.get(f"{prefix}{p}.weight"), shapes, prefix, "original")


def diffusers_weights(shapes: Mapping[str, Shape], family: str) -> dict[str, tuple[Shape, str, tuple[str, ...]]]:
    """The same table for a diffusers checkpoint: each original weight's shape rebuilt from its parts."""
    def shape_of(paths: tuple[str, ...], split: str) -> Shape | None:
        parts = [shapes.get(f"{p}.weight") for p in paths]
        if any(s is None for s in parts):
            return None
        first = parts[0]
        assert first is not None
        if split == "swap":
            return first
        if split == "head3":  # q is [hidden, hidden]: its rows are linear1's input width
            return (sum(s[0] for s in parts if s is not None), first[0])
        return (sum(s[0] for s in parts if s is not None), *first[1:])

    return _expand(family, None, shapes, "", "diffusers", shape_of)


def _expand(family: str, original: Any, shapes: Mapping[str, Shape], prefix: str, style: str,
            from_parts: Any = None) -> dict[str, tuple[Shape, str, tuple[str, ...]]]:
    counts: dict[str, int] = {}
    for k in shapes:
        rest = k[len(prefix):] if k.startswith(prefix) else None
        if rest is None:
            continue
        m = re.match(r"(double_blocks|single_blocks|joint_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.", rest)
        if m is not None:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    out: dict[str, tuple[Shape, str, tuple[str, ...]]] = {}
    for path, dpaths, split in RULES[family]:
        scope = path.split(".", 1)[0] if "{i}" in path else None
        if scope is not None and style == "diffusers":
            scope = "single_transformer_blocks" if scope == "single_blocks" else "transformer_blocks"
        n = counts.get(scope, 0) if scope else 1
        for i in range(n):
            p, ds = path.format(i=i), tuple(d.format(i=i) for d in dpaths)
            kind = "swap" if family == "sd3" and path == SD3_LAST_CONTEXT_SWAP and i == n - 1 else split
            shape = original(p) if original is not None else from_parts(ds, kind)
            if shape is not None and len(shape) >= 2:
                out[p] = (tuple(shape), kind, ds)
    return out


def part_prefixes(keys: Iterable[str], part: str) -> tuple[tuple[str, ...], str | None] | None:
    """``(key prefixes kept, prefix removed)`` for ``prune --part`` on a Flux/SD3 single file, else None.

    The VAE's prefix (``vae.`` in Flux files, ``first_stage_model.`` in SD3's) is the one the file uses.
    """
    keys = list(keys)
    family = family_of(keys)
    if family is None or part not in PARTS or not any(k.startswith(TRANSFORMER_PREFIX) for k in keys):
        return None
    comps, strip = PARTS[part]
    prefixes = tuple(p for c in comps for p in COMPONENTS[family].get(c, ()))
    kept = [k for k in keys if k.startswith(prefixes)]
    if part == "vae":
        strip = next((p for p in prefixes if any(k.startswith(p) for k in kept)), None)
    if strip is not None and not all(k.startswith(strip) for k in kept):
        strip = prefixes[0] if len(prefixes) == 1 and all(k.startswith(prefixes[0]) for k in kept) else None
    return prefixes, strip
