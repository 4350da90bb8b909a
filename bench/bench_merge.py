"""``modelkit merge lora`` and ``modelkit merge models`` beside naive in-RAM merges, in one run.

Inputs: the 2.1 GB SD-1.5-shaped fp16 checkpoints ``bench/out/sd15-full-fp16.ckpt`` (all-zero
weights, built by ``bench_inspect.py``) and ``bench/out/sd15-fp16.ckpt`` (random weights, built by
``bench_convert.py``), both with the real SD 1.5 key set; the bake runs on each. The LoRA is a
rank-32 kohya LoRA generated here (fp16, alpha 16) on every UNet attention projection,
feed-forward layer and ``proj_in``/``proj_out`` and every text-encoder attention and MLP layer
(the issue's benchmark), and a second one that also adapts every ResBlock, downsampler and
upsampler convolution (LoCon, 3x3).

Rows, each a fresh child process (wall time including a final ``sync``; peak RSS from
``getrusage(RUSAGE_CHILDREN)`` in a wrapper whose only child is the command):

* ``modelkit merge lora`` (the command: streaming, the input scanned and its sha256 recorded);
* naive kohya-style bake, written plainly below: ``torch.load`` the whole checkpoint, every float
  tensor to fp32, ``W + (up @ down) * alpha / rank`` per module, back to fp16, ``save_file``. It
  finds each module's weight through a name -> key table the bench writes beside the LoRA (the
  same pairs the LoRA was generated from), so it does no key mapping of its own;
* ``modelkit merge models --alpha 0.3`` (weighted sum) and a naive A1111-style in-RAM weighted sum
  (both checkpoints loaded, ``(1 - a) * A + a * B`` per tensor in fp16, ``save_file``).

The two bakes are compared tensor by tensor (bit-identical or not; element counts and the largest
difference in fp16 ulps otherwise). Usage: ``python bench/bench_merge.py [--out bench/out] [--runs N] [--sdxl]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.rounds import row, run  # noqa: E402

RANK, ALPHA = 32, 16.0

NAIVE_BAKE = """
import json, sys, torch
from safetensors.torch import load_file, save_file
sd = torch.load(sys.argv[1], weights_only=True, map_location="cpu")["state_dict"]
lora = load_file(sys.argv[2])
pairs = json.load(open(sys.argv[4]))
dtypes = {k: v.dtype for k, v in sd.items()}
sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
for name, key in pairs.items():
    down = lora[name + ".lora_down.weight"].float()
    up = lora[name + ".lora_up.weight"].float()
    scale = float(lora[name + ".alpha"]) / down.shape[0]
    w = sd[key]
    sd[key] = w + (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape) * scale
save_file({k: v.to(dtypes[k]).contiguous() for k, v in sd.items()}, sys.argv[3])
"""
NAIVE_SUM = """
import sys, torch
from safetensors.torch import save_file
a = torch.load(sys.argv[1], weights_only=True, map_location="cpu")["state_dict"]
b = torch.load(sys.argv[2], weights_only=True, map_location="cpu")["state_dict"]
for k in a:
    if k in b and a[k].is_floating_point():
        a[k] = (1 - 0.3) * a[k] + 0.3 * b[k]
save_file({k: v.contiguous() for k, v in a.items()}, sys.argv[3])
"""


def make_lora(ckpt: str, path: str, pairs_path: str, convs: bool) -> int:
    """Write a rank-32 LoRA (with LoCon 3x3 convolutions when ``convs``) and its name -> key table;
    returns the module count."""
    import torch
    from safetensors.torch import save_file

    import modelkit
    from modelkit.ops.lora.keymap import KeyMap

    with modelkit.open_model(ckpt) as mf:
        km = KeyMap.build({k: r.shape for k, r in mf.items()}, "sd1")
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, str] = {}
    for t in km.targets:
        conv3 = len(t.shape) == 4 and t.shape[2] * t.shape[3] > 1
        if not (t.block in ("attention", "text") or (convs and t.block in ("resnet", "sampler") and conv3)):
            continue
        name = km.name_for(t, "kohya")
        kernel = t.shape[2:]
        out[f"{name}.lora_down.weight"] = (torch.randn(RANK, t.shape[1], *kernel, generator=g) * 0.02).half()
        out[f"{name}.lora_up.weight"] = (torch.randn(t.shape[0], RANK, *[1] * len(kernel), generator=g) * 0.02).half()
        out[f"{name}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
        pairs[name] = t.key
    save_file(out, path)
    with open(pairs_path, "w") as f:
        json.dump(pairs, f)
    return len(pairs)


def compare(a: str, b: str) -> str:
    """Tensor-by-tensor comparison of two safetensors files, in words."""
    import torch
    from safetensors import safe_open

    differing = elements = 0
    worst = 0
    names: list[str] = []
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return "different key sets"
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape:
                return f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
            if x.dtype == torch.float16:
                xi, yi = _ordered(x), _ordered(y)
                bad = xi != yi
                if bool(bad.any()):
                    differing += 1
                    names.append(k)
                    elements += int(bad.sum())
                    worst = max(worst, int((xi - yi).abs().max()))
            elif not torch.equal(x, y):
                differing += 1
                names.append(k)
    if not differing:
        return "bit-identical"
    shown = ", ".join(sorted(names)[:4]) + (" ..." if len(names) > 4 else "")
    return f"{differing} tensors differ ({elements:,} elements, at most {worst} fp16 ulp): {shown}"


def _ordered(t):  # noqa: ANN001 - fp16 bits -> integers in value order (+0 = -0): differences count ulps
    import torch

    bits = t.view(torch.int16).int()
    return bits.where(bits >= 0, -(bits & 0x7FFF))


MECHA_SUM = """
import sys, sd_mecha
recipe = sd_mecha.weighted_sum(sd_mecha.model(sys.argv[1]), sd_mecha.model(sys.argv[2]), alpha=0.3)
sd_mecha.merge(recipe, output=sys.argv[3], merge_device="cpu", threads=2)
"""


def build_sdxl(path: str, seed: int) -> None:
    """An SDXL-base-shaped fp16 .safetensors (the real 2,515 keys, random weights, 6.9 GB), written
    tensor by tensor through modelkit's writer, once."""
    if os.path.exists(path):
        return
    import torch

    from modelkit.detect.layouts import sdxl_layout
    from modelkit.dtypes import ALIASES
    from modelkit.formats.safetensors_write import OutTensor, write_stream
    from modelkit.paths import atomic_output

    gen = torch.Generator().manual_seed(seed)

    def values(shape: tuple[int, ...]) -> object:
        return (torch.randn(shape, generator=gen) * 0.02).half().reshape(-1).view(torch.uint8).numpy()

    tensors = [OutTensor(name=name, dtype=ALIASES["fp16"], shape=tuple(shape), ref=None,
                         compute=lambda shape=tuple(shape): values(shape))
               for name, (shape, _) in sdxl_layout().items()]
    with atomic_output(path) as fd:
        write_stream(fd, tensors, {}, path=path)


def sdxl_rows(out_dir: str, runs: int) -> None:
    """The weighted sum of two SDXL-shaped checkpoints: modelkit only (an in-RAM merge would hold
    both, 13.9 GB, before writing a third)."""
    a, b = (os.path.join(out_dir, f"sdxl-{n}-fp16.safetensors") for n in ("a", "b"))
    need = 3 * 6.94e9
    if not (os.path.exists(a) and os.path.exists(b)) and shutil.disk_usage(out_dir).free < need * 1.1:
        print(f"--sdxl needs about {need / 1e9:.0f} GB free; not measured")
        return
    build_sdxl(a, 1)
    build_sdxl(b, 2)
    ours = os.path.join(out_dir, "merged-sdxl.safetensors")
    subprocess.run(["cat", a, b], stdout=subprocess.DEVNULL, check=True)
    print(f"merge models (weighted sum, alpha 0.3): two SDXL-shaped fp16 checkpoints, {os.path.getsize(a) / 1e9:.2f} GB each")
    (ws,) = run([([sys.executable, "-m", "modelkit", "merge", "models", a, b, "--alpha", "0.3", "-o", ours, "-q"],
                  ours)], runs)
    row("modelkit merge models", ws, None, "(an in-RAM merge holds both inputs: 13.9 GB)")
    os.unlink(ours)


def _mecha_python(given: str | None) -> str | None:
    py = given or sys.executable
    ok = subprocess.run([py, "-c", "import sd_mecha"], capture_output=True).returncode == 0
    return py if ok else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--sdxl", action="store_true", help="also two SDXL-shaped 6.9 GB checkpoints (needs ~23 GB disk)")
    ap.add_argument("--runs", type=int, default=1, help="rounds of every row (median and min are printed)")
    ap.add_argument("--mecha-python", default=None, help="a python with sd-mecha installed (default: this one)")
    args = ap.parse_args()
    ckpt = os.path.join(args.out, "sd15-full-fp16.ckpt")
    other = os.path.join(args.out, "sd15-fp16.ckpt")
    if not os.path.exists(ckpt):
        sys.exit(f"{ckpt} is missing: run bench/bench_inspect.py first")
    py = sys.executable
    ours, naive = os.path.join(args.out, "merged-modelkit.safetensors"), os.path.join(args.out, "merged-naive.safetensors")
    subprocess.run(["cat", *(p for p in (ckpt, other) if os.path.exists(p))], stdout=subprocess.DEVNULL, check=True)
    cases = [(ckpt, "all-zero weights", True), (other, "random weights", True), (other, "random weights", False)]
    for base, what, convs in cases:
        if not os.path.exists(base):
            continue
        tag = "r32-locon" if convs else "r32-attn-mlp"
        lora, pairs = os.path.join(args.out, f"lora-{tag}.safetensors"), os.path.join(args.out, f"lora-{tag}.json")
        n = make_lora(ckpt, lora, pairs, convs)
        targets = "attention/MLP + 3x3 convs" if convs else "attention/MLP only (the issue's spec)"
        print(f"merge lora: {base} ({os.path.getsize(base) / 1e9:.2f} GB fp16, {what}) + rank-{RANK} LoRA on "
              f"{targets}, {n} modules ({os.path.getsize(lora) / 1e6:.0f} MB)")
        mk, nv = run([([py, "-m", "modelkit", "merge", "lora", base, lora, "-o", ours, "-q"], ours),
                      ([py, "-c", NAIVE_BAKE, base, lora, naive, pairs], naive)], args.runs)
        same = compare(ours, naive)
        row("modelkit merge lora", mk, nv, "of naive")
        row("naive kohya-style (load, fp32, merge, save)", nv, nv)
        print(f"  result: {same}")
        for p in (ours, naive):
            os.unlink(p)
    if os.path.exists(other):
        print(f"merge models (weighted sum, alpha 0.3): {ckpt} + {other}")
        ws, a1 = run([([py, "-m", "modelkit", "merge", "models", ckpt, other, "--alpha", "0.3", "-o", ours, "-q"],
                       ours),
                      ([py, "-c", NAIVE_SUM, ckpt, other, naive], naive)], args.runs)
        same = compare(ours, naive)
        row("modelkit merge models", ws, a1, "of A1111-style")
        row("naive A1111-style (both in RAM, fp16)", a1, a1)
        print(f"  result vs A1111-style: {same}\n    (modelkit keeps A's schedule buffers and rounds once from fp32; "
              "the naive merges every float tensor, rounding after each fp16 op)")
        mecha_py = _mecha_python(args.mecha_python)
        if mecha_py is None:
            print("  sd-mecha: not installed (pip install sd-mecha, or --mecha-python PATH); not measured")
        else:
            # sd-mecha reads safetensors only: give both tools the same two .safetensors files.
            sa, sb = (os.path.join(args.out, n) for n in ("ws-a.safetensors", "ws-b.safetensors"))
            for src, dst in ((ckpt, sa), (other, sb)):
                if not os.path.exists(dst):
                    subprocess.run([py, "-m", "modelkit", "convert", src, "-o", dst, "-q"], check=True, cwd=ROOT)
            mk2, me = run([([py, "-m", "modelkit", "merge", "models", sa, sb, "--alpha", "0.3", "-o", ours, "-q"],
                            ours),
                           ([mecha_py, "-c", MECHA_SUM, sa, sb, naive], naive)], args.runs)
            print("merge models (weighted sum, alpha 0.3) on the same two checkpoints as .safetensors:")
            row("modelkit merge models", mk2, me, "of sd-mecha")
            row("sd-mecha weighted_sum (threads=2)", me, me)
        for p in (ours, naive):
            if os.path.exists(p):
                os.unlink(p)
    if args.sdxl:
        sdxl_rows(args.out, args.runs)
    print(f"median (and min) of {args.runs} round-robin runs per row; page cache warm; each time includes a "
          f"final sync; {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
