"""Real files from public repositories (../shared/realdata); skipped where the folder is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modelkit
from tests.conftest import same_bits

FILES = {
    "EasyNegative.pt": (1, ["emb_params"]),
    "bad-hands-5.pt": (1, ["string_to_param.*"]),
    "learned_embeds.bin": (1, ["<birb-style>"]),
    "vae-approx-sd1.pt": (16, None),
    "empty.pt": (0, []),
    "diffusers-attnproc-lora-sd1-cuda-storages.bin": (256, None),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_real_file_reads_bit_equal_and_scans_safe(realdata: Path, name: str) -> None:
    path = realdata / name
    count, keys = FILES[name]
    ref = torch.load(path, weights_only=True, map_location="cpu")
    with modelkit.open_model(path) as mf:
        assert len(mf) == count
        if keys is not None:
            assert list(mf) == keys
        flat = _flatten(ref)
        assert set(flat) == set(mf)
        for k, t in flat.items():
            assert same_bits(mf[k].read(), t), k
    report = modelkit.scan(path).files[0]
    assert report.verdict == "safe", report.findings


def test_real_embedding_extras(realdata: Path) -> None:
    with modelkit.open_model(realdata / "bad-hands-5.pt") as mf:
        assert mf.extras["name"] == "bad-hands-5" and mf.extras["step"] == 1364
    with modelkit.open_model(realdata / "diffusers-attnproc-lora-sd1-cuda-storages.bin") as mf:
        assert mf.info["archive_prefix"] == "pytorch_lora_weights"


def _flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
