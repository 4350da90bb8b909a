"""Start-up: ``import modelkit``, ``modelkit --help`` and ``modelkit scan`` import only what they
need (issue 14). Each case runs in a fresh interpreter and checks the modules it imported, never
a time (bench/bench_startup.py measures the times)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from fixtures import torchfree

ROOT = Path(__file__).resolve().parents[1]

#: Never imported by ``--help`` or ``scan``: the extras, numpy and tqdm, and the other commands' code.
HEAVY = ("torch", "numpy", "tqdm", "safetensors", "fickling", "diffusers", "transformers", "accelerate",
         "modelkit.ops", "modelkit.detect", "modelkit.load", "modelkit.train", "modelkit.reading")

#: Runs ``sys.argv[2:]`` through the modelkit CLI (or ``import modelkit`` when there are none) and
#: writes the names in ``sys.modules`` to the file ``sys.argv[1]``.
CHILD = """
import sys
out, args = sys.argv[1], sys.argv[2:]
try:
    if args:
        sys.argv = ["modelkit", *args]
        from modelkit.cli.main import main
        main()
    else:
        import modelkit
finally:
    with open(out, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
"""


def _imported(tmp_path: Path, *args: str) -> set[str]:
    out = tmp_path / "modules.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", CHILD, str(out), *args], capture_output=True, env=env, timeout=120)
    return set(out.read_text().split())


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.fixture(scope="module")
def small_pt(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("startup") / "small.pt")
    torchfree.save_zip({"w": np.zeros((4, 4), np.float32), "b": np.ones(4, np.float32)}, path)
    return path


def test_import_modelkit_imports_only_the_package(tmp_path: Path) -> None:
    modules = _imported(tmp_path)
    assert "modelkit" in modules
    ours = sorted(m for m in modules if m.startswith("modelkit.") and not m.startswith("modelkit._"))
    assert ours == [], f"import modelkit imported {ours}"
    assert _heavy(modules) == [] and "click" not in modules


@pytest.mark.parametrize("args", [["--help"], ["--version"]], ids=["help", "version"])
def test_help_imports_no_command(tmp_path: Path, args: list[str]) -> None:
    modules = _imported(tmp_path, *args)
    assert "modelkit.cli.main" in modules
    commands = sorted(m for m in modules if m.startswith("modelkit.cli.") and m.endswith(("_cmd", "_group")))
    assert commands == [], f"modelkit {args[0]} imported {commands}"
    assert _heavy(modules) == []
    assert "modelkit.scan" not in modules and "modelkit.formats" not in modules


def test_scan_imports_only_the_scanner(tmp_path: Path, small_pt: str) -> None:
    modules = _imported(tmp_path, "scan", small_pt)
    assert "modelkit.scan.engine" in modules and "modelkit.cli.scan_cmd" in modules  # the scan ran
    assert _heavy(modules) == [], f"modelkit scan imported {_heavy(modules)}"
    others = sorted(m for m in modules if m.startswith("modelkit.cli.") and m.endswith("_cmd") and "scan" not in m)
    assert others == []
    assert not {"gzip", "pickletools", "secrets"} & modules  # imported where a scan needs them


def test_help_lists_every_command_with_its_own_short_help() -> None:
    """``COMMANDS`` repeats each command's help so --help need not import it: it must agree with
    the commands themselves (the output equals click's own listing with every command loaded)."""
    from modelkit.cli.main import COMMANDS, ModelkitGroup, cli

    group = ModelkitGroup("modelkit")  # none of its commands loaded yet
    ctx = click.Context(group, info_name="modelkit")
    lazy, loaded = ctx.make_formatter(), ctx.make_formatter()
    group.format_commands(ctx, lazy)
    assert group.commands == {}
    click.Group.format_commands(group, ctx, loaded)  # loads every command, as click does
    assert lazy.getvalue() == loaded.getvalue()
    assert len(group.commands) == len(COMMANDS)
    assert lazy.getvalue() in CliRunner().invoke(cli, ["--help"]).output
    for name, (_, short) in COMMANDS.items():
        cmd = group.commands[name]
        assert cmd is not None and cmd.name == name
        assert " ".join((cmd.help or "").partition("\n\n")[0].split()) == short, name


def test_public_names_resolve_lazily() -> None:
    import modelkit

    assert set(modelkit.__all__) == {*modelkit._LAZY, "__version__"}
    for name in modelkit.__all__:
        assert getattr(modelkit, name) is not None
        assert name in dir(modelkit)
    with pytest.raises(AttributeError):
        modelkit.no_such_name  # noqa: B018
    assert isinstance(modelkit.scan, types.ModuleType) and callable(modelkit.scan)


def test_function_named_like_a_submodule_stays_the_function(tmp_path: Path) -> None:
    """``modelkit.load`` and ``modelkit.detect`` are functions even after their submodules are imported."""
    code = ("import types, modelkit.load, modelkit.detect.engine, modelkit\n"
            "assert not isinstance(modelkit.load, types.ModuleType), modelkit.load\n"
            "assert not isinstance(modelkit.detect, types.ModuleType), modelkit.detect\n"
            "assert modelkit.load.__module__ == 'modelkit.load' and modelkit.detect.__name__ == 'detect'\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
