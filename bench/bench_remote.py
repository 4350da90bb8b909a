"""Scanning a remote 2 GB checkpoint: modelkit (range requests) beside picklescan --url and fickling
--huggingface (which download the whole file), in one run, against the same loopback server.

The checkpoint is SD-1.5-shaped (the real key set, 1,143 tensors, fp16, about 2 GB; built by
bench/bench_inspect.py's ``build``, or here). The server (fixtures/http_server.py, 127.0.0.1)
counts the body bytes it sends; each tool's figure is what the server sent for its scan.

Target (issue 17): modelkit transfers at most 2 MB (0.1% of the file) and is at least 20x faster
than a peer that downloads the whole file over loopback.

Over loopback the peers' whole-file download is as fast as a download can be. ``--rate MB`` (MB/s
the server sends at most) and ``--rtt MS`` (a wait before each answer) model a real link instead; each
request then costs modelkit a round trip, as it would.

``--hub N`` adds a hub-scale row: N URLs of the file in one ``modelkit scan --manifest -j 8``, the
time per file beside each peer's time for one file.

Usage: ``python bench/bench_remote.py [--out bench/out] [--runs 3] [--rate 100] [--rtt 20] [--hub 20]``
(peers: ``pip install picklescan fickling``; both run as their own command lines.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fixtures.http_server import Loopback, serve  # noqa: E402


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mk-remote-bench-") as cwd:  # fickling writes safety_results.json
        p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONPATH": ROOT}, cwd=cwd)
    return time.perf_counter() - t, p.returncode, (p.stdout + p.stderr).strip().splitlines()[-1:][0][:90] \
        if (p.stdout + p.stderr).strip() else ""


def _measure(srv: Loopback, cmd: list[str], env: dict[str, str], runs: int) -> tuple[float, int, int, str]:
    times, sent, reqs, last = [], 0, 0, ""
    _run(cmd, env)  # untimed: writes the command's bytecode, as an install does
    for _ in range(runs):
        shutil.rmtree(env["HF_HUB_CACHE"], ignore_errors=True)  # every run downloads afresh
        srv.reset_counts()
        dt, _rc, last = _run(cmd, env)
        times.append(dt)
        sent, reqs = srv.sent, srv.requests
    return statistics.median(times), sent, reqs, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.0, help="MB/s the server sends at most (0: loopback speed)")
    ap.add_argument("--rtt", type=float, default=0.0, help="ms the server waits before each answer")
    ap.add_argument("--hub", type=int, default=0, metavar="N",
                    help="also scan N URLs of the file in one `modelkit scan --manifest -j 8` (hub scale): per-file time")
    args = ap.parse_args()
    big = os.path.join(args.out, "sd15-full-fp16.ckpt")
    if not os.path.exists(big):
        from bench.bench_inspect import build
        from fixtures.sd_layout import sd1_layout

        os.makedirs(args.out, exist_ok=True)
        build(big, sd1_layout())
    size = os.path.getsize(big)
    bindir = os.path.dirname(sys.executable)
    hf_cache = tempfile.mkdtemp(prefix="mk-remote-bench-hf-")
    pycache = tempfile.mkdtemp(prefix="mk-remote-bench-pyc-")
    with serve({"/sd15.ckpt": big, **{f"/hub/{i}/sd15.ckpt": big for i in range(args.hub)}}) as srv:
        srv.hf["bench/sd15"] = {"sd15.ckpt": big}
        srv.rate, srv.delay = int(args.rate * 1e6), args.rtt / 1000
        # bytecode is written and read (in a fresh prefix), as an installed package's is, even where
        # PYTHONDONTWRITEBYTECODE is set: without it every run would compile modelkit's sources first
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
               "PYTHONPYCACHEPREFIX": pycache, "HF_ENDPOINT": srv.url, "HF_HUB_CACHE": hf_cache, "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_HUB_DISABLE_XET": "1"}
        url = srv.url + "/sd15.ckpt"
        tools = {
            "modelkit": [os.path.join(bindir, "modelkit"), "scan", "-q", url],
            "modelkit hf://": [os.path.join(bindir, "modelkit"), "scan", "-q", "hf://bench/sd15/sd15.ckpt"],
            # picklescan --url speaks https only (http.client.HTTPSConnection); on the loopback
            # server it gets plain HTTP instead, which only makes its download cheaper.
            "picklescan --url": [sys.executable, "-c", "import sys, http.client as h; h.HTTPSConnection = "
                                 "h.HTTPConnection; from picklescan.cli import main; sys.argv = ['picklescan', "
                                 f"'--url', {url!r}]; sys.exit(main())"],
            "fickling --hf": [os.path.join(bindir, "fickling"), "--huggingface", "bench/sd15"],
        }
        link = "loopback" + (f", at most {args.rate:g} MB/s" if args.rate else "") + \
            (f", {args.rtt:g} ms before each answer" if args.rtt else "")
        print(f"file: {size / 1e9:.2f} GB SD-1.5-shaped .ckpt served on {srv.url} ({link}); "
              f"median of {args.runs} runs, wall time of the whole command")
        print(f"{'tool':<16} {'bytes sent':>14} {'% of file':>9} {'requests':>8} {'seconds':>8}  last line of output")
        rows = {}
        for name, cmd in tools.items():
            if not os.path.exists(cmd[0]):
                print(f"{name:<16} (not installed)")
                continue
            dt, sent, reqs, last = _measure(srv, cmd, env, args.runs)
            rows[name] = (dt, sent)
            print(f"{name:<16} {sent:>14,} {100 * sent / size:>8.3f}% {reqs:>8} {dt:>8.2f}  {last}")
        if "modelkit" in rows:
            mk_t, mk_b = rows["modelkit"]
            print(f"modelkit: {mk_b / 1e6:.2f} MB transferred (target <= 2 MB: "
                  f"{'met' if mk_b <= 2_000_000 else 'NOT met'})")
            for peer in ("picklescan --url", "fickling --hf"):
                if peer in rows:
                    print(f"  {rows[peer][0] / mk_t:.1f}x faster than {peer} (target >= 20x)")
        if args.hub:
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
                f.write("".join(f"{srv.url}/hub/{i}/sd15.ckpt\n" for i in range(args.hub)))
            cmd = [os.path.join(bindir, "modelkit"), "scan", "-q", "--manifest", f.name, "-j", "8"]
            dt, sent, reqs, last = _measure(srv, cmd, env, args.runs)
            os.unlink(f.name)
            per = dt / args.hub
            print(f"hub scale: {args.hub} URLs in one `modelkit scan --manifest -j 8`: {dt:.2f} s, {per:.3f} s a file, "
                  f"{sent / args.hub / 1e6:.2f} MB and {reqs / args.hub:.0f} requests a file ({last})")
            for peer in ("picklescan --url", "fickling --hf"):
                if peer in rows:
                    print(f"  {rows[peer][0] / per:.1f}x {peer}'s time for one file (it downloads each whole)")
    shutil.rmtree(hf_cache, ignore_errors=True)
    shutil.rmtree(pycache, ignore_errors=True)


if __name__ == "__main__":
    main()
