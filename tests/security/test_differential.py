"""Differential: the real C unpickler (sandboxed, tracing) against ``modelkit.scan``.

``tests/security/pickle_oracle.py`` loads each file in a child process, the way victims load it
(``pickle.loads``, ``pickle.load`` loops on ``io.BytesIO`` and on a buffered file, and
``torch.load(weights_only=False)`` with a tracing pickle module), with every global outside
modelkit's allow-list replaced by a recording stand-in and ``torch.storage._load_from_bytes`` by
a recording wrapper that traces the nested load. The child's cwd is an empty folder, and payloads
only create a marker file (they never run: the names that would run them are stand-ins).

Whenever CPython would call something outside the allow-list (including calls no opcode names:
BUILD through a ``__setstate__`` in the instance dict, the setattr of slot state, torch's state
rebuilders), or ``_load_from_bytes`` on bytes built at run time, the scan must say ``unsafe``;
when it resolves a name outside the allow-list, the scan must not say ``safe``. So a ``safe``
scan means CPython called nothing outside the allow-list in any reading.

Inputs: the generated corpus (every class of issue 13), and seeded random inputs (mutations of
real pickles in every protocol, tensors, torch files, the hostile fixtures; random programs over
a vocabulary of allowed objects, ``_load_from_bytes``, dunder keys, BUILD and calls; random bytes).
The random inputs name a marker that cannot be created and are the same bytes every run, so a
failure here fails again. Bounded here; ``bench/fuzz_vm.py`` runs the same for as long as you like.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import modelkit
from modelkit.formats.unpickler import ALLOWED
from tests import cpythons
from tests.security import corpus_gen, pickle_oracle
from tests.security.pickle_oracle import TraceOracle, judge, refused_globals, violations

#: Random inputs per run; the seed is fixed so that a failure here fails again.
FUZZ_EXAMPLES = 400
FUZZ_SEED = 13


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    """(files folder, the child's empty cwd, marker path)."""
    files = tmp_path_factory.mktemp("diff-files")
    cwd = tmp_path_factory.mktemp("diff-cwd")
    marker = (files / "PWNED").as_posix()  # payloads take a plain path: no backslash on Windows (check_marker)
    yield files, cwd, marker
    assert not os.path.exists(marker), "a payload ran"
    assert not os.listdir(cwd), f"the child wrote into its cwd: {os.listdir(cwd)}"


@pytest.fixture(scope="module")
def oracle(sandbox: tuple[Path, Path, str]) -> Iterator[TraceOracle]:
    _files, cwd, _marker = sandbox
    o = TraceOracle(cpythons.interpreters()[0][1], cwd, ALLOWED)
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch.load is one of the readings, and this install has no torch (the core install)")
    assert o.has_torch, "the project's interpreter has torch: torch.load is one of the readings"
    yield o
    o.close()


def _verdict(path: Path) -> str:
    try:
        return modelkit.scan(path).files[0].verdict
    except Exception as exc:  # noqa: BLE001 - a scanner that crashes has let the file through
        return f"crashed ({type(exc).__name__})"


def _run(oracle: TraceOracle, items: list[tuple[str, bytes]], folder: Path) -> list[tuple[str, str, bytes]]:
    """Scan and trace each (name, bytes); (name, problem, bytes) for each inconsistent input."""
    problems = []
    for i, (name, data) in enumerate(items):
        path = folder / f"in-{i}.bin"
        path.write_bytes(data)
        logs = oracle.trace(path)
        found = judge(_verdict(path), logs)
        if found:
            modes = sorted({p.split(":", 1)[0] for p in found})
            problems.append((name, f"{'/'.join(modes)}:{found[0].split(':', 1)[1]}", data))
        path.unlink()
    return problems


def _fail(problems: list[tuple[str, str, bytes]], total: int) -> None:
    """Fail with the problems grouped by kind, a few examples each, and the smallest input's bytes."""
    if not problems:
        return
    groups: dict[str, list[tuple[str, str, bytes]]] = {}
    for item in problems:
        key = re.sub(r"\(.*?\)|\d+", "", item[1])[:140]
        groups.setdefault(key, []).append(item)
    lines = [f"{len(problems)} of {total} inputs are inconsistent, in {len(groups)} groups:"]
    for key, items in sorted(groups.items(), key=lambda g: -len(g[1])):
        lines.append(f"  {len(items):4} x {key}")
        for name, problem, _data in items[:3]:
            lines.append(f"         {name}: {problem}")
        smallest = min(items, key=lambda x: len(x[2]))
        if len(smallest[2]) <= 300:
            lines.append(f"         smallest ({smallest[0]}): {smallest[2].hex()}")
    pytest.fail("\n".join(lines), pytrace=False)


def test_oracle_sees_what_cpython_calls(oracle: TraceOracle, sandbox: tuple[Path, Path, str]) -> None:
    """The oracle itself: a benign tensor pickle calls nothing outside the allow-list; a planted
    ``__setstate__`` is a call no opcode names; a FRAME straddle runs the payload in one reading only."""
    files, _cwd, marker = sandbox
    samples = {s.name: s for s in corpus_gen.generate(marker)}

    def trace(data: bytes) -> dict[str, list[list[str]]]:
        path = files / "oracle-check.bin"
        path.write_bytes(data)
        logs = oracle.trace(path)
        path.unlink()
        return {mode: log["events"] for mode, log in logs.items()}

    import pickle

    import torch

    benign = trace(pickle.dumps({"w": torch.ones(2), "step": 3}, protocol=2))
    for mode, events in benign.items():
        assert not violations(events) and not refused_globals(events), (mode, events)
        assert ["nested", "torch.storage._load_from_bytes", "constant"] in events, (mode, events)

    planted = next(s for s in samples.values() if s.family == "setstate-build" and s.loader == "pickle"
                   and "-bytes-list-" in s.name)
    events = trace(planted.data)["loads"]
    assert ["runtime-bytes", "torch.storage._load_from_bytes", "built at run time: bytes"] in events, events
    assert violations(events), events

    for direction, hostile_in, quiet_in in (("file", "bytesio", "loads"), ("memory", "loads", "bytesio")):
        straddle = corpus_gen.straddle("binint", 2, direction, corpus_gen.payload_text(marker))
        logs = trace(straddle)
        assert any(e[:2] == ["call", "builtins.exec"] for e in logs[hostile_in]), (direction, logs)
        assert not violations(logs[quiet_in]), (direction, logs)

    runtime = next(s for s in samples.values() if s.family == "runtime-bytes" and not s.live and s.loader == "pickle")
    assert any(e[0] == "runtime-bytes" for e in trace(runtime.data)["loads"])


def test_generated_corpus_against_cpython(oracle: TraceOracle, sandbox: tuple[Path, Path, str]) -> None:
    """Every generated variant: what CPython calls in any reading, the scan calls unsafe."""
    files, _cwd, marker = sandbox
    samples = corpus_gen.generate(marker)
    items = [(s.name, s.data) for s in samples]
    _fail(_run(oracle, items, files), len(items))


def test_random_and_mutated_pickles_against_cpython(oracle: TraceOracle, sandbox: tuple[Path, Path, str]) -> None:
    """Seeded random inputs: mutated real and hostile pickles, random programs, random bytes."""
    files, _cwd, _marker = sandbox
    rng = random.Random(FUZZ_SEED)
    seeds = pickle_oracle.seed_pickles()
    inputs = pickle_oracle.fuzz_inputs(rng, FUZZ_EXAMPLES, seeds)
    items = [(f"fuzz-{FUZZ_SEED}-{i}", data) for i, data in enumerate(inputs)]
    _fail(_run(oracle, items, files), len(items))


def test_other_cpythons_against_the_scan(sandbox: tuple[Path, Path, str]) -> None:
    """Every other CPython 3.10-3.13 on the machine (no torch there: pickle.loads and pickle.load
    loops) on the parser-differential families and some random inputs."""
    files, cwd, marker = sandbox
    others = cpythons.interpreters()[1:]
    samples = [s for s in corpus_gen.generate(marker)
               if s.family in ("int-parse", "frame-straddle", "frame-tail", "setstate-build")]
    rng = random.Random(FUZZ_SEED + 1)
    seeds = pickle_oracle.seed_pickles()
    items = [(s.name, s.data) for s in samples[::3]]
    items += [(f"fuzz-{FUZZ_SEED + 1}-{i}", d) for i, d in enumerate(pickle_oracle.fuzz_inputs(rng, 60, seeds))]
    problems = []
    for version, exe in others:
        o = TraceOracle(exe, cwd, ALLOWED)
        try:
            problems += [(f"[{version}] {name}", p, d) for name, p, d in _run(o, items, files)]
        finally:
            o.close()
    _fail(problems, len(items) * len(others))
