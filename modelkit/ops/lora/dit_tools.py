"""Flux.1 and SD3.x in ``lora extract``, ``lora convert`` and ``lora merge``: fused weights both ways.

The original keys fuse what diffusers keeps apart (``qkv`` = ``to_q``, ``to_k``, ``to_v``; Flux's
``linear1`` = those three and ``proj_mlp``; the final modulation's halves swapped). A module is placed by
the key table of the layout the *output* names (``keymap.KeyMap.pieces``), and every module that lands on
one weight of that layout becomes one plain LoRA module there (``combine``):

* the downs are stacked, ``down = [d_1; d_2; ...]`` (rank ``R = Σ r_i``), and ``up`` is block-diagonal:
  the rows each module covers in its own column block, zeros elsewhere, so ``up @ down`` is exactly the
  sum of the modules' products on their rows. Modules with the very same down and scale (the parts of a
  module split before) share one block, so a split and re-fused module comes back as it was. ``alpha = s R``
  keeps the scale ``s = alpha / rank`` of the module whose scale is largest in size; modules of another scale
  have ``s_i / s`` (at most 1 in size) folded into their block of ``up`` (the only rounding). A module of
  alpha 0 has scale 0, as ``loader.Module.scale`` reads it (its block of ``up`` is zeros);
* to kohya (original keys): three diffusers ``to_q``/``to_k``/``to_v`` modules become one ``qkv`` module,
  as kohya's Flux and SD3 trainers save them and ComfyUI loads them;
* to diffusers: a fused module gives each diffusers weight the same down and its rows of ``up`` (exact).

A LoHa, LoKr, (IA)^3 or DoRA module is only passed on when it covers one whole weight of the output
layout; one that would be cut or fused is refused. ``extract`` takes each original weight's difference,
assembled from diffusers weights when the checkpoints are diffusers transformers, so one LoRA in kohya's
Flux/SD3 names comes out of any layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ...errors import UsageError
from .. import families as fam
from . import dit, dit_ref
from . import math as lmath
from .keymap import KeyMap, Target
from .loader import LoraFile, Module

Shape = tuple[int, ...]
DIT = ("flux", "sd3")
#: Key prefixes of the text encoders in a Flux/SD3 single file (kept when a layout is rewritten).
TEXT_PREFIX = "text_encoders."
#: One module's part of one weight: the target (rows of the weight, or all), the rows of the module's up.
Piece = tuple[Target, tuple[int, int] | None, Module]


def as_layout(shapes: Mapping[str, Shape], *, diffusers: bool) -> tuple[str, dict[str, Shape]]:
    """``(family, key -> shape)`` of a Flux/SD3 checkpoint's adaptable weights rewritten in the original
    keys (no prefix) or in diffusers' keys; the text encoders kept as they are.

    Raises:
        UsageError: the shapes hold no Flux or SD3 transformer.
    """
    lay = dit.layout(shapes)
    if lay is None:
        raise UsageError(None, "the checkpoint holds no Flux or SD3 transformer")
    family, style, prefix = lay
    table = (fam.original_weights(shapes, family, prefix) if style == "original"
             else fam.diffusers_weights(shapes, family))
    orig = {f"{p}.weight": shape for p, (shape, _split, _d) in table.items()}
    out = dit_ref.to_diffusers_shapes(orig, family) if diffusers else orig
    out.update({k: tuple(s) for k, s in shapes.items() if k.startswith(TEXT_PREFIX)})
    return family, out


def _fits(km: KeyMap, mod: Module) -> bool:
    pieces = km.pieces(mod.name)
    return pieces is not None and all(lmath.misfit(_cut(mod, rows) if rows and "up" in mod.parts else mod, t.shape)
                                      is None for t, rows in pieces)


def reference_keymap(loras: Sequence[LoraFile], family: str, *, diffusers: bool) -> KeyMap:
    """The key table of the ``family`` size the LoRAs' modules fit best (``dit_ref.VARIANTS``)."""
    best: tuple[int, KeyMap] | None = None
    for _name, shapes in dit_ref.reference_layouts(family, diffusers=diffusers):
        km = KeyMap.build(shapes, family)
        score = sum(_fits(km, m) for lf in loras for m in lf.modules.values())
        if best is None or score > best[0]:
            best = (score, km)
    assert best is not None
    return best[1]


def checkpoint_keymap(shapes: Mapping[str, Shape], base: str | None, *, diffusers: bool) -> KeyMap:
    """The key table of a Flux/SD3 checkpoint's own sizes, in the layout the output names."""
    family, out = as_layout(shapes, diffusers=diffusers)
    return KeyMap.build(out, base or family)


def _cut(mod: Module, rows: tuple[int, int]) -> Module:
    parts = dict(mod.parts)
    parts["up"] = parts["up"][rows[0]:rows[1]]
    return Module(mod.name, mod.algo, parts, dict(mod.keys), mod.alpha, mod.scalar, mod.on_input)


def place(km: KeyMap, lf: LoraFile, missing: list[str]) -> dict[str, list[Piece]]:
    """Every module of ``lf`` cut onto the weights of ``km``: weight key -> pieces (names that match
    nothing go to ``missing``).

    Raises:
        UsageError: a piece does not fit its weight.
    """
    out: dict[str, list[Piece]] = {}
    for name, mod in lf.modules.items():
        pieces = km.pieces(name)
        if pieces is None:
            missing.append(name)
            continue
        for t, rows in pieces:
            plain = mod.algo == "lora" and not mod.dora and "mid" not in mod.parts
            why = lmath.misfit(_cut(mod, rows) if rows is not None else mod, t.shape) \
                if plain or (rows is None and t.rows is None) else None  # others: ``combine`` refuses them
            if why is not None:
                raise UsageError(lf.path, f"module {name} does not fit the {km.base} layout: {why}",
                                 "Pass the right --base, or --checkpoint with the model the LoRA is for")
            out.setdefault(t.key, []).append((t, rows, mod))
    return out


def combine(src: str, km: KeyMap, key: str, pieces: Sequence[Piece]) -> tuple[Target, Module]:
    """The one module that adapts weight ``key`` of ``km``'s layout with all these pieces (see the module doc).

    Raises:
        UsageError: a module that is not a plain LoRA would be cut or fused.
    """
    import torch

    whole = next(t for t in km.targets if t.key == key and t.rows is None)
    mods = list({id(m): m for _t, _r, m in pieces}.values())
    if len(mods) == 1 and all(t.rows is None and r is None for t, r, _m in pieces):
        return whole, mods[0]  # one module on one whole weight: passed on as it is
    for t, _rows, m in pieces:
        if m.algo != "lora" or m.dora or "mid" in m.parts:
            where = f"rows {t.rows[0]}:{t.rows[1]} of {whole.path}" if t.rows else whole.path
            raise UsageError(src, f"module {m.name} ({m.kind}) would have to be cut or fused into {where}, and only "
                                  "a plain LoRA can be", "Convert a plain LoRA, or bake this one with `modelkit merge lora`")
    shape = whole.shape
    out_rows = shape[0]
    # the largest scale (by size) is kept as alpha / rank: the others' ratios to it are at most 1, so no up
    # grows, and an fp16 up is not pushed toward subnormals by a small common scale
    s = max((m.scale() for m in mods), key=abs)
    # one column block per distinct down: modules that share theirs (the parts of a split module) share it again
    blocks: list[tuple[Any, float, tuple[int, int]]] = []  # (down, scale, its columns)
    cols: dict[int, tuple[int, int]] = {}
    at = 0
    for m in mods:
        d = m.parts["down"].reshape(int(m.parts["down"].shape[0]), -1)
        same = next((c for bd, bs, c in blocks if bs == m.scale() and bd.shape == d.shape and bd.dtype == d.dtype
                     and torch.equal(bd, d)), None)
        if same is None:
            same = (at, at + int(d.shape[0]))
            blocks.append((d, m.scale(), same))
            at = same[1]
        cols[id(m)] = same
    total = at
    dt = blocks[0][0].dtype
    down = torch.cat([bd.to(dt) for bd, _s, _c in blocks], dim=0)
    up = torch.zeros(out_rows, total, dtype=mods[0].parts["up"].dtype)
    for t, rows, m in pieces:
        u = m.parts["up"].reshape(int(m.parts["up"].shape[0]), -1)
        if rows is not None:
            u = u[rows[0]:rows[1]]
        f = m.scale() / s if s else 0.0  # all scales 0 (alpha 0, as the loader reads it): nothing is applied
        if f != 1.0:
            u = (u.double() * f).to(up.dtype)
        a, b = t.rows or (0, out_rows)
        c0, c1 = cols[id(m)]
        up[a:b, c0:c1] += u
    down = down.reshape(total, *shape[1:])
    up = up.reshape(out_rows, total, *([1] * (len(shape) - 2)))
    name = "+".join(m.name for m in mods)
    return whole, Module(name, "lora", {"down": down, "up": up}, {}, s * total)


def fused(src: str, km: KeyMap, lf: LoraFile, allow_unmatched: bool, warnings: list[str]) -> list[tuple[Target, Module]]:
    """``lf``'s modules as one module per weight of ``km``'s layout (``place`` then ``combine``).

    Raises:
        UsageError: names that match nothing (without ``allow_unmatched``), or as ``place``/``combine``.
    """
    missing: list[str] = []
    placed = place(km, lf, missing)
    if missing and not allow_unmatched:
        raise UsageError(lf.path, f"{len(missing)} modules have names no {km.base} layer has: {', '.join(missing[:3])}",
                         "Check --base, or pass --allow-unmatched to leave them out")
    if missing:
        warnings.append(f"{lf.path}: {len(missing)} unmatched modules left out (e.g. {missing[0]})")
    return [combine(src, km, key, pieces) for key, pieces in placed.items()]


def refuse_t5(src: str, pairs: Sequence[tuple[Target, Module]], family: str | None, to: str = "diffusers") -> None:
    """diffusers' Flux and SD3 loaders apply no T5 module: such a LoRA is refused for ``--to diffusers``,
    and for ``--to peft`` (whose folders are the diffusers pipeline's components: modelkit writes none for T5)."""
    t5 = [m.name for t, m in pairs if t.component == "t5"]
    if t5:
        pipe = "FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline"
        where = f"which {pipe}.load_lora_weights does not apply" if to == "diffusers" else \
            "for which modelkit writes no PEFT adapter (it writes the transformer's and the CLIP encoders')"
        raise UsageError(src, f"{len(t5)} modules adapt the T5 text encoder (e.g. {t5[0]}), {where}",
                         "Keep the kohya file (ComfyUI applies it), or bake it with `modelkit merge lora`")


def extract(mb: Any, mt: Any, tuned: str, rank: int, compute: Any, cast: Any, min_diff: float,
            progress: Callable[[str, int], None] | None, overflow: dict[str, int],
            name_tensors: Callable[[str, Any, Any], list[Any]]) -> tuple[list[Any], int]:
    """The transformer part of ``extract_lora`` for Flux/SD3: one SVD per original weight (fused ones whole).

    ``name_tensors(name, up, down)`` gives a module's output tensors. Returns (tensors, modules skipped).

    Raises:
        UsageError: the tuned checkpoint lacks a weight, or its shape differs.
        FormatError: a weight holds NaN or inf.
    """
    import torch

    shapes = {k: tuple(r.shape) for k, r in mb.items()}
    lay = dit.layout(shapes)
    assert lay is not None
    family, style, prefix = lay
    table = (fam.original_weights(shapes, family, prefix) if style == "original"
             else fam.diffusers_weights(shapes, family))
    tensors: list[Any] = []
    skipped = 0
    for path, (shape, split, dpaths) in table.items():
        parts: list[tuple[str, tuple[int, int, int, int] | None]]
        if style == "original":
            parts = [(f"{prefix}{path}.weight", None)]
        else:
            parts = [(f"{d}.weight", (a, b, da, db)) for a, b, d, da, db, _rows in fam.segments(split, dpaths, shape)]
        diff = torch.empty(shape, dtype=compute)
        from .extract import weight_diff

        for key, where in parts:
            d = weight_diff(mb, mt, key, tuned, compute)
            ref_b = mb[key]
            if where is None:
                diff.copy_(d)
            else:
                a, b, da, db = where
                diff[a:b] = d[da:db]
            if progress is not None:
                progress(key, ref_b.nbytes)
        if float(diff.abs().max()) <= min_diff:
            skipped += 1
            continue
        from .extract import svd_factors

        up, down = svd_factors(diff, shape, rank)
        tensors += name_tensors("lora_unet_" + path.replace(".", "_"), up, down)
    return tensors, skipped

