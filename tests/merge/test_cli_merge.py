"""``modelkit merge lora|models`` and ``modelkit lora extract|merge|convert``: the API's answers, exit codes 0/1/2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import modelkit
from fixtures import build, hostile
from fixtures import merge_layouts as ml
from modelkit.cli.main import cli
from tests.conftest import same_bits

K2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _strip(d: dict) -> dict:
    d = dict(d)
    d.pop("seconds", None)
    d.pop("schema", None)
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    out = {"a": d / "a.safetensors", "b": d / "b.safetensors", "lora": d / "style.safetensors"}
    layout = ml.sd1()
    sd = ml.checkpoint(str(out["a"]), layout, seed=0)
    ml.checkpoint(str(out["b"]), layout, seed=1)
    ml.lora_file(str(out["lora"]), {ml.kohya_name(K2): ml.module("lora", tuple(sd[K2].shape)),
                                    ml.kohya_name(CONV): ml.module("loha", tuple(sd[CONV].shape))})
    return out


def test_merge_lora_json_is_the_api_result(tmp_path: Path, files: dict[str, Path]) -> None:
    o1, o2 = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    r = _run("merge", "lora", str(files["a"]), f"{files['lora']}:0.8", "-o", str(o1), "--te-ratio", "0.5", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "modelkit.merge.lora/1"
    api = modelkit.merge_lora(files["a"], [f"{files['lora']}:0.8"], o2, te_ratio=0.5).to_dict()
    cli_d, api_d = _strip(doc), _strip(api)
    for d in (cli_d, api_d):
        d.pop("output")
        d["metadata"].pop("modelspec.title", None)
        d["metadata"].pop("modelspec.date", None)  # the two runs may fall in different seconds
        d.pop("stats")
    assert cli_d == json.loads(json.dumps(api_d))
    t1, t2 = load_file(o1), load_file(o2)
    assert set(t1) == set(t2) and all(same_bits(t1[k], t2[k]) for k in t1)
    r = _run("merge", "lora", str(files["a"]), str(files["lora"]), "-o", str(o1))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "already exists" in r.stderr
    human = _run("merge", "lora", str(files["a"]), f"{files['lora']}:0.8", "-o", str(o1), "--force")
    assert human.exit_code == 0 and "2 changed" in human.stdout and "style.safetensors x0.8: 2/2 modules" in human.stdout


def test_merge_lora_errors_are_one_line(tmp_path: Path, files: dict[str, Path], marker: str) -> None:
    bad = tmp_path / "bad.safetensors"
    ml.lora_file(str(bad), {"lora_unet_nothing_here": ml.module("lora", (4, 4))})
    r = _run("merge", "lora", str(files["a"]), str(bad), "-o", str(tmp_path / "o.safetensors"))
    assert r.exit_code == 2 and r.stderr.startswith("modelkit: error: ") and r.stderr.count("\n") == 1
    assert "--allow-unmatched" in r.stderr
    r = _run("merge", "lora", str(files["a"]), str(bad), "-o", str(tmp_path / "o.safetensors"), "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["error"] == "UsageError"
    evil = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(evil), marker, payload="os_system")
    r = _run("merge", "lora", str(files["a"]), str(evil), "-o", str(tmp_path / "o.safetensors"))
    assert r.exit_code == 1 and "unsafe" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_models_cli(tmp_path: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "m.safetensors"
    weights = ",".join(["0.3"] * 26)
    r = _run("merge", "models", str(files["a"]), str(files["b"]), "-o", str(out), "--block-weights", weights,
             "--components", "unet", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "modelkit.merge.models/1" and doc["components"] == ["unet"]
    assert doc["block_weights"]["BASE"] == 0.3 and doc["block_weights"]["OUT11"] == 0.3
    r = _run("merge", "models", str(files["a"]), str(files["b"]), "-o", str(tmp_path / "x.safetensors"),
             "--block-weights", "1,2")
    assert r.exit_code == 2 and "25 block weights" in r.stderr


def test_lora_extract_merge_convert_cli(tmp_path: Path, files: dict[str, Path]) -> None:
    tuned = tmp_path / "tuned.safetensors"
    with modelkit.open_model(files["a"]) as mf:
        sd = {k: r.read("torch") for k, r in mf.items()}
    sd[K2] = sd[K2] + torch.ones_like(sd[K2]) * 0.01
    build.write_safetensors(str(tuned), sd)
    x = tmp_path / "x.safetensors"
    r = _run("lora", "extract", str(files["a"]), str(tuned), "-o", str(x), "--rank", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["modules"] == 1
    shapes = {k: v for k, (v, _) in ml.sd1_real_subset([K2]).items()}
    a, b = tmp_path / "ra.safetensors", tmp_path / "rb.safetensors"
    ml.lora_file(str(a), {ml.kohya_name(K2): ml.module("lora", shapes[K2], seed=1)})
    ml.lora_file(str(b), {ml.kohya_name(K2): ml.module("lora", shapes[K2], seed=2, rank=2)})
    m = tmp_path / "m.safetensors"
    r = _run("lora", "merge", f"{a}:0.5", f"{b}:1", "-o", str(m), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["modules"] == 1 and load_file(m)[ml.kohya_name(K2) + ".lora_down.weight"].shape[0] == 6
    p = tmp_path / "p-peft"
    r = _run("lora", "convert", str(m), "--to", "peft", "-o", str(p), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["style"] == "peft"
    assert "base_model.model." + ml.KNOWN_PATH[K2] + ".lora_A.weight" in load_file(p / "unet" / "adapter_model.safetensors")
    assert (p / "unet" / "adapter_config.json").is_file()
    r = _run("lora", "convert", str(m), "--to", "peft", "-o", str(tmp_path / "one.safetensors"))
    assert r.exit_code == 2 and "PEFT adapters are folders" in r.stderr and not (tmp_path / "one.safetensors").exists()
    r = _run("lora", "convert", str(x), "--to", "diffusers", "-o", str(tmp_path / "q.safetensors"))
    assert r.exit_code == 2 and "does not fit" in r.stderr  # a LoRA of the tiny layout against real SD1 shapes
