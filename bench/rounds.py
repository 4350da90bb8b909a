"""Timed child processes, run round-robin, for the benchmarks that compare whole commands.

Each case runs in a fresh wrapper process (``python bench/rounds.py --measure -- ARGV``) whose only
child is the command, so its peak RSS comes from ``getrusage(RUSAGE_CHILDREN)``; the wall time
includes a final ``sync``, so tools that fsync (modelkit) and tools that do not (cp, save_file) are
compared on durable output. The cases of one table run round-robin, so the machine's noise falls
on every row alike; the median and the minimum of each row are kept.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: (median wall seconds, min wall seconds, max peak RSS bytes)
Result = tuple[float, float, int]


def measure(argv: list[str]) -> None:
    """Wrapper mode: run one command as the only child; print its wall time (with sync) and peak RSS."""
    t0 = time.perf_counter()
    subprocess.run(argv, check=True)
    os.sync()
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))


def run(cases: list[tuple[list[str], str]], runs: int) -> list[Result]:
    """Run ``(argv, output)`` cases round-robin ``runs`` times; each output is removed before its
    run (the last round's outputs are kept, for comparisons)."""
    walls: list[list[float]] = [[] for _ in cases]
    rss: list[list[int]] = [[] for _ in cases]
    for _ in range(runs):
        for i, (argv, out) in enumerate(cases):
            if os.path.exists(out):
                os.unlink(out)
            os.sync()
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", "--", *argv], check=True,
                                 capture_output=True, text=True, cwd=ROOT)
            doc = json.loads(res.stdout.strip().splitlines()[-1])
            walls[i].append(doc["wall"])
            rss[i].append(doc["rss"])
    return [(statistics.median(w), min(w), max(r)) for w, r in zip(walls, rss)]


def row(label: str, res: Result, base: Result | None = None, note: str = "") -> None:
    """One table row: median (min) seconds, the ratios to ``base``, peak RSS."""
    med, low, peak = res
    ratio = f"{med / base[0]:5.2f}x (min {low / base[1]:4.2f}x)" if base else " " * 20
    print(f"  {label:<42} {med:7.2f} s (min {low:5.2f})  {ratio}  peak RSS {peak / 2**30:6.3f} GiB  {note}")


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--measure":
    measure(sys.argv[3:])
