"""Training tests need the [train] extra; without it (as in CI) every test here that needs it is skipped."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny SD1-style checkpoint (LDM single file), its configs folder and a small image folder."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from . import tiny

    root = tmp_path_factory.mktemp("tiny")
    return {
        "checkpoint": tiny.write_checkpoint(str(root / "tiny-sd1.safetensors")),
        "configs": tiny.write_configs(str(root / "configs")),
        "images": tiny.write_images(str(root / "images")),
    }


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread() -> object:
    """The tiny models are far too small for intra-op threads; on a busy 2-core machine they only spin."""
    try:
        import torch
    except ImportError:
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield None
    torch.set_num_threads(before)
