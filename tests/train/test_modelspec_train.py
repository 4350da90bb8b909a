"""Every training export carries a valid ModelSpec block (``modelkit.ops.modelspec``, checked with the
spec-written validator in ``tests/ops/modelspec_validator.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from modelkit.ops import modelspec as ms  # noqa: E402
from modelkit.train import train  # noqa: E402
from modelkit.train.config import build_config  # noqa: E402
from tests.ops.modelspec_validator import header, problems  # noqa: E402

CASES = [
    ("lora", "stable-diffusion-v1/lora", ms.IMPL_DIFFUSERS, ("network.train_text_encoder=true",)),
    ("ti", "stable-diffusion-v1/textual-inversion", ms.IMPL_SGM, ("ti.token=<tiny>", "ti.init_word=circle")),
    ("hypernetwork", "stable-diffusion-v1/hypernetwork", ms.IMPL_A1111, ()),
    ("dreambooth", "stable-diffusion-v1", ms.IMPL_SGM, ("output.save_state=false",)),
]


@pytest.mark.parametrize(("method", "arch", "impl", "extra"), CASES)
def test_training_exports_carry_a_valid_block(tiny_model: dict[str, str], tmp_path: Path, method: str, arch: str,
                                              impl: str, extra: tuple[str, ...]) -> None:
    data = {
        "model": {"path": tiny_model["checkpoint"], "base": "sd1", "configs": tiny_model["configs"]},
        "dataset": {"path": tiny_model["images"], "resolution": 64, "min_bucket": 32, "max_bucket": 128,
                    "bucket_step": 32},
        "network": {"dim": 4, "alpha": 2.0},
        "train": {"max_steps": 1, "device": "cpu", "seed": 3, "threads": 1},
        "optimizer": {"lr": 1e-3},
        "output": {"dir": str(tmp_path), "name": f"my {method}"},
    }
    result = train(build_config(method, data, extra))
    assert not problems(result.output), problems(result.output)
    meta = header(result.output)["__metadata__"]
    assert isinstance(meta, dict)
    assert meta["modelspec.architecture"] == arch and meta["modelspec.implementation"] == impl
    assert meta["modelspec.title"] == f"my {method}" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.prediction_type"] == "epsilon" and "modelspec.date" in meta
    if method == "lora":
        assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
