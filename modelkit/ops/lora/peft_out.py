"""LoRAs that diffusers and PEFT load as they are: ``lora convert --to diffusers`` and ``--to peft``.

* ``diffusers``: one ``.safetensors`` in the layout ``pipe.load_lora_weights(file)`` reads and
  ``save_lora_weights`` writes: ``unet.<module>.lora_A.weight`` / ``lora_B``, ``text_encoder.`` and
  ``text_encoder_2.`` + ``text_model.encoder.layers...`` (diffusers drops ``text_model.`` itself
  where the installed transformers flattens ``CLIPTextModel``). The ranks and alphas go in the
  header under ``lora_adapter_metadata`` (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``
  ...), which diffusers turns into each component's ``LoraConfig``; the factors are written as
  they are, so the applied change is kohya's ``alpha / rank * up @ down`` with no rounding.
* ``peft``: a folder, one PEFT adapter per component (``unet/`` or, for Flux and SD3,
  ``transformer/``; ``text_encoder/``, ``text_encoder_2/``), each ``adapter_config.json``
  (``peft_type`` LORA, ``r``, ``lora_alpha``, ``rank_pattern``/``alpha_pattern`` where modules
  differ, ``target_modules``) and
  ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``), for
  ``PeftModel.from_pretrained(model, folder/unet)``. The module names are the installed libraries'
  (``LOADER_COMPONENTS``). The folder is built beside its target and renamed into place.

Only plain LoRA/LoCon modules fit (``lora_A`` a linear or convolution, ``lora_B`` linear or 1x1);
LoHa, LoKr, (IA)^3, DoRA and Tucker modules are refused before anything is written.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import OutputExistsError, OutputWriteError, UsageError
from ...paths import refuse_windows_name, temp_path, write_text_atomic
from ..streaming import write_output
from .dit_tools import DIT
from .extract import out_tensor
from .keymap import KeyMap, Target
from .loader import Module

#: LoRA component -> (diffusers file prefix, PEFT folder, the text tower's module root in the
#: installed transformers: ``CLIPTextModel`` is flattened (no ``text_model.``) since transformers 5,
#: ``CLIPTextModelWithProjection`` (SDXL's second encoder) keeps it). None for the UNet.
LOADER_COMPONENTS: dict[str, tuple[str, str, str | None]] = {
    "unet": ("unet", "unet", None),
    "te": ("text_encoder", "text_encoder", ""),
    "te1": ("text_encoder", "text_encoder", ""),
    "te2": ("text_encoder_2", "text_encoder_2", "text_model."),
}
#: The header key diffusers reads each component's ``LoraConfig`` from.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
#: The ``LoraConfig`` fields written beside the ranks and target modules (PEFT's defaults, inference).
CONFIG_DEFAULTS: dict[str, Any] = {
    "base_model_name_or_path": None, "bias": "none", "exclude_modules": None, "fan_in_fan_out": False,
    "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
    "lora_bias": False, "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "revision": None,
    "task_type": None, "use_dora": False, "use_rslora": False,
}
TEXT_ROOT = "text_model."
#: OpenCLIP towers whose Hugging Face conversion stops one layer short (SD 2.x: diffusers' text
#: encoder has 23 of the 24 layers, since SD 2 conditions on the penultimate one).
SHORT_TOWERS = ("cond_stage_model.model.",)


#: Families whose first text encoder is ``CLIPTextModelWithProjection`` in diffusers' pipeline
#: (SD3's CLIP-L, as its CLIP-G), so its modules keep ``text_model.`` as SDXL's second encoder does.
PROJECTED_TE1 = frozenset({"sd3"})


@dataclass(frozen=True)
class Adapted:
    """One module ready for a loader: its component, names, factors, rank and alpha, and the root of
    its text tower's module names in the installed transformers (None for the denoiser)."""

    component: str
    path: str
    down: Any
    up: Any
    rank: int
    alpha: float
    root: str | None = None


def adapted(src: str, km: KeyMap, pairs: Sequence[tuple[Target, Module]],
            to: str) -> tuple[list[Adapted], list[str]]:
    """Check that every module fits ``to`` and give its factors in the layer's own shape.

    Returns:
        (the modules, the names of those left out: on the last layer of a ``SHORT_TOWERS`` encoder,
        which the loaders' model does not have and whose output SD 2 never uses).

    Raises:
        UsageError: a module is not plain LoRA/LoCon, adapts a layer the loaders have no name for,
            or two modules adapt one layer.
    """
    out: list[Adapted] = []
    dropped: list[str] = []
    seen: dict[tuple[str, tuple[int, int] | None], str] = {}
    last = {p: max((_layer(t.key, p) for t in km.targets), default=-1) for p in SHORT_TOWERS}
    for t, mod in pairs:
        if any(last[p] >= 0 and _layer(t.key, p) == last[p] for p in SHORT_TOWERS):
            dropped.append(mod.name)
            continue
        if mod.algo != "lora" or mod.dora or "mid" in mod.parts:
            raise UsageError(src, f"module {mod.name} is {mod.kind}, which a {to} LoRA cannot hold",
                             "diffusers and PEFT load plain LoRA/LoCon only: use the file as it is (A1111, "
                             "ComfyUI) or bake it into the checkpoint with `modelkit merge lora`")
        if t.component == "unet" and t.path == t.ldm and km.base not in DIT:  # a DiT's own names may agree
            raise UsageError(src, f"module {mod.name} adapts {t.ldm}, which has no diffusers name",
                             "Convert --to kohya instead")
        if (t.key, t.rows) in seen:
            raise UsageError(src, f"modules {seen[(t.key, t.rows)]} and {mod.name} adapt the same layer",
                             "Merge them first with `modelkit lora merge`")
        seen[(t.key, t.rows)] = mod.name
        down, up = mod.parts["down"], mod.parts["up"]
        r = int(down.shape[0])
        if up.dim() > 2 and any(int(n) != 1 for n in up.shape[2:]):
            raise UsageError(src, f"module {mod.name} has a {tuple(up.shape[2:])} lora_up kernel",
                             "diffusers and PEFT take a 1x1 lora_B only")
        shape = t.shape
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        alpha = mod.alpha if mod.alpha is not None and mod.scalar is None else mod.scale() * r
        root = LOADER_COMPONENTS[t.component][2]
        if root is not None and t.component in ("te", "te1") and km.base in PROJECTED_TE1:
            root = TEXT_ROOT
        out.append(Adapted(t.component, t.path, down, up, r, float(alpha), root))
    return out, dropped


def _layer(key: str, prefix: str) -> int:
    """The resblock number of an OpenCLIP tower key under ``prefix``, else -1."""
    head = prefix + "transformer.resblocks."
    if not key.startswith(head):
        return -1
    n = key[len(head):].split(".", 1)[0]
    return int(n) if n.isdigit() else -1


def module_name(a: Adapted, style: str) -> str:
    """The module's name in the diffusers file (with ``text_model.``), in the diffusers config
    (text modules without it: PEFT matches a name as a suffix, so it fits both transformers
    layouts), or in a PEFT folder (``peft``: exactly as the installed libraries name it)."""
    root = a.root
    if root is None or style == "file":
        return a.path
    bare = a.path.removeprefix(TEXT_ROOT)
    return bare if style == "config" else root + bare


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def lora_config(items: Sequence[Adapted], style: str) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields for one component's modules: the commonest rank and alpha, and
    ``rank_pattern``/``alpha_pattern`` for the modules that differ."""
    names = [module_name(a, style) for a in items]
    r = collections.Counter(a.rank for a in items).most_common(1)[0][0]
    alpha = collections.Counter(a.alpha for a in items).most_common(1)[0][0]
    return {**CONFIG_DEFAULTS, "r": r, "lora_alpha": _num(alpha), "target_modules": sorted(names),
            "rank_pattern": {n: a.rank for n, a in zip(names, items) if a.rank != r},
            "alpha_pattern": {n: _num(a.alpha) for n, a in zip(names, items) if a.alpha != alpha}}


def by_component(items: Sequence[Adapted], denoiser: str = "unet") -> dict[str, list[Adapted]]:
    """Modules grouped by loader component (``unet``, ``text_encoder``, ``text_encoder_2``); the
    denoiser's modules under ``denoiser`` (``transformer`` for Flux and SD3)."""
    out: dict[str, list[Adapted]] = {}
    for a in items:
        out.setdefault(denoiser if a.component == "unet" else LOADER_COMPONENTS[a.component][0], []).append(a)
    return out


def diffusers_tensors(items: Sequence[Adapted], denoiser: str = "unet") -> tuple[list[Any], dict[str, str]]:
    """The tensors of a diffusers LoRA file and its ``lora_adapter_metadata`` header entry (the denoiser's
    modules under ``denoiser``: ``unet`` or, for Flux and SD3, ``transformer``)."""
    tensors: list[Any] = []
    config: dict[str, Any] = {}
    for prefix, group in by_component(items, denoiser).items():
        for a in group:
            name = f"{prefix}.{module_name(a, 'file')}"
            tensors += [out_tensor(f"{name}.lora_A.weight", a.down, a.down.dtype),
                        out_tensor(f"{name}.lora_B.weight", a.up, a.up.dtype)]
        config.update({f"{prefix}.{k}": v for k, v in lora_config(group, "config").items()})
    return tensors, {DIFFUSERS_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def peft_tensors(group: Sequence[Adapted]) -> list[Any]:
    """One component's tensors as PEFT saves them (``base_model.model.<module>.lora_A.weight``)."""
    out: list[Any] = []
    for a in group:
        name = "base_model.model." + module_name(a, "peft")
        out += [out_tensor(f"{name}.lora_A.weight", a.down, a.down.dtype),
                out_tensor(f"{name}.lora_B.weight", a.up, a.up.dtype)]
    return out


def check_folder(target: str, force: bool, inputs: Sequence[str]) -> str:
    """Refuse a folder output that exists (without ``force``), is a file, or is an input.

    Raises:
        OutputExistsError: as said.
        UsageError: a name Windows cannot hold, on Windows.
    """
    t = os.fspath(target).rstrip("/\\") or os.fspath(target)
    refuse_windows_name(t)
    for i in inputs:
        if os.path.abspath(t) == os.path.abspath(i):
            raise OutputExistsError(t, "is the input file; modelkit never writes onto its input",
                                    "Choose another output folder")
    if os.path.lexists(t):
        if not os.path.isdir(t) or os.path.islink(t):
            raise OutputExistsError(t, "exists and is not a folder", "Choose a folder name for a PEFT adapter")
        if not force:
            raise OutputExistsError(t, "already exists")
    return t


def write_peft_folder(target: str, items: Sequence[Adapted], metadata: dict[str, str], *, source: str,
                      force: bool, dry_run: bool, denoiser: str = "unet") -> tuple[int, int, dict[str, str]]:
    """Write one PEFT adapter folder per component under ``target``, all at once or not at all (the
    denoiser's folder is ``denoiser``: ``unet``, or ``transformer`` for Flux and SD3).

    The folders are built in a temp sibling of ``target`` (``.NAME.TOKEN.modelkit-tmp``), which is
    then renamed onto it; with ``force`` an existing ``target`` folder is moved aside first and
    removed after the rename.

    Returns:
        (tensors, bytes) written (or that would be written), and the metadata as written (its
        ``modelkit.source_sha256`` filled in).

    Raises:
        OutputExistsError, OutputWriteError: the target exists without ``force``, or the disk refused.
    """
    from ...tempfiles import writer_token

    groups = by_component(items, denoiser)
    if dry_run:  # laid out, not written: the sizes are the real ones
        heads = [write_output(os.path.join(target, folder, "adapter_model.safetensors"), peft_tensors(g), metadata,
                              source=source, inputs=[source], force=False, dry_run=True)[0]
                 for folder, g in groups.items()]
        return sum(2 * len(g) for g in groups.values()), sum(h.size for h in heads), dict(metadata)
    check_folder(target, force, [source])
    tmp = temp_path(target, writer_token())
    try:
        os.mkdir(tmp)
    except OSError as exc:
        raise OutputWriteError(target, f"cannot create a folder beside it ({exc.strerror or exc})",
                               "Choose a folder you can write to") from None
    count = size = 0
    final = dict(metadata)
    try:
        for folder, group in groups.items():
            sub = os.path.join(tmp, folder)
            os.mkdir(sub)
            tensors = peft_tensors(group)
            header, final, _stats = write_output(os.path.join(sub, "adapter_model.safetensors"), tensors, metadata,
                                                 source=source, inputs=[source], force=False, dry_run=False)
            write_text_atomic(os.path.join(sub, "adapter_config.json"),
                              json.dumps(lora_config(group, "peft"), indent=2, sort_keys=True) + "\n")
            count, size = count + len(tensors), size + header.size
        _publish_folder(tmp, target, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count, size, final


def _publish_folder(tmp: str, target: str, force: bool) -> None:
    from ...tempfiles import writer_token

    if not os.path.lexists(target):
        try:
            os.rename(tmp, target)  # fails if a non-empty folder appeared meanwhile
        except OSError:
            raise OutputExistsError(target, "appeared while modelkit was writing it") from None
        return
    if not force:
        raise OutputExistsError(target, "appeared while modelkit was writing it")
    old = temp_path(target, writer_token() + "-old")
    try:
        os.rename(target, old)
    except OSError as exc:
        raise OutputWriteError(target, f"could not be moved aside to be replaced ({exc.strerror or exc})") from None
    try:
        os.rename(tmp, target)
    except BaseException as exc:
        os.rename(old, target)
        if isinstance(exc, OSError):
            raise OutputWriteError(target, f"could not be replaced ({exc.strerror or exc})") from None
        raise
    shutil.rmtree(old, ignore_errors=True)

