"""``modelkit convert --to single|diffusers``: the layout conversion's part of the convert command."""

from __future__ import annotations

import os

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError, UsageError
from ..ops.layout_convert import LayoutResult, convert_layout
from ..paths import signals_raise
from ._words import count
from .output import Output, human_bytes


def default_target(src: str, to: str, part: str | None, out_dir: str | None) -> str:
    """``FOLDER.safetensors`` for ``--to single``, ``STEM`` (a folder) for ``--to diffusers``; beside
    the input or in ``out_dir``; with ``--part`` the part's name is added."""
    base = os.path.basename(os.path.normpath(src))
    stem = base[: -len(".safetensors")] if base.lower().endswith(".safetensors") else os.path.splitext(base)[0]
    stem = stem + (f"-{part}" if part else "")
    name = stem + ".safetensors" if to == "single" else stem
    folder = out_dir if out_dir is not None else os.path.dirname(os.path.abspath(os.path.normpath(src)))
    return os.path.join(folder, name)


def run_layout(out: Output, paths: tuple[str, ...], o: str | None, out_dir: str | None, to: str | None,
               part: str | None, configs: str | None, prediction: str | None, force: bool, dry_run: bool,
               ignore_scan: bool) -> int:
    """Run one layout conversion and render it; the exit code."""
    try:
        if to is None:
            raise UsageError(None, "--part, --configs and --prediction go with --to single or --to diffusers")
        if len(paths) != 1:
            raise UsageError(None, f"--to converts one input at a time, not {len(paths)}")
        if configs is not None and to != "diffusers" or prediction is not None and to != "diffusers":
            raise UsageError(None, "--configs and --prediction go with --to diffusers")
        target = o if o is not None else default_target(paths[0], to, part, out_dir)
        with signals_raise():
            res = convert_layout(paths[0], target, to=to, part=part, configs=configs, prediction=prediction,
                                 force=force, dry_run=dry_run, ignore_scan=ignore_scan)
    except ModelkitError as exc:
        out.fail(exc, "modelkit.convert/1")
        return EXIT_FINDINGS if isinstance(exc, UnsafeFileError) else EXIT_ERROR
    for w in res.warnings:
        out.warn(f"{res.source}: {w}")
    render(out, res)
    if out.json_mode:
        out.json({"schema": "modelkit.convert/1", "files": [res.to_dict()]})
    return EXIT_OK


def render(out: Output, r: LayoutResult) -> None:
    verb = "would write" if r.status == "dry-run" else "wrote"
    what = f"the {r.part}" if r.part else (r.family or "model")
    out.result(f"{r.source} -> {r.output}  ({verb} {what} as {'an LDM file' if r.to == 'single' else 'a diffusers folder'}, "
               f"{count(r.tensors, 'tensor')}, {human_bytes(r.size)})")
    if r.configs:
        out.line(f"  configs: {r.configs}")
    if r.kept:
        out.line(f"  {count(len(r.kept), 'tensor')} with no place in a diffusers folder kept in ldm_extra.safetensors")
