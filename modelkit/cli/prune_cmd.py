"""``modelkit prune IN... [-o OUT | --out-dir DIR] [--ema ...] [--dtype ...] [--part ...]``"""

from __future__ import annotations

import sys
from typing import Any

import click

from .._exit import EXIT_ERROR
from ..errors import ModelkitError
from ..ops.convert import Progress
from ..ops.fp8 import FP8_MODES
from ..ops.prune import CAST_TARGETS, EMA_MODES, PARTS, PruneResult, check_options, default_tag, prune
from ._words import count
from .convert_cmd import common_options, run_command
from .output import Output, human_bytes


@click.command("prune")
@common_options
@click.option("--ema", default="drop", show_default=True, metavar="|".join(EMA_MODES),
              help="keep or drop the EMA weights, or only: write the UNet from its EMA copy.")
@click.option("--dtype", "dtype", metavar="|".join(CAST_TARGETS), help="Cast floating-point tensors (never int/bool).")
@click.option("--fp8", "fp8", type=click.Choice(FP8_MODES),
              help="With --dtype fp8_*: values out of range are refused (default), clamped (saturated), or "
                   "scaled: a float32 scale per weight, in ComfyUI's comfy_quant layout.")
@click.option("--allow-overflow", is_flag=True, help="Write the output even if a cast turns finite values into inf.")
@click.option("--part", metavar="|".join(PARTS), help="Keep one component without its prefix (a VAE loses first_stage_model.); Flux/SD3 single files also take transformer|clip_l|clip_g|t5xxl.")
def prune_cmd(paths: tuple[str, ...], out: str | None, out_dir: str | None, force: bool, dry_run: bool,
              ignore_scan: bool, jobs: int, json_mode: bool, quiet: bool, ema: str, dtype: str | None,
              part: str | None, allow_overflow: bool, fp8: str | None) -> None:
    """Prune checkpoints into .safetensors: drop EMA, optimizer state and junk, cast, fix, extract.

    The default output is IN.pruned.safetensors (IN.vae.safetensors with --part vae, ...).
    Broken position_ids are rewritten as int64 0..76. A cast that overflows to inf is refused
    unless --allow-overflow. Exit status: 0 ok, 1 a file was refused as unsafe, 2 a file could
    not be pruned (or its cast overflowed).
    """
    out_ = Output(json_mode, quiet)
    try:
        check_options(ema, dtype, part, fp8)
    except ModelkitError as exc:
        out_.fail(exc, "modelkit.prune/1")
        sys.exit(EXIT_ERROR)

    def job(src: str, target: str, progress: Progress) -> PruneResult:
        return prune(src, target, ema=ema, dtype=dtype, part=part, force=force, dry_run=dry_run,
                     ignore_scan=ignore_scan, progress=progress, allow_overflow=allow_overflow,
                     fp8=fp8)

    sys.exit(run_command(out_, "prune", paths, out, out_dir, default_tag(part), jobs, job, render_prune,
                         whole_folders=True))


def render_prune(out: Output, r: Any) -> None:
    verb = "would write" if r.status == "dry-run" else "wrote"
    out.result(f"{r.source} -> {r.output}  ({verb} {count(r.tensors, 'tensor')}, {human_bytes(r.input_size)} -> "
             f"{human_bytes(r.size)})")
    for c in r.changes:
        out.line(f"  {c}")
    for s in r.sidecars:
        out.line(f"  sidecar {s}")
