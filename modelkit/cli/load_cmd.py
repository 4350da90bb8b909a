"""``modelkit load PATH [--device] [--dtype] [--bench]``"""

from __future__ import annotations

import sys

import click

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError
from ._words import count
from .output import Output


@click.command("load")
@click.argument("path", type=click.Path())
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.option("--dtype", default=None, help="Cast floating-point tensors (float16, bfloat16, float32).")
@click.option("--bench", is_flag=True, help="Time modelkit beside safetensors, torch.load and the raw copy limit.")
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True, help="Runs per loader (--bench).")
@click.option("--json", "json_mode", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no chatter; results and errors stay.")
def load_cmd(path: str, device: str, dtype: str | None, bench: bool, repeat: int, json_mode: bool,
             quiet: bool) -> None:
    """Load a model file safely onto a device and report the throughput."""
    from ..ops.loadbench import bench_load, time_modelkit

    out = Output(json_mode, quiet)
    try:
        result = bench_load(path, device, dtype, repeat) if bench else time_modelkit(path, device, dtype)
    except ModelkitError as exc:
        out.fail(exc, "modelkit.load/1")
        sys.exit(EXIT_FINDINGS if isinstance(exc, UnsafeFileError) else EXIT_ERROR)
    if json_mode:
        out.json(result.to_dict())
    else:
        out.result(f"{result.path}: {count(result.tensors, 'tensor')}, {result.gigabytes:.3f} GB onto {result.device}")
        for row in result.rows:
            gbps = f"{row.gbps:8.2f} GB/s" if row.seconds else "     n/a"
            note = f"  ({row.note})" if row.note else ""
            out.result(f"  {row.name:<44} {row.seconds * 1000:9.1f} ms {gbps}{note}")
    sys.exit(EXIT_OK)
