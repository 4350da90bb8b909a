"""``modelkit convert --to gguf`` on a Flux-shaped fp16 transformer: Q8_0 (the gguf package's
quantizer) beside the K-quants (modelkit's numpy port of llama.cpp's reference quantizer).

The input is ``bench_fp8``'s: Flux.1-dev's transformer keys and shapes with fewer blocks (default 4
double and 5 single: about 4.3 GB in fp16), random normal values times 0.02, generated on disk.
Each row is ``modelkit.convert.to_gguf`` in a fresh child process (``bench.rounds``: peak RSS from
``getrusage``, wall time including a final ``sync``, rows round-robin). Before the table, one
3072x3072 float32 tensor is quantized in-process in each K-quant type (CPU seconds), the
per-tensor speed.

Usage: ``python bench/bench_gguf.py [--out bench/out] [--runs 1] [--double 4] [--single 5]
[--quants Q8_0,Q4_K] [--keep]``. The generated input and outputs are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_fp8 import build, flux_layout  # noqa: E402
from bench.rounds import row, run  # noqa: E402

TO_GGUF = ("import sys; from modelkit.ops.gguf_ops import to_gguf; "
           "to_gguf(sys.argv[1], sys.argv[2], quant=sys.argv[3], base='flux', force=True)")


def per_tensor() -> None:
    """CPU seconds to quantize one 3072x3072 tensor in each K-quant type."""
    import numpy as np

    from modelkit.ops import kquants

    x = (np.random.default_rng(0).standard_normal((3072, 3072), dtype=np.float32) * 0.02).astype(np.float32)
    cells = []
    for q in kquants.TYPES:
        t0 = time.process_time()
        kquants.quantize(x, q)
        dt = time.process_time() - t0
        cells.append(f"{q} {dt:.2f} s ({x.size / dt / 1e6:.1f} M values/s)")
    print("one 3072x3072 float32 tensor, CPU time: " + ", ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--double", type=int, default=4)
    ap.add_argument("--single", type=int, default=5)
    ap.add_argument("--quants", default="Q8_0,Q4_K", help="comma-separated --quant values, one row each")
    ap.add_argument("--keep", action="store_true", help="keep the generated input and outputs")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    per_tensor()
    py = sys.executable
    src = os.path.join(args.out, f"flux-{args.double}d{args.single}s-fp16.safetensors")
    layout = flux_layout(args.double, args.single)
    size = os.path.getsize(src) if os.path.exists(src) else build(src, layout)
    print(f"input: Flux.1-dev shapes, {args.double} double + {args.single} single blocks, {len(layout)} tensors, "
          f"{size / 1e9:.2f} GB fp16")
    subprocess.run([py, "-m", "compileall", "-q", os.path.join(ROOT, "modelkit")], check=True)
    subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    outs = [os.path.join(args.out, f"flux-{q}.gguf") for q in quants]
    res = run([([py, "-c", TO_GGUF, src, out, q], out) for q, out in zip(quants, outs)], args.runs)
    for q, r, out in zip(quants, res, outs):
        row(f"convert --to gguf --quant {q}", r, res[0], f"{os.path.getsize(out) / 1e9:.2f} GB out")
    print(f"median (and min) of {args.runs} run(s) per row, round-robin; page cache warm; ratios to the first "
          f"row; each time includes a final sync")
    if not args.keep:
        for p in (src, *outs):
            if os.path.exists(p):
                os.unlink(p)


if __name__ == "__main__":
    main()
