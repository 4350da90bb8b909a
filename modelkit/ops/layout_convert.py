"""``modelkit convert --to single|diffusers``: a diffusers folder <-> an LDM single file, streaming, no torch.

``--to single`` opens the folder as a lazy ``ModelFile`` in LDM names (``modelkit.layout.folder``) and
writes every tensor through the streaming writer. ``--to diffusers`` splits the file into components
(``modelkit.layout.plan``), checks every shape against the configs (the shipped SD1/SD2/SD2-v/SDXL
ones, or ``--configs DIR``), and writes a folder ``DiffusionPipeline.from_pretrained`` loads offline:
``model_index.json``, ``scheduler/``, ``tokenizer/`` (and ``tokenizer_2/``) from the shipped CLIP BPE,
each component's ``config.json`` and safetensors weights, and ``ldm_extra.safetensors`` with what a
diffusers folder has no place for. The folder is built in a temp sibling and renamed into place.
Flux.1 and SD3.x files take the same road through ``modelkit.ops.layout_dit``; their folders are read
back by the same ``open_folder``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError, OutputExistsError, OutputWriteError, UsageError
from ..formats.safetensors_write import OutTensor, layout, write_stream
from ..layout import dit, names
from ..layout import plan as lp
from ..layout.bpe import configs_root, shipped_bpe
from ..layout.folder import FolderModel, open_folder
from ..model import ModelFile
from ..paths import atomic_output, check_output, ensure_room, require_safetensors_name, temp_path
from ..remote import is_remote
from . import metadata as md
from . import modelspec as ms
from .convert import Progress
from .fp8 import refuse_scaled
from .gguf_ops import refuse_quantized
from .result import result_dict

DIRECTIONS = ("single", "diffusers")
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class LayoutResult:
    """What ``convert_layout`` did (or, with ``dry_run``, would do).

    Attributes:
        source, output: the paths (a folder on the diffusers side).
        status: ``written`` or ``dry-run``.
        to: ``single`` or ``diffusers``.
        family: ``sd1``, ``sd2``, ``sdxl`` (None for a lone component).
        part: the ``--part`` converted, or None for the whole model.
        configs: where the configs came from (``shipped sd2-v`` or the ``--configs`` folder).
        components: the diffusers components written or read.
        tensors: tensors written; size: bytes written.
        kept: tensors a diffusers folder has no place for, kept in ``ldm_extra.safetensors``.
        dropped: tensors not carried over (EMA copies).
        warnings: things the user should know.
        seconds: wall time.
    """

    source: str
    output: str
    status: str
    to: str
    family: str | None
    part: str | None
    configs: str | None
    components: tuple[str, ...]
    tensors: int
    size: int
    kept: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    to_dict = result_dict


def convert_layout(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: str,
    part: str | None = None,
    configs: str | os.PathLike[str] | None = None,
    prediction: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    ignore_scan: bool = False,
    progress: Progress | None = None,
) -> LayoutResult:
    """Convert a diffusers folder to an LDM single file (``to="single"``) or back (``to="diffusers"``).

    Args:
        src: a diffusers pipeline folder, a component folder, or a single file (any container
            ``open_model`` reads).
        out: the output ``.safetensors`` file, or the output folder.
        to: ``single`` or ``diffusers``.
        part: ``unet``, ``vae``, ``te`` or ``te2`` (SDXL's second text encoder), or for Flux/SD3
            ``transformer``, ``clip_l``, ``clip_g``, ``t5xxl``: that component only.
        configs: a diffusers folder whose ``*/config.json`` (and ``scheduler/``, ``tokenizer/``,
            ``model_index.json`` where present) to use instead of the shipped ones.
        prediction: ``eps`` or ``v``: the scheduler's prediction type (needed for SD2 when the file
            does not say).
        force: replace an existing output.
        dry_run: decide and check everything, write nothing.
        ignore_scan: read a pickle-based input the scan calls unsafe (only through the allow-list).
        progress: called after each tensor with its name and size.

    Returns:
        LayoutResult.

    Raises:
        UsageError: a bad option, or an SD2 file whose prediction type is unknown.
        FormatError: a folder missing a component, shapes that do not fit the configs.
        OutputExistsError: the output exists (without ``force``) or is the input.

    Example:
        >>> modelkit.convert_layout("sd15-diffusers", "sd15.safetensors", to="single").tensors  # doctest: +SKIP
        1131
    """
    t0 = time.perf_counter()
    s, target = os.fspath(src), os.fspath(out)
    if to not in DIRECTIONS:
        raise UsageError(None, f"--to must be single or diffusers, not {to!r}")
    if part is not None and part not in lp.PARTS and part not in dit.PART_NAMES:
        raise UsageError(None, f"--part must be one of {', '.join(dict.fromkeys([*lp.PARTS, *dit.PART_NAMES]))}, "
                               f"not {part!r}")
    if prediction is not None and prediction not in PREDICTIONS:
        raise UsageError(None, f"--prediction must be eps or v, not {prediction!r}")
    if is_remote(s):  # the refusal every command that writes gives (check_output raises it for a remote input)
        check_output(target, force=True, inputs=[s])
    if not os.path.exists(s):
        from ..errors import InputNotFoundError

        raise InputNotFoundError(s, "does not exist")
    if to == "single":
        res = _to_single(s, target, part, force, dry_run, ignore_scan, progress)
    else:
        res = _to_diffusers(s, target, part, configs, prediction, force, dry_run, ignore_scan, progress)
    return _with_seconds(res, time.perf_counter() - t0)


def _with_seconds(r: LayoutResult, seconds: float) -> LayoutResult:
    from dataclasses import replace

    return replace(r, seconds=seconds)


# --- folder -> single -----------------------------------------------------------------------------

def _to_single(s: str, target: str, part: str | None, force: bool, dry_run: bool, ignore_scan: bool,
               progress: Progress | None) -> LayoutResult:
    require_safetensors_name(target)
    check_output(target, force=force, inputs=[s])
    if os.path.isdir(s):
        model: ModelFile = open_folder(s, part=part, ignore_scan=ignore_scan)
    else:
        model = _single_part(s, part, ignore_scan)
    with model:
        tensors = [OutTensor.of(ref, name) for name, ref in model.items()]
        family = model.family if isinstance(model, FolderModel) else lp.family_of(model)
        changes = [f"diffusers folder -> LDM single file ({family or 'one component'})" if os.path.isdir(s)
                   else f"the {part} of an LDM single file"]
        block = ms.modelspec_block(kind="checkpoint" if part is None else _PART_KIND[part], base=family,
                                   prediction=_folder_prediction(s), title=Path(target).stem,
                                   names=[t.name for t in tensors])
        filled = ms.fill(model.metadata, block, override=("modelspec.implementation", "modelspec.architecture"),
                         changes=changes)
        meta = md.combine(filled, md.provenance(os.path.basename(os.path.normpath(s)), changes))
        size = _write_file(target, tensors, meta, s, force, dry_run, progress)
        comps = tuple(sorted({f for f in _folders_of(model)}))
        return LayoutResult(s, target, "dry-run" if dry_run else "written", "single", family, part, None, comps,
                            len(tensors), size)


#: --part -> the ModelSpec kind of a file holding that part alone.
_PART_KIND = {"unet": "unet", "vae": "vae", "te": "text-encoder", "te2": "text-encoder", "transformer": "unet",
              "clip_l": "text-encoder", "clip_g": "text-encoder", "t5xxl": "text-encoder"}


def _folder_prediction(s: str) -> str | None:
    """A diffusers folder's prediction type, from its scheduler config (None for a file, or none said)."""
    if not os.path.isdir(s):
        return None
    try:
        with open(os.path.join(s, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
            value = json.load(f).get("prediction_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _folders_of(model: ModelFile) -> list[str]:
    keys = list(model)
    if isinstance(model, FolderModel) and model.family in dit.COMPONENTS:
        return [f for f, kind, prefix, _ in dit.COMPONENTS[model.family]
                if any(n.startswith(dit.VAE_PREFIXES if kind == "vae" else prefix) for n in keys)]
    found = []
    for folder, prefix in (("unet", names.UNET_PREFIX), ("vae", names.VAE_PREFIX),
                           ("text_encoder", "cond_stage_model."), ("text_encoder", "conditioner.embedders.0."),
                           ("text_encoder_2", "conditioner.embedders.1.")):
        if any(n.startswith(prefix) for n in keys):
            found.append(folder)
    if not found and any(n.startswith("encoder.") for n in keys):
        found.append("vae")
    return found


def _single_part(s: str, part: str | None, ignore_scan: bool) -> ModelFile:
    """One component of a single file, in the names a file of that part alone has."""
    from ..reading import open_model

    if part is None:
        raise UsageError(s, "is a file; --to single reads a diffusers folder",
                         "Pass the folder, or --part unet|vae|te|te2 to take one component out of the file")
    mf = open_model(s, ignore_scan=ignore_scan)
    try:
        refuse_scaled(mf.tensors, mf.metadata, s, "convert --to single")
        refuse_quantized(mf, s, "convert --to single")
        found = dit.single_family(list(mf))
        if found is not None:
            from .layout_dit import single_part

            return single_part(mf, s, found[0], part)
        if part == "transformer":  # a Flux/SD3 transformer in diffusers keys: its original (BFL/ComfyUI) keys
            from .layout_dit import diffusers_transformer

            if diffusers_transformer(mf, s) is not None:
                mf.metadata = dict(mf.metadata)
                return mf
        family = lp.family_of(mf)
        _sd_part(s, part, family)
        parts = [p for p in lp.parts_of(family or "sd1") if p.folder == lp.PARTS[part]]
        if not parts or family is None and part != "vae":
            raise FormatError(s, f"holds no {part} of a Stable Diffusion checkpoint")
        prefix = parts[0].prefix
        keep = {k: mf[k] for k in mf if k.startswith(prefix)}
        if part == "vae":
            keep = {k[len(prefix):]: v for k, v in keep.items()}
        if not keep:
            raise FormatError(s, f"holds no {part} tensors (none start with {prefix})")
        mf.tensors = keep
        mf.metadata = dict(mf.metadata)
        return mf
    except BaseException:
        mf.close()
        raise


def _write_file(target: str, tensors: list[OutTensor], meta: dict[str, str], source: str, force: bool,
                dry_run: bool, progress: Progress | None) -> int:
    """Lay out and (unless ``dry_run``) write one safetensors file atomically; its size."""
    header = layout(tensors, meta, target)
    if dry_run:
        return header.size
    ensure_room(target, header.size)
    # the sha256 of the input (of a folder: of its sha256sum listing), hashed while the tensors are written
    with md.SourceHash(source) as hasher, \
            atomic_output(target, force=force, inputs=[source] if not os.path.isdir(source) else []) as fd:
        write_stream(fd, header, meta, late={"modelkit.source_sha256": hasher.hexdigest}, on_tensor=progress,
                     path=target)
    meta["modelkit.source_sha256"] = hasher.hexdigest()
    return header.size


# --- single -> diffusers --------------------------------------------------------------------------

class _Configs:
    """Component configs, scheduler, tokenizer and model_index from ``--configs DIR`` or the shipped set."""

    def __init__(self, root: Any, label: str, user: bool):
        self.root, self.label, self.user = root, label, user

    def text(self, *parts: str) -> str | None:
        node = self.root.joinpath(*parts)
        return node.read_text(encoding="utf-8") if node.is_file() else None

    def config(self, folder: str) -> dict[str, Any]:
        text = self.text(folder, "config.json")
        if text is None:
            raise FormatError(self.label, f"has no {folder}/config.json", "Pass --configs with a folder that has it")
        return lp.load_json(text, f"{self.label}/{folder}/config.json")


def _pick_configs(s: str, family: str, configs: str | os.PathLike[str] | None, prediction: str | None,
                  mf: ModelFile) -> tuple[_Configs, str | None]:
    """The configs to use, and the prediction type for the scheduler (None: keep the config's)."""
    if configs is not None:
        root = Path(os.fspath(configs))
        if not root.is_dir():
            raise UsageError(os.fspath(configs), "is not a folder", "--configs takes a diffusers folder")
        user = _Configs(root, os.fspath(configs), True)
        if prediction is None and family == "sd2" and user.text("scheduler", "scheduler_config.json") is None:
            prediction = _detected_prediction(s, mf)
        return user, prediction
    shipped = family
    if family == "sd2":
        pred = prediction or _detected_prediction(s, mf)
        shipped = "sd2-v" if pred == "v" else "sd2"
        prediction = pred
    return _Configs(configs_root().joinpath(shipped), f"shipped {shipped}", False), prediction


def _detected_prediction(s: str, mf: ModelFile) -> str:
    from ..detect import detect_modelfile

    pred = detect_modelfile(mf).variant.get("prediction")
    if pred not in PREDICTIONS:
        raise UsageError(s, "is an SD2 model whose prediction type (eps or v) is unknown",
                         "Pass --prediction eps or --prediction v")
    return str(pred)


def _to_diffusers(s: str, target: str, part: str | None, configs: str | os.PathLike[str] | None,
                  prediction: str | None, force: bool, dry_run: bool, ignore_scan: bool,
                  progress: Progress | None) -> LayoutResult:
    from ..reading import open_model

    if os.path.isdir(s):
        raise UsageError(s, "is a folder; --to diffusers reads a single file", "Use --to single for a folder")
    _check_folder_output(target, s, force)
    with open_model(s, ignore_scan=ignore_scan) as mf:
        from .layout_dit import diffusers_transformer, to_diffusers

        refuse_scaled(mf.tensors, mf.metadata, s, "convert --to diffusers")
        refuse_quantized(mf, s, "convert --to diffusers")

        found = dit.single_family(list(mf)) or diffusers_transformer(mf, s)
        if found is not None:
            if prediction is not None:
                raise UsageError(s, f"is a {found[0]} model; --prediction is for SD2")
            return to_diffusers(s, target, mf, found[0], found[1], part, configs, force, dry_run, progress)
        family = lp.family_of(mf)
        bare_vae = family is None and part == "vae" and "encoder.conv_in.weight" in mf
        if family is None and not bare_vae:
            raise FormatError(s, "is not an SD1, SD2, SDXL, SD3 or Flux checkpoint (no text encoder under cond_stage_model. "
                                 "or conditioner.embedders.)", "--part vae converts a standalone VAE file")
        # a standalone VAE is the same AutoencoderKL in every family: SD1's config fits it
        cfgs, pred = _pick_configs(s, family or "sd1", configs, prediction, mf)
        parts = lp.parts_of(family or "sd1")
        if part is not None:
            _sd_part(s, part, family)
            parts = [p for p in parts if p.folder == lp.PARTS[part]]
            if not parts:
                raise UsageError(s, f"is an {family} model, which has no {part}")
            if bare_vae:
                parts = [lp.Part("vae", "vae", "")]
        sp = lp.split(mf, parts, cfgs.config, whole=part is None)
        if sp.problems:
            more = f" ({len(sp.problems)} problems; first: {sp.problems[0]})"
            remedy = ("Pass --configs FOLDER (a diffusers folder whose */config.json fit the file)" if not cfgs.user
                      else "Pass --configs with a folder whose */config.json fit the file")
            raise FormatError(s, f"shapes do not fit the {cfgs.label} configs{more}", remedy)
        files = _folder_files(mf, family, parts, cfgs, pred, sp, part, s)
        size = sum(x[2] for x in files)
        count = sum(len(x[1]) for x in files if isinstance(x[1], list))
        if not dry_run:
            _publish_folder(target, files, force, progress)
        warnings = []
        if sp.dropped:
            warnings.append(f"{len(sp.dropped)} EMA tensor{'s' if len(sp.dropped) != 1 else ''} (model_ema.*) "
                            "dropped, as prune does")
        return LayoutResult(s, target, "dry-run" if dry_run else "written", "diffusers", family, part, cfgs.label,
                            tuple(sp.components), count, size, tuple(t.name for t in sp.leftovers),
                            tuple(sp.dropped), tuple(warnings))


def _check_folder_output(target: str, src: str, force: bool) -> None:
    if os.path.abspath(target) == os.path.abspath(src):
        raise OutputExistsError(target, "is the input; modelkit never writes onto its input")
    if os.path.lexists(target):
        if not force:
            raise OutputExistsError(target, "already exists")
        if not os.path.isdir(target) or os.path.islink(target):
            raise OutputExistsError(target, "exists and is not a folder", "Choose another output folder")


#: One file of the output folder: (relative path, tensors or text, size, metadata).
_File = tuple[str, "list[OutTensor] | str", int, "dict[str, str] | None"]


def _folder_files(mf: ModelFile, family: str | None, parts: Sequence[lp.Part], cfgs: _Configs,
                  prediction: str | None, sp: lp.Split, part: str | None, s: str) -> list[_File]:
    """Every file of the output folder, decided before anything is written."""
    files: list[_File] = []
    title = Path(s).stem

    def weights_meta(folder: str) -> dict[str, str]:
        kind = {"unet": "unet", "vae": "vae"}.get(folder, "text-encoder")
        return {"format": "pt", **ms.modelspec_block(kind=kind, base=family, prediction=prediction, title=title,
                                                     implementation=ms.IMPL_DIFFUSERS)}

    def add_text(rel: str, text: str) -> None:
        files.append((rel, text, len(text.encode("utf-8")), None))

    def add_tensors(rel: str, tensors: list[OutTensor], meta: dict[str, str]) -> None:
        files.append((rel, tensors, layout(tensors, meta).size, meta))

    for p in parts:
        sub = "" if part is not None else p.folder + "/"
        add_text(sub + "config.json", _dump(cfgs.config(p.folder)))
        add_tensors(sub + p.weights, sp.components[p.folder], weights_meta(p.folder))
    if part is not None:
        return files
    assert family is not None
    index = lp.load_json(cfgs.text("model_index.json") or configs_root().joinpath(
        _shipped_name(family, prediction), "model_index.json").read_text(encoding="utf-8"), "model_index.json")
    add_text("model_index.json", _dump(_model_index(index, family)))
    add_text("scheduler/scheduler_config.json", _dump(_scheduler(cfgs, family, prediction)))
    text, vocab = shipped_bpe()
    for i, _ in enumerate(names.TEXT_ENCODERS[family]):
        tok = "tokenizer" if i == 0 else "tokenizer_2"
        shipped = configs_root().joinpath(_shipped_name(family, prediction), tok, "tokenizer_config.json")
        tcfg = lp.load_json(cfgs.text(tok, "tokenizer_config.json") or shipped.read_text(encoding="utf-8"),
                            f"{tok}/tokenizer_config.json")
        add_text(f"{tok}/vocab.json", json.dumps(vocab, ensure_ascii=False))
        add_text(f"{tok}/merges.txt", text)
        add_text(f"{tok}/tokenizer_config.json", _dump(tcfg))
        add_text(f"{tok}/special_tokens_map.json", _dump(
            {k: tcfg.get(k, "<|endoftext|>") for k in ("bos_token", "eos_token", "pad_token", "unk_token")}))
    if sp.leftovers:
        meta = md.combine(ms.carried(mf.metadata), {"modelkit.layout": "ldm-extra/1",
                                                    "modelkit.source": os.path.basename(s)})
        add_tensors(lp.EXTRA_FILE, sp.leftovers, meta)
    return files


def _shipped_name(family: str, prediction: str | None) -> str:
    return "sd2-v" if family == "sd2" and prediction == "v" else family


def _dump(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _model_index(index: dict[str, Any], family: str) -> dict[str, Any]:
    """The pipeline's model_index.json: every component, the optional ones null."""
    out = dict(index)
    out.setdefault("feature_extractor", [None, None])
    out.setdefault("image_encoder", [None, None])
    if family == "sdxl":
        out.setdefault("force_zeros_for_empty_prompt", True)
    else:
        out.setdefault("safety_checker", [None, None])
        out.setdefault("requires_safety_checker", False)
    return out


def _scheduler(cfgs: _Configs, family: str, prediction: str | None) -> dict[str, Any]:
    text = cfgs.text("scheduler", "scheduler_config.json") or configs_root().joinpath(
        _shipped_name(family, prediction), "scheduler", "scheduler_config.json").read_text(encoding="utf-8")
    cfg = lp.load_json(text, "scheduler_config.json")
    if prediction is not None:
        cfg["prediction_type"] = PREDICTIONS[prediction]
    return cfg


def _publish_folder(target: str, files: list[_File], force: bool, progress: Progress | None) -> None:
    """Write ``files`` into a temp sibling of ``target``, then rename it into place (all or nothing)."""
    from ..tempfiles import writer_token

    parent = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(target, f"cannot create {parent} ({exc.strerror})") from None
    ensure_room(os.path.join(parent, "x"), sum(f[2] for f in files))
    tmp = temp_path(target, writer_token())
    old: str | None = None
    try:
        os.mkdir(tmp)
        for rel, body, _, meta in files:
            path = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if isinstance(body, str):
                with open(path, "x", encoding="utf-8", newline="\n") as f:
                    f.write(body)
                continue
            with atomic_output(path) as fd:
                write_stream(fd, layout(body, meta, path), meta, on_tensor=progress, path=path)
        if os.path.lexists(target):
            if not force:
                raise OutputExistsError(target, "appeared while modelkit was writing it")
            old = temp_path(target, writer_token())
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        if old is not None and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.rename(old, target)
            old = None
        if isinstance(exc, OSError) and not isinstance(exc, (OutputExistsError, OutputWriteError)):
            raise OutputWriteError(target, f"could not be written ({exc.strerror or exc})") from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["DIRECTIONS", "LayoutResult", "convert_layout"]


def _sd_part(s: str, part: str | None, family: str | None) -> None:
    """A ``--part`` of Flux/SD3 (transformer, clip_l, clip_g, t5xxl) asked of a file that is not one is refused
    in one line: an SD file's parts are unet, vae, te and te2."""
    if part is not None and part not in lp.PARTS:
        what = f"an {family.upper()} model" if family else "not a Flux or SD3 file (nor a diffusers-keys transformer of one)"
        raise UsageError(s, f"--part {part} is a part of Flux and SD3 files; this is {what}",
                         "Use --part " + "|".join(lp.PARTS) + " for SD files")
