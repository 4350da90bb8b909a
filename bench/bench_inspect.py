"""``modelkit inspect`` beside ``torch.load(weights_only=True, mmap=True)`` in one run.

Builds two checkpoints with the real SD 1.5 key set (1,143 tensors, state_dict wrapper): one
full-size fp16 (about 2 GB) and one tiny (same keys, tiny shapes). Inspect reads headers and
the pickle only, so its time should not grow with the file's size; torch.load with mmap also
avoids reading data, but rebuilds every tensor object.

Usage: ``python bench/bench_inspect.py [--out bench/out] [--runs 7]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import modelkit  # noqa: E402
from fixtures.sd_layout import param_count, sd1_layout, tiny_sd1_layout  # noqa: E402


def build(path: str, layout: dict) -> None:
    if os.path.exists(path):
        return
    sd: dict[str, torch.Tensor] = OrderedDict()
    for name, (shape, dt) in layout.items():
        sd[name] = torch.zeros(shape, dtype=torch.int64 if dt == "int64" else torch.float16)
    torch.save({"state_dict": sd, "global_step": 840000, "epoch": 6}, path)


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def timed(fn, runs: int) -> tuple[float, int]:
    times, reads = [], []
    for _ in range(runs):
        r0 = rchar()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        reads.append(rchar() - r0)
    return statistics.median(times), int(statistics.median(reads))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    files = {
        "tiny (same keys)": (os.path.join(args.out, "sd15-tiny-fp16.ckpt"), tiny_sd1_layout()),
        "SD 1.5 full fp16": (os.path.join(args.out, "sd15-full-fp16.ckpt"), sd1_layout()),
    }
    print(f"{'file':<18} {'size':>10} {'tensors':>8} {'params':>14} | {'modelkit inspect':>17} {'read':>9} | "
          f"{'torch.load mmap':>16} {'read':>9}")
    for label, (path, layout) in files.items():
        t0 = time.perf_counter()
        build(path, layout)
        build_s = time.perf_counter() - t0

        def mk(path: str = path) -> None:
            modelkit.inspect(path)

        def tl(path: str = path) -> None:
            torch.load(path, weights_only=True, mmap=True, map_location="cpu")

        mk()
        tl()  # warm the page cache for both
        mk_s, mk_read = timed(mk, args.runs)
        tl_s, tl_read = timed(tl, args.runs)
        size = os.path.getsize(path)
        print(f"{label:<18} {size / 1e9:>8.3f}GB {len(layout):>8} {param_count(layout):>14,} | "
              f"{mk_s * 1000:>14.1f} ms {mk_read / 1e6:>7.2f}MB | {tl_s * 1000:>13.1f} ms {tl_read / 1e6:>7.2f}MB"
              f"   (built in {build_s:.1f}s)" if build_s > 1 else
              f"{label:<18} {size / 1e9:>8.3f}GB {len(layout):>8} {param_count(layout):>14,} | "
              f"{mk_s * 1000:>14.1f} ms {mk_read / 1e6:>7.2f}MB | {tl_s * 1000:>13.1f} ms {tl_read / 1e6:>7.2f}MB")
    print(f"median of {args.runs} runs each, page cache warm; 'read' = bytes read through syscalls (/proc/self/io)")


if __name__ == "__main__":
    main()
