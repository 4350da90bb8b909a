"""Sample images during training: PNGs of the requested size, the trained parts in effect, training untouched."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import modelkit  # noqa: E402
from modelkit.errors import ConfigError, OutputExistsError  # noqa: E402
from modelkit.train import train  # noqa: E402
from modelkit.train.config import resolved  # noqa: E402

from .test_train import _config  # noqa: E402

SAMPLE = ("sample.every_steps=1", 'sample.prompts=["red square", "a <tiny> thing"]', "sample.steps=2",
          "sample.width=64", "sample.height=32", "sample.sampler=euler_a", "sample.guidance_scale=3",
          "sample.negative_prompt=blurry")


def test_samples_are_pngs_and_do_not_change_training(tiny_model: dict[str, str], tmp_path: Path) -> None:
    # LoRA dropout draws from the global RNG at every step: any draw by sampling would change the weights
    extra = ("train.max_steps=2", "network.dropout=0.2", "output.dtype=float32", "output.save_state=false")
    sampled = train(_config(tiny_model, tmp_path / "a", "lora", *extra, *SAMPLE))
    names = sorted(p.name for p in (tmp_path / "a" / "samples").iterdir())
    assert names == [f"lora-step00000{s}-0{i}.png" for s in (1, 2) for i in (0, 1)]
    assert list(sampled.samples) == [str(tmp_path / "a" / "samples" / n) for n in names]
    for path in sampled.samples:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 32) and im.mode == "RGB"
            params = im.info["parameters"]
        assert "Negative prompt: blurry" in params and "Size: 64x32" in params and "Sampler: euler_a" in params
    with Image.open(sampled.samples[1]) as im:
        assert im.info["parameters"].startswith("a <tiny> thing\n") and "Seed: 1," in im.info["parameters"]

    plain = train(_config(tiny_model, tmp_path / "b", "lora", *extra))
    assert sampled.losses == plain.losses
    a, b = modelkit.load(sampled.output), modelkit.load(plain.output)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # samples of an earlier run are not replaced without output.force
    (tmp_path / "a" / "lora.safetensors").unlink()
    with pytest.raises(OutputExistsError, match="sample images"):
        train(_config(tiny_model, tmp_path / "a", "lora", *extra, *SAMPLE))


def test_samples_at_start_show_the_base_and_change_nothing(tiny_model: dict[str, str], tmp_path: Path) -> None:
    extra = ("train.max_steps=2", "network.dropout=0.2", "output.dtype=float32", "output.save_state=false")
    start_only = (*(k for k in SAMPLE if not k.startswith("sample.every_steps")), "sample.at_start=true")
    sampled = train(_config(tiny_model, tmp_path / "a", "lora", *extra, *start_only))
    assert [Path(p).name for p in sampled.samples] == ["lora-step000000-00.png", "lora-step000000-01.png"]
    plain = train(_config(tiny_model, tmp_path / "b", "lora", *extra))
    assert sampled.losses == plain.losses
    a, b = modelkit.load(sampled.output), modelkit.load(plain.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="sample.prompts"):
        _config(tiny_model, tmp_path, "lora", "sample.at_start=true")


def test_sample_keys_are_checked(tiny_model: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sample.prompts"):
        _config(tiny_model, tmp_path, "lora", "sample.every_steps=5")
    with pytest.raises(ConfigError, match="sample.width: must be a multiple of 8"):
        _config(tiny_model, tmp_path, "lora", "sample.width=60")
    with pytest.raises(ConfigError, match="sample.sampler"):
        _config(tiny_model, tmp_path, "lora", "sample.sampler=plms")


def _pixels(paths: list[str]) -> list[Any]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im).astype(np.int16))
    return out


@pytest.mark.parametrize("method_name", ["lora", "ti"])
def test_sampling_uses_the_trained_parts_and_restores_everything(tiny_model: dict[str, str], tmp_path: Path,
                                                                 method_name: str) -> None:
    from modelkit.train.base import load_base
    from modelkit.train.methods import make_method
    from modelkit.train.sample import sample_images

    cfg = resolved(_config(tiny_model, tmp_path, method_name, "ti.token=<tiny>", "sample.every_steps=1",
                           'sample.prompts=["a <tiny> thing"]', "sample.steps=1", "sample.width=32",
                           "sample.height=32"))
    base = load_base(cfg.model)
    method = make_method(cfg, base)
    method.prepare()
    params = method.trainable()
    assert params
    for m in method.modules_in_training():
        m.train()
    first = _pixels(sample_images(cfg, base, method, 1, force=True))
    again = _pixels(sample_images(cfg, base, method, 1, force=True))
    assert np.array_equal(first[0], again[0])  # deterministic

    torch.manual_seed(7)
    random.seed(7)
    cpu_state, py_state = torch.get_rng_state(), random.getstate()
    with torch.no_grad():  # change only the trained parameters: the LoRA's up weights / the new token's rows
        for name, p in params.items():
            if method_name == "ti" or "lora_up" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    changed = _pixels(sample_images(cfg, base, method, 2, force=True))
    assert np.abs(changed[0] - first[0]).max() > 0
    assert torch.equal(torch.get_rng_state(), cpu_state) and random.getstate() == py_state
    assert all(m.training for m in method.modules_in_training())
    assert not base.vae.training and all(p.requires_grad for p in params.values())


def test_sdxl_samples_with_the_xl_pipeline(tmp_path: Path) -> None:
    from modelkit.train.base import load_base
    from modelkit.train.sample import ImageSpec, build_pipeline, generate

    from . import tiny

    path, configs, _ = tiny.family_checkpoint("sdxl", str(tmp_path))
    images = tiny.write_images(str(tmp_path / "images"))
    cfg = resolved(_config({"checkpoint": path, "configs": configs, "images": images}, tmp_path, "lora",
                           "model.base=sdxl"))
    base = load_base(cfg.model)
    pipe = build_pipeline(base, "dpm++")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    image = generate(pipe, ImageSpec("a cat", "", 2, 2.0, 0, 64, 48, "dpm++"), base.family)
    assert image.size == (64, 48)
    shutil.rmtree(tmp_path / "images")


def test_tensorboard_logs_loss_lr_speed_and_samples(tiny_model: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(_config(tiny_model, tmp_path, "lora", "train.max_steps=3", "output.tensorboard=true",
                           "output.save_state=false", "sample.every_steps=2", 'sample.prompts=["red"]',
                           "sample.steps=1", "sample.width=32", "sample.height=32", "scheduler.name=linear"))
    logs = tmp_path / "logs"
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/steps_per_s", "train/epoch"} <= set(tags["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(list(result.losses), rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0], abs=1e-9)
    assert all(e.value > 0 for e in events.Scalars("train/steps_per_s"))
    images = events.Images("samples/00")
    assert [(e.step, e.width, e.height) for e in images] == [(2, 32, 32)]


def test_tensorboard_missing_is_one_config_error(tiny_model: dict[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"output.tensorboard.*pip install tensorboard") as info:
        train(_config(tiny_model, tmp_path, "lora", "output.tensorboard=true", "model.path=/nonexistent"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "logs").exists()


def test_dreambooth_fills_the_class_folder_once(tiny_model: dict[str, str], tmp_path: Path) -> None:
    from modelkit.train.base import load_base
    from modelkit.train.sample import generate_class_images

    from . import tiny

    classes = tmp_path / "class"
    tiny.write_images(str(classes), sizes=((64, 64),), captions=("a shape",))
    extra = (f"dreambooth.class_path={classes}", "dreambooth.class_prompt=a photo of a shape",
             "dreambooth.num_class_images=3", "dreambooth.class_steps=2", "dreambooth.class_guidance_scale=2",
             "train.max_steps=1", "output.save_state=false", "dataset.default_caption=sks shape")
    first = train(_config(tiny_model, tmp_path / "a", "dreambooth", *extra))
    made = [str(classes / "class-000000.png"), str(classes / "class-000001.png")]
    assert list(first.class_images) == made
    assert sorted(p.name for p in classes.iterdir()) == ["class-000000.png", "class-000000.txt", "class-000001.png",
                                                         "class-000001.txt", "img0.png", "img0.txt"]
    for path in made:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
        assert Path(path).with_suffix(".txt").read_text() == "a photo of a shape\n"
    stamps = {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}

    second = train(_config(tiny_model, tmp_path / "b", "dreambooth", *extra))
    assert second.class_images == () and {p.name: p.stat().st_mtime_ns for p in classes.iterdir()} == stamps

    # the same settings give the same pictures: image N depends on train.seed and N only
    cfg = resolved(_config(tiny_model, tmp_path / "c", "dreambooth", *extra, f"dreambooth.class_path={tmp_path / 'new'}",
                           "dreambooth.num_class_images=1"))
    again = generate_class_images(cfg, load_base(cfg.model))
    assert again == [str(tmp_path / "new" / "class-000000.png")]
    assert np.array_equal(*_pixels([again[0], made[0]]))


def test_class_generation_keys_are_checked(tiny_model: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key dreambooth.class_prompt: is required"):
        _config(tiny_model, tmp_path, "dreambooth", "dreambooth.num_class_images=4", f"dreambooth.class_path={tmp_path}")
    with pytest.raises(ConfigError, match="key dreambooth.class_path: is required"):
        _config(tiny_model, tmp_path, "dreambooth", "dreambooth.num_class_images=4", "dreambooth.class_prompt=a dog")
