"""Start-up time: ``modelkit --help``, ``modelkit --version`` and ``modelkit scan small.pt`` beside
``picklescan --path small.pt`` and the floor (``python -c pass``), in one run.

Every run is a fresh process, timed by wall clock and by its CPU time; the commands take turns
(round robin) so that a busy machine slows them alike. Prints, per command, the best and the
median of ``--runs`` runs, the time above the floor, the median CPU time, and the modules the
process imported (``sys.modules`` at exit), with the heavy ones (numpy, torch, tqdm, ...) named.

Bytecode: the children write and read ``.pyc`` files in a fresh ``PYTHONPYCACHEPREFIX`` (after one
untimed warm-up run each), as an installed package does, even where ``PYTHONDONTWRITEBYTECODE``
is set; without ``.pyc`` files every run would compile modelkit's sources.

Usage: ``python bench/bench_startup.py [--runs 21]``  (peer: ``pip install picklescan``)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fixtures import torchfree  # noqa: E402

HEAVY = ("numpy", "torch", "tqdm", "safetensors", "fickling", "diffusers", "modelkit.ops", "modelkit.detect")


def tool(name: str) -> str | None:
    """The console script ``name`` of this interpreter's environment, or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else shutil.which(name)


def commands(small: str) -> dict[str, tuple[list[str] | None, str | None]]:
    """Label -> (argv to time, the same as code, run once more to list the modules it imports)."""
    mk, ps = tool("modelkit"), tool("picklescan")

    def cli(module: str, args: list[str]) -> str:
        return f"import sys; sys.argv = ['x', *{args!r}]; from {module} import main; sys.exit(main())"

    return {
        "python -c pass (floor)": ([sys.executable, "-c", "pass"], "pass"),
        "modelkit --version": (mk and [mk, "--version"], cli("modelkit.cli.main", ["--version"])),
        "modelkit --help": (mk and [mk, "--help"], cli("modelkit.cli.main", ["--help"])),
        "modelkit scan small.pt": (mk and [mk, "scan", small], cli("modelkit.cli.main", ["scan", small])),
        "picklescan --path small.pt": (ps and [ps, "--path", small], ps and cli("picklescan.cli", ["--path", small])),
    }


def imported(code: str, env: dict[str, str], work: str) -> set[str]:
    """The modules in ``sys.modules`` when a fresh interpreter has run ``code``."""
    out = os.path.join(work, "modules.txt")
    dump = f"import sys\ntry:\n    {code}\nfinally:\n    open({out!r}, 'w').write('\\n'.join(sys.modules))\n"
    subprocess.run([sys.executable, "-c", dump], env=env, cwd=work, capture_output=True)
    with open(out) as f:
        return set(f.read().split())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="mk-startup-bench-")
    small = os.path.join(work, "small.pt")
    import numpy as np

    torchfree.save_zip({"w": np.zeros((4, 4), np.float32), "b": np.zeros(4, np.float32)}, small)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pyc")
    cmds = {label: c for label, c in commands(small).items() if c[0]}
    for label, (argv, _) in commands(small).items():
        if not argv:
            print(f"{label}: not installed")
    for argv, _ in cmds.values():  # warm-up: writes the .pyc files, fills the page cache
        subprocess.run(argv, env=env, cwd=work, capture_output=True)
    times: dict[str, list[float]] = {label: [] for label in cmds}
    cpu: dict[str, list[float]] = {label: [] for label in cmds}
    for _ in range(args.runs):
        for label, (argv, _) in cmds.items():
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, cwd=work, capture_output=True)
            times[label].append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[label].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    floor = min(times["python -c pass (floor)"])
    base = len(imported("pass", env, work))
    from importlib.metadata import PackageNotFoundError, version

    try:
        peer = f"picklescan {version('picklescan')}"
    except PackageNotFoundError:
        peer = "picklescan not installed"
    print(f"{args.runs} runs each, round robin; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; {peer}")
    print(f"{'command':<28} {'best ms':>8} {'median ms':>10} {'above floor':>12} {'CPU ms':>7} {'modules':>8}  "
          f"heavy modules")
    for label, (_, code) in cmds.items():
        mods = imported(code, env, work) if code else set()
        heavy = sorted({h for h in HEAVY for m in mods if m == h or m.startswith(h + ".")})
        best, med = min(times[label]), statistics.median(times[label])
        print(f"{label:<28} {1000 * best:>8.1f} {1000 * med:>10.1f} {1000 * (best - floor):>9.1f} ms "
              f"{1000 * statistics.median(cpu[label]):>7.1f} {len(mods) - base:>+8}  {', '.join(heavy) or '-'}")
    print("wall time best and median; above floor: best minus the floor's best; CPU: median user+sys of the "
          "process; modules: imported beyond the floor's; heavy: "
          "numpy, torch, tqdm, ... or modelkit.ops/detect")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
