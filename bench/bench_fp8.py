"""``modelkit prune --dtype fp8_e4m3fn`` beside the naive torch way, on a Flux-shaped fp16 transformer.

The input is generated on disk: the key set and the real shapes of Flux.1-dev's transformer (BFL's
keys: ``img_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``txt_in``, ``double_blocks.N.*``,
``single_blocks.N.*``, ``final_layer.*``) with fewer blocks (default 4 double and 5 single: about
4.3 GB in fp16), random normal values times 0.02, written tensor by tensor (never whole in RAM).

Rows (``bench.rounds``: each a fresh child process, peak RSS from ``getrusage``, time including a
final ``sync``, rows round-robin):

* ``modelkit prune --dtype fp8_e4m3fn`` (the API call the CLI makes): weight matrices to fp8,
  overflow checked, the input's sha256 computed for the provenance metadata (hash cache off);
* ``--fp8 scaled``: the same with a per-tensor scale (two reads of each weight, numpy rounding);
* naive: ``safetensors.torch.load_file``, ``.to(torch.float8_e4m3fn)`` on every float tensor,
  ``save_file``.

Usage: ``python bench/bench_fp8.py [--out bench/out] [--runs 1] [--double 4] [--single 5] [--keep]``
The generated input and the outputs are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.rounds import row, run  # noqa: E402

COLD = ["env", "MODELKIT_HASH_CACHE=0"]
PRUNE = ("import modelkit, sys; modelkit.prune(sys.argv[1], sys.argv[2], dtype='fp8_e4m3fn', force=True, "
         "fp8=(sys.argv[3] if len(sys.argv) > 3 else None))")
NAIVE = (
    "import sys, torch\nfrom safetensors.torch import load_file, save_file\n"
    "sd = load_file(sys.argv[1])\n"
    "sd = {k: (v.to(torch.float8_e4m3fn) if v.is_floating_point() else v) for k, v in sd.items()}\n"
    "save_file(sd, sys.argv[2])\n"
)
H, MLP, CTX, POOL = 3072, 12288, 4096, 1 << 25


def flux_layout(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """Flux.1-dev's transformer keys and shapes with ``double``/``single`` blocks."""
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, o: int, i: int) -> None:
        out[f"{name}.weight"] = (o, i)
        out[f"{name}.bias"] = (o,)

    linear("img_in", H, 64)
    for emb, width in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        linear(f"{emb}.in_layer", H, width)
        linear(f"{emb}.out_layer", H, H)
    linear("txt_in", H, CTX)
    for n in range(double):
        for s in ("img", "txt"):
            p = f"double_blocks.{n}.{s}"
            linear(f"{p}_mod.lin", 6 * H, H)
            linear(f"{p}_attn.qkv", 3 * H, H)
            out[f"{p}_attn.norm.query_norm.scale"] = (128,)
            out[f"{p}_attn.norm.key_norm.scale"] = (128,)
            linear(f"{p}_attn.proj", H, H)
            linear(f"{p}_mlp.0", MLP, H)
            linear(f"{p}_mlp.2", H, MLP)
    for n in range(single):
        p = f"single_blocks.{n}"
        linear(f"{p}.linear1", 3 * H + MLP, H)
        linear(f"{p}.linear2", H, H + MLP)
        out[f"{p}.norm.query_norm.scale"] = (128,)
        out[f"{p}.norm.key_norm.scale"] = (128,)
        linear(f"{p}.modulation.lin", 3 * H, H)
    linear("final_layer.adaLN_modulation.1", 2 * H, H)
    linear("final_layer.linear", 64, H)
    return out


def build(path: str, layout: dict[str, tuple[int, ...]]) -> int:
    """Write an fp16 safetensors file of ``layout`` tensor by tensor: random values from one pool
    of 32M normals times 0.02, each tensor starting at its own place in it. Returns its size."""
    import numpy as np

    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(POOL, dtype=np.float32) * 0.02).astype(np.float16)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos, sizes = 0, {}
    for name, shape in layout.items():
        n = 1
        for s in shape:
            n *= s
        sizes[name] = n
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [pos, pos + 2 * n]}
        pos += 2 * n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i, name in enumerate(layout):
            left, start = sizes[name], (i * 7919) % POOL
            while left:
                k = min(left, POOL - start)
                f.write(pool[start:start + k].tobytes())
                left -= k
                start = 0
    os.replace(tmp, path)
    return os.path.getsize(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--double", type=int, default=4)
    ap.add_argument("--single", type=int, default=5)
    ap.add_argument("--no-scaled", action="store_true", help="skip the --fp8 scaled row")
    ap.add_argument("--keep", action="store_true", help="keep the generated input and outputs")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    py = sys.executable
    src = os.path.join(args.out, f"flux-{args.double}d{args.single}s-fp16.safetensors")
    out = os.path.join(args.out, "fp8.safetensors")
    layout = flux_layout(args.double, args.single)
    size = os.path.getsize(src) if os.path.exists(src) else build(src, layout)
    print(f"input: Flux.1-dev shapes, {args.double} double + {args.single} single blocks, {len(layout)} tensors, "
          f"{size / 1e9:.2f} GB fp16")
    subprocess.run([py, "-m", "compileall", "-q", os.path.join(ROOT, "modelkit")], check=True)
    subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    cases = [([*COLD, py, "-c", PRUNE, src, out], out), ([py, "-c", NAIVE, src, out], out)]
    if not args.no_scaled:
        cases.insert(1, ([*COLD, py, "-c", PRUNE, src, out, "scaled"], out))
    res = run(cases, args.runs)
    naive = res[-1]
    row("modelkit prune --dtype fp8_e4m3fn", res[0], naive, "of naive")
    if not args.no_scaled:
        row("modelkit prune ... --fp8 scaled", res[1], naive, "of naive")
    row("naive load_file + .to(fp8) + save_file", naive, naive)
    print(f"median (and min) of {args.runs} run(s) per row, round-robin; page cache warm; each time includes a "
          f"final sync; modelkit also hashes the input (sha256) for its provenance metadata")
    if not args.keep:
        for p in (src, out):
            if os.path.exists(p):
                os.unlink(p)


if __name__ == "__main__":
    main()
