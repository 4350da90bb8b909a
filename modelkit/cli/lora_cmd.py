"""``modelkit lora extract|merge|convert``: LoRA files from checkpoints and from other LoRAs."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..ops.convert import Progress
from ..ops.streaming import COMPUTE_DTYPES, OUTPUT_DTYPES
from ._words import count
from .merge_cmd import output_options, passive_threads, run_op
from .output import Output, human_bytes

STYLES = ("kohya", "diffusers", "peft")
BASES = ("sd1", "sd2", "sdxl", "flux", "sd3")


@click.group("lora")
def lora_group() -> None:
    """Extract a LoRA from two checkpoints, merge LoRAs, or change a LoRA's key style."""


def _render(out: Output, r: Any) -> None:
    verb = "would write" if r.status == "dry-run" else "wrote"
    out.result(f"{' + '.join(r.sources)} -> {r.output}  ({verb} {count(r.modules, 'module')}, {count(r.tensors, 'tensor')}, "
             f"{human_bytes(r.size)})")
    for ch in r.changes:
        out.line(f"  {ch}")


@lora_group.command("extract")
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), help="Output (default TUNED.lora.safetensors).")
@click.option("--rank", type=click.IntRange(1), default=16, show_default=True, help="Rank of linear and 1x1 layers.")
@click.option("--conv-rank", type=click.IntRange(1), help="Rank of 3x3 convolutions (default: leave them out).")
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), default="fp16", show_default=True)
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), default="fp32", show_default=True)
@click.option("--min-diff", type=float, default=0.0, show_default=True, help="Leave out layers that differ by at most this.")
@click.option("--allow-overflow", is_flag=True, help="Write the output even if a cast turns finite values into inf.")
@output_options
def extract_cmd(base: str, tuned: str, out: str | None, rank: int, conv_rank: int | None, dtype: str,
                compute_dtype: str, min_diff: float, allow_overflow: bool, force: bool, dry_run: bool,
                ignore_scan: bool, json_mode: bool, quiet: bool) -> None:
    """Extract a kohya-format LoRA from TUNED - BASE by SVD. Exit status: 0 ok, 1 unsafe input, 2 error."""
    passive_threads()
    from ..ops.lora.extract import extract_lora

    o = Output(json_mode, quiet)

    def op(progress: Progress | None) -> Any:
        return extract_lora(base, tuned, out, rank=rank, conv_rank=conv_rank, dtype=dtype, compute_dtype=compute_dtype,
                            min_diff=min_diff, force=force, dry_run=dry_run, ignore_scan=ignore_scan, progress=progress,
                            allow_overflow=allow_overflow)

    size = os.path.getsize(base) if os.path.isfile(base) else 0
    sys.exit(run_op(o, "modelkit.lora.extract/1", op, _render, size, os.path.basename(tuned)))


@lora_group.command("merge")
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", "out", type=click.Path(), required=True, help="Output file.")
@click.option("--rank", type=click.IntRange(1), help="Re-rank every layer by SVD (default: exact, ranks concatenated).")
@click.option("--conv-rank", type=click.IntRange(1), help="SVD rank of 3x3 convolutions (default --rank).")
@click.option("--base", type=click.Choice(BASES), help="The base model, when detection cannot tell.")
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), default="fp16", show_default=True)
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), default="fp32", show_default=True)
@click.option("--allow-unmatched", is_flag=True, help="Leave out modules whose names match no layer.")
@click.option("--allow-overflow", is_flag=True, help="Write the output even if a cast turns finite values into inf.")
@output_options
def merge_cmd(loras: tuple[str, ...], out: str, rank: int | None, conv_rank: int | None, base: str | None, dtype: str,
              compute_dtype: str, allow_unmatched: bool, allow_overflow: bool, force: bool, dry_run: bool,
              ignore_scan: bool, json_mode: bool, quiet: bool) -> None:
    """Merge LoRAs FILE[:RATIO]... into one kohya-format LoRA. Exit status: 0 ok, 1 unsafe input, 2 error."""
    passive_threads()
    from ..ops.lora.tools import merge_loras

    o = Output(json_mode, quiet)

    def op(_progress: Progress | None) -> Any:
        return merge_loras(list(loras), out, rank=rank, conv_rank=conv_rank, base=base, dtype=dtype,
                           compute_dtype=compute_dtype, allow_unmatched=allow_unmatched, force=force, dry_run=dry_run,
                           ignore_scan=ignore_scan, allow_overflow=allow_overflow)

    sys.exit(run_op(o, "modelkit.lora.merge/1", op, _render))


@lora_group.command("convert")
@click.argument("src", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), required=True,
              help="Output file; for --to peft a folder (one PEFT adapter per component).")
@click.option("--to", "to", type=click.Choice(STYLES), required=True,
              help="kohya; diffusers (the file pipe.load_lora_weights applies); peft (adapter folders).")
@click.option("--base", type=click.Choice(BASES), help="The base model, when detection cannot tell.")
@click.option("--checkpoint", type=click.Path(),
              help="The checkpoint the LoRA is for: its layers name the modules (models of another size).")
@click.option("--allow-unmatched", is_flag=True, help="Leave out modules whose names match no layer.")
@output_options
def convert_cmd(src: str, out: str, to: str, base: str | None, checkpoint: str | None, allow_unmatched: bool,
                force: bool, dry_run: bool, ignore_scan: bool, json_mode: bool, quiet: bool) -> None:
    """Rewrite a LoRA for kohya, diffusers or PEFT. Exit status: 0 ok, 1 unsafe input, 2 error."""
    passive_threads()
    from ..ops.lora.tools import convert_lora

    o = Output(json_mode, quiet)

    def op(_progress: Progress | None) -> Any:
        return convert_lora(src, out, to=to, base=base, checkpoint=checkpoint, allow_unmatched=allow_unmatched,
                            force=force, dry_run=dry_run, ignore_scan=ignore_scan)

    sys.exit(run_op(o, "modelkit.lora.convert/1", op, _render))
