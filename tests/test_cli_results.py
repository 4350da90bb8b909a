"""What the CLI reports is true: no file named like a folder, no IDENTICAL for values never
compared, no torch import in a load time, no "1 tensors", no AutoV1 of zero bytes (issue 16, item 7)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import modelkit._torch
from fixtures import torchfree
from modelkit.cli.main import cli


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def _folder_with_a_checkpoint(tmp_path: Path) -> Path:
    src = tmp_path / "models"
    src.mkdir()
    torchfree.save_zip({"w": np.ones((2, 3), dtype=np.float32)}, str(src / "a.ckpt"))
    return src


@pytest.mark.parametrize("command", ["convert", "prune"])
def test_a_folder_input_refuses_an_output_named_like_a_file(tmp_path: Path, command: str) -> None:
    src = _folder_with_a_checkpoint(tmp_path)
    target = tmp_path / "x.safetensors"
    r = _run(command, str(src), "-o", str(target))
    assert r.exit_code == 2
    (line,) = r.stderr.strip().splitlines()
    assert "is a folder" in line and "--out-dir" in line
    assert not target.exists() and sorted(p.name for p in src.iterdir()) == ["a.ckpt"]


def test_a_folder_input_still_takes_an_output_folder(tmp_path: Path) -> None:
    src = _folder_with_a_checkpoint(tmp_path)
    out = tmp_path / "out"
    r = _run("convert", str(src), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert (out / "a.safetensors").is_file()
    # an existing folder of that name is a folder, whatever it is called
    odd = tmp_path / "odd.safetensors"
    odd.mkdir()
    r = _run("convert", str(src), "-o", str(odd))
    assert r.exit_code == 0, r.output
    assert (odd / "a.safetensors").is_file()


def test_diff_without_values_does_not_claim_identical(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    torchfree.save_safetensors({"w": np.zeros(4, dtype=np.float32)}, str(a))
    torchfree.save_safetensors({"w": np.ones(4, dtype=np.float32)}, str(b))
    r = _run("diff", "--no-values", str(a), str(b))
    assert r.exit_code == 0
    assert "IDENTICAL" not in r.stdout and "same keys, shapes and dtypes; values not compared" in r.stdout
    doc = json.loads(_run("diff", "--no-values", "--json", str(a), str(b)).stdout)
    assert doc["values_compared"] is False and doc["schema"] == "modelkit.diff/1"
    # with values the same files differ, and the JSON says the values were compared
    r = _run("diff", str(a), str(b))
    assert r.exit_code == 1 and "DIFFERENT" in r.stdout
    doc = json.loads(_run("diff", "--json", str(a), str(a)).stdout)
    assert doc["values_compared"] is True and doc["identical"] is True
    assert "IDENTICAL" in _run("diff", str(a), str(a)).stdout


def test_load_does_not_time_the_torch_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    p = tmp_path / "m.safetensors"
    torchfree.save_safetensors({"w": np.ones(8, dtype=np.float32)}, str(p))
    real = modelkit._torch.require_torch
    cold = [True]

    def slow_import(what: str) -> object:
        if cold.pop() if cold else False:
            time.sleep(0.5)  # the first `import torch` of a process; later ones are free
        return real(what)

    monkeypatch.setattr(modelkit._torch, "require_torch", slow_import)
    r = _run("load", "--json", str(p))
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["loaders"]
    assert row["loader"] == "modelkit.load" and row["seconds"] < 0.5


def test_counts_are_singular_for_one(tmp_path: Path) -> None:
    src = tmp_path / "one.ckpt"
    torchfree.save_zip({"w": np.ones(3, dtype=np.float32)}, str(src))
    r = _run("convert", str(src))
    assert r.exit_code == 0, r.output
    assert "1 tensor," in r.stdout and "1 tensors" not in r.stdout
    r = _run("prune", str(src))
    assert r.exit_code == 0, r.output
    assert "1 tensor," in r.stdout and "1 tensors" not in r.stdout
    r = _run("verify", str(src), str(tmp_path / "one.safetensors"))
    assert r.exit_code == 0 and "OK  1 tensor checked" in r.stdout
    r = _run("inspect", str(tmp_path))
    assert r.exit_code == 0
    assert "  1 tensor  3 params  " in r.stdout and "1 tensors" not in r.stdout


def test_container_line_has_no_empty_parentheses(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    torchfree.save_safetensors({"w": np.ones(3, dtype=np.float32)}, str(p))
    r = _run("inspect", str(p))
    assert r.exit_code == 0
    assert "  container     safetensors\n" in r.stdout and "()" not in r.stdout


def test_autov1_is_left_out_where_it_hashes_no_bytes(tmp_path: Path) -> None:
    small, big = tmp_path / "small.safetensors", tmp_path / "big.safetensors"
    torchfree.save_safetensors({"w": np.ones(3, dtype=np.float32)}, str(small))
    torchfree.save_safetensors({"w": np.arange(300_000, dtype=np.float32)}, str(big))  # 1.2 MB
    r = _run("inspect", str(small))
    assert r.exit_code == 0 and "  autov1 " not in r.stdout
    (f,) = json.loads(_run("inspect", "--json", str(small)).stdout)["files"]
    assert f["hashes"]["autov1"] == hashlib.sha256(b"").hexdigest()[:8]  # the field stays, as A1111 shows it
    assert "no longer than 1 MiB" in f["hash_notes"]["autov1"]
    data = big.read_bytes()
    r = _run("inspect", str(big))
    assert f"autov1        {hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}" in r.stdout
    (f,) = json.loads(_run("inspect", "--json", str(big)).stdout)["files"]
    assert "hash_notes" not in f
