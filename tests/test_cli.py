"""The CLI and the API give the same answers; exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

import modelkit
from fixtures import build, hostile
from fixtures.sd_layout import tiny_sd1_layout
from modelkit.cli.main import cli


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_inspect_json_matches_the_api(tmp_path: Path) -> None:
    ckpt = tmp_path / "sd.ckpt"
    build.sd_checkpoint(str(ckpt), tiny_sd1_layout())
    r = _run("inspect", "--json", str(ckpt))
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["schema"] == "modelkit.inspect/1"
    (entry,) = doc["files"]
    api = modelkit.inspect(ckpt).to_dict()
    assert entry == json.loads(json.dumps(api))
    assert entry["container"] == "torch-zip" and entry["wrappers"] == ["state_dict"]
    assert entry["placeholders"] == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert entry["tensor_count"] == len(tiny_sd1_layout())
    assert entry["bytes_by_dtype"]["float16"] > 0 and entry["bytes_by_dtype"]["int64"] == 77 * 8


def test_inspect_keys_and_human_table(tmp_path: Path) -> None:
    p = tmp_path / "e.pt"
    build.a1111_embedding(str(p))
    r = _run("inspect", "--keys", str(p))
    assert r.exit_code == 0
    assert "string_to_param.*" in r.stdout and "float32" in r.stdout and "[2, 768]" in r.stdout
    assert "name: my-style" in r.stdout
    r = _run("inspect", "--json", "--keys", str(p))
    t = json.loads(r.stdout)["files"][0]["tensors"][0]
    assert t["name"] == "string_to_param.*" and t["shape"] == [2, 768] and t["dtype"] == "float32"


def test_inspect_folder_gives_one_line_per_file(tmp_path: Path) -> None:
    build.a1111_embedding(str(tmp_path / "a.pt"))
    build.write_safetensors(str(tmp_path / "b.safetensors"), {"w": torch.ones(2)})
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04garbage")
    r = _run("inspect", str(tmp_path))
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and r.exit_code == 2
    assert any("broken.ckpt" in ln and "ERROR" in ln for ln in lines)


def test_scan_exit_codes_json_and_sarif(tmp_path: Path, marker: str) -> None:
    clean = tmp_path / "clean.safetensors"
    build.write_safetensors(str(clean), {"w": torch.ones(2)})
    r = _run("scan", str(clean))
    assert r.exit_code == 0 and "SAFE" in r.stdout

    evil = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(evil), marker, payload="os_system")
    sarif = tmp_path / "scan.sarif"
    r = _run("scan", "--json", "--sarif", str(sarif), str(clean), str(evil))
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    verdicts = {Path(f["path"]).name: f["verdict"] for f in doc["files"]}
    assert verdicts == {"clean.safetensors": "safe", "evil.ckpt": "unsafe"}
    evil_findings = [f for f in doc["files"] if f["verdict"] == "unsafe"][0]["findings"]
    assert evil_findings[0]["global"] == "os.system" and evil_findings[0]["severity"] == "critical"
    s = json.loads(sarif.read_text())
    assert s["version"] == "2.1.0"
    assert any(res["ruleId"] == "MK-P001" for res in s["runs"][0]["results"])
    assert {r["id"] for r in s["runs"][0]["tool"]["driver"]["rules"]} >= {"MK-P001", "MK-Z001"}

    bad = tmp_path / "trunc.ckpt"
    bad.write_bytes(evil.read_bytes()[:40])
    r = _run("scan", str(bad))
    assert r.exit_code == 2 and "ERROR" in r.stdout


def test_scan_folder_walks_model_files(tmp_path: Path, marker: str) -> None:
    sub = tmp_path / "models" / "Lora"
    sub.mkdir(parents=True)
    build.write_safetensors(str(sub / "x.safetensors"), {"w": torch.ones(2)})
    hostile.hostile_legacy(str(tmp_path / "models" / "bad.pt"), marker)
    r = _run("scan", "--json", str(tmp_path / "models"))
    doc = json.loads(r.stdout)
    assert doc["counts"] == {"safe": 1, "suspicious": 0, "unsafe": 1, "error": 0}
    assert r.exit_code == 1


def test_usage_errors_exit_2() -> None:
    assert _run("inspect").exit_code == 2
    assert _run("frobnicate").exit_code == 2


def test_a_closed_pipe_is_not_a_finding(tmp_path: Path) -> None:
    """`modelkit inspect --keys big.ckpt | head -1`: exit 141 (as a SIGPIPE death), no traceback; never 1."""
    import subprocess
    import sys

    ckpt = tmp_path / "sd.ckpt"
    build.sd_checkpoint(str(ckpt), tiny_sd1_layout())
    proc = subprocess.Popen([sys.executable, "-m", "modelkit", "inspect", "--keys", str(ckpt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away with ~100 KB still to print
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err
