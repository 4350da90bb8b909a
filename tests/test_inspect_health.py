"""inspect: detection, hashes, decoded metadata, junk and known defects."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from click.testing import CliRunner

import modelkit
from fixtures import build
from fixtures.sd_layout import tiny_sd1_layout
from modelkit.cli.main import cli


def _ckpt(path: Path, **edits: object) -> dict[str, torch.Tensor]:
    layout = tiny_sd1_layout(context_dim=768)
    sd = {k: torch.zeros(s, dtype=torch.int64 if d == "int64" else torch.float16) for k, (s, d) in layout.items()}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).reshape(1, 77)
    sd.update(edits)  # type: ignore[arg-type]
    torch.save({"state_dict": sd, "global_step": 1}, path)
    return sd


def test_inspect_reports_detection_junk_and_defects(tmp_path: Path) -> None:
    p = tmp_path / "m.ckpt"
    bad_ids = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    bad_ids[0, 5] = 4.9999  # the well-known corrupted float position_ids
    sd = _ckpt(p, **{
        "cond_stage_model.transformer.text_model.embeddings.position_ids": bad_ids,
        "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
        "loss.logvar": torch.zeros(1000),
    })
    del sd["model.diffusion_model.out.2.bias"]
    torch.save({"state_dict": {k: v for k, v in sd.items() if k != "model.diffusion_model.out.2.bias"}}, p)
    r = modelkit.inspect(p)
    assert r.detection is not None and r.detection["kind"] == "checkpoint" and r.detection["base"] == "sd1"
    assert r.junk["ema"]["tensors"] == 2 and r.junk["loss"]["tensors"] == 1
    assert any("position_ids" in d and "float32" in d for d in r.defects)
    assert any("UNet: 1 keys" in d and "out.2.bias" in d for d in r.defects)
    assert set(r.hashes) == {"autov1"}


def test_inspect_hashes_and_decoded_metadata(tmp_path: Path) -> None:
    p = tmp_path / "l.safetensors"
    build.write_safetensors(str(p), {"w": torch.ones(4)}, metadata={
        "ss_network_dim": "16", "ss_tag_frequency": '{"img": {"1girl": 3}}', "ss_learning_rate": "0.0001",
        "modelspec.title": "x",
    })
    r = CliRunner().invoke(cli, ["inspect", "--json", "--hashes", str(p)])
    f = json.loads(r.stdout)["files"][0]
    assert f["hashes"]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert f["hashes"]["autov2"] == f["hashes"]["sha256"][:10] and "autov3" in f["hashes"]
    assert f["metadata_decoded"]["ss_network_dim"] == 16
    assert f["metadata_decoded"]["ss_tag_frequency"] == {"img": {"1girl": 3}}
    assert f["metadata_decoded"]["ss_learning_rate"] == 0.0001


def test_inspect_human_output_names_the_type(tmp_path: Path) -> None:
    p = tmp_path / "m.ckpt"
    _ckpt(p)
    r = CliRunner().invoke(cli, ["inspect", str(p)])
    assert r.exit_code == 0
    assert "type          checkpoint standard sd1" in r.stdout
