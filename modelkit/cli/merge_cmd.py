"""``modelkit merge lora BASE A:0.8 B:-0.3 -o OUT`` and ``modelkit merge models A B [C] -o OUT``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError
from ..ops.convert import Progress
from ..ops.streaming import COMPUTE_DTYPES, OUTPUT_DTYPES
from ._words import count
from .output import Output, human_bytes


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command that writes one file shares."""
    for opt in reversed([
        click.option("--force", is_flag=True, help="Replace an existing output (never an input)."),
        click.option("--dry-run", is_flag=True, help="Check everything and say what would be written; write nothing."),
        click.option("--ignore-scan", is_flag=True, help="Read files the scan calls unsafe (still only through the allow-list)."),
        click.option("--json", "json_mode", is_flag=True, help="Print JSON."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no chatter; results and errors stay."),
    ]):
        fn = opt(fn)
    return fn


def run_op(out: Output, schema: str, op: Callable[[Progress | None], Any], render: Callable[[Output, Any], None],
           total: int = 0, desc: str = "") -> int:
    """Run one op with a byte progress bar; render its result; return the exit code.

    A ModelkitError becomes one line (and, with ``--json``, an ``error`` object): exit 1 for a file
    refused as unsafe, 2 for anything else. Ctrl-C and SIGTERM go up to ``cli.main.main`` (one
    line, exit 130 or 143); the bar is closed first and no partial output is left.
    """
    bar = out.bar(total, desc)
    try:
        res = op((lambda _name, n: bar.update(n)) if bar is not None else None)
    except ModelkitError as exc:
        out.fail(exc, schema)
        return EXIT_FINDINGS if isinstance(exc, UnsafeFileError) else EXIT_ERROR
    finally:
        if bar is not None:
            bar.close()
    for w in res.warnings:
        out.warn(w)
    render(out, res)
    if out.json_mode:
        out.json({"schema": schema, **res.to_dict()})
    return EXIT_OK


def passive_threads() -> None:
    """Tune this process for streaming merges (the CLI's own process; the API leaves it alone).

    * torch's OpenMP threads sleep rather than spin between parallel regions (``OMP_WAIT_POLICY``,
      set before torch loads; a value the user set is kept). A streaming merge alternates short
      parallel operations with I/O in the main thread, and spinning threads then hold the cores
      the I/O and the next operation need: several times slower on a busy machine with few cores.
    * glibc serves allocations of 4 MiB and more by ``mmap`` (a fixed ``M_MMAP_THRESHOLD``), so each
      tensor-sized buffer goes back to the system when freed instead of fragmenting the heap.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).mallopt(-3, 4 << 20)  # -3: M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@click.group("merge")
def merge_group() -> None:
    """Bake LoRAs into a checkpoint, or merge checkpoints: streaming, exact, atomic."""


@merge_group.command("lora")
@click.argument("base", type=click.Path())
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", "out", type=click.Path(), help="Output .safetensors (default BASE.merged.safetensors).")
@click.option("--unet-ratio", type=float, default=1.0, show_default=True, help="Multiplies every ratio for UNet modules.")
@click.option("--te-ratio", type=float, default=1.0, show_default=True, help="Multiplies every ratio for text-encoder modules.")
@click.option("--allow-unmatched", is_flag=True, help="Skip (and report) LoRA modules that match no weight.")
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), default="fp32", show_default=True)
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), help="Cast float tensors of the output (default: as BASE).")
@click.option("--allow-overflow", is_flag=True, help="Write the output even if a cast turns finite values into inf.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), help="Threads computing ahead of the writer.")
@output_options
def merge_lora_cmd(base: str, loras: tuple[str, ...], out: str | None, unet_ratio: float, te_ratio: float,
                   allow_unmatched: bool, compute_dtype: str, dtype: str | None, jobs: int | None, force: bool,
                   dry_run: bool, ignore_scan: bool, json_mode: bool, quiet: bool, allow_overflow: bool) -> None:
    """Bake LoRA/LyCORIS files into a checkpoint: BASE FILE[:RATIO]...

    LoRA, LoCon (incl. 3x3 and Tucker), LoHa, LoKr, (IA)^3 and DoRA in kohya, diffusers and PEFT
    key styles, for SD 1.x, 2.x and SDXL. Modules that match nothing are an error unless
    --allow-unmatched; a LoRA for another base is refused; a result that overflows to inf in its
    dtype is refused unless --allow-overflow. Exit status: 0 ok, 1 a file was refused as unsafe,
    2 an error.
    """
    passive_threads()
    from ..ops.lora.bake import merge_lora

    o = Output(json_mode, quiet)

    def op(progress: Progress | None) -> Any:
        return merge_lora(base, list(loras), out, unet_ratio=unet_ratio, te_ratio=te_ratio,
                          allow_unmatched=allow_unmatched, compute_dtype=compute_dtype, dtype=dtype, force=force,
                          dry_run=dry_run, ignore_scan=ignore_scan, jobs=jobs, progress=progress,
                          allow_overflow=allow_overflow)

    sys.exit(run_op(o, "modelkit.merge.lora/1", op, _render_lora, _size(base), os.path.basename(base)))


def _render_lora(out: Output, r: Any) -> None:
    verb = "would write" if r.status == "dry-run" else "wrote"
    out.result(f"{r.source} -> {r.output}  ({verb} {count(r.tensors, 'tensor')}, {r.touched:,} changed, {human_bytes(r.size)})")
    for u in r.loras:
        algos = ", ".join(f"{k} {v}" for k, v in u.algorithms.items())
        out.line(f"  {u.path} x{u.ratio:g}: {u.matched}/{u.modules} modules ({algos})"
                 + (f", {len(u.unmatched)} unmatched" if u.unmatched else ""))


@merge_group.command("models")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.argument("c", type=click.Path(), required=False)
@click.option("-o", "--output", "out", type=click.Path(), help="Output .safetensors (default A.merged.safetensors).")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of B (weighted sum) or of B - C (add difference).")
@click.option("--block-weights", metavar="W,...", help="Per-block weights: IN00..,M00,OUT00.. (25 for SD1, 19 for SDXL), D00..,S00.. for Flux, "
                   "J00.. for SD3; BASE first optional.")
@click.option("--components", default="unet,te,vae", show_default=True, help="Which of unet, te, vae to merge (the rest: A's); a Flux/SD3 file also takes "
              "transformer, clip_l, clip_g, t5xxl.")
@click.option("--vae", "vae", type=click.Path(), help="Bake this VAE into the output.")
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), default="fp32", show_default=True)
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), help="Cast float tensors of the output (default: as A).")
@click.option("--allow-overflow", is_flag=True, help="Write the output even if a cast turns finite values into inf.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), help="Threads computing ahead of the writer.")
@output_options
def merge_models_cmd(a: str, b: str, c: str | None, out: str | None, alpha: float, block_weights: str | None,
                     components: str, vae: str | None, compute_dtype: str, dtype: str | None, jobs: int | None,
                     force: bool, dry_run: bool, ignore_scan: bool, json_mode: bool, quiet: bool,
                     allow_overflow: bool) -> None:
    """Merge checkpoints: A*(1-alpha) + B*alpha, or A + (B-C)*alpha with a third model.

    A result that overflows to inf in its dtype is refused unless --allow-overflow.
    Exit status: 0 ok, 1 a file was refused as unsafe, 2 an error.
    """
    passive_threads()
    from ..ops.merge import merge_models

    o = Output(json_mode, quiet)
    comps = [x.strip() for x in components.split(",") if x.strip()]

    def op(progress: Progress | None) -> Any:
        return merge_models(a, b, c, out, alpha=alpha, block_weights=block_weights, components=comps, vae=vae,
                            dtype=dtype, compute_dtype=compute_dtype, force=force, dry_run=dry_run,
                            ignore_scan=ignore_scan, jobs=jobs, progress=progress, allow_overflow=allow_overflow)

    sys.exit(run_op(o, "modelkit.merge.models/1", op, _render_models, _size(a), os.path.basename(a)))


def _render_models(out: Output, r: Any) -> None:
    verb = "would write" if r.status == "dry-run" else "wrote"
    out.result(f"{' + '.join(r.sources)} -> {r.output}  ({verb} {count(r.tensors, 'tensor')}, {human_bytes(r.size)})")
    for ch in r.changes:
        out.line(f"  {ch}")
