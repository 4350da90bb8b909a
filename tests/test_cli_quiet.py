"""``-q`` means one thing in every command (issue 16): no progress bar and no chatter; results
and errors stay. With ``--json`` it changes nothing: stdout holds the JSON document and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import click
import click.testing
import pytest
import torch
from click.testing import CliRunner, Result

from fixtures import build
from fixtures import merge_layouts as ml
from modelkit.cli.main import COMMANDS, cli

QUIET_HELP = "No progress bar and no chatter; results and errors stay."
K2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _run(*args: str) -> Result:
    r = CliRunner().invoke(cli, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{args}: {r.exception!r}"
    return r


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quiet")
    f = {n: d / n for n in ("a.safetensors", "b.safetensors", "style.safetensors", "ra.safetensors",
                            "rb.safetensors", "m.ckpt")}
    sd = ml.checkpoint(str(f["a.safetensors"]), ml.sd1(), seed=0)
    ml.checkpoint(str(f["b.safetensors"]), ml.sd1(), seed=1)
    ml.lora_file(str(f["style.safetensors"]), {ml.kohya_name(K2): ml.module("lora", tuple(sd[K2].shape))})
    real = {k: v for k, (v, _) in ml.sd1_real_subset([K2]).items()}
    ml.lora_file(str(f["ra.safetensors"]), {ml.kohya_name(K2): ml.module("lora", real[K2], seed=1)})
    ml.lora_file(str(f["rb.safetensors"]), {ml.kohya_name(K2): ml.module("lora", real[K2], seed=2)})
    # a wrapped checkpoint with an EMA copy and a sidecar: convert and prune have notes to print
    build.save_torch({"state_dict": {"w": torch.ones(2), "model_ema.w": torch.ones(2)}}, str(f["m.ckpt"]))
    (d / "m.preview.png").write_bytes(b"\x89PNG")
    return f


def _commands(f: dict[str, Path], out: Path) -> dict[str, tuple[list[str], str, int]]:
    """name -> (arguments, the start of the result line, exit code)."""
    a, b = str(f["a.safetensors"]), str(f["b.safetensors"])
    return {
        "convert": (["convert", str(f["m.ckpt"]), "--out-dir", str(out / "c")], f"{f['m.ckpt']} -> ", 0),
        "prune": (["prune", str(f["m.ckpt"]), "--out-dir", str(out / "p")], f"{f['m.ckpt']} -> ", 0),
        "merge lora": (["merge", "lora", a, str(f["style.safetensors"]), "-o", str(out / "ml.safetensors")],
                       f"{a} -> ", 0),
        "merge models": (["merge", "models", a, b, "-o", str(out / "mm.safetensors")], f"{a} + {b} -> ", 0),
        "lora extract": (["lora", "extract", a, b, "--rank", "2", "-o", str(out / "le.safetensors")],
                         f"{a} + {b} -> ", 0),
        "lora merge": (["lora", "merge", str(f["ra.safetensors"]), str(f["rb.safetensors"]), "-o",
                        str(out / "lm.safetensors")], f"{f['ra.safetensors']} + ", 0),
        "lora convert": (["lora", "convert", str(f["ra.safetensors"]), "--to", "diffusers", "-o",
                          str(out / "lc.safetensors")], f"{f['ra.safetensors']} -> ", 0),
        "verify": (["verify", a, b], "MISMATCH  ", 1),
        "diff": (["diff", a, b], "DIFFERENT  ", 1),
        "inspect": (["inspect", str(f["m.ckpt"])], str(f["m.ckpt"]), 0),
        "load": (["load", a], f"{a}: ", 0),
        "clean": (["clean", str(out)], "removed 0 abandoned temp files", 0),
        "scan": (["scan", a], "SAFE       ", 0),
        "hash": (["hash", "--algo", "crc32", a], a, 0),
    }


#: what each command prints without -q and must not print with it (None: it has no chatter here)
CHATTER = {"convert": "  state_dict wrapper removed", "prune": "  removed 1 EMA tensor",
           "merge lora": "x1: 1/1 modules", "merge models": "weighted-sum", "lora extract": "  extracted ",
           "lora merge": "  ", "lora convert": "  ", "verify": "values differ", "diff": "  values  "}


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """stderr is a terminal inside CliRunner; every tqdm bar made is recorded."""
    import tqdm

    made: list[object] = []

    class Recorded(tqdm.tqdm):  # type: ignore[type-arg]
        def __init__(self, *args: object, **kwargs: object) -> None:
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(click.testing._NamedTextIOWrapper, "isatty", lambda self: True)
    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    return made


def test_the_terminal_fixture_sees_a_bar_without_q(files: dict[str, Path], terminal: list[object]) -> None:
    assert _run("scan", str(files["a.safetensors"])).exit_code == 0
    assert terminal  # the check below is not vacuous


def test_quiet_keeps_results_and_drops_chatter(files: dict[str, Path], tmp_path: Path,
                                               terminal: list[object]) -> None:
    for name, (args, _, code) in _commands(files, tmp_path / "loud").items():
        r = _run(*args)
        assert r.exit_code == code, (name, r.output)
        if name in CHATTER:
            chatter = CHATTER[name]
            assert any(ln.startswith(chatter) or chatter in ln for ln in r.stdout.splitlines()[1:]), (name, r.stdout)
    terminal.clear()
    for name, (args, result, code) in _commands(files, tmp_path / "quiet").items():
        r = _run(*args, "-q")
        assert r.exit_code == code, (name, r.output)
        assert r.stderr == "", (name, r.stderr)
        lines = r.stdout.splitlines()
        assert lines and lines[0].startswith(result), (name, r.stdout)
        if name in CHATTER:
            assert len(lines) == 1, (name, r.stdout)
    assert terminal == []
    # inspect's report and load's measurements are results: -q keeps them whole
    r = _run("inspect", "-q", str(files["m.ckpt"]))
    assert "  junk          ema: 1 tensor" in r.stdout and "evidence: no rule matched 2 tensors;" in r.stdout
    assert "modelkit.load" in _run("load", "-q", str(files["a.safetensors"])).stdout
    # verify's OK verdict, and a dry run's result line
    r = _run("verify", "-q", str(files["a.safetensors"]), str(files["a.safetensors"]))
    assert r.exit_code == 0 and r.stdout.startswith("OK  ") and len(r.stdout.splitlines()) == 1
    r = _run("convert", "-q", "--dry-run", str(files["m.ckpt"]), "--out-dir", str(tmp_path / "dry"))
    assert r.exit_code == 0 and "would write" in r.stdout and len(r.stdout.splitlines()) == 1


def test_quiet_keeps_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.ckpt")
    for args in (["convert", missing], ["prune", missing], ["inspect", missing], ["verify", missing, missing],
                 ["diff", missing, missing], ["load", missing], ["merge", "models", missing, missing],
                 ["lora", "convert", missing, "--to", "diffusers", "-o", str(tmp_path / "o.safetensors")]):
        r = _run(*args, "-q")
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("modelkit: error: ") and r.stdout == "", (args, r.output)
        r = _run(*args, "-q", "--json")
        assert r.exit_code == 2, (args, r.output)
        doc = json.loads(r.stdout)
        error = doc["error"] if "error" in doc else doc["files"][0]
        assert error["error"] and error["problem"], (args, doc)


def test_quiet_json_is_the_json_and_nothing_else(files: dict[str, Path], tmp_path: Path) -> None:
    quiet = _commands(files, tmp_path / "quiet")
    for name, (args, _, code) in _commands(files, tmp_path / "plain").items():
        plain = _run(*args, "--json")
        assert plain.exit_code == code, (name, plain.output)
        r = _run(*quiet[name][0], "-q", "--json")
        assert r.exit_code == code and r.stderr == "", (name, r.output)
        doc, plain_doc = json.loads(r.stdout), json.loads(plain.stdout)
        assert doc.get("schema") == plain_doc.get("schema") and set(doc) == set(plain_doc), name


def _leaves(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name in group.list_commands(click.Context(group)):
        cmd = group.get_command(click.Context(group), name)
        assert cmd is not None
        if isinstance(cmd, click.Group):
            out += _leaves(cmd, f"{prefix}{name} ")
        else:
            out.append((f"{prefix}{name}", cmd))
    return out


def test_every_command_describes_q_the_same_way() -> None:
    leaves = _leaves(cli, "")
    assert {name.split()[0] for name, _ in leaves} == set(COMMANDS)
    for name, cmd in leaves:
        (quiet,) = [p for p in cmd.params if "-q" in p.opts]
        assert quiet.opts == ["-q", "--quiet"] and isinstance(quiet, click.Option) and quiet.help, name
        if name in ("scan", "hash"):  # the same definition, naming what those two keep
            assert quiet.help.startswith("No progress bar and no chatter; ") and quiet.help.endswith("errors stay.")
        else:
            assert quiet.help == QUIET_HELP, name
        r = _run(*name.split(), "--help")
        assert r.exit_code == 0 and "-q, --quiet" in r.stdout, name
