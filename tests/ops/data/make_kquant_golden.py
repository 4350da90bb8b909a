"""Make ``kquant_golden.npz``: varied float32 super-blocks and ggml's K-quant bytes for them.

Usage: python make_kquant_golden.py PATH/TO/kquant_harness  (see README.md in this folder)

The inputs are seeded, so a rerun against the same ggml gives the same file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

QK = 256
SIZES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Named groups of 256-value blocks, float32."""
    n = rng.standard_normal
    c: dict[str, np.ndarray] = {}
    for s in (1.0, 1e-3, 1e-2, 0.05, 10.0, 1e3, 1e-6, 3e4):
        c[f"normal*{s:g}"] = n((8, QK)) * s
    c["fp16-rounded"] = (n((16, QK)) * 0.02).astype(np.float16)
    bf = (n((16, QK)) * 0.05).astype(np.float32)
    c["bf16-rounded"] = (bf.view(np.uint32) & 0xFFFF0000).view(np.float32)
    c["zeros"] = np.zeros((2, QK))
    c["constant"] = np.array([[0.5] * QK, [-3.0] * QK, [1e-3] * QK, [7.0] * QK])
    out = n((8, QK)) * 0.01
    out[np.arange(8), rng.integers(0, QK, 8)] = [5.0, -5.0, 40.0, -0.8, 1e3, -1e3, 0.3, -0.3]
    c["one-outlier"] = out
    for s in (1e-39, 1e-42, 1e-44, 1e-16, 1e-14):
        c[f"tiny*{s:g}"] = n((2, QK)) * s
    c["negative-only"] = -np.abs(n((6, QK))) * rng.uniform(0.01, 2.0, (6, 1))
    c["positive-only"] = np.abs(n((6, QK))) * rng.uniform(0.01, 2.0, (6, 1))
    c["subblock-scales"] = n((8, 16, 16)) * 10.0 ** rng.uniform(-8, 4, (8, 16, 1))
    c["log-uniform"] = rng.choice([-1.0, 1.0], (8, QK)) * 10.0 ** rng.uniform(-12, 6, (8, QK))
    c["ties-half"] = rng.integers(-64, 65, (6, QK)) * 0.5
    c["ties-eighth"] = (rng.integers(-40, 41, (6, QK)) + 0.5) / 8.0
    c["small-ints"] = rng.integers(-4, 5, (4, QK)).astype(np.float64)
    c["uniform"] = rng.uniform(-1, 1, (8, QK))
    c["uniform-offset"] = rng.uniform(0.5, 1.5, (4, QK))
    c["laplace"] = rng.laplace(0, 0.1, (8, QK))
    c["student-t"] = rng.standard_t(2, (8, QK)) * 0.05
    sparse = n((6, QK))
    sparse[rng.uniform(size=(6, QK)) < 0.9] = 0.0
    c["sparse"] = sparse
    half = n((6, 16, 16))
    half[:, ::2] = 0.0
    c["zero-subblocks"] = half
    c["beyond-fp16"] = n((4, QK)) * np.array([[1e5], [1e6], [3e7], [1e4]])
    sym = n((4, QK)) * 0.1
    sym[:, 3], sym[:, 200] = 2.0, -2.0
    c["tied-max"] = sym
    return {k: np.asarray(v, np.float32).reshape(-1, QK) for k, v in c.items()}


def main() -> None:
    harness = sys.argv[1]
    groups = cases(np.random.default_rng(20261203))
    x = np.concatenate(list(groups.values()))
    raw = subprocess.run([harness], input=x.tobytes(), capture_output=True, check=True).stdout
    nb, pos, out = x.shape[0], 0, {}
    for name, size in SIZES.items():
        out[name] = np.frombuffer(raw[pos:pos + nb * size], np.uint8).reshape(nb, size)
        pos += nb * size
    assert pos == len(raw)
    labels = np.concatenate([[k] * len(v) for k, v in groups.items()])
    np.savez_compressed(Path(__file__).with_name("kquant_golden.npz"), x=x, case=labels, **out)
    print(f"{nb} blocks, {len(groups)} cases")


if __name__ == "__main__":
    main()
