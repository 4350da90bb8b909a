"""The matcher engine: an ordered table of rules, each a signature (``tables.SIGNATURES``) plus the
analyser that reads the shapes.

Every rule whose signature matches is analysed. The most confident answer wins; a tie at the top
between two different kinds is ambiguous, and the answer is then ``unknown`` naming both.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..model import ModelFile
from ..reading import open_model
from . import adapters, checkpoint, embedding, hypernetwork, lora, misc, tables, vae
from .result import _RANK, Detection, unknown
from .view import KeyView, rx


@dataclass(frozen=True)
class Rule:
    """One row of the table: the signature named ``name`` in ``tables.SIGNATURES``, the kind it
    claims, and the analyser that decides (or declines with None)."""

    name: str
    kind: str
    analyse: Callable[[KeyView], Detection | None]


#: The order matters only between rules of equal confidence.
RULES: tuple[Rule, ...] = (
    Rule("optimizer-state", "unknown", hypernetwork.optimizer_state),
    Rule("hypernetwork", "hypernetwork", hypernetwork.hypernetwork),
    Rule("embedding.a1111", "embedding", embedding.a1111),
    Rule("embedding.emb_params", "embedding", embedding.emb_params),
    Rule("embedding.sdxl", "embedding", embedding.sdxl),
    Rule("embedding.single", "embedding", embedding.single),
    Rule("ip-adapter", "ip-adapter", adapters.ip_adapter),
    Rule("ip-adapter.flux", "ip-adapter", adapters.ip_adapter_flux),
    Rule("controlnet.control-lora", "controlnet", adapters.control_lora),
    Rule("controlnet.ldm", "controlnet", adapters.controlnet_ldm),
    Rule("controlnet.diffusers", "controlnet", adapters.controlnet_diffusers),
    Rule("controlnet.mmdit", "controlnet", adapters.controlnet_mmdit),
    Rule("controlnet.lllite", "controlnet", adapters.controlnet_lllite),
    Rule("t2i-adapter", "t2i-adapter", adapters.t2i_adapter),
    Rule("lora", "lora", lora.lora),
    Rule("checkpoint.sd3", "checkpoint", checkpoint.sd3),
    Rule("checkpoint.flux", "checkpoint", checkpoint.flux),
    Rule("checkpoint.ldm", "checkpoint", checkpoint.ldm),
    Rule("checkpoint.diffusers-unet", "checkpoint", checkpoint.diffusers_unet),
    Rule("checkpoint.diffusers-flux", "checkpoint", checkpoint.diffusers_flux),
    Rule("checkpoint.diffusers-sd3", "checkpoint", checkpoint.diffusers_sd3),
    Rule("vae-approx", "vae-approx", vae.vae_approx),
    Rule("vae.ldm", "vae", vae.vae_ldm),
    Rule("vae.diffusers", "vae", vae.vae_diffusers),
    Rule("text-encoder.clip", "text-encoder", misc.clip),
    Rule("text-encoder.openclip", "text-encoder", misc.openclip),
    Rule("text-encoder.t5", "text-encoder", misc.t5),
    Rule("upscaler.esrgan-old", "upscaler", misc.esrgan_old),
    Rule("upscaler.esrgan", "upscaler", misc.esrgan),
    Rule("upscaler.real-esrgan", "upscaler", misc.real_esrgan),
    Rule("upscaler.compact", "upscaler", misc.compact),
)


def signature_matches(view: KeyView, name: str) -> bool:
    """Whether the file passes the signature ``tables.SIGNATURES[name]``.

    Args:
        view: the file.
        name: a key of ``tables.SIGNATURES``.

    Returns:
        True when every clause the signature has holds.
    """
    sig = tables.SIGNATURES[name]
    max_keys = sig.get("max_keys")
    if isinstance(max_keys, int) and len(view) > max_keys:
        return False
    extras_any = _patterns(sig, "extras_any")
    any_ = _patterns(sig, "any")
    hit_any = any(view.find(p) is not None for p in any_) if any_ else True
    if extras_any and not hit_any:
        hit_any = any(k in view.extras for k in extras_any)
    if not hit_any:
        return False
    if not all(view.find(p) is not None for p in _patterns(sig, "all")):
        return False
    if any(view.find(p) is not None for p in _patterns(sig, "none")):
        return False
    only = [rx(p) for p in _patterns(sig, "only")]
    return not only or all(any(p.search(n) for p in only) for n in view.names)


def _patterns(sig: dict[str, tuple[str, ...] | int], clause: str) -> tuple[str, ...]:
    value = sig.get(clause, ())
    return value if isinstance(value, tuple) else ()


def detect_view(view: KeyView) -> Detection:
    """Run the rule table on one file's view.

    Args:
        view: names, shapes, metadata and extras of the file.

    Returns:
        The Detection; ``unknown`` when nothing matched or the best answers disagree.
    """
    if len(view) == 0:
        if "optimizer_name" in view.extras:
            return Detection("unknown", "optimizer-state", None, {}, "high",
                             ("optimizer_name but no tensors: an empty optimizer state",), {})
        return unknown(["no tensors in the file"], tensors=0)
    found: list[tuple[Rule, Detection]] = []
    for rule in RULES:
        if signature_matches(view, rule.name):
            result = rule.analyse(view)
            if result is not None:
                found.append((rule, result))
    if not found:
        n = len(view)
        return unknown([f"no rule matched {n:,} tensor{'' if n == 1 else 's'}; top-level names: {_top_names(view)}"],
                       tensors=len(view))
    best = max(_RANK[d.confidence] for _, d in found)
    top = [(r, d) for r, d in found if _RANK[d.confidence] == best]
    kinds = {d.kind for _, d in top}
    if len(kinds) > 1:
        return unknown([f"ambiguous: rule {r.name} says {d.kind} ({d.confidence})" for r, d in top]
                       + [e for _, d in top for e in d.evidence], candidates=[r.name for r, _ in top])
    rule, result = top[0]
    details = {**result.details, "rule": rule.name}
    others = [r.name for r, _ in found if r is not rule]
    if others:
        details["also_matched"] = others
    return replace(result, details=details)


def _top_names(view: KeyView) -> str:
    counts = Counter(n.split(".", 1)[0] for n in view.names)
    return ", ".join(f"{k} ({v})" for k, v in counts.most_common(5))


def detect_modelfile(mf: ModelFile) -> Detection:
    """Detect an already-open ModelFile (its path is used only to find a ``.yaml`` beside it)."""
    return detect_view(KeyView.of(mf))


def detect(target: str | os.PathLike[str] | ModelFile) -> Detection:
    """Detect what a model file is from its content: kind, subtype, base model and variant.

    Decisions use key names, shapes, metadata and at most a few tiny tensors, never the file or
    folder name. For SD2 checkpoints a ``.yaml`` beside the file may name the prediction type.

    Args:
        target: a file path, a diffusers folder (see ``detect_folder``), or an open ModelFile.

    Returns:
        A Detection (``kind`` is ``unknown`` when the evidence is missing or ambiguous).

    Raises:
        ModelkitError: the file cannot be read safely (see ``open_model``).

    Example:
        >>> modelkit.detect("v1-5-pruned-emaonly.safetensors").base  # doctest: +SKIP
        'sd1'
    """
    if isinstance(target, ModelFile):
        return detect_modelfile(target)
    path = os.fspath(target)
    if os.path.isdir(path):
        from .folder import detect_folder

        return detect_folder(path)
    with open_model(path) as mf:
        return detect_modelfile(mf)
