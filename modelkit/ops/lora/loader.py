"""Read a LoRA-family file into modules held in RAM (a LoRA is small; the checkpoint is not).

Tensors are grouped into modules by their suffix, using the same table detection uses
(``detect.tables.LORA_SUFFIXES``); the file must be detected as a LoRA. Each module keeps its
tensors in the dtype they were stored in; the maths casts them when it uses them.

Scale of a module (as AUTOMATIC1111 and ComfyUI apply it): a LyCORIS ``.scale`` tensor when present,
else ``alpha / rank`` when the file has an alpha, else 1. LoKr with full (not factorised) ``w1`` and
``w2`` and (IA)^3 always have scale 1. A PEFT adapter saved without alphas takes ``lora_alpha`` and
``r`` (``use_rslora``: ``alpha / sqrt(r)``) from an ``adapter_config.json`` beside the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ...detect import Detection, detect_modelfile
from ...detect.tables import LORA_SUFFIXES
from ...errors import FormatError, UsageError
from ...formats import open_model

_SUFFIXES = sorted(LORA_SUFFIXES, key=lambda row: -len(row[0]))
#: Algorithms ``merge`` can apply.
SUPPORTED = ("lora", "loha", "lokr", "ia3")
#: The suffix of LyCORIS's DoRA magnitude, whose shape says its axis (PEFT's is always per output row).
LYCORIS_DORA = ".dora_scale"
#: LoRA-family algorithms it cannot, with why.
UNSUPPORTED = {"glora": "GLoRA", "full": "LyCORIS full (diff) modules", "oft": "OFT/BOFT"}


@dataclass
class Module:
    """One adapted layer of a LoRA file.

    Attributes:
        name: the module name in the file (``lora_unet_down_blocks_0_..._to_q``).
        algo: ``lora`` (LoRA/LoCon, with ``mid`` for Tucker, ``magnitude`` for DoRA), ``loha``,
            ``lokr`` or ``ia3``.
        parts: role -> tensor (``down``, ``up``, ``mid``, ``magnitude``, ``w1_a`` ..., ``weight``).
        keys: role -> the tensor's key in the file.
        alpha: the stored alpha, if any.
        scalar: a LyCORIS ``.scale`` value, if any.
        on_input: (IA)^3 scales the layer's input (columns) rather than its output (rows); DoRA
            normalises per input column rather than per output row (LyCORIS ``dora_scale`` of shape
            ``[1, in, ...]``; PEFT's ``lora_magnitude_vector`` is always per output, even when a
            convolution's is stored as ``[1, out, 1, 1]``).
    """

    name: str
    algo: str
    parts: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    alpha: float | None = None
    scalar: float | None = None
    on_input: bool = False

    @property
    def rank(self) -> int | None:
        p = self.parts
        if self.algo == "lora":
            return int(p["down"].shape[0])
        if self.algo == "loha":
            return int(p["w1_b"].shape[0])
        if self.algo == "lokr":
            for role in ("w1_b", "w2_b"):
                if role in p:
                    return int(p[role].shape[0])
        return None

    @property
    def dora(self) -> bool:
        return "magnitude" in self.parts

    @property
    def kind(self) -> str:
        """A label for reports: lora, locon-tucker, dora, loha, lokr, ia3."""
        if self.algo == "lora":
            if self.dora:
                return "dora"
            return "lora-tucker" if "mid" in self.parts else "lora"
        return self.algo

    def scale(self) -> float:
        """The factor applied to this module's product (before the user's ratio)."""
        if self.scalar is not None:
            return self.scalar
        if self.algo == "ia3":
            return 1.0
        rank = self.rank
        if self.alpha is None or rank is None:
            return 1.0
        return self.alpha / rank

    def nbytes(self) -> int:
        return sum(int(t.numel()) * t.element_size() for t in self.parts.values())


@dataclass
class LoraFile:
    """A LoRA-family file loaded for merging.

    Attributes:
        path: the file; sha256: its sha256 (hex).
        modules: module name -> Module, in file order.
        detection: what ``modelkit.detect`` says (kind ``lora``; base and key style in its fields).
        metadata: the file's string metadata.
        leftover: keys that belong to no module (bundled embeddings, unknown tensors).
        notes: how scales were decided, when not from the file itself.
    """

    path: str
    sha256: str
    modules: dict[str, Module]
    detection: Detection
    metadata: dict[str, str]
    leftover: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def base(self) -> str | None:
        return self.detection.base

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.modules.values())

    def algorithms(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            out[m.kind] = out.get(m.kind, 0) + 1
        return out


def load_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read a LoRA-family file into RAM.

    Raises:
        UsageError: the file is not a LoRA, or holds an algorithm merging does not support.
        FormatError: a module lacks a tensor its algorithm needs.
    """
    p = os.fspath(path)
    with open_model(p) as mf:
        det = detect_modelfile(mf)
        if det.kind != "lora":
            raise UsageError(p, f"is not a LoRA (detected as {det.kind}{' ' + det.subtype if det.subtype else ''})",
                             "Pass a LoRA, LoCon, LyCORIS, diffusers or PEFT LoRA file")
        modules: dict[str, Module] = {}
        algos: dict[str, set[str]] = {}
        leftover: list[str] = []
        for key, ref in mf.items():
            for suffix, algo, role in _SUFFIXES:
                if key.endswith(suffix) and len(key) > len(suffix):
                    name = key[: -len(suffix)]
                    if suffix.startswith(("_lora1.", "_lora2.")):  # XLabs: ``qkv_lora1`` (image) and ``qkv_lora2`` (text)
                        name += suffix[:6]
                    mod = modules.setdefault(name, Module(name, ""))
                    mod.parts[role] = ref.read("torch")
                    mod.keys[role] = key
                    if algo:
                        algos.setdefault(name, set()).add(algo)
                    break
            else:
                leftover.append(key)
        rest = []
        for key in leftover:  # (IA)^3 keeps its vector as ``<module>.weight`` beside ``<module>.on_input``
            owner = modules.get(key[: -len(".weight")]) if key.endswith(".weight") else None
            if owner is not None and "on_input" in owner.parts:
                owner.parts["weight"] = mf[key].read("torch")
                owner.keys["weight"] = key
            else:
                rest.append(key)
        metadata = dict(mf.metadata)
    out: dict[str, Module] = {}
    for name, mod in modules.items():
        kinds = algos.get(name, set())
        if not kinds:  # only an alpha or scale: nothing to apply
            rest.extend(mod.keys.values())
            continue
        _finish(p, mod, kinds)
        out[name] = mod
    lf = LoraFile(p, _sha256(p), out, det, metadata, rest)
    _peft_alphas(lf)
    return lf


def _finish(path: str, mod: Module, kinds: set[str]) -> None:
    main = kinds - {"dora"}
    for algo in main:
        if algo in UNSUPPORTED:
            raise UsageError(path, f"module {mod.name} is {UNSUPPORTED[algo]}, which merge cannot apply",
                             "Merge LoRA, LoCon, LoHa, LoKr, (IA)^3 or DoRA modules")
    if len(main) > 1:
        raise FormatError(path, f"module {mod.name} mixes {sorted(main)} tensors")
    mod.algo = next(iter(main)) if main else "lora"
    need = {"lora": ("down", "up"), "loha": ("w1_a", "w1_b", "w2_a", "w2_b"), "ia3": ("weight", "on_input")}
    missing = [r for r in need.get(mod.algo, ()) if r not in mod.parts]
    if mod.algo == "lokr":
        if "w1" not in mod.parts and not {"w1_a", "w1_b"} <= set(mod.parts):
            missing.append("lokr_w1")
        if "w2" not in mod.parts and not {"w2_a", "w2_b"} <= set(mod.parts):
            missing.append("lokr_w2")
    if missing:
        raise FormatError(path, f"module {mod.name} ({mod.algo}) lacks {', '.join(missing)}")
    for role in ("alpha", "scale"):
        t = mod.parts.pop(role, None)
        if t is not None:
            if t.numel() != 1:
                raise FormatError(path, f"{mod.keys[role]} should hold one number, not {list(t.shape)}")
            value = float(t.reshape(-1)[0].float())
            if role == "alpha":
                mod.alpha = value
            else:
                mod.scalar = value
    if mod.algo == "ia3":
        mod.on_input = bool(float(mod.parts.pop("on_input").reshape(-1)[0].float()) != 0.0)
    mag = mod.parts.get("magnitude")
    if mag is not None and mod.keys["magnitude"].endswith(LYCORIS_DORA):
        mod.on_input = mag.dim() >= 2 and int(mag.shape[0]) == 1


def _peft_alphas(lf: LoraFile) -> None:
    """Take alphas from a PEFT ``adapter_config.json`` beside a file that has none, or from the
    ``lora_adapter_metadata`` header of a diffusers file (one ``LoraConfig`` per component prefix)."""
    if any(m.alpha is not None or m.scalar is not None for m in lf.modules.values()):
        return
    header = lf.metadata.get("lora_adapter_metadata")
    if header is not None:
        try:
            flat = json.loads(header)
            configs: dict[str, dict[str, Any]] = {}
            for key, value in flat.items():
                prefix, _, field_name = key.partition(".")
                configs.setdefault(prefix, {})[field_name] = value
        except (ValueError, AttributeError) as exc:
            raise FormatError(lf.path, f"has a lora_adapter_metadata header that is not JSON ({exc})") from None
        for prefix, cfg in configs.items():
            _config_alphas(lf, cfg, prefix + ".", f"{lf.path} (lora_adapter_metadata)")
        return
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(lf.path)), "adapter_config.json")
    if not os.path.isfile(cfg_path):
        return
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise FormatError(cfg_path, f"is not a PEFT adapter config ({exc})") from None
    _config_alphas(lf, cfg, "base_model.model.", cfg_path)


def _config_alphas(lf: LoraFile, cfg: Any, prefix: str, where: str) -> None:
    """Set the alphas of the modules named ``prefix...`` from a ``LoraConfig`` as PEFT applies it:
    scale ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), ``r`` and ``alpha`` taken from the first
    ``rank_pattern``/``alpha_pattern`` key that matches the module path as a suffix, else ``r`` and
    ``lora_alpha``."""
    import re

    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        ranks = {str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()}
        alphas = {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(where, f"is not a PEFT adapter config ({exc!r})") from None
    rslora = bool(cfg.get("use_rslora"))

    def pick(patterns: dict[str, Any], path: str, default: Any) -> Any:
        for key, value in patterns.items():
            try:
                if re.match(rf"(.*\.)?({key})$", path):
                    return value
            except re.error:
                raise FormatError(where, f"has a pattern that is not a regular expression: {key!r}") from None
        return default

    for m in lf.modules.values():
        if m.algo == "lora" and m.name.startswith(prefix):
            path = m.name[len(prefix):]
            mr, ma = pick(ranks, path, r), pick(alphas, path, alpha)
            exact = not rslora and (m.rank or mr) == mr  # alpha as written: no rounding
            m.alpha = ma if exact else ma / (math.sqrt(mr) if rslora else mr) * (m.rank or mr)
    lf.notes.append(f"alpha from {where}: lora_alpha {alpha:g}, r {r}" + (", rsLoRA" if rslora else "")
                    + (", per-module patterns" if ranks or alphas else ""))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
