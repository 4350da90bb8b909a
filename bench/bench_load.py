"""``modelkit.load`` beside safetensors and torch.load, CPU (and CUDA when present), one run.

Uses the 2.1 GB SD-1.5-shaped fp16 checkpoint of bench/bench_inspect.py, as ``.ckpt`` and as
``.safetensors`` (same tensors). Every loader is timed until its tensors are usable: each page
touched on the CPU, the device synchronised on CUDA. Page cache warm, median of 3.

Usage: ``python bench/bench_load.py [--out bench/out] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from modelkit.ops.loadbench import bench_load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    ckpt = os.path.join(args.out, "sd15-full-fp16.ckpt")
    if not os.path.exists(ckpt):
        from bench.bench_inspect import build
        from fixtures.sd_layout import sd1_layout

        os.makedirs(args.out, exist_ok=True)
        build(ckpt, sd1_layout())
    st = os.path.join(args.out, "sd15-full-fp16.safetensors")
    if not os.path.exists(st):
        from safetensors.torch import save_file

        sd = torch.load(ckpt, weights_only=True, mmap=True)["state_dict"]
        save_file(sd, st)
    for path in (st, ckpt):
        r = bench_load(path, args.device, None, 3)
        print(f"{os.path.basename(path)}: {r.tensors} tensors, {r.gigabytes:.2f} GB -> {r.device}")
        for row in r.rows:
            print(f"  {row.name:<40} {row.seconds * 1000:8.1f} ms {row.gbps:7.2f} GB/s {row.note}")


if __name__ == "__main__":
    main()
