"""``modelkit convert``: any supported container -> ``.safetensors``, type-aware, streaming, atomic.

What changes, by kind of file (see ``_kind``):

* A1111 textual-inversion embeddings (``string_to_param.*``) become one ``emb_params`` tensor, the
  layout A1111 reads from ``.safetensors``; ``clip_l``/``clip_g`` pairs (SDXL) keep their names.
  ``name``, ``step``, ``sd_checkpoint`` and ``sd_checkpoint_name`` go into the metadata.
* A1111 hypernetworks keep their flattened names, ``{dim}.{0|1}.linear.{i}.{weight|bias}`` (the
  two modules per attention width, in A1111's order), with ``modelkit.layout`` set to
  ``a1111-hypernetwork/1`` and the structure fields (``layer_structure``, ``activation_func``,
  ``is_layer_norm``, ``use_dropout`` ...) as JSON strings in the metadata. Neither A1111 nor ComfyUI
  reads any hypernetwork ``.safetensors`` by itself; the repository's ``integrations/`` loaders do.
* Checkpoints lose their ``state_dict`` wrapper (the reader already flattened it); VAEs, LoRAs and
  everything else keep their keys.
* Non-tensor values: ``global_step``, ``epoch``, ``name`` and ``step`` go into the metadata;
  anything else is listed in ``ConvertResult.dropped`` (never silently lost).

The tensors themselves are bit-exact: views and shared storages are written as contiguous copies.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..dtypes import BY_NAME, DType
from ..errors import CastOverflowError, ModelkitError, UnsafeFileError, UsageError
from ..formats import open_model
from ..formats.safetensors_write import Header, OutTensor, WriteStats, casts_with_torch, layout, write_stream
from ..model import ModelFile
from ..paths import (
    atomic_output,
    check_output,
    copy_file_atomic,
    default_target,
    ensure_room,
    require_safetensors_name,
    same_file,
    sidecars,
    text_name,
)
from ..remote import is_remote
from . import metadata as md
from . import modelspec as ms
from .result import result_dict

#: ``progress(tensor name, bytes)``, called after each tensor is written; may raise to stop.
Progress = Callable[[str, int], None]

_HYPERNETWORK_KEY = re.compile(r"^\d+\.\d+\.linear\.\d+\.(weight|bias)$")


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` did (or, with ``dry_run``, would do) for one file.

    Attributes:
        source, output: the paths.
        status: ``written`` or ``dry-run``.
        container: the input's container; kind: what ``_kind`` took it for.
        tensors: number of output tensors; size: output bytes.
        changes: what was changed, in words (also in the output's ``modelkit.changes``).
        metadata: the output's ``__metadata__`` (in a dry run ``modelkit.source_sha256`` is still
            the all-zero placeholder: the input is not hashed).
        dropped: non-tensor values of the input that were not carried over.
        sidecars: sidecar files copied (or to be copied) beside the output.
        warnings: things the user should know.
        stats: how the bytes were written (``None`` for a dry run).
        scan: the input's scan verdict (``None`` when the scan was skipped).
        seconds: wall time.
    """

    source: str
    output: str
    status: str
    container: str
    kind: str
    tensors: int
    size: int
    changes: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, Any] = field(default_factory=dict)
    sidecars: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    stats: WriteStats | None = None
    scan: str | None = None
    seconds: float = 0.0

    to_dict = result_dict


def _kind(mf: ModelFile, detected: str | None = None) -> str:
    """What kind of file this is, for the type-aware rules: embedding, hypernetwork, checkpoint, or
    what detection calls it (lora, vae, controlnet, ...), else other."""
    names = set(mf)
    if any(n.startswith("string_to_param.") for n in names) or names in ({"clip_l", "clip_g"}, {"emb_params"}):
        return "embedding"
    if names and all(_HYPERNETWORK_KEY.match(n) for n in names) and (
            "layer_structure" in mf.extras or "activation_func" in mf.extras):
        return "hypernetwork"
    if any(n.startswith("model.diffusion_model.") for n in names):
        return "checkpoint"
    # a layout the key rules above do not know (a diffusers embedding, ...), or lora, vae, controlnet ...
    return detected if detected and detected != "unknown" else "other"


def _architecture(mf: ModelFile, kind: str) -> str | None:
    """The ``modelspec.architecture`` where the minimal rules know it."""
    names = set(mf)
    if kind == "embedding":
        if names == {"clip_l", "clip_g"}:
            return "stable-diffusion-xl-v1-base/textual-inversion"
        shapes = {mf[n].shape[-1] for n in names if mf[n].shape}
        return "stable-diffusion-v1/textual-inversion" if shapes == {768} else None
    if kind == "hypernetwork":
        dims = {n.split(".", 1)[0] for n in names}
        return "stable-diffusion-v1/hypernetwork" if "768" in dims and "1024" not in dims else None
    if kind == "checkpoint":
        if any(n.startswith("conditioner.embedders.1.") for n in names):
            return "stable-diffusion-xl-v1-base"
        tok = mf.get("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        if tok is not None and tok.shape[-1] == 768:
            return "stable-diffusion-v1"
    return None


def _base_of(det: Any, arch: str | None) -> tuple[str | None, str | None]:
    """(base, prediction) of a detected file; the minimal rules' architecture when detection has no base."""
    base, pred = det.base, det.variant.get("prediction")
    if base is None and arch:
        base = {"stable-diffusion-v1": "sd1", "stable-diffusion-xl-v1-base": "sdxl"}.get(arch.split("/")[0])
    return base, pred


@dataclass
class Plan:
    """The output of one file, decided before any data is read."""

    tensors: list[OutTensor]
    metadata: dict[str, str]
    dropped: dict[str, Any]
    changes: list[str]
    warnings: list[str]
    kind: str
    architecture: str | None
    title: str | None
    base_metadata: dict[str, str] = field(default_factory=dict)
    #: for the ModelSpec block (``modelspec.modelspec_block``): the base, its prediction, the kind of
    #: file when it is not ``kind`` (a part of a checkpoint), and the input's keys it replaces
    base: str | None = None
    prediction: str | None = None
    spec_kind: str | None = None
    spec_override: tuple[str, ...] = ()


def plan_convert(mf: ModelFile, dtype: DType | None = None) -> Plan:
    """Decide the output tensors and metadata of ``convert`` for an open file (reads no tensor data but
    the few small ones detection probes). ``dtype``: what a GGUF file's tensors are dequantized to
    (float16 by default); other containers keep every dtype."""
    from ..detect import detect_modelfile

    det = detect_modelfile(mf)
    kind = _kind(mf, det.kind)
    changes: list[str] = []
    warnings: list[str] = []
    if mf.container != "safetensors":
        changes.append(f"container {mf.container} -> safetensors")
    if mf.wrappers:
        changes.append(f"{'/'.join(mf.wrappers)} wrapper removed")
    tensors = [OutTensor.of(ref) for ref in mf.values()]
    if mf.container == "gguf":
        from .gguf_ops import plan_from_gguf

        want = dtype or BY_NAME["float16"]
        tensors = plan_from_gguf(mf, want)
        quantized = len((mf.info.get("gguf") or {}).get("types", {}))
        changes.append(f"{quantized} quantized tensor{_s(quantized)} dequantized by the gguf package; float tensors "
                       f"as {want.name}")
    elif dtype is not None:
        raise UsageError(mf.path, f"convert keeps every dtype of a {mf.container} file; --dtype is for GGUF input",
                         "Use modelkit prune --dtype to cast")
    keep: tuple[str, ...] = ()
    as_json: tuple[str, ...] = ()
    token_meta: dict[str, str] = {}
    if kind == "embedding":
        params = [ref for ref in mf.values() if ref.name.startswith("string_to_param.")]
        if len(params) == 1:
            # token ids kept as tensors (the original textual-inversion layout) are the tokenizer's
            # business, not the embedding's: A1111 and ComfyUI read emb_params alone
            ids = [t.name for t in tensors if t.name.startswith("string_to_token.")]
            tensors = [OutTensor.of(params[0], "emb_params")] + [t for t in tensors
                                                                 if t.name != params[0].name and t.name not in ids]
            changes.append(f"{params[0].name} -> emb_params")
            if ids:
                changes.append(f"token id tensor{'s' if len(ids) > 1 else ''} {', '.join(ids)} dropped")
        elif len(params) > 1:
            warnings.append(f"{len(params)} string_to_param tensors; A1111 reads only one, so names were kept")
        elif det.subtype == "diffusers" and len(tensors) == 1:
            # {"<token>": [vectors, width] or [width]}: the token goes to the metadata, the vectors
            # to emb_params (2-D), the layout A1111 and ComfyUI both read.
            (ref,) = mf.values()
            shape = ref.shape if len(ref.shape) == 2 else (1, *ref.shape)
            tensors = [OutTensor(name="emb_params", dtype=ref.dtype, shape=shape, ref=ref)]
            token_meta["name"] = ref.name
            changes.append(f"{ref.name!r} (a diffusers embedding) -> emb_params {list(shape)}, token in metadata")
        keep = md.EMBEDDING_EXTRAS
    elif kind == "hypernetwork":
        as_json = md.HYPERNETWORK_EXTRAS
    meta, dropped = md.split_extras(mf.extras, keep=keep, as_json=as_json)
    meta = {**token_meta, **meta}
    if kind == "hypernetwork":
        meta["modelkit.layout"] = "a1111-hypernetwork/1"
    if meta:
        changes.append("non-tensor values to metadata: " + ", ".join(sorted(k for k in meta if "." not in k)))
    if dropped:
        changes.append(f"{len(dropped)} non-tensor value{_s(len(dropped))} not carried over")
    _note_layout_changes(mf, changes)
    name = mf.extras.get("name")
    return Plan(tensors, meta, dropped, changes, warnings, kind, _architecture(mf, kind),
                name if isinstance(name, str) and name else None, dict(mf.metadata),
                *_base_of(det, _architecture(mf, kind)))


def _note_layout_changes(mf: ModelFile, changes: list[str]) -> None:
    refs = list(mf.values())
    views = sum(1 for r in refs if not r.is_contiguous)
    keys = [r.storage_key for r in refs if r.storage_key is not None and mf.container != "safetensors"]
    shared = len(keys) - len(set(keys))
    if views:
        changes.append(f"{views} non-contiguous views written as contiguous tensors")
    if shared:
        changes.append(f"{shared} tensors sharing a storage written as separate copies")
    if any(r.byteorder == "big" and r.dtype.itemsize > 1 for r in refs):
        changes.append("big-endian arrays written little-endian")


def check_scan(src: str, ignore_scan: bool) -> tuple[str | None, list[str]]:
    """Scan ``src``; refuse it when unsafe unless ``ignore_scan``. Returns (verdict, warnings).

    Raises:
        UnsafeFileError: the scan says ``unsafe`` and ``ignore_scan`` is false.
    """
    from ..scan.engine import scan_file

    if os.path.isdir(src):  # a diffusers folder: each pickle-based weights file is scanned as it is opened
        return None, []
    report = scan_file(src)
    bad = [f for f in report.findings if f.verdict == "unsafe"]
    if report.verdict == "unsafe":
        what = bad[0].message if bad else "unsafe content"
        if not ignore_scan:
            raise UnsafeFileError(
                src, f"the scan found it unsafe ({what})",
                "Run `modelkit scan` on it; --ignore-scan reads it anyway, still only through the allow-list",
            )
        return report.verdict, [f"the scan found it unsafe ({what}); read anyway (--ignore-scan), "
                                "only through the allow-list"]
    if report.verdict == "suspicious":
        return report.verdict, ["the scan found it suspicious; run `modelkit scan` on it for details"]
    return report.verdict, []


def early_hash(src: str, dry_run: bool) -> contextlib.AbstractContextManager[md.SourceHash | None]:
    """The sha256 of ``src``, started now (before the scan and the imports, so that it overlaps
    them) unless ``dry_run``; stopped when the block ends, normally or not, if nothing waited for it."""
    return contextlib.nullcontext() if dry_run else md.SourceHash(src)


def write_plan(
    src: str, target: str, plan: Plan, *, force: bool, dry_run: bool,
    progress: Progress | None = None, extra_changes: Sequence[str] = (), hasher: md.SourceHash | None = None,
    allow_overflow: bool = True, dtype: str | None = None,
) -> tuple[Header, dict[str, str], WriteStats | None, list[str]]:
    """Lay out the header, then (unless ``dry_run``) stream the file and copy its sidecars.

    ``hasher`` is the sha256 of ``src`` already under way (``early_hash``); needed unless ``dry_run``.
    Unless ``allow_overflow``, a cast that turned finite values into inf raises ``CastOverflowError``
    (``dtype`` names the target in its message) before the rename: nothing is published.

    Returns:
        (header, final metadata, write stats or None, sidecar outputs).
    """
    changes = plan.changes + list(extra_changes)
    title = plan.title or os.path.splitext(text_name(target))[0]  # metadata is UTF-8; file names may not be
    spec = ms.modelspec_block(kind=plan.spec_kind or plan.kind, base=plan.base, prediction=plan.prediction,
                              title=title, names=[t.name for t in plan.tensors])
    base = ms.fill(plan.base_metadata, spec, override=plan.spec_override, changes=changes)
    meta = md.combine(base, plan.metadata, md.provenance(text_name(src), changes))
    header = layout(plan.tensors, meta, target)
    cars = sidecars(src, target)
    if dry_run:
        return header, meta, None, [b for _, b in cars]
    assert hasher is not None, "write_plan needs the source hash (early_hash) unless dry_run"
    ensure_room(target, header.size)
    with md.core_for_hash(any(casts_with_torch(t) for t in plan.tensors) and not hasher.cached), \
            atomic_output(target, force=force, inputs=[src]) as fd:
        stats = write_stream(fd, header, meta, late={"modelkit.source_sha256": hasher.hexdigest},
                             on_tensor=progress, path=target)
        if not allow_overflow and stats.overflow:
            raise CastOverflowError(target, dict(stats.overflow), dtype)
    meta["modelkit.source_sha256"] = hasher.hexdigest()
    copied = []
    for a, b in cars:
        if os.path.lexists(b) and not force:
            continue
        copy_file_atomic(a, b, force=force)
        copied.append(b)
    return header, meta, stats, copied


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
    ignore_scan: bool = False,
    progress: Progress | None = None,
    dtype: str | None = None,
) -> ConvertResult:
    """Convert one model file to ``.safetensors``.

    Args:
        src: the input file (any container ``open_model`` reads).
        out: the output file; default: ``src`` with ``.safetensors`` (in ``out_dir`` if given).
        out_dir: the output folder (created if missing).
        force: replace an existing output (never the input itself).
        dry_run: decide everything, write nothing.
        ignore_scan: convert a file the scan calls unsafe (it is still read only through the
            allow-list reader, which refuses what it cannot read safely).
        progress: called after each tensor with its name and size.
        dtype: ``fp16``, ``bf16`` or ``fp32``: what a GGUF file is dequantized to (default fp16).

    Returns:
        ConvertResult.

    Raises:
        UnsafeFileError: the scan found the file unsafe, or the reader refused it.
        OutputExistsError: the output exists (without ``force``) or is the input.
        FormatError: the input is corrupt or holds something safetensors cannot store.
        OutputWriteError: the output could not be written; nothing was left behind.

    Example:
        >>> modelkit.convert("embeddings/style.pt").output  # doctest: +SKIP
        'embeddings/style.safetensors'
    """
    t0 = time.perf_counter()
    s = os.fspath(src)
    from .streaming import OUTPUT_DTYPES, float_dtype

    want = float_dtype(dtype, OUTPUT_DTYPES, "--dtype")
    target = default_output(s, out, out_dir)
    if is_remote(s) and not dry_run:  # downloaded whole beside the output, converted as a local file, the copy removed
        from ..remote.download import run_on_copy

        check_output(target, force=force)
        return run_on_copy(s, target, lambda local: convert(
            local, target, force=force, dry_run=dry_run, ignore_scan=ignore_scan, progress=progress, dtype=dtype),
            progress)
    check_output(target, force=force, inputs=[] if is_remote(s) else [s])  # a remote dry run: ranged reads
    with early_hash(s, dry_run) as hasher:
        verdict, warnings = check_scan(s, ignore_scan)
        with open_model(s, allow_hidden_pickles=ignore_scan) as mf:
            plan = plan_convert(mf, want)
            header, meta, stats, cars = write_plan(s, target, plan, force=force, dry_run=dry_run,
                                                   progress=progress, hasher=hasher)
            warnings += plan.warnings
            if plan.dropped:
                warnings.append(f"{len(plan.dropped)} non-tensor value{_s(len(plan.dropped))} not carried over: "
                                + ", ".join(list(plan.dropped)[:5]) + (" ..." if len(plan.dropped) > 5 else ""))
            return ConvertResult(
                source=s, output=target, status="dry-run" if dry_run else "written", container=mf.container,
                kind=plan.kind, tensors=len(plan.tensors), size=header.size, changes=tuple(meta_changes(meta)),
                metadata=meta, dropped=plan.dropped, sidecars=tuple(cars), warnings=tuple(warnings), stats=stats,
                scan=verdict, seconds=time.perf_counter() - t0,
            )


def default_output(src: str, out: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str] | None,
                   tag: str = "") -> str:
    """``out`` (which must end in ``.safetensors``), else ``paths.default_target``: ``output_name(src, tag)`` in
    ``out_dir`` or beside ``src`` (a remote ``src``: in the current folder)."""
    if out is not None:
        if same_file(os.fspath(out), src):
            return os.fspath(out)  # check_output says what is wrong: it is the input
        return require_safetensors_name(out)
    return default_target(src, out_dir, tag)


def meta_changes(meta: dict[str, str]) -> list[str]:
    import json

    value = json.loads(meta.get("modelkit.changes", "[]"))
    return [str(v) for v in value] if isinstance(value, list) else []


R = TypeVar("R")


def run_many(
    pairs: Sequence[tuple[str, str]],
    fn: Callable[[str, str, Progress], R],
    *,
    jobs: int = 1,
    on_tensor: Progress | None = None,
    on_done: Callable[[int, R | ModelkitError], None] | None = None,
    stop: threading.Event | None = None,
) -> list[R | ModelkitError]:
    """Run ``fn(src, out, progress)`` over ``pairs``, ``jobs`` at a time; results in input order.

    A ModelkitError from one file is returned in its place. Setting ``stop`` (or Ctrl-C while this
    waits) stops every file at its next tensor; each removes its temp file, and the interrupt is
    raised.
    """
    stop = stop or threading.Event()
    lock = threading.Lock()

    def progress(name: str, nbytes: int) -> None:
        if stop.is_set():
            raise KeyboardInterrupt("stopped")
        if on_tensor is not None:
            with lock:
                on_tensor(name, nbytes)

    def one(i: int) -> R | ModelkitError:
        if stop.is_set():
            raise KeyboardInterrupt("stopped")
        src, out = pairs[i]
        try:
            return fn(src, out, progress)
        except ModelkitError as exc:
            return exc

    results: list[R | ModelkitError] = []
    pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="modelkit")
    try:
        futures: list[Future[R | ModelkitError]] = [pool.submit(one, i) for i in range(len(pairs))]
        for i, fut in enumerate(futures):
            res = fut.result()
            results.append(res)
            if on_done is not None:
                on_done(i, res)
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def _s(n: int) -> str:
    """The plural ending for ``n`` things."""
    return "" if n == 1 else "s"
