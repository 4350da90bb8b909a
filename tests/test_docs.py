"""The docs stay true: the README and docs/ pages are checked against the code.

Every ```console block in README.md and docs/*.md is run: each ``$ modelkit ARGS`` line runs the
CLI in a child process, in a folder that holds a fresh copy of the demo files at
``fixtures/demo/`` (built once by ``fixtures.demo``, the same bytes on every run), and what it
prints (stdout and stderr, as a terminal shows them) must be the lines that follow, exactly, after
both sides are normalised for what varies by machine: times and throughputs. A line ``...`` stands
for any number of lines. The blocks of one page run in order, in one folder, so a page may convert
a file and then verify it. Blocks that cannot run here (a GPU, a training run, a placeholder file
name) are fenced ```sh and not run.

To paste the real output after changing a command: ``MODELKIT_DOCS_UPDATE=1 pytest tests/test_docs.py``
rewrites each console block with what the commands now print (``...`` lines are lost: put them back).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelkit.scan.rules import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
COMMAND_PAGES = ("scan", "inspect", "hash", "convert", "verify", "load", "merge", "train", "clean",
                 "json", "formats")

_FENCE = re.compile(r"^```console\n(.*?)^```\n", re.S | re.M)
# What varies by machine: a time ("161 ms", "1.2 s", "0:00:49") or a throughput ("13.2 GB/s", "3.21 it/s").
_VARIES = [
    (re.compile(r"\d+(?:[.,]\d+)*\s?(?:[KMGT]i?B|B)/s\b"), "<rate>"),
    (re.compile(r"\d+(?:\.\d+)?\s?it/s\b"), "<rate>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ns|µs|us|ms|s)\b"), "<time>"),
    (re.compile(r"\b\d+:\d\d:\d\d\b"), "<time>"),
    (re.compile(r'("(?:seconds|elapsed_s|time_s|[a-z_]*_s|gb_per_s|[a-z_]*per_s)"\s*:\s*)[-\d.e+]+'), r"\1<n>"),
]


def _console_blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _FENCE.finditer(text)]


def _commands(block: str) -> list[tuple[str, list[str]]]:
    """The block's ``$ `` lines, each with the lines that follow it (its expected output)."""
    out: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
        else:
            raise AssertionError(f"a console block must start with a '$ ' line: {line!r}")
    return out


def _normalise(text: str, folder: Path) -> str:
    text = text.replace(str(folder) + os.sep, "").replace(str(folder), ".")
    for pattern, repl in _VARIES:
        text = pattern.sub(repl, text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def _matches(expected: list[str], actual: str) -> bool:
    parts = [r"(?:[^\n]*\n)*?" if line == "..." else re.escape(line) + r"\n" for line in expected]
    return re.fullmatch("".join(parts), actual + "\n" if actual else "") is not None


def _run(command: str, folder: Path) -> str:
    args = shlex.split(command)
    assert args[0] == "modelkit", f"console examples run modelkit only: {command!r}"
    env = {**os.environ, "MODELKIT_CACHE_DIR": str(folder / ".cache"), "PYTHONUNBUFFERED": "1",
           "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    env.pop("MODELKIT_PORTABLE", None)
    r = subprocess.run([sys.executable, "-m", "modelkit", *args[1:]], cwd=folder, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                       text=True, timeout=120, check=False)
    return r.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="the demo files are built with torch (the [torch] extra)")
    from fixtures.demo import main

    folder = tmp_path_factory.mktemp("demo") / "fixtures" / "demo"
    main(str(folder))
    return folder


@pytest.mark.parametrize("page", [p for p in PAGES if _console_blocks(p)], ids=lambda p: p.name)
def test_console_examples_print_what_the_docs_show(page: Path, demo: Path, tmp_path: Path) -> None:
    blocks = _console_blocks(page)
    shutil.copytree(demo, tmp_path / "fixtures" / "demo")
    update = os.environ.get("MODELKIT_DOCS_UPDATE") == "1"
    failures, new_blocks = [], []
    for line_no, block in blocks:
        new = []
        for command, expected in _commands(block):
            raw = _run(command, tmp_path)
            actual = _normalise(raw, tmp_path)
            want = [_normalise(line, tmp_path) for line in expected]
            if not _matches(want, actual):
                failures.append(f"{page.name}:{line_no}: $ {command}\n--- expected\n" + "\n".join(want)
                                + "\n--- printed\n" + actual)
            if update:
                shown = "\n".join(line.rstrip() for line in raw.replace(str(tmp_path) + os.sep, "").splitlines())
                new.append(f"$ {command}\n" + (shown + "\n" if shown else ""))
        new_blocks.append((block, "".join(new)))
    if update and failures:
        text = page.read_text(encoding="utf-8")
        for old, new_text in new_blocks:
            text = text.replace(f"```console\n{old}```\n", f"```console\n{new_text}```\n", 1)
        page.write_text(text, encoding="utf-8")
    assert not failures, "\n\n".join(failures)


def test_the_normaliser_keeps_what_does_not_vary() -> None:
    here = Path("/tmp/x")
    assert _normalise("/tmp/x/fixtures/demo/a.ckpt  7.6 MiB  loaded in 161 ms (13.2 GB/s)", here) == \
        "fixtures/demo/a.ckpt  7.6 MiB  loaded in <time> (<rate>)"
    assert _matches(["a", "...", "d"], "a\nb\nc\nd") and not _matches(["a", "d"], "a\nb\nd")
    assert _matches([], "") and not _matches(["a"], "a\nb")


def test_every_command_has_a_page_and_the_readme_links_them() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in COMMAND_PAGES:
        assert (DOCS / f"{name}.md").is_file(), name
        assert f"docs/{name}.md" in readme, f"README does not link docs/{name}.md"
    assert len(readme.encode()) < 12_000, "the README is a front page: the reference goes in docs/"


def test_rule_table_is_generated_from_the_registry() -> None:
    assert markdown_table() in (DOCS / "scan.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert "make demo" in block and "make test" in block
    assert "make test-core" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_inspect_json_fields_are_all_documented(demo: Path) -> None:
    """Every key ``inspect --json`` prints for the demo files is named in docs/json.md."""
    import json

    doc = (DOCS / "json.md").read_text(encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "modelkit", "inspect", "--json", "--keys", str(demo)],
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "MODELKIT_CACHE_DIR": str(demo.parent / ".cache"),
                              "PYTHONPATH": str(ROOT)}).stdout
    files = json.loads(out)["files"]
    keys = {k for f in files for k in f} | {k for f in files for t in f.get("tensors", []) for k in t}
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"docs/json.md does not name these inspect --json fields: {missing}"
