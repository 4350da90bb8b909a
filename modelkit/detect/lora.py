"""The LoRA family: kohya LoRA/LoCon, LyCORIS (LoHa, LoKr, IA3, GLoRA, full, DoRA, OFT, DyLoRA),
and the diffusers, PEFT, ComfyUI, BFL and XLabs key styles.

A module's algorithm comes from its tensor suffixes (``tables.LORA_SUFFIXES``), its component
(unet, te, te1, te2, te3) and key style from its name (``tables.LORA_NAMESPACES``). The base
comes from the input width of the modules that project the cross-attention context (768 SD1,
1024 SD2, 2048 SDXL), from DiT block names (Flux, SD3), then from text-encoder modules.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import tables
from .meta import read_hints, reconcile
from .result import Detection
from .view import MAX_ALPHA_READS, KeyView, rx

_SUFFIXES = sorted(tables.LORA_SUFFIXES, key=lambda row: -len(row[0]))


@dataclass
class _Module:
    name: str
    parts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    algos: set[str] = field(default_factory=set)

    def algo(self) -> str | None:
        a = self.algos - {"dora"}
        main = sorted(a)[0] if len(a) == 1 else ("mixed" if a else None)
        if "dora" in self.algos and main in ("lora", None):
            return "dora"
        return main

    def rank(self) -> int | None:
        p = self.parts
        for role in ("down", "w1_b"):
            if role in p and len(p[role]) >= 2:
                return p[role][0]
        if "w2_b" in p:
            return p["w2_b"][0]
        if "a2" in p:
            return p["a2"][0]
        return None

    def in_width(self, view: KeyView) -> int | None:
        """The input width of the layer this module adapts (None when its tensors cannot tell)."""
        found = self.width(view)
        return found[0] if found else None

    def width(self, view: KeyView) -> tuple[int, str] | None:
        """``(input width, the key that shows it)``; IA3 reads its tiny ``on_input`` flag to know."""
        p, k = self.parts, self.keys
        if "down" in p and len(p["down"]) == 2:
            return p["down"][1], k["down"]
        if "w1_b" in p and "w1_a" in p and len(p["w1_b"]) == 2:
            return p["w1_b"][1], k["w1_b"]
        w1, w2 = ("w1" if "w1" in p else "w1_b"), ("w2" if "w2" in p else "w2_b")
        if w1 in p and w2 in p and len(p[w1]) == 2 and len(p[w2]) == 2:
            return p[w1][1] * p[w2][1], f"{k[w1]} x {k[w2]}"
        for role in ("a2", "diff"):
            if role in p and len(p[role]) == 2:
                return p[role][1], k[role]
        if "weight" in p and "on_input" in k and view.scalar(k["on_input"]) == 1.0:
            return p["weight"][-1], f"{k['weight']} (on_input=1)"
        return None


def _sample_key(mod: _Module) -> str:
    return next((k for role, k in mod.keys.items() if role != "alpha"), next(iter(mod.keys.values())))


def _namespace(module: str) -> tuple[str, str]:
    for pattern, component, style in tables.LORA_NAMESPACES:
        if rx(pattern).search(module):
            return component, style
    return "other", "other"


def _collect(view: KeyView) -> tuple[dict[str, _Module], list[str]]:
    modules: dict[str, _Module] = {}
    rest: list[str] = []
    for key in view.names:
        for suffix, algo, role in _SUFFIXES:
            if key.endswith(suffix) and len(key) > len(suffix):
                mod = modules.setdefault(key[: -len(suffix)], _Module(key[: -len(suffix)]))
                mod.parts[role] = view.shape(key) or ()
                mod.keys[role] = key
                if algo:
                    mod.algos.add(algo)
                break
        else:
            rest.append(key)
    leftover = []
    for key in rest:  # IA3 keeps its vector as ``<module>.weight`` beside ``<module>.on_input``
        owner = modules.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if owner is not None and "on_input" in owner.parts:
            owner.parts["weight"] = view.shape(key) or ()
            owner.keys["weight"] = key
        else:
            leftover.append(key)
    return modules, leftover


def _is_locon(mod: _Module) -> bool:
    down = mod.parts.get("down", ())
    if len(down) == 4 and (down[2] > 1 or down[3] > 1):
        return True
    return any(rx(p).search(mod.name) for p in tables.LOCON_MODULE)


def _base_from_shapes(view: KeyView, mods: list[_Module], components: Counter[str], evidence: list[str],
                      conflicts: list[str]) -> tuple[str | None, str]:
    """(base, confidence) from module names and shapes alone."""
    names = [m.name for m in mods]
    dit = {base for pattern, base in tables.DIT_MARKERS if any(rx(pattern).search(n) for n in names)}
    base: str | None = None
    level = "medium"
    if len(dit) == 1:
        base, level = dit.pop(), "high"
        evidence.append(f"module names of the {base} denoiser ({_example(names, tables.DIT_MARKERS)})")
    elif dit:
        evidence.append(f"module names of several denoisers {sorted(dit)}")
        return None, "low"
    widths: dict[int, str] = {}
    for m in mods:
        if _component(m) == "unet" and rx(tables.CROSS_ATTN_MODULE).search(m.name) and (found := m.width(view)):
            widths.setdefault(*found)
    if len(widths) > 1:
        evidence.append(f"cross-attention modules disagree on the context width {sorted(widths)}")
        return None, "low"
    if widths:
        width, key = next(iter(widths.items()))
        wbase = tables.CONTEXT_WIDTH_BASE.get(width)
        evidence.append(f"{key} {list(view.shape(key) or ())}: context width {width} -> {wbase}"
                        if key in view.nameset else f"{key}: context width {width} -> {wbase}")
        if base is None and wbase:
            base, level = wbase, "high"
        elif wbase and base != wbase:
            conflicts.append(f"conflict: context width {width} ({wbase}) contradicts the {base} module names")
            evidence.append(conflicts[-1])
    if base is None and not dit:
        for m in mods:
            if rx(tables.DIT_ATTN_MODULE).search(m.name) and (w := m.in_width(view)) in tables.DIT_HIDDEN_BASE:
                base, level = tables.DIT_HIDDEN_BASE[w], "high"
                evidence.append(f"{m.name} input width {w} -> {base}")
                break
    te_base = _text_base(view, mods, components, evidence)
    if base is None and te_base in ("sd1", "sd2", "sdxl") and any(n.startswith("transformer.") for n in names):
        evidence.append(f"the denoiser is a DiT transformer (transformer.*), so not {te_base}: base not known")
        te_base = None  # diffusers names a UNet ``unet.``; the metadata, if any, decides
    if base is None and te_base:
        base, level = te_base, "medium"
    elif te_base and base and te_base != base and not (te_base == "sdxl" and base == "sd3"):
        conflicts.append(f"conflict: text-encoder modules say {te_base}, the denoiser modules say {base} (denoiser wins)")
        evidence.append(conflicts[-1])
    if base is None and any(rx(tables.SDXL_DEPTH_MODULE).search(n) for n in names):
        base = "sdxl"
        evidence.append("UNet transformer blocks numbered 2 and up: only the SDXL family (base or refiner) "
                        "is that deep -> sdxl")
    return base, level


def _component(m: _Module) -> str:
    return _namespace(m.name)[0]


#: A T5 encoder module (``encoder.block.N.layer.M...``), whatever its prefix.
T5_MODULE = r"(?:^|[._])encoder[._]block[._]\d+[._]layer[._]\d+[._]"


def _text_base(view: KeyView, mods: list[_Module], components: Counter[str], evidence: list[str]) -> str | None:
    t5_te2 = [m.name for m in mods if _component(m) == "te2" and rx(T5_MODULE).search(m.name)]
    if t5_te2:
        evidence.append(f"T5 modules as the second text encoder ({t5_te2[0]}: OneTrainer's and diffusers' Flux "
                        "names) -> flux")
        return "flux"
    if components.get("te3"):  # kohya names T5 ``lora_te3_`` for Flux and SD3 alike; only SD3 has a CLIP-G (te2)
        if components.get("te2"):
            evidence.append("a third text encoder (T5) beside a second (CLIP-G) -> sd3")
            return "sd3"
        evidence.append("a T5 text encoder (te3): Flux or SD3")
        return None
    if components.get("te2"):
        evidence.append("modules for a second text encoder (te2) -> sdxl")
        return "sdxl"
    for m in mods:
        if _component(m) == "te" and rx(tables.TEXT_ATTN_MODULE).search(m.name):
            w = m.in_width(view)
            if w in (768, 1024):
                base = "sd1" if w == 768 else "sd2"
                evidence.append(f"text-encoder module {m.name} width {w} -> {base}")
                return base
    return None


def _example(names: list[str], markers: tuple[tuple[str, str], ...]) -> str:
    for n in names:
        if any(rx(p).search(n) for p, _ in markers):
            return n
    return names[0]


def _alphas(view: KeyView, mods: list[_Module]) -> list[float]:
    out: set[float] = set()
    for m in mods[:MAX_ALPHA_READS]:
        key = m.keys.get("alpha")
        if key is not None and (v := view.scalar(key, budget=False)) is not None:
            out.add(round(v, 6))
    return sorted(out)


def _network_algo(md: dict[str, str]) -> str | None:
    raw = md.get("ss_network_args")
    if not raw:
        return None
    try:
        args = json.loads(raw)
    except ValueError:
        return None
    algo = args.get("algo") if isinstance(args, dict) else None
    return str(algo).lower() if algo else None


def lora(view: KeyView) -> Detection | None:
    """Detect a LoRA-family file; None when no module has LoRA-family tensors."""
    modules, leftover = _collect(view)
    mods = [m for m in modules.values() if m.algos]
    if not mods:
        return None
    algos: Counter[str] = Counter()
    for m in mods:
        a = m.algo() or "other"
        algos["locon" if a == "lora" and _is_locon(m) else a] += 1
    components: Counter[str] = Counter()
    styles: Counter[str] = Counter()
    for m in mods:
        comp, style = _namespace(m.name)
        components[comp] += 1
        styles[style] += 1
    style = styles.most_common(1)[0][0]
    main = algos.most_common(1)[0][0]
    evidence = [f"{len(mods)} modules with {', '.join(f'{a} ({n})' for a, n in algos.most_common())} tensors, "
                f"{style} key style (e.g. {_sample_key(mods[0])})"]
    conflicts: list[str] = []
    base, level = _base_from_shapes(view, mods, components, evidence, conflicts)
    hints = read_hints(view.metadata)
    base, from_meta = reconcile(base, hints, evidence, conflicts)
    if from_meta:
        level = "medium"
    network = view.metadata.get("ss_network_module", "")
    subtype = main
    if main in ("lora", "locon") and algos.get("locon"):
        subtype = "locon"
    elif main == "lora":
        subtype = style if style in ("diffusers", "diffusers-attnproc", "peft") else "lora"
        if "dylora" in network.lower() or _network_algo(view.metadata) == "dylora":
            subtype = "dylora"
            evidence.append("metadata names DyLoRA (saved like a plain LoRA)")
    if leftover:
        evidence.append(f"{len(leftover)} keys outside the LoRA layout (e.g. {leftover[0]})")
        if len(leftover) > len(mods):
            level = "low"
    if conflicts:
        level = "medium" if level == "high" else level
    ranks = sorted({r for m in mods if (r := m.rank()) is not None})
    conv_ranks = sorted({m.parts["down"][0] for m in mods if len(m.parts.get("down", ())) == 4})
    bundled = sorted({m.name.split(".")[1] for m in modules.values() if m.name.startswith("bundle_emb.")}
                     | {k.split(".")[1] for k in leftover if k.startswith("bundle_emb.")})
    details: dict[str, Any] = {
        "key_style": style, "algorithms": dict(algos), "module_count": len(mods), "ranks": ranks,
        "alphas": _alphas(view, mods), "modules": dict(components),
        "unet_only": set(components) == {"unet"}, "text_encoder_only": bool(components) and "unet" not in components,
    }
    if conv_ranks:
        details["conv_ranks"] = conv_ranks
    if any("mid" in m.parts or "t1" in m.parts or "t2" in m.parts for m in mods):
        details["tucker"] = True
    if bundled:
        details["bundled_embeddings"] = bundled
    if network:
        details["network_module"] = network
    if (algo := _network_algo(view.metadata)) is not None:
        details["network_args_algo"] = algo
    if leftover:
        details["unrecognised_keys"] = len(leftover)
    if conflicts:
        details["conflicts"] = conflicts
    return Detection("lora", subtype, base, {}, level if base else weakest_medium(level), tuple(evidence), details)


def weakest_medium(level: str) -> str:
    """A LoRA whose base is unknown is still certainly a LoRA: at most medium, at least low."""
    return "low" if level == "low" else "medium"
