"""Masked loss, the optimizer registry, EMA, the text-encoder cache, validation loss and wandb, on the tiny model."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import torch  # noqa: E402

import modelkit  # noqa: E402
from modelkit.errors import ConfigError, ModelkitError, TrainingError  # noqa: E402
from modelkit.train import train  # noqa: E402
from modelkit.train.config import Config, build_config, resolved  # noqa: E402


def _config(tiny_model: dict[str, str], out: Path, method: str = "lora", *overrides: str,
            images: str | None = None) -> Config:
    data: dict[str, Any] = {
        "model": {"path": tiny_model["checkpoint"], "base": "sd1", "configs": tiny_model["configs"]},
        "dataset": {"path": images or tiny_model["images"], "resolution": 64, "min_bucket": 32, "max_bucket": 128,
                    "bucket_step": 32},
        "network": {"dim": 4, "alpha": 2.0},
        "train": {"max_steps": 2, "device": "cpu", "seed": 3, "threads": 1},
        "optimizer": {"lr": 1e-3},
        "output": {"dir": str(out), "dtype": "float32"},
    }
    return build_config(method, data, overrides)


def _masked_images(folder: Path) -> Path:
    """Three 64x64 images: transparent left half (alpha), a separate mask file, and a fully opaque RGBA."""
    from PIL import Image

    folder.mkdir()
    rgba = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))
    rgba.save(folder / "alpha.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(folder / "masked.png")
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 64, 32))  # top half ignored
    mask.save(folder / "masked.mask.png")
    Image.new("RGBA", (64, 64), (30, 160, 30, 255)).save(folder / "opaque.png")
    for name in ("alpha", "masked", "opaque"):
        (folder / f"{name}.txt").write_text(f"{name} square")
    return folder


# --- 1. masked loss --------------------------------------------------------------------------------

def test_masked_loss_gives_no_gradient_where_the_mask_is_zero(tiny_model: dict[str, str], tmp_path: Path) -> None:
    from modelkit.train import data
    from modelkit.train.base import load_base
    from modelkit.train.methods import make_method
    from modelkit.train.step import compute_loss, load_batch

    images = str(_masked_images(tmp_path / "img"))
    plain = data.scan(_config(tiny_model, tmp_path, images=images).dataset)
    # without masked_loss: the transparent image is skipped (one line saying how to use it), the opaque one is RGB
    assert [os.path.basename(i.path) for i in plain.items] == ["masked.png", "opaque.png"]
    assert [os.path.basename(i.path) for i in plain.items if i.mask] == []
    assert "dataset.masked_loss" in plain.skipped[0].reason and "mask.png" not in str(plain.skipped)
    cfg = resolved(_config(tiny_model, tmp_path, "lora", "dataset.masked_loss=true", images=images))
    ds = data.scan(cfg.dataset)
    masks = {os.path.basename(i.path): i.mask for i in ds.items}
    assert masks == {"alpha.png": "alpha", "masked.png": os.path.join(images, "masked.mask.png"), "opaque.png": ""}
    base = load_base(cfg.model)
    method = make_method(cfg, base)
    method.prepare()
    seen: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = base.unet(*args, **kwargs)
        out.sample.retain_grad()
        seen.append(out.sample)
        return out

    for index, zero in ((0, (slice(None), slice(0, 4))), (1, (slice(0, 4), slice(None)))):  # (rows, cols) of 8x8
        batch = load_batch(ds, [index], cfg, 0, method.caption)
        assert batch.mask is not None and tuple(batch.mask.shape) == (1, 1, 64, 64)
        seen.clear()
        compute_loss(cfg, base, spy, batch, 0, "cpu", torch.float32, False).backward()
        grad = seen[0].grad[0]
        assert torch.count_nonzero(grad[:, zero[0], zero[1]]) == 0
        ones = (slice(4, 8), slice(None)) if index == 1 else (slice(None), slice(4, 8))
        assert bool((grad[:, ones[0], ones[1]] != 0).all())
    batch = load_batch(ds, [2], cfg, 0, method.caption)
    assert batch.mask is None  # a fully opaque image is simply RGB


# --- 2. optimizers ---------------------------------------------------------------------------------

def test_each_optimizer_builds_and_steps_with_per_component_rates(tiny_model: dict[str, str], tmp_path: Path) -> None:
    from modelkit.train.base import load_base
    from modelkit.train.methods import make_method
    from modelkit.train.optim import OPTIMIZERS, make_optimizer, make_scheduler
    from modelkit.train.step import load_batch

    cfg = resolved(_config(tiny_model, tmp_path, "lora", "network.train_text_encoder=true"))
    base = load_base(cfg.model)
    method = make_method(cfg, base)
    groups = method.prepare()
    from modelkit.train import data
    from modelkit.train.step import compute_loss

    batch = load_batch(data.scan(cfg.dataset), [0], cfg, 0, method.caption)
    ran = []
    for name in OPTIMIZERS:
        try:
            __import__(OPTIMIZERS[name].module)
        except ImportError:
            continue
        for rates in ((), ("optimizer.unet_lr=2e-4", "optimizer.text_encoder_lr=5e-5")):
            c = resolved(_config(tiny_model, tmp_path, "lora", "network.train_text_encoder=true", f"optimizer.name={name}",
                                 *(("optimizer.lr=none",) if OPTIMIZERS[name].lr_free else ()), *rates))
            if name == "prodigy" and rates:
                with pytest.raises(ConfigError, match="one learning rate"):
                    make_optimizer(c, [dict(g) for g in groups])
                continue
            opt = make_optimizer(c, [dict(g) for g in groups])
            lrs = [g["lr"] for g in opt.param_groups]
            sched = make_scheduler(c, opt, 2)
            if rates:
                assert lrs == [2e-4, 5e-5], name
            elif name == "prodigy":
                assert lrs == [1.0, 1.0] and c.optimizer.lr == 1.0 and c.optimizer.weight_decay == 0.0
            elif name == "adafactor":
                assert lrs == [None, None]  # relative step: Adafactor sets its own rate
            if name.startswith("lion"):
                assert c.optimizer.betas == (0.9, 0.99)
            before = {k: v.detach().clone() for k, v in method.trainable().items()}
            for _ in range(2):
                compute_loss(c, base, base.unet, batch, 0, "cpu", torch.float32, True).backward()
                opt.step()
                sched.step()
                opt.zero_grad()
            after = method.trainable()
            assert any(not torch.equal(before[k], after[k].detach()) for k in before), name
            ran.append(name)
    assert {"adamw", "adafactor"} <= set(ran)
    assert resolved(_config(tiny_model, tmp_path)).optimizer.weight_decay == 1e-2  # AdamW's defaults are unchanged


def test_missing_optimizer_package_is_one_line_with_the_pip_command(tiny_model: dict[str, str], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from modelkit.train import optim

    real = importlib.util.find_spec
    monkeypatch.setattr(optim.importlib.util, "find_spec",
                        lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        train(_config(tiny_model, tmp_path, "lora", "optimizer.name=prodigy"))
    assert "pip install prodigyopt" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "lora.safetensors").exists()
    with pytest.raises(ConfigError, match="scheduler.name"):
        _config(tiny_model, tmp_path, "lora", "optimizer.name=adafactor", "optimizer.lr=none", "scheduler.name=cosine")


def test_optimizer_args_reach_the_constructor_and_are_checked_first(tiny_model: dict[str, str], tmp_path: Path) -> None:
    """[optimizer.args] (kohya's optimizer_args): from the file or --set, into the built optimizer,
    round-tripped by --print-config, written into ss_optimizer; a key the constructor lacks, one
    with a key of its own, or a value the optimizer refuses is one line, before anything loads."""
    from modelkit.train.optim import OPTIMIZERS, check_optimizer, make_optimizer
    from modelkit.train.tomlio import render_toml, toml_module

    params = [{"params": [torch.nn.Parameter(torch.ones(3))], "component": "unet"}]
    cases = {"adamw": ({"amsgrad": True, "maximize": False}, "amsgrad", True),
             "prodigy": ({"d_coef": 2.0, "use_bias_correction": True, "safeguard_warmup": True}, "d_coef", 2.0),
             "lion": ({"decoupled_weight_decay": True}, "decoupled_wd", True),  # kept on the optimizer
             "adafactor": ({"clip_threshold": 0.5, "eps": [1e-30, 2e-3], "scale_parameter": False}, "eps",
                           (1e-30, 2e-3))}
    built = []
    for name, (args, key, want) in cases.items():
        try:
            __import__(OPTIMIZERS[name].module)
        except ImportError:
            continue
        lr = ("optimizer.lr=none",) if OPTIMIZERS[name].lr_free else ()
        c = resolved(build_config("lora", {**_config(tiny_model, tmp_path).to_dict(), "method": "lora",
                                           "optimizer": {"name": name, "args": args}}, lr))
        check_optimizer(c)
        opt = make_optimizer(c, [dict(g) for g in params])
        assert (opt.param_groups[0][key] if key in opt.param_groups[0] else getattr(opt, key)) == want, name
        again = build_config("lora", toml_module().loads(render_toml(c)), ())
        assert again.optimizer.args == c.optimizer.args, name  # --print-config gives it back
        built.append(name)
    assert {"adamw", "adafactor"} <= set(built)
    c = resolved(_config(tiny_model, tmp_path, "lora", "optimizer.args.amsgrad=true", "optimizer.args.foreach=false"))
    assert c.optimizer.args == {"amsgrad": True, "foreach": False}
    assert make_optimizer(c, [dict(g) for g in params]).param_groups[0]["amsgrad"] is True
    from modelkit.train.loop import _ss_optimizer

    assert _ss_optimizer(c.optimizer) == "torch.optim.AdamW(amsgrad=True,foreach=False)"
    assert _ss_optimizer(resolved(_config(tiny_model, tmp_path)).optimizer) == "torch.optim.AdamW"
    # a resume keeps the arguments the state was saved with (its param_groups bring them back): a change is refused
    first = train(_config(tiny_model, tmp_path / "a", "lora", "optimizer.args.amsgrad=true", "output.save_every_steps=1"))
    assert first.steps == 2
    state = str(tmp_path / "a" / "lora-step000001-state")
    with pytest.raises(TrainingError, match=r"optimizer.args.amsgrad \(the state: True, this run: False\)"):
        train(_config(tiny_model, tmp_path / "b", "lora", "optimizer.args.amsgrad=false", f"output.resume={state}"))
    with pytest.raises(TrainingError, match=r"optimizer.args.amsgrad \(the state: True, this run: None\)"):
        train(_config(tiny_model, tmp_path / "c", "lora", f"output.resume={state}"))
    assert train(_config(tiny_model, tmp_path / "d", "lora", "optimizer.args.amsgrad=true",
                         f"output.resume={state}")).steps == 2
    for bad, match in ((("optimizer.args.d_coef=2",), "AdamW takes no argument 'd_coef'"),
                       (("optimizer.args.lr=0.1",), "set it with optimizer.lr"),
                       (("optimizer.args.betas=[0.9, 0.9]",), "set it with optimizer.betas"),
                       (("optimizer.name=adafactor", "optimizer.args.relative_step=true"), "relative step"),
                       (("optimizer.args.amsgrad=\"yes\"",), "AdamW expects true or false"),
                       (("optimizer.name=prodigy", "optimizer.lr=none", "optimizer.args.d_coef=true"),
                        "Prodigy expects a number"),
                       (("optimizer.name=adafactor", "optimizer.args.warmup_init=true"),  # with an lr: no relative step
                        r"Adafactor refuses them \(ValueError"),
                       (("optimizer.name=prodigy", "optimizer.lr=none", "optimizer.args.slice_p=0"),  # fails at a step
                        "Prodigy refuses them"),
                       (("optimizer.name=adafactor", "optimizer.lr=none", "optimizer.args.eps=[1e-30]"),  # eps[1]
                        r"Adafactor refuses them \(IndexError"),
                       (("optimizer.args.fused=False",), "'False' is a string here; write false")):
        with pytest.raises(ConfigError, match=match) as info:
            train(_config(tiny_model, tmp_path / "bad", "lora", *bad))
        assert "\n" not in str(info.value)
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())  # nothing loaded or written
    try:
        import lion_pytorch  # noqa: F401
        import triton  # noqa: F401
    except ImportError:  # lion-pytorch exits the process when use_triton is asked without triton
        if "lion_pytorch" in sys.modules:
            with pytest.raises(ConfigError, match=r"Lion refuses them \(SystemExit"):
                train(_config(tiny_model, tmp_path / "bad", "lora", "optimizer.name=lion", "optimizer.args.use_triton=true"))
    for bad, match in ((("optimizer.args=3",), "expected a table"),
                       (("optimizer.args.x={a = 1}",), "expected a boolean, a number"),
                       (("optimizer.lr.x=1",), "optimizer.lr is not a table")):
        with pytest.raises(ConfigError, match=match):
            _config(tiny_model, tmp_path, "lora", *bad)


# --- 3. EMA ----------------------------------------------------------------------------------------

def test_ema_output_and_resume_are_bit_exact(tiny_model: dict[str, str], tmp_path: Path) -> None:
    extra = ("train.max_steps=4", "train.ema=true", "train.ema_decay=0.5")
    straight = train(_config(tiny_model, tmp_path / "a", "lora", *extra, "output.save_every_steps=2"))
    assert straight.ema_saved == (str(tmp_path / "a" / "lora-step000002-ema.safetensors"),
                                  str(tmp_path / "a" / "lora-ema.safetensors"))
    ema, main = modelkit.load(straight.ema_saved[-1]), modelkit.load(straight.output)
    assert set(ema) == set(main) and any(not torch.equal(ema[k], main[k]) for k in main if k.endswith("up.weight"))
    assert modelkit.detect(straight.ema_saved[-1]).kind == "lora"
    state = str(tmp_path / "a" / "lora-step000002-state")
    resumed = train(_config(tiny_model, tmp_path / "b", "lora", *extra, f"output.resume={state}"))
    again = modelkit.load(resumed.ema_saved[-1])
    assert all(torch.equal(ema[k], again[k]) for k in ema)
    with pytest.raises(TrainingError, match=r"train.ema_decay \(the state: 0.5, this run: 0.9\)"):
        train(_config(tiny_model, tmp_path / "c", "lora", *extra[:2], "train.ema_decay=0.9", f"output.resume={state}"))
    # a state saved before train.ema_warmup existed trained without the warm-up: it resumes with
    # ema_warmup=false, and the default (on) is refused naming the key and both values
    import json

    from modelkit.train.state import STATE_JSON

    meta_path = Path(state) / STATE_JSON
    meta = json.loads(meta_path.read_text())
    del meta["fingerprint"]["ema_warmup"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match=r"train.ema_warmup \(the state: False, this run: True\)"):
        train(_config(tiny_model, tmp_path / "d", "lora", *extra, f"output.resume={state}"))
    old = train(_config(tiny_model, tmp_path / "e", "lora", *extra, "train.ema_warmup=false", f"output.resume={state}"))
    assert old.steps == 4


def test_a_refused_resume_names_each_changed_setting() -> None:
    from modelkit.train.state import fingerprint_changes

    saved = {"method": "lora", "network": {"dim": 4, "alpha": 2.0}, "seed": 3, "optimizer": "adamw"}
    now = {"method": "lora", "network": {"dim": 8, "alpha": 2.0}, "seed": 4, "optimizer": "adamw",
           "ema": 0.999, "ema_warmup": True}
    assert fingerprint_changes(saved, now) == [
        "train.ema_decay (the state: none, this run: 0.999)", "train.ema_warmup (the state: none, this run: True)",
        "network.dim (the state: 4, this run: 8)", "train.seed (the state: 3, this run: 4)"]
    assert fingerprint_changes({**saved, "ema": 0.999}, {**saved, "ema": 0.999, "ema_warmup": False}) == []
    assert fingerprint_changes(saved, {**saved, "optimizer_args": {}}) == []  # a state from before optimizer.args


# --- 4. text-encoder cache -------------------------------------------------------------------------

def test_text_cache_equals_no_cache_and_rebuilds_a_corrupt_entry(tiny_model: dict[str, str], tmp_path: Path) -> None:
    uncached = train(_config(tiny_model, tmp_path / "a", "lora", "output.save_state=false"))
    cached = train(_config(tiny_model, tmp_path / "b", "lora", "output.save_state=false", "dataset.cache_text=true"))
    assert cached.losses == uncached.losses
    a, b = modelkit.load(uncached.output), modelkit.load(cached.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    files = sorted(glob.glob(str(tmp_path / "b" / ".modelkit-text" / "*.safetensors")))
    from modelkit.train import data

    captions = {i.caption for i in data.scan(_config(tiny_model, tmp_path).dataset).items}
    # every caption is encoded before step 1 (2 steps see only 2 of the 3 images)
    assert len(files) == len(captions) == 3 and any("3 encoded" in n for n in cached.notes), cached.notes
    with modelkit.open_model(files[0]) as mf:
        assert mf.metadata["modelkit.layout"] == "modelkit-text/1" and set(mf) == {"states"}
    Path(files[0]).write_bytes(b"\x00" * 40)
    again = train(_config(tiny_model, tmp_path / "b", "lora", "output.save_state=false", "dataset.cache_text=true",
                          "output.force=true"))
    assert again.losses == uncached.losses
    warned = [n for n in again.notes if "unusable" in n]
    assert len(warned) == 1 and files[0] in warned[0] and "\n" not in warned[0]
    with modelkit.open_model(files[0]) as mf:
        assert set(mf) == {"states"}
    with pytest.raises(ConfigError, match="dataset.cache_text"):
        _config(tiny_model, tmp_path, "lora", "dataset.cache_text=true", "network.train_text_encoder=true")


# --- 6. validation loss, TensorBoard and wandb -----------------------------------------------------

def test_validation_loss_is_the_same_in_two_runs_and_logged(tiny_model: dict[str, str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    extra = ("dataset.validation_split=0.34", "train.validation_every=1", "output.save_state=false",
             "output.tensorboard=true")
    one = train(_config(tiny_model, tmp_path / "a", "lora", *extra))
    two = train(_config(tiny_model, tmp_path / "b", "lora", *extra))
    assert [s for s, _ in one.validation] == [0, 1, 2] and one.images == 2  # one of three images held out
    assert one.validation == two.validation
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "a" / "logs"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("validation/loss")]
    assert [s for s, _ in logged] == [0, 1, 2]
    assert [v for _, v in logged] == pytest.approx([v for _, v in one.validation], rel=1e-6)


def test_validation_is_deterministic_and_changes_no_weights(tiny_model: dict[str, str], tmp_path: Path) -> None:
    from modelkit.train import data

    held = tmp_path / "held"
    held.mkdir()
    src = data.scan(_config(tiny_model, tmp_path).dataset).items[0].path
    (held / "h.png").write_bytes(Path(src).read_bytes())
    (held / "h.txt").write_text("held out")
    extra = (f"dataset.validation_path={held}", "train.validation_every=1", "output.save_state=false")
    one = train(_config(tiny_model, tmp_path / "a", "lora", *extra))
    two = train(_config(tiny_model, tmp_path / "b", "lora", *extra))
    plain = train(_config(tiny_model, tmp_path / "c", "lora", "output.save_state=false"))
    assert one.validation == two.validation and [s for s, _ in one.validation] == [0, 1, 2]
    assert one.losses == plain.losses  # validation takes nothing from the training's random streams
    a, c = modelkit.load(one.output), modelkit.load(plain.output)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_wandb_offline_logs_the_run(tiny_model: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    result = train(_config(tiny_model, tmp_path, "lora", "output.wandb=true", "output.save_state=false",
                           "dataset.validation_split=0.34", "train.validation_every=2"))
    runs = glob.glob(str(tmp_path / "**" / "offline-run-*" / "*.wandb"), recursive=True)
    assert result.steps == 2 and len(runs) == 1 and os.path.getsize(runs[0]) > 0
    assert [s for s, _ in result.validation] == [0, 2]


def test_missing_wandb_is_one_line_and_the_extras_list_the_packages(tiny_model: dict[str, str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import re

    from modelkit.train import logs
    from modelkit.train.optim import OPTIMIZERS
    from modelkit.train.tomlio import read_toml

    real = importlib.util.find_spec
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        train(_config(tiny_model, tmp_path, "lora", "output.wandb=true"))
    assert "pip install 'modelkit[wandb]'" in str(info.value) and "\n" not in str(info.value)
    extras = read_toml(str(Path(__file__).resolve().parents[2] / "pyproject.toml"))["project"]["optional-dependencies"]
    names = {re.split(r"[<>=;\[ ]", req, maxsplit=1)[0].lower() for req in extras["optimizers"] + extras["train"]}
    assert {spec.pip for spec in OPTIMIZERS.values() if spec.pip != "torch"} <= names
    assert any(req.startswith("wandb") for req in extras["wandb"])


def test_text_cache_of_sdxl_keeps_the_pooled_output(tmp_path: Path) -> None:
    from . import tiny

    checkpoint, configs, _ = tiny.family_checkpoint("sdxl", str(tmp_path))
    images = tiny.write_images(str(tmp_path / "img"))
    runs = []
    for extra in ((), ("dataset.cache_text=true",)):
        cfg = build_config("lora", {
            "model": {"path": checkpoint, "base": "sdxl", "configs": configs},
            "dataset": {"path": images, "resolution": 64, "min_bucket": 32, "max_bucket": 128, "bucket_step": 32},
            "train": {"max_steps": 2, "device": "cpu", "threads": 1},
            "output": {"dir": str(tmp_path / f"out{len(extra)}"), "save_state": False}}, extra)
        runs.append(train(cfg).losses)
    assert runs[0] == runs[1]
    entry = sorted(glob.glob(str(tmp_path / "out1" / ".modelkit-text" / "*.safetensors")))[0]
    with modelkit.open_model(entry) as mf:
        assert set(mf) == {"states", "pooled"} and tuple(mf["states"].shape)[0] == 77 and mf["pooled"].shape[0] > 0


def test_every_optimizer_resumes_bit_exactly(tiny_model: dict[str, str], tmp_path: Path) -> None:
    """Prodigy's scalars, Adafactor's tensor learning rates and bitsandbytes' nested state go through the state."""
    from modelkit.train.optim import OPTIMIZERS

    for name, spec in OPTIMIZERS.items():
        if name == "adamw":
            continue  # test_train's resume test
        try:
            __import__(spec.module)
        except ImportError:
            continue
        extra = (f"optimizer.name={name}", *(("optimizer.lr=none",) if spec.lr_free else ()))
        straight = train(_config(tiny_model, tmp_path / f"{name}-a", "lora", *extra, "output.save_every_steps=1"))
        state = str(tmp_path / f"{name}-a" / "lora-step000001-state")
        resumed = train(_config(tiny_model, tmp_path / f"{name}-b", "lora", *extra, f"output.resume={state}"))
        a, b = modelkit.load(straight.output), modelkit.load(resumed.output)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_human_result_names_the_ema_file_and_the_validation_loss(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from modelkit.cli.output import Output
    from modelkit.cli.train_cmd import _render

    r = SimpleNamespace(method="lora", steps=4, epochs=1, images=3, base="sd1", prediction="epsilon", loss=0.1,
                        seconds=1.0, output=str(tmp_path / "o.safetensors"), config_file=None, saved=["o"],
                        class_images=[], samples=[], states=[], ema_saved=("o-ema.safetensors",),
                        validation=((2, 0.5), (4, 0.25)))
    _render(Output(), r)
    out = capsys.readouterr().out
    assert "wrote o-ema.safetensors (EMA of the trained weights)" in out
    assert "validation loss 0.2500 at step 4 (first 0.5000 at step 2)" in out


def test_validation_compares_across_training_seeds(tiny_model: dict[str, str], tmp_path: Path) -> None:
    """The held-out split and the validation noise come from train.validation_seed, so two runs with other
    training seeds start from the same validation value (the untrained model, step 0) on the same images."""
    extra = ("dataset.validation_split=0.34", "train.validation_every=2", "output.save_state=false")
    a = train(_config(tiny_model, tmp_path / "a", "lora", *extra, "train.seed=3"))
    b = train(_config(tiny_model, tmp_path / "b", "lora", *extra, "train.seed=4"))
    c = train(_config(tiny_model, tmp_path / "c", "lora", *extra, "train.seed=4", "train.validation_seed=9"))
    assert a.validation[0] == b.validation[0] and a.validation[0][0] == 0
    assert a.losses != b.losses and c.validation[0] != b.validation[0]
    with pytest.raises(ConfigError, match="train.validation_every"):  # a split that no validation uses
        _config(tiny_model, tmp_path, "lora", "dataset.validation_split=0.34")


def test_validation_folder_errors_name_its_key(tiny_model: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ModelkitError) as info:
        train(_config(tiny_model, tmp_path / "o", "lora", f"dataset.validation_path={tmp_path / 'nope'}",
                      "train.validation_every=1"))
    assert "dataset.validation_path" in str(info.value) and "key dataset.path" not in str(info.value)


def test_ema_warms_up(tiny_model: dict[str, str], tmp_path: Path) -> None:
    """decay min(ema_decay, (1 + t) / (10 + t)): after a few steps the average has moved most of the way to
    the weights (without the warm-up it would still be almost its starting values: zero for lora_up)."""
    from modelkit.train.ema import EMA

    ema = EMA({}, 0.999)
    assert [round(ema.decay_at(t), 6) for t in (0, 1, 10, 10_000)] == [0.1, round(2 / 11, 6), round(11 / 20, 6), 0.999]
    assert EMA({}, 0.999, warmup=False).decay_at(0) == 0.999
    extra = ("train.max_steps=3", "train.ema=true", "output.save_state=false")
    warm = train(_config(tiny_model, tmp_path / "a", "lora", *extra))
    cold = train(_config(tiny_model, tmp_path / "b", "lora", *extra, "train.ema_warmup=false"))
    main, w, c = (modelkit.load(p) for p in (warm.output, warm.ema_saved[-1], cold.ema_saved[-1]))
    ups = [k for k in main if k.endswith("lora_up.weight")]
    far = sum(float((main[k] - c[k]).abs().sum()) for k in ups)
    near = sum(float((main[k] - w[k]).abs().sum()) for k in ups)
    assert near < 0.5 * far


def test_text_cache_is_built_before_training_and_refuses_changing_captions(tiny_model: dict[str, str], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every caption is in the cache before step 1 and the text encoders leave the training device; options
    that make a new caption at each step are refused; an unusable cache folder is one line before loading."""
    from modelkit.errors import OutputWriteError
    from modelkit.train import loop

    moved: list[str] = []
    real = loop._build_text_cache

    def spy(cfg: Any, cache: Any, base: Any, *a: Any) -> None:
        real(cfg, cache, base, *a)
        moved.extend(str(next(te.parameters()).device) for te in base.text_encoders)
        moved.append(str(len(glob.glob(os.path.join(cache.folder, "*.safetensors")))))

    monkeypatch.setattr(loop, "_build_text_cache", spy)
    train(_config(tiny_model, tmp_path / "a", "lora", "output.save_state=false", "dataset.cache_text=true",
                  "train.max_steps=1"))
    assert moved == ["cpu", "3"]
    for opt in ("dataset.shuffle_tags=true", "dataset.tag_dropout=0.2"):
        with pytest.raises(ConfigError, match="dataset.cache_text"):
            _config(tiny_model, tmp_path, "lora", "dataset.cache_text=true", opt)
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(OutputWriteError, match="dataset.text_cache_dir") as info:
        train(_config(tiny_model, tmp_path / "b", "lora", "dataset.cache_text=true",
                      f"dataset.text_cache_dir={tmp_path / 'afile'}"))
    assert "\n" not in str(info.value) and not (tmp_path / "b" / "lora.safetensors").exists()


def test_a_wandb_that_cannot_start_is_one_line_before_the_base_loads(tiny_model: dict[str, str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from modelkit.train import base as base_mod

    def no_key(**_: Any) -> None:
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    monkeypatch.setattr(base_mod, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(ConfigError) as info:
        train(_config(tiny_model, tmp_path, "lora", "output.wandb=true"))
    assert "No API key configured" in str(info.value) and "wandb login" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_component_rate_of_0_freezes_it(tiny_model: dict[str, str], tmp_path: Path) -> None:
    """optimizer.unet_lr = 0 is accepted (a negative rate is not) and leaves the UNet's LoRA as it started."""
    r = train(_config(tiny_model, tmp_path, "lora", "optimizer.unet_lr=0", "output.save_state=false"))
    ups = {k: v for k, v in modelkit.load(r.output).items() if k.startswith("lora_unet") and k.endswith("lora_up.weight")}
    assert ups and all(not v.any() for v in ups.values())  # LoRA up starts at zero and never moved
    with pytest.raises(ConfigError, match="optimizer.unet_lr"):
        _config(tiny_model, tmp_path, "lora", "optimizer.unet_lr=-1")


def test_settings_an_optimizer_does_not_have_are_refused(tiny_model: dict[str, str], tmp_path: Path) -> None:
    for name, key in (("adafactor", "optimizer.betas=[0.9, 0.99]"), ("lion", "optimizer.eps=1e-6"),
                      ("adafactor", "optimizer.eps=1e-6")):
        with pytest.raises(ConfigError, match=f"{key.split('=')[0]}: {name} has no such setting"):
            _config(tiny_model, tmp_path, "lora", f"optimizer.name={name}", key)
    _config(tiny_model, tmp_path, "lora", "optimizer.name=lion", "optimizer.betas=[0.9, 0.98]")  # Lion has betas


def test_built_optimizers_carry_their_documented_defaults_and_the_rate_precedence(tiny_model: dict[str, str],
                                                                                tmp_path: Path) -> None:
    """The optimizer objects themselves (not just the config): documented betas, eps, weight decay and lr, and
    optimizer.unet_lr before network.unet_lr before optimizer.lr."""
    import importlib.util

    from modelkit.train.optim import OPTIMIZERS, component_lr, make_optimizer

    def built(*overrides: str) -> Any:
        cfg = resolved(_config(tiny_model, tmp_path, "lora", *overrides))
        return make_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(2))], "component": "unet"}])

    want = {"adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
            "lion": {"betas": (0.9, 0.99), "weight_decay": 0.0},
            "prodigy": {"lr": 1.0, "weight_decay": 0.0}}
    for name, fields in want.items():
        if importlib.util.find_spec(OPTIMIZERS[name].module) is None:
            continue
        group = built(f"optimizer.name={name}", *(["optimizer.lr=none"] if name == "prodigy" else [])).param_groups[0]
        for k, v in fields.items():
            assert group[k] == pytest.approx(v) if not isinstance(v, tuple) else tuple(group[k]) == v, (name, k, group[k])
    cfg = resolved(_config(tiny_model, tmp_path, "lora", "optimizer.lr=1e-3", "network.unet_lr=2e-3"))
    assert component_lr(cfg, "unet") == 2e-3 and component_lr(cfg, "text_encoder") == 1e-3
    cfg = resolved(_config(tiny_model, tmp_path, "lora", "optimizer.lr=1e-3", "network.unet_lr=2e-3",
                           "optimizer.unet_lr=3e-3"))
    assert component_lr(cfg, "unet") == 3e-3
    assert built("optimizer.lr=1e-3", "optimizer.unet_lr=3e-3").param_groups[0]["lr"] == 3e-3


def test_the_log_sinks_are_closed_when_the_first_validation_fails(tiny_model: dict[str, str], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from modelkit.train import loop, validation

    closed: list[bool] = []

    class Sink:
        def __init__(self, *a: Any) -> None:
            pass

        def close(self) -> None:
            closed.append(True)

    def broken(*a: Any, **k: Any) -> float:
        raise TrainingError(None, "a held-out image went missing")

    monkeypatch.setattr(loop, "WandB", Sink)
    monkeypatch.setattr(validation, "validation_loss", broken)
    with pytest.raises(TrainingError, match="went missing"):
        train(_config(tiny_model, tmp_path, "lora", "output.wandb=true", "dataset.validation_split=0.34",
                      "train.validation_every=1"))
    assert closed == [True]
