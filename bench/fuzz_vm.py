"""Fuzz modelkit's scanner against CPython's real unpickler for N minutes (the long run of
``tests/security/test_differential.py``).

Each input (a mutated real or hostile pickle, a random program over allowed objects, dunder keys,
BUILD and every call opcode, or random bytes; and the generated corpus first, with ``--corpus``)
is scanned by modelkit and loaded, in a sandboxed child, by the real C unpickler with a tracing
``find_class`` (see ``tests/security/pickle_oracle.py``): ``pickle.loads``, ``pickle.load`` loops
on ``io.BytesIO`` and on a buffered file, and ``torch.load`` with a tracing pickle module.
Payloads never run (every name that could run one is a recording stand-in).

Prints counts: inputs, scan verdicts, inputs where CPython calls something outside the allow-list
(or ``_load_from_bytes`` on bytes built at run time), and the inconsistencies: such a call but a
scan that is not ``unsafe``; a name outside the allow-list but a ``safe`` scan. Also counted, not
failures: ``error`` scans of inputs CPython loads cleanly. Inconsistent inputs are saved with
``--save DIR``. Exit status 1 if any inconsistency was found.

Usage: ``python bench/fuzz_vm.py --minutes 10 --seed 1 [--python /path/to/python3.12] [--save out/]``
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import modelkit  # noqa: E402
from modelkit.formats.unpickler import ALLOWED  # noqa: E402
from tests.security import corpus_gen, pickle_oracle  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--python", default=sys.executable,
                        help="the CPython whose unpickler is the oracle (default: this one; torch.load only where "
                             "torch is installed)")
    parser.add_argument("--corpus", action="store_true", help="run the generated corpus first")
    parser.add_argument("--batch", type=int, default=200, help="inputs generated at a time")
    parser.add_argument("--save", help="write inconsistent inputs to this folder")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()
    problems: list[tuple[str, str, bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fuzz-vm-") as tmp:
        work, cwd = Path(tmp, "files"), Path(tmp, "cwd")
        work.mkdir()
        cwd.mkdir()
        marker = str(work / "PWNED")
        oracle = pickle_oracle.TraceOracle(args.python, cwd, ALLOWED)
        seeds = pickle_oracle.seed_pickles()
        print(f"oracle: {args.python} (readings: {', '.join(oracle.modes)}); {len(seeds)} seeds; seed {args.seed}")
        queue: list[tuple[str, bytes]] = []
        if args.corpus:
            queue += [(s.name, s.data) for s in corpus_gen.generate(marker)]
        start = time.monotonic()
        deadline = start + args.minutes * 60
        last_report = start
        n = 0
        try:
            while time.monotonic() < deadline:
                if not queue:
                    queue = [(f"seed{args.seed}-{n + i}", d)
                             for i, d in enumerate(pickle_oracle.fuzz_inputs(rng, args.batch, seeds))]
                name, data = queue.pop(0)
                n += 1
                path = work / "input.bin"
                path.write_bytes(data)
                logs = oracle.trace(path)
                verdict = modelkit.scan(path).files[0].verdict
                counts["inputs"] += 1
                counts[f"verdict {verdict}"] += 1
                events = [e for log in logs.values() for e in log["events"]]
                if pickle_oracle.violations(events):
                    counts["CPython calls outside the allow-list"] += 1
                if any(e[0] in ("crash", "hang") for e in events):
                    counts["child crashed or hung"] += 1
                loads = logs.get("loads", {"error": "?", "events": []})
                if verdict == "error" and not loads["error"] and not pickle_oracle.refused_globals(loads["events"]):
                    counts["error scan of a pickle that pickle.loads loads cleanly (not a failure)"] += 1
                found = pickle_oracle.judge(verdict, logs)
                if found:
                    counts["INCONSISTENT"] += 1
                    problems.append((name, found[0], data))
                    if args.save:
                        os.makedirs(args.save, exist_ok=True)
                        Path(args.save, f"{name}.bin").write_bytes(data)
                        Path(args.save, f"{name}.txt").write_text("\n".join(found) + "\n")
                if os.path.exists(marker):
                    print("A PAYLOAD RAN: this is a bug in the oracle", file=sys.stderr)
                    return 2
                if time.monotonic() - last_report > 60:
                    last_report = time.monotonic()
                    print(f"  {counts['inputs']} inputs, {counts['INCONSISTENT']} inconsistent", flush=True)
        finally:
            oracle.close()
    elapsed = time.monotonic() - start
    print(f"{counts['inputs']} inputs in {elapsed:.0f} s ({counts['inputs'] / max(elapsed, 1e-9):.0f}/s)")
    for key, value in sorted(counts.items()):
        print(f"  {key:64} {value}")
    for name, problem, data in problems[:20]:
        shown = data.hex() if len(data) <= 200 else f"{len(data)} bytes"
        print(f"  {name}: {problem}\n    {shown}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
