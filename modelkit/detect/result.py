"""The result of detection: one frozen dataclass, plus the vocabularies its fields draw from."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Every ``Detection.kind``. ``unknown`` is the answer whenever the evidence is ambiguous.
KINDS = (
    "checkpoint", "vae", "vae-approx", "lora", "embedding", "hypernetwork", "controlnet",
    "text-encoder", "ip-adapter", "t2i-adapter", "upscaler", "unknown",
)
#: Every ``Detection.base`` other than ``None`` (not known, or not tied to one base model).
BASES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux")
CONFIDENCES = ("high", "medium", "low")
_RANK = {"low": 0, "medium": 1, "high": 2}


@dataclass(frozen=True)
class Detection:
    """What a model file is, decided from its keys, shapes, a few tiny tensors and its metadata.

    Attributes:
        kind: one of ``KINDS``.
        subtype: the flavour within the kind (``locon``, ``inpaint``, ``a1111``...), or ``None``.
        base: one of ``BASES``, or ``None`` when unknown or shared by several bases.
        variant: base-specific facts, for example ``{"prediction": "v", "resolution": 768}``.
        confidence: ``high`` (decisive keys and shapes agree), ``medium`` (a weaker route, such as
            metadata alone or a secondary shape), or ``low``.
        evidence: short strings naming the keys, shapes and metadata that decided it, and any
            conflict between them.
        details: structured facts per kind (LoRA ranks and modules, embedding vectors, checkpoint
            components...).
    """

    kind: str
    subtype: str | None = None
    base: str | None = None
    variant: dict[str, Any] = field(default_factory=dict)
    confidence: str = "low"
    evidence: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown detection kind {self.kind!r}")
        if self.base is not None and self.base not in BASES:
            raise ValueError(f"unknown base {self.base!r}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"unknown confidence {self.confidence!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (schema ``modelkit.detect/1``)."""
        return {
            "kind": self.kind, "subtype": self.subtype, "base": self.base, "variant": dict(self.variant),
            "confidence": self.confidence, "evidence": list(self.evidence), "details": _plain(self.details),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_plain(v) for v in items]
    return value


def unknown(evidence: Iterable[str], **details: Any) -> Detection:
    """The honest answer when nothing matched, or when several answers did."""
    return Detection("unknown", None, None, {}, "low", tuple(evidence), dict(details))


def weakest(*levels: str) -> str:
    """The lowest of several confidence levels."""
    return min(levels, key=_RANK.__getitem__)
