"""LoRA module names for a Flux.1 or SD3.x transformer, in every key style, onto the checkpoint's weights.

A module is named either in the original keys (BFL / Stability: ``double_blocks.0.img_attn.qkv``) or in
diffusers' (``transformer_blocks.0.attn.to_q``); ``families.RULES`` says which rows of an original
weight each diffusers weight is. Styles registered:

* original: bare (BFL control LoRAs), ``diffusion_model.`` (ComfyUI), ``lora_unet_`` with ``_`` (kohya
  sd-scripts), and XLabs' processor names (``double_blocks.0.processor.qkv_lora1`` = ``img_attn.qkv``,
  ``..._lora2`` = ``txt_attn.qkv``, ``proj_lora1``/``proj_lora2``; ``single_blocks.0.processor.qkv_lora``
  = the q, k, v rows of ``linear1``, ``proj_lora`` = ``linear2``; the loader names those modules
  ``processor.qkv_lora1`` ... and ``processor.qkv``/``processor.proj``);
* diffusers: ``transformer.`` (diffusers, PEFT via diffusers), bare, ``base_model.model.`` (PEFT), and
  ``lora_transformer_`` with ``_`` (kohya's names for diffusers-trained LoRAs).

When the checkpoint keeps apart what the module's style fuses, or the reverse, the module's delta
``up @ down`` is cut by rows of ``up`` (``KeyMap.splits``): a diffusers ``to_q`` module adapts rows
``0:h`` of ``img_attn.qkv``; a ``img_attn.qkv`` module on a diffusers checkpoint gives ``to_q`` the
first third of ``up``'s rows, and so on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .. import families as fam

if TYPE_CHECKING:
    from .keymap import KeyMap, Target

Shape = tuple[int, ...]

#: XLabs module names (as the loader names them) per original path inside a block, and the rows
#: they cover: None all, ``"qkv"`` the q, k, v rows of a single block's ``linear1``.
XLABS = (
    ("img_attn.qkv", "processor.qkv_lora1", None), ("txt_attn.qkv", "processor.qkv_lora2", None),
    ("img_attn.proj", "processor.proj_lora1", None), ("txt_attn.proj", "processor.proj_lora2", None),
    ("linear1", "processor.qkv", "qkv"), ("linear2", "processor.proj", None),
)
Styles = tuple[tuple[str, str], ...]
#: Original-key styles: (prefix, separator); XLabs' names take the first two.
ORIGINAL_STYLES: Styles = (("", "."), ("diffusion_model.", "."), ("lora_unet_", "_"))
XLABS_STYLES: Styles = (("", "."), ("diffusion_model.", "."))
#: Diffusers-key styles: (prefix, separator).
DIFFUSERS_STYLES: Styles = (("transformer.", "."), ("", "."), ("base_model.model.", "."), ("lora_transformer_", "_"),
                    ("diffusion_model.", "."))


def layout(shapes: Mapping[str, Shape]) -> tuple[str, str, str] | None:
    """``(family, style, prefix)`` of a DiT checkpoint (style ``original`` or ``diffusers``), else None."""
    family = fam.family_of(shapes)
    if family is None:
        return None
    marker = "double_blocks." if family == "flux" else "joint_blocks."
    for k in shapes:
        at = k.find(marker)
        if at >= 0 and (at == 0 or k[at - 1] == "."):
            return family, "original", k[:at]
    return family, "diffusers", ""


def _block(path: str) -> str:
    head = path.split(".", 1)[0]
    return {"double_blocks": "double", "single_blocks": "single", "joint_blocks": "joint"}.get(head, "top")


def _xlabs(path: str, shape: Shape) -> list[tuple[str, tuple[int, int]]]:
    """XLabs' names for an original Flux weight, each with the rows it covers."""
    block, _, rest = path.partition(".")
    num, _, inner = rest.partition(".")
    if block not in ("double_blocks", "single_blocks"):
        return []
    return [(f"{block}.{num}.{xname}", (0, 3 * shape[1]) if rows == "qkv" else (0, shape[0]))
            for suffix, xname, rows in XLABS if inner == suffix]


def add(km: KeyMap, shapes: Mapping[str, Shape], family: str, style: str, prefix: str) -> set[str]:
    """Register every module name of the transformer in ``shapes`` into ``km``; returns the keys covered."""
    from .keymap import Target

    table = (fam.original_weights(shapes, family, prefix) if style == "original"
             else fam.diffusers_weights(shapes, family))
    covered: set[str] = set()
    for path, (shape, split, dpaths) in table.items():
        try:
            segs = fam.segments(split, dpaths, shape)
        except ValueError:
            continue
        block = _block(path)
        spans: list[tuple[Styles, str, tuple[int, int]]] = [(ORIGINAL_STYLES, path, (0, shape[0]))]
        if family == "flux":
            spans += [(XLABS_STYLES, name, rows) for name, rows in _xlabs(path, shape)]
        if style == "original":
            key = f"{prefix}{path}.weight"
            covered.add(key)
            whole = Target(key, shape, None, "unet", path, path, block)
            km.targets.append(whole)
            for styles, name, (lo, hi) in spans:
                t = whole if (lo, hi) == (0, shape[0]) else \
                    Target(key, (hi - lo, *shape[1:]), (lo, hi), "unet", name, path, block)
                _register(km, styles, name, t)
            for dpath, parts in _by_dpath(segs).items():
                if len(parts) == 1 and parts[0][3:5] == (0, parts[0][5]):
                    a, b = parts[0][0], parts[0][1]
                    sub = Target(key, (b - a, *shape[1:]), None if (a, b) == (0, shape[0]) else (a, b), "unet",
                                 dpath, path, block)
                    _register(km, DIFFUSERS_STYLES, dpath, sub)
                else:  # a diffusers module whose rows sit elsewhere in the original (a swap)
                    _split(km, DIFFUSERS_STYLES, dpath, [
                        (Target(key, (s[1] - s[0], *shape[1:]), (s[0], s[1]), "unet", dpath, path, block), (s[3], s[4]))
                        for s in parts])
            continue
        for dpath in dict.fromkeys(s[2] for s in segs):
            dkey = f"{dpath}.weight"
            covered.add(dkey)
            t = Target(dkey, tuple(shapes[dkey]), None, "unet", dpath, path, block)
            km.targets.append(t)
            _register(km, DIFFUSERS_STYLES, dpath, t)
        for styles, name, (lo, hi) in spans:  # an original-style module cut into the diffusers weights
            pieces = []
            for a, b, dpath, da, db, drows in segs:
                if a >= lo and b <= hi:
                    dshape = tuple(shapes[f"{dpath}.weight"])
                    t = Target(f"{dpath}.weight", (db - da, *dshape[1:]), None if (da, db) == (0, drows) else (da, db),
                               "unet", dpath, path, block)
                    pieces.append((t, (a - lo, b - lo)))
            if len(pieces) == 1 and pieces[0][1] == (0, hi - lo) and pieces[0][0].rows is None:
                _register(km, styles, name, pieces[0][0])
            else:
                _split(km, styles, name, pieces)
    return covered


def _by_dpath(segs: list[fam.Segment]) -> dict[str, list[fam.Segment]]:
    out: dict[str, list[fam.Segment]] = {}
    for s in segs:
        out.setdefault(s[2], []).append(s)
    return out


def _register(km: KeyMap, styles: tuple[tuple[str, str], ...], path: str, target: Target) -> None:
    for prefix, sep in styles:
        km._register(prefix + path.replace(".", sep), target)


def _split(km: KeyMap, styles: tuple[tuple[str, str], ...], path: str,
           pieces: list[tuple[Target, tuple[int, int]]]) -> None:
    for prefix, sep in styles:
        km.splits[prefix + path.replace(".", sep)] = pieces
