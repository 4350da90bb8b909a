"""``modelkit convert`` and ``modelkit prune`` beside ``cp`` and the naive torch way, in one run.

Files (synthetic, random values, the real SD 1.5 key set from ``fixtures.sd_layout``; a
``state_dict`` wrapper plus ``global_step``/``epoch``, as the original ``.ckpt`` files have):

* ``sd15-fp16.ckpt``: full-size SD 1.5, fp16, about 2.1 GB: convert (same dtype).
* prune input, fp32 with EMA: full size (about 7.7 GB) only with ``--big`` and enough free disk;
  by default a scaled-down variant (UNet at 160 channels instead of 320, VAE and text encoder
  full size: about 2.5 GB), and the table says which one ran.

Rows, each a fresh child process (peak RSS from ``getrusage(RUSAGE_CHILDREN)`` in a wrapper
process whose only child is the command); every timing includes a final ``sync`` so all rows are
compared on durable output (modelkit fsyncs its output; cp and save_file do not):

* ``convert`` same dtype: ``modelkit.convert``, with the sha256 of the input that goes into the
  provenance metadata computed (the hash cache turned off: a file seen for the first time), and
  with that sha256 taken from the hash cache (the file was hashed, converted or pruned before);
* ``cp`` of the same file;
* naive: ``torch.load(weights_only=True)`` + ``safetensors.torch.save_file``;
* ``prune`` fp32+EMA -> fp16, EMA dropped: ``modelkit.prune(ema="drop", dtype="fp16")``, hash
  computed and hash cached as for convert;
* naive prune: load, drop ``model_ema.*``, ``.half()`` the floats, ``save_file``.

modelkit's bytecode is compiled first (``compileall``), as a pip install does: with
``PYTHONDONTWRITEBYTECODE`` set, every run would otherwise compile it again (about 70 ms).

Usage: ``python bench/bench_convert.py [--out bench/out] [--runs 3] [--big] [--dest /dev/shm]``

``--dest`` puts the outputs elsewhere: on a tmpfs (``/dev/shm``) the disk's write speed leaves
the figures and what remains is each tool's own work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.rounds import row, run  # noqa: E402

SCALED = {"model_channels": 160}
COLD = ["env", "MODELKIT_HASH_CACHE=0"]

CONVERT = "import modelkit, sys; modelkit.convert(sys.argv[1], sys.argv[2], force=True)"
PRUNE = "import modelkit, sys; modelkit.prune(sys.argv[1], sys.argv[2], ema='drop', dtype='fp16', force=True)"
NAIVE_CONVERT = (
    "import sys, torch\nfrom safetensors.torch import save_file\n"
    "sd = torch.load(sys.argv[1], weights_only=True, map_location='cpu')['state_dict']\n"
    "save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])\n"
)
NAIVE_PRUNE = (
    "import sys, torch\nfrom safetensors.torch import save_file\n"
    "sd = torch.load(sys.argv[1], weights_only=True, map_location='cpu')['state_dict']\n"
    "sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()"
    " if not k.startswith('model_ema.')}\n"
    "save_file(sd, sys.argv[2])\n"
)


def build(path: str, layout: dict, dtype: str) -> None:
    """Write a checkpoint tensor by tensor into one dict (torch.save needs the whole dict)."""
    if os.path.exists(path):
        return
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, (shape, dt) in layout.items():
        if dt in ("int64", "int32"):
            sd[name] = torch.arange(shape[-1] if shape else 1, dtype=getattr(torch, dt)).reshape(shape)
        else:
            sd[name] = (torch.randn(shape, generator=g) * 0.02).to(getattr(torch, dtype))
    tmp = path + ".part"
    torch.save({"state_dict": sd, "global_step": 840000, "epoch": 6}, tmp)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="full-size 7.7 GB fp32+EMA prune input (if disk allows)")
    ap.add_argument("--only", choices=("convert", "prune"), default=None, help="run one of the two tables")
    ap.add_argument("--dest", default=None,
                    help="folder for the outputs (default: --out). /dev/shm takes the disk out of the figures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from fixtures.sd_layout import param_count, sd1_layout

    py = sys.executable
    dest = args.dest or args.out
    os.makedirs(dest, exist_ok=True)
    out = os.path.join(dest, "out.safetensors")
    print(f"outputs in {dest}")
    subprocess.run([py, "-m", "compileall", "-q", os.path.join(ROOT, "modelkit")], check=True)
    # the "hash cached" rows: a cache of their own, filled once per input
    warm = ["env", "MODELKIT_HASH_CACHE=1", f"MODELKIT_CACHE_DIR={os.path.abspath(os.path.join(args.out, 'hashcache'))}"]

    def fill_cache(path: str) -> None:
        subprocess.run([*warm, py, "-m", "modelkit", "hash", "--algo", "sha256", "--quiet", path], check=True,
                       stdout=subprocess.DEVNULL)

    if args.only != "prune":
        fp16 = os.path.join(args.out, "sd15-fp16.ckpt")
        t0 = time.perf_counter()
        build(fp16, sd1_layout(), "float16")
        built = time.perf_counter() - t0
        size = os.path.getsize(fp16)
        print(f"convert: {fp16}  {size / 1e9:.2f} GB, {len(sd1_layout())} tensors"
              + (f" (built in {built:.0f} s)" if built > 1 else ""))
        subprocess.run(["cat", fp16], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        fill_cache(fp16)
        cp, mk, mkw, nv = run([(["cp", fp16, out], out), ([*COLD, py, "-c", CONVERT, fp16, out], out),
                               ([*warm, py, "-c", CONVERT, fp16, out], out),
                               ([py, "-c", NAIVE_CONVERT, fp16, out], out)], args.runs)
        row("cp", cp, cp)
        row("modelkit convert (same dtype), sha256 read", mk, cp,
            f"{nv[0] / mk[0]:.1f}x faster than naive (min {nv[1] / mk[1]:.1f}x)")
        row("modelkit convert, sha256 cached", mkw, cp,
            f"{nv[0] / mkw[0]:.1f}x faster than naive (min {nv[1] / mkw[1]:.1f}x)")
        row("naive torch.load + save_file", nv, cp)
        os.unlink(out)
    if args.only == "convert":
        return
    layout = sd1_layout(ema=True)
    need = param_count(layout) * 4
    free = shutil.disk_usage(args.out).free
    big = args.big and free > need * 2.2
    if args.big and not big:
        print(f"--big needs about {need * 2.2 / 1e9:.0f} GB free; {free / 1e9:.0f} GB are: using the scaled variant")
    if not big:
        layout = sd1_layout(ema=True, **SCALED)
    name = "sd15-fp32-ema.ckpt" if big else "sd15-fp32-ema-scaled.ckpt"
    fp32 = os.path.join(args.out, name)
    t0 = time.perf_counter()
    build(fp32, layout, "float32")
    built = time.perf_counter() - t0
    what = "full size" if big else "SCALED DOWN (UNet at 160 channels; --big for the full 7.7 GB file)"
    print(f"prune fp32+EMA -> fp16: {fp32}  {os.path.getsize(fp32) / 1e9:.2f} GB, {len(layout)} tensors, {what}"
          + (f" (built in {built:.0f} s)" if built > 1 else ""))
    runs = args.runs
    subprocess.run(["cat", fp32], stdout=subprocess.DEVNULL, check=True)
    fill_cache(fp32)
    pr, prw, nprune = run([([*COLD, py, "-c", PRUNE, fp32, out], out), ([*warm, py, "-c", PRUNE, fp32, out], out),
                           ([py, "-c", NAIVE_PRUNE, fp32, out], out)], runs)
    row("modelkit prune (--ema drop --dtype fp16)", pr, nprune, "of naive; sha256 read")
    row("modelkit prune, sha256 cached", prw, nprune, "of naive")
    row("naive load + filter + half + save_file", nprune, nprune)
    os.unlink(out)
    print(f"median (and min) of {runs} runs per row, rows run round-robin (peak RSS: the max); page cache "
          "warm; each time includes a final sync")


if __name__ == "__main__":
    main()
