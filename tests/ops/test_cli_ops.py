"""``modelkit convert`` and ``modelkit prune`` on the command line: same answers as the API, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fixtures import build, hostile
from modelkit.cli.main import cli
from tests.conftest import same_bits


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_convert_folder_to_folder_with_jobs(tmp_path: Path) -> None:
    src = tmp_path / "models"
    (src / "emb").mkdir(parents=True)
    build.a1111_embedding(str(src / "emb" / "style.pt"))
    build.save_torch({"w": torch.arange(6.0)}, str(src / "a.ckpt"), "legacy")
    build.write_safetensors(str(src / "b.safetensors"), {"w": torch.ones(2)})
    (src / "a.preview.png").write_bytes(b"\x89PNG")
    r = _run("convert", str(src), "--out-dir", str(tmp_path / "out"), "-j", "2", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "modelkit.convert/1"
    assert [Path(f["output"]).relative_to(tmp_path).as_posix() for f in doc["files"]] == [
        "out/a.safetensors", "out/b.safetensors", "out/emb/style.safetensors"]
    assert all(f["status"] == "written" for f in doc["files"])
    assert list(load_file(tmp_path / "out/emb/style.safetensors")) == ["emb_params"]
    assert (tmp_path / "out" / "a.preview.png").read_bytes() == b"\x89PNG"
    # Beside the inputs: the .safetensors file is skipped, not an error.
    r = _run("convert", str(src))
    assert r.exit_code == 0 and "skipped" in r.stdout
    assert (src / "a.safetensors").exists()


def test_convert_dry_run_force_and_errors(tmp_path: Path, marker: str) -> None:
    src = tmp_path / "m.pt"
    build.save_torch({"w": torch.ones(2)}, str(src))
    r = _run("convert", "--dry-run", str(src))
    assert r.exit_code == 0 and "would write" in r.stdout
    assert not (tmp_path / "m.safetensors").exists()
    assert _run("convert", "-q", str(src)).exit_code == 0
    r = _run("convert", str(src))
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert _run("convert", "--force", str(src)).exit_code == 0

    evil = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(evil), marker, payload="os_system")
    r = _run("convert", "--json", str(evil))
    assert r.exit_code == 1
    (entry,) = json.loads(r.stdout)["files"]
    assert entry["status"] == "refused" and entry["error"] == "UnsafeFileError"
    assert not (tmp_path / "evil.safetensors").exists()

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04garbage")
    r = _run("convert", str(broken), str(src), "-o", str(tmp_path / "x.safetensors"))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--out-dir" in r.stderr
    r = _run("convert", str(broken))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1


def test_prune_cli_matches_the_api(tmp_path: Path) -> None:
    import modelkit

    src = tmp_path / "sd.ckpt"
    sd = {"model.diffusion_model.w": torch.randn(4, 4), "model_ema.diffusion_modelw": torch.randn(4, 4),
          "model_ema.decay": torch.tensor(0.999), "first_stage_model.encoder.w": torch.randn(2),
          "optimizer.state": torch.ones(1)}
    build.save_torch({"state_dict": sd}, str(src))
    r = _run("prune", "--ema", "only", "--dtype", "fp16", "--json", str(src))
    assert r.exit_code == 0, r.output
    (entry,) = json.loads(r.stdout)["files"]
    assert entry["output"] == str(tmp_path / "sd.pruned.safetensors")
    got = load_file(entry["output"])
    assert same_bits(got["model.diffusion_model.w"], sd["model_ema.diffusion_modelw"].half())
    assert set(got) == {"model.diffusion_model.w", "first_stage_model.encoder.w"}
    api = modelkit.prune(src, out_dir=tmp_path / "api", ema="only", dtype="fp16")
    for key in ("removed", "ema_swapped", "casts", "tensors", "size"):
        assert entry[key] == api.to_dict()[key], key

    r = _run("prune", "--part", "vae", str(src))
    assert r.exit_code == 0 and list(load_file(tmp_path / "sd.vae.safetensors")) == ["encoder.w"]
    r = _run("prune", "--dtype", "int8", str(src))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--dtype" in r.stderr
