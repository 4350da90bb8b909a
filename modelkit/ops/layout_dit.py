"""``convert --to diffusers`` for Flux.1 and SD3.x single files and transformer-only files, no torch.

A ComfyUI / BFL / Stability single file becomes a diffusers ``FluxPipeline`` or
``StableDiffusion3Pipeline`` folder: ``transformer/`` (fused weights as row views, swapped halves as a
``ConcatSource``: ``modelkit.layout.dit``), ``vae/`` (the SD VAE map, 16 latent channels),
``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (SD3: CLIP-G) and the T5-XXL encoder
(``text_encoder_2/`` in Flux, ``text_encoder_3/`` in SD3) when the file has them, ``model_index.json``,
the ``FlowMatchEulerDiscreteScheduler`` config, and the CLIP tokenizers from the shipped BPE. The T5
tokenizer is a SentencePiece model that cannot be rebuilt offline: it is listed as null in
``model_index.json`` and passed to ``from_pretrained`` (``tokenizer_2=`` / ``tokenizer_3=``).

The transformer's config comes from its shapes (layers, widths, channels, guidance, dual attention,
qk norm) checked against the shipped config of the variant (Flux.1-dev or -schnell, SD3 medium,
SD3.5 medium or large) or ``--configs DIR``; a shipped Flux config takes the file's channels (Fill).
SD3's CLIP-L pools without a projection: diffusers' ``CLIPTextModelWithProjection`` gets the identity
(as diffusers' own single-file loader does), and a projection in the file is kept in
``ldm_extra.safetensors`` with whatever else has no place in the folder, so the way back is bit-identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..dtypes import BY_ST
from ..errors import FormatError, UsageError
from ..formats.safetensors_write import OutTensor, layout
from ..layout import dit
from ..layout import plan as lp
from ..layout.bpe import configs_root, shipped_bpe
from ..model import ModelFile
from . import families as fam
from . import metadata as md
from . import modelspec as ms
from .convert import Progress
from .layout_convert import LayoutResult, _check_folder_output, _Configs, _dump, _File, _publish_folder

#: Where the T5 tokenizer goes in each family's pipeline (it is not written; see the module doc).
T5_TOKENIZER = {"flux": "tokenizer_2", "sd3": "tokenizer_3"}
#: The metadata key of ``ldm_extra.safetensors`` that records a VAE prefix other than the family's usual one.
VAE_PREFIX_KEY = "modelkit.layout.vae_prefix"


def to_diffusers(s: str, target: str, mf: ModelFile, family: str, tprefix: str, part: str | None,
                 configs: str | os.PathLike[str] | None, force: bool, dry_run: bool,
                 progress: Progress | None) -> LayoutResult:
    """Split an open Flux/SD3 file ``mf`` (transformer under ``tprefix``) into a diffusers folder."""
    _check_folder_output(target, s, force)
    keys = list(mf)
    if tprefix == "":
        if part is not None and dit.part_folder(family, part) != "transformer":
            raise UsageError(s, f"is a {family} transformer-only file; it has no {part}")
        part = "transformer"
    vprefix = dit.vae_prefix(keys, family)
    parts = [p for p in dit.parts_of(family, vprefix) if any(k.startswith(p.prefix) for k in keys)]
    if tprefix == "":
        parts = [lp.Part("transformer", family, "")]
    if part is not None:
        folder = dit.part_folder(family, part)
        parts = [p for p in parts if p.folder == folder]
        if not parts:
            takes = ", ".join(n for n in dit.PART_NAMES if dit.part_folder(family, n))
            raise UsageError(s, f"is a {family} file with no {part}" if folder else
                             f"is a {family} file, which has no {part}; --part takes {takes}")
    trans = {k[len(tprefix):]: mf[k] for k in keys if k.startswith(tprefix) and fam.component_of(k, family) == "transformer"}
    if not trans:
        raise FormatError(s, f"holds no {family} transformer")
    derived = _derived(s, trans, family, {})
    variant = dit.shipped_variant(family, derived)
    if configs is not None:
        root = Path(os.fspath(configs))
        if not root.is_dir():
            raise UsageError(os.fspath(configs), "is not a folder", "--configs takes a diffusers folder")
        cfgs = _Configs(root, os.fspath(configs), True)
    else:
        cfgs = _Configs(configs_root().joinpath(variant), f"shipped {variant}", False)
    sp = lp.Split()
    claimed: set[str] = set()
    tcfg: dict[str, Any] = {}
    for p in parts:
        if p.kind == family:
            tcfg = _transformer(s, p, cfgs, trans, family, sp, claimed)
    others = [p for p in parts if p.kind != family]
    if others:
        sub = lp.split(mf, others, lambda folder: _as_loaded(cfgs.config(folder), family, folder), whole=False)
        sp.components.update(sub.components)
        sp.leftovers.extend(sub.leftovers)
        sp.problems.extend(sub.problems)
        claimed.update(k for p in others for k in keys if k.startswith(p.prefix))
        if family == "sd3" and sp.components.get("text_encoder"):
            sp.components["text_encoder"].append(_identity(sp.components["text_encoder"], cfgs.config("text_encoder")))
    if sp.problems:
        more = f" ({len(sp.problems)} problems; first: {sp.problems[0]})"
        raise FormatError(s, f"shapes do not fit the {cfgs.label} configs{more}",
                          "Pass --configs FOLDER (a diffusers folder whose */config.json fit the file)")
    claimed.update(t.name for t in sp.leftovers)
    for k in keys:
        if k in claimed:
            continue
        if k.startswith("model_ema."):
            sp.dropped.append(k)
        elif part is None:
            sp.leftovers.append(OutTensor.of(mf[k]))
    files = _files(mf, family, parts, cfgs, variant, tcfg, sp, part, s, vprefix)
    if not dry_run:
        _publish_folder(target, files, force, progress)
    missing = [f for f, _, _, _ in dit.COMPONENTS[family] if part is None and f not in sp.components]
    warnings = [f"the file has no {dit.part_name(family, f)}: {f} is null in model_index.json" for f in missing]
    if part is None:
        warnings.append(f"no T5 tokenizer is written ({T5_TOKENIZER[family]} is null in model_index.json): pass "
                        f"{T5_TOKENIZER[family]}=T5TokenizerFast.from_pretrained(...) to from_pretrained")
    count = sum(len(x[1]) for x in files if isinstance(x[1], list))
    return LayoutResult(s, target, "dry-run" if dry_run else "written", "diffusers", family, part, cfgs.label,
                        tuple(sp.components), count, sum(x[2] for x in files), tuple(t.name for t in sp.leftovers),
                        tuple(sp.dropped), tuple(warnings))


def _transformer(s: str, p: lp.Part, cfgs: _Configs, trans: dict[str, Any], family: str, sp: lp.Split,
                 claimed: set[str]) -> dict[str, Any]:
    """Map the transformer into ``sp``; its config (a shipped one adapted to the file)."""
    cfg = cfgs.config("transformer")
    if dit.TRANSFORMERS.get(str(cfg.get("_class_name"))) != family:
        sp.problems.append(f"transformer/config.json is a {cfg.get('_class_name')}, not a {family} transformer")
        return cfg
    derived = _derived(s, trans, family, cfg, "transformer/config.json")
    if not cfgs.user:
        cfg = dit.adapted(cfg, family, derived)
    sp.problems.extend(dit.config_problems(cfg, derived))
    refs, used, problems = dit.to_diffusers(trans, family, s)
    if problems:  # the file's own weights do not fit together: no config can help
        raise FormatError(s, f"is a {family} transformer whose fused weights do not split ({len(problems)} "
                             f"problem{'s' if len(problems) > 1 else ''}; first: {problems[0]})")
    left = sorted(set(trans) - set(used))
    sp.problems.extend(f"{p.prefix}{k} has no place in a diffusers {family} transformer" for k in left)
    sp.components["transformer"] = [OutTensor.of(r, n) for n, r in refs.items()]
    claimed.update(p.prefix + k for k in trans)
    return cfg


def _derived(s: str, trans: dict[str, Any], family: str, base: dict[str, Any], cfg_name: str | None = None) -> dict[str, Any]:
    """``dit.derived_config`` of the transformer ``trans``, its failures as one line (``cfg_name``: the
    config ``base`` comes from, once the shapes alone gave a config).

    Raises:
        FormatError: a tensor every transformer of the family has is missing, lacks a dimension or is
            empty, or the config gives a head size that is not a positive number.
    """
    try:
        return dit.derived_config({k: r.shape for k, r in trans.items()}, family, base)
    except KeyError as exc:
        raise FormatError(s, f"is a {family} transformer missing {exc}", "Is the file complete?") from None
    except (IndexError, ValueError, ZeroDivisionError, TypeError) as exc:
        if cfg_name is not None:  # the shapes gave a config before: what fails now is the config's
            raise FormatError(s, f"is a {family} transformer that its {cfg_name} does not fit ({exc})",
                              "Pass --configs FOLDER (a diffusers folder whose */config.json fit the file)") from None
        raise FormatError(s, f"is a {family} transformer whose shapes make no config ({exc})",
                          "Is this a Flux.1 or SD3.x transformer?") from None


def _as_loaded(cfg: dict[str, Any], family: str, folder: str) -> dict[str, Any]:
    """The config the split checks against: SD3's CLIP-L pools unprojected, so its file's projection
    (if any) is set aside as a spare tensor."""
    if family == "sd3" and folder == "text_encoder":
        return {**cfg, "architectures": ["CLIPTextModel"], "_class_name": "CLIPTextModel"}
    return cfg


def _identity(tensors: list[OutTensor], cfg: dict[str, Any]) -> OutTensor:
    """The identity ``text_projection.weight`` of SD3's CLIP-L, in the encoder's dtype."""
    tok = next((t for t in tensors if t.name.endswith("token_embedding.weight")), tensors[0])
    width = int(tok.shape[1]) if len(tok.shape) == 2 else int(cfg["hidden_size"])
    dtype = tok.dtype
    if dtype.st not in dit.ONE:
        dtype = BY_ST["F32"]
    return OutTensor("text_projection.weight", dtype, (width, width), data=dit.identity_bytes(str(dtype.st), width))


def _files(mf: ModelFile, family: str, parts: list[lp.Part], cfgs: _Configs, variant: str, tcfg: dict[str, Any],
           sp: lp.Split, part: str | None, s: str, vprefix: str) -> list[_File]:
    """Every file of the output folder, decided before anything is written."""
    files: list[_File] = []
    title = Path(s).stem
    shipped = configs_root().joinpath(variant)

    def text(*rel: str) -> str:
        got = cfgs.text(*rel)
        return got if got is not None else shipped.joinpath(*rel).read_text(encoding="utf-8")

    def add_text(rel: str, body: str) -> None:
        files.append((rel, body, len(body.encode("utf-8")), None))

    def add_tensors(rel: str, tensors: list[OutTensor], meta: dict[str, str]) -> None:
        files.append((rel, tensors, layout(tensors, meta).size, meta))

    for p in parts:
        sub = "" if part is not None else p.folder + "/"
        kind = {"vae": "vae"}.get(p.kind, "unet" if p.kind == family else "text-encoder")
        meta = {"format": "pt", **ms.modelspec_block(kind=kind, base=family, title=title,
                                                     implementation=ms.IMPL_DIFFUSERS)}
        add_text(sub + "config.json", _dump(tcfg if p.kind == family else cfgs.config(p.folder)))
        add_tensors(sub + p.weights, sp.components[p.folder], meta)
    if part is not None:
        return files
    index = lp.load_json(text("model_index.json"), "model_index.json")
    for folder, _, _, _ in dit.COMPONENTS[family]:
        if folder not in sp.components:
            index[folder] = [None, None]
    index[T5_TOKENIZER[family]] = [None, None]
    add_text("scheduler/scheduler_config.json", _dump(lp.load_json(text("scheduler", "scheduler_config.json"),
                                                                   "scheduler_config.json")))
    bpe, vocab = shipped_bpe()
    for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        if tok == T5_TOKENIZER[family]:
            continue
        if enc not in sp.components:
            index[tok] = [None, None]
            continue
        tcfg_ = lp.load_json(text(tok, "tokenizer_config.json"), f"{tok}/tokenizer_config.json")
        add_text(f"{tok}/vocab.json", json.dumps(vocab, ensure_ascii=False))
        add_text(f"{tok}/merges.txt", bpe)
        add_text(f"{tok}/tokenizer_config.json", _dump(tcfg_))
        add_text(f"{tok}/special_tokens_map.json", _dump(
            {k: tcfg_.get(k, "<|endoftext|>") for k in ("bos_token", "eos_token", "pad_token", "unk_token")}))
    add_text("model_index.json", _dump(index))
    usual = dit.vae_prefix([], family)
    if sp.leftovers or vprefix != usual:
        meta = md.combine(ms.carried(mf.metadata), {"modelkit.layout": "ldm-extra/1",
                                                    "modelkit.source": os.path.basename(s)},
                          {VAE_PREFIX_KEY: vprefix} if vprefix != usual else {})
        add_tensors(lp.EXTRA_FILE, sp.leftovers, meta)
    return files


def diffusers_transformer(mf: ModelFile, s: str) -> tuple[str, str] | None:
    """A Flux/SD3 transformer file in diffusers keys, read in the original keys (``mf`` is re-keyed in place)."""
    family = fam.family_of(mf)
    if family is None or any(k.startswith(("model.diffusion_model.", "text_encoders.")) for k in mf):
        return None
    if not any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in mf):
        return None  # original keys (a transformer-only file as ComfyUI saves it)
    try:
        refs, left = dit.to_original(dict(mf.tensors), family, s)
    except ValueError as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(s, f"is a {family} transformer in diffusers keys whose parts do not fit ({exc})") from None
    if left:
        raise FormatError(s, f"holds {len(left)} tensors with no place in a {family} transformer (first: {left[0]})")
    mf.tensors = refs
    return family, ""


def single_part(mf: ModelFile, s: str, family: str, part: str) -> ModelFile:
    """One component of a Flux/SD3 single file, in the names ComfyUI's separate files use (as ``prune --part``)."""
    found = fam.part_prefixes(list(mf), dit.ALIASES.get(part, part) if part != "te" else "clip_l")
    if found is None:
        raise FormatError(s, f"holds no {part} of a {family} single file")
    prefixes, strip = found
    keep = {(k[len(strip):] if strip else k): mf[k] for k in mf if k.startswith(prefixes)}
    if not keep:
        raise FormatError(s, f"holds no {part} tensors (none start with {' or '.join(prefixes)})")
    mf.tensors = keep
    mf.metadata = dict(mf.metadata)
    return mf
