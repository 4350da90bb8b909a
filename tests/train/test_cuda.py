"""Training on a CUDA GPU: mixed precision, sampling and the latent cache on the device. Skipped
without a GPU (CI); run them with ``pytest -m cuda`` on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

import modelkit  # noqa: E402
from modelkit.train import train  # noqa: E402
from modelkit.train.config import Config  # noqa: E402

from .test_train import _config as train_config  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _config(tiny_model: dict[str, str], out: Path, method: str, *overrides: str) -> Config:
    return train_config(tiny_model, out, method, "train.device=cuda", *overrides)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("method", ["lora", "locon", "ti", "hypernetwork", "dreambooth"])
def test_every_method_trains_on_cuda_in_mixed_precision(tiny_model: dict[str, str], tmp_path: Path,
                                                        method: str, precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    result = train(_config(tiny_model, tmp_path, method, f"train.mixed_precision={precision}",
                           "train.gradient_checkpointing=true", "ti.token=<t>"))
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(x)) for x in result.losses)
    info = modelkit.inspect(result.output)
    assert info.detection is not None
    if method != "dreambooth":
        tensors = load_file(result.output)
        assert all(t.device.type == "cpu" and bool(torch.isfinite(t.float()).all()) for t in tensors.values())


def test_cached_latents_and_samples_on_cuda(tiny_model: dict[str, str], tmp_path: Path) -> None:
    result = train(_config(tiny_model, tmp_path, "lora", "train.mixed_precision=fp16", "dataset.cache_latents=true",
                           "dataset.flip=true", "sample.every_steps=3", 'sample.prompts=["red square"]',
                           "sample.steps=2", "sample.width=64", "sample.height=64"))
    assert len(result.samples) == 1 and Path(result.samples[0]).stat().st_size > 0
    again = train(_config(tiny_model, tmp_path / "again", "lora", "train.mixed_precision=fp16",
                          "dataset.cache_latents=true", "dataset.flip=true",
                          f"dataset.cache_dir={tmp_path / '.modelkit-latents'}"))
    assert again.steps == 3 and any("latent cache" in n and " 0 encoded" in n for n in again.notes)
