"""Multi-process training (``torchrun``/``accelerate launch -m modelkit train``): two CPU processes train exactly like one process with
``grad_accum`` 2 (same batches, same noise per sample, gradients averaged), and only the main
process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from modelkit.train import train  # noqa: E402
from modelkit.train.config import build_config  # noqa: E402

from . import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _data(tiny_model: dict[str, str], images: str, out: Path) -> dict[str, dict[str, object]]:
    return {
        "model": {"path": tiny_model["checkpoint"], "base": "sd1", "configs": tiny_model["configs"]},
        "dataset": {"path": images, "resolution": 64, "bucketing": False, "shuffle_tags": True, "flip": True},
        "network": {"dim": 4, "alpha": 2.0},
        "train": {"max_steps": 2, "device": "cpu", "seed": 5},
        "optimizer": {"lr": 1e-2},
        "output": {"dir": str(out), "dtype": "float32", "save_state": False},
    }


def test_two_processes_train_like_one_with_grad_accum(tiny_model: dict[str, str], tmp_path: Path) -> None:
    images = tiny.write_images(str(tmp_path / "images"), sizes=((64, 64),) * 4,
                               captions=("red, square", "blue, circle", "green, plain", "grey, dot"))
    toml = tmp_path / "train.toml"
    lines = []
    for section, values in _data(tiny_model, images, tmp_path / "two").items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    toml.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    # torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; accelerate's Accelerator (cpu=True) then runs gloo
    # data parallel, as under `accelerate launch` on several machines or GPUs.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "modelkit", "train", "lora", "--config", str(toml), "--json"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[:3000]
    doc = json.loads(run.stdout[run.stdout.index("{"):])  # one report: only the main process prints it
    assert run.stdout.count('"method"') == 1
    assert doc["steps"] == 2
    two = load_file(doc["output"])
    # one output and its resolved config, written once (by the main process)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["lora.config.toml", "lora.safetensors"]

    data = _data(tiny_model, images, tmp_path / "one")
    data["train"]["grad_accum"] = 2  # type: ignore[index]
    one = load_file(train(build_config("lora", data)).output)
    assert one.keys() == two.keys()
    moved = 0
    moved = 0
    diffs = {k: float((v - two[k]).abs().max()) for k, v in one.items()}
    # Adam turns the last-bit differences of a reordered gradient sum into up to ~1% of a step
    # (lr 1e-2) where a gradient is still near zero; shared noise between the processes (each
    # process drawing the noise of micro-batch 0) gives differences of ~4e-2 in most tensors.
    assert max(diffs.values()) < 1e-3, max(diffs.items(), key=lambda kv: kv[1])
    assert sum(d > 1e-5 for d in diffs.values()) < len(diffs) // 4
    for k, v in one.items():
        moved += int(k.endswith("lora_up.weight") and bool(v.abs().max() > 0))
    assert moved > 0  # the LoRA trained (lora_up starts at zero)
