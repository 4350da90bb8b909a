"""DreamBooth from a diffusers-folder base writes a complete pipeline folder: diffusers'
``StableDiffusionPipeline.from_pretrained`` (and ``StableDiffusionXLPipeline`` for SDXL) loads it
offline, with the trained UNet; the folder appears all at once, and an existing one is refused."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import torch  # noqa: E402

import modelkit  # noqa: E402
from modelkit.errors import OutputExistsError  # noqa: E402
from modelkit.train import train  # noqa: E402
from modelkit.train.config import Config, build_config  # noqa: E402


def _folder_base(tiny_model: dict[str, str], root: Path) -> Path:
    """The tiny SD1 model as a diffusers folder (safetensors weights, as save_pretrained writes them),
    with a DDIM scheduler (the export keeps the base's own)."""
    from diffusers import DDIMScheduler

    from modelkit.train.base import load_base

    cfg = build_config("lora", {"model": {"path": tiny_model["checkpoint"], "base": "sd1",
                                          "configs": tiny_model["configs"]}, "dataset": {"path": tiny_model["images"]}})
    base = load_base(cfg.model)
    folder = root / "base"
    base.unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    base.text_encoders[0].save_pretrained(folder / "text_encoder")
    DDIMScheduler.from_config(base.scheduler.config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def _config(tiny_model: dict[str, str], base: Path, out: Path, *overrides: str) -> Config:
    data: dict[str, Any] = {
        "model": {"path": str(base)},
        "dataset": {"path": tiny_model["images"], "resolution": 64, "min_bucket": 32, "max_bucket": 128,
                    "bucket_step": 32, "default_caption": "sks shape"},
        "train": {"max_steps": 2, "device": "cpu", "seed": 3, "threads": 1},
        "optimizer": {"lr": 1e-3},
        "output": {"dir": str(out), "save_state": False, "dtype": "float32"},
    }
    return build_config("dreambooth", data, overrides)


def test_dreambooth_folder_loads_in_diffusers_with_the_trained_unet(tiny_model: dict[str, str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline

    base = _folder_base(tiny_model, tmp_path)
    out = tmp_path / "out"
    result = train(_config(tiny_model, base, out))
    folder = out / "dreambooth"
    assert result.output == str(folder) and math.isfinite(result.loss)

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["_diffusers_version"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["tokenizer"][0] == "transformers"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    weights = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin",
                                                                                           ".pt", ".ckpt", ".pth"))
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]
    assert not [n for n in os.listdir(out) if n.endswith(".modelkit-tmp")]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    written = modelkit.load(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    before = modelkit.load(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    loaded = pipe.unet.state_dict()
    assert set(loaded) == set(written)
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    changed = [k for k in written if not torch.equal(written[k], before[k])]
    assert len(changed) > len(written) // 2  # the trained UNet, not the base one
    te = modelkit.load(str(folder / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(pipe.text_encoder.state_dict()[k], v) for k, v in te.items())
    assert pipe.tokenizer("sks shape").input_ids[0] == 49406
    image = pipe("sks shape", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())

    # An existing folder is refused before any training; --force replaces it whole.
    marker = folder / "unet" / "mine.txt"
    marker.write_text("x")
    with pytest.raises(OutputExistsError):
        train(_config(tiny_model, base, out, "train.max_steps=1"))
    assert marker.exists()
    train(_config(tiny_model, base, out, "train.max_steps=1", "output.force=true"))
    assert not marker.exists() and (folder / "model_index.json").is_file()
    assert not [n for n in os.listdir(out) if n.endswith(".modelkit-tmp")]


def test_a_failed_folder_export_leaves_nothing(tiny_model: dict[str, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkit.train.base import load_base
    from modelkit.train.methods import dreambooth

    base_folder = _folder_base(tiny_model, tmp_path)
    cfg = _config(tiny_model, base_folder, tmp_path / "out")
    method = dreambooth.DreamBooth(cfg, load_base(cfg.model))
    calls = []
    real = dreambooth.save_tensors

    def failing(path: str, *a: Any, **k: Any) -> Any:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(dreambooth, "save_tensors", failing)
    target = tmp_path / "out" / "db.safetensors"
    with pytest.raises(OSError, match="No space"):
        method.export(str(target), {}, torch.float32, False)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    monkeypatch.setattr(dreambooth, "save_tensors", real)
    assert method.export(str(target), {}, torch.float32, False).path == str(tmp_path / "out" / "db")
    with pytest.raises(OutputExistsError):
        method.export(str(target), {}, torch.float32, False)


def test_sdxl_dreambooth_folder_loads_in_diffusers(tmp_path: Path) -> None:
    """The SDXL export (two text encoders and tokenizers, no safety checker) loads as an SDXL pipeline."""
    from diffusers import StableDiffusionXLPipeline

    from modelkit.train.base import load_base
    from modelkit.train.methods.dreambooth import DreamBooth

    from . import tiny

    path, configs, originals = tiny.family_checkpoint("sdxl", str(tmp_path))
    cfg = build_config("dreambooth", {"model": {"path": str(tmp_path), "base": "sdxl", "configs": configs},
                                      "dataset": {"path": "d"}})
    file_cfg = build_config("dreambooth", {"model": {"path": path, "base": "sdxl", "configs": configs},
                                           "dataset": {"path": "d"}})
    base = load_base(file_cfg.model)
    with torch.no_grad():
        for p in base.unet.parameters():
            p.add_(0.5)  # stands for training
    written = DreamBooth(cfg, base).export(str(tmp_path / "xl.safetensors"), {"modelkit.step": "1"}, torch.float32,
                                           False)
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "safety_checker" not in index
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    pipe = StableDiffusionXLPipeline.from_pretrained(written.path, local_files_only=True)
    trained = base.unet.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.state_dict().items())
    assert not torch.equal(pipe.unet.state_dict()["conv_in.weight"], originals["unet"]["conv_in.weight"])
    te2 = base.text_encoders[1].state_dict()
    assert all(torch.equal(v, te2[k]) for k, v in pipe.text_encoder_2.state_dict().items())
    with modelkit.open_model(os.path.join(written.path, "unet", "diffusion_pytorch_model.safetensors")) as mf:
        assert mf.metadata["modelkit.step"] == "1"
