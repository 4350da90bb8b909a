"""modelkit scan beside picklescan, modelscan and fickling, in one run, on the same corpus.

Prints, per tool: hostile files flagged, hostile files missed, benign files flagged (false
alarms), crashes; milliseconds per small file; and the time on a 2 GB SD-1.5-shaped checkpoint
(built by bench/bench_inspect.py, or here if missing).

Usage: ``python bench/bench_scan.py [--out bench/out]``  (peers: ``pip install picklescan modelscan``)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fixtures import corpus  # noqa: E402

Verdict = str  # "flagged" | "clean" | "error"


def tool_modelkit() -> Callable[[str], Verdict]:
    import modelkit

    def run(path: str) -> Verdict:
        v = modelkit.scan.scan_file(path).verdict
        return {"safe": "clean", "suspicious": "clean", "unsafe": "flagged"}.get(v, "error")

    return run


def tool_picklescan() -> Callable[[str], Verdict]:
    from picklescan.scanner import scan_file_path

    def run(path: str) -> Verdict:
        r = scan_file_path(path)
        if r.infected_files:
            return "flagged"
        return "error" if r.scan_err else "clean"

    return run


def tool_modelscan() -> Callable[[str], Verdict]:
    from modelscan.modelscan import ModelScan

    def run(path: str) -> Verdict:
        r = ModelScan().scan(path)
        if r.get("issues"):
            return "flagged"
        return "error" if r.get("errors") else "clean"

    return run


def tool_fickling() -> Callable[[str], Verdict]:
    import fickling

    def run(path: str) -> Verdict:
        r = fickling.scan_file(path, graceful=True)
        if not r.is_safe:
            return "flagged"
        return "error" if r.errors else "clean"

    return run


TOOLS = {"modelkit": tool_modelkit, "picklescan": tool_picklescan, "modelscan": tool_modelscan,
         "fickling": tool_fickling}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="mk-scan-bench-")
    marker = os.path.join(work, "PWNED")
    hostile = corpus.build_hostile(os.path.join(work, "hostile"), marker)
    benign = corpus.build_benign(os.path.join(work, "benign"))
    big = os.path.join(args.out, "sd15-full-fp16.ckpt")
    if not os.path.exists(big):
        from bench.bench_inspect import build as build_ckpt
        from fixtures.sd_layout import sd1_layout

        os.makedirs(args.out, exist_ok=True)
        build_ckpt(big, sd1_layout())
    print(f"corpus: {len(hostile)} hostile (harmless payloads), {len(benign)} benign real layouts; "
          f"big file: {os.path.getsize(big) / 1e9:.2f} GB")
    print(f"{'tool':<11} {'flagged':>8} {'missed':>7} {'errors':>7} | {'false alarms':>12} {'benign err':>10} | "
          f"{'crashes':>7} | {'ms/small file':>13} | {'2 GB ckpt':>9}")
    for name, make in TOOLS.items():
        try:
            run = make()
        except ImportError:
            print(f"{name:<11} not installed")
            continue
        counts = {"flagged": 0, "clean": 0, "error": 0}
        fp = {"flagged": 0, "clean": 0, "error": 0}
        crashes = 0
        missed: list[str] = []
        small_times = []
        for path in hostile + benign:
            t0 = time.perf_counter()
            try:
                v = run(path)
            except Exception:  # noqa: BLE001 - a peer's crash is a data point
                v = "crash"
                crashes += 1
            small_times.append(time.perf_counter() - t0)
            if v == "crash":
                continue
            if path in hostile:
                counts[v] += 1
                if v == "clean":
                    missed.append(os.path.basename(path))
            else:
                fp[v] += 1
        big_times = []
        for _ in range(4):  # the first run warms the page cache; the median of the other three counts
            t0 = time.perf_counter()
            try:
                big_v = run(big)
            except Exception:  # noqa: BLE001
                big_v = "crash"
            big_times.append(time.perf_counter() - t0)
        big_s = sorted(big_times[1:])[1]
        ms = 1000 * sum(small_times) / len(small_times)
        print(f"{name:<11} {counts['flagged']:>8} {counts['clean']:>7} {counts['error']:>7} | {fp['flagged']:>12} "
              f"{fp['error']:>10} | {crashes:>7} | {ms:>13.2f} | {big_s:>7.3f} s ({big_v})")
        if missed:
            print(f"{'':<11} missed: {', '.join(sorted(missed))}")
    assert not os.path.exists(marker), "a payload ran during the benchmark"
    print("no payload ran; 'errors' = the tool could not scan the file (hostile: fail-closed counts as flagged by "
          "modelkit's policy; for peers it is shown apart)")


if __name__ == "__main__":
    main()
