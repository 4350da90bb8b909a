"""LoRA, LoCon and textual inversion on a tiny SD1-style model, on the CPU, a few steps each."""

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
from click.testing import CliRunner  # noqa: E402

import modelkit  # noqa: E402
from modelkit.cli.main import cli  # noqa: E402
from modelkit.errors import OutputExistsError, TrainingError  # noqa: E402
from modelkit.train import train  # noqa: E402
from modelkit.train.config import Config, build_config, resolved  # noqa: E402


def _config(tiny_model: dict[str, str], out: Path, method: str = "lora", *overrides: str) -> Config:
    data: dict[str, Any] = {
        "model": {"path": tiny_model["checkpoint"], "base": "sd1", "configs": tiny_model["configs"]},
        "dataset": {"path": tiny_model["images"], "resolution": 64, "min_bucket": 32, "max_bucket": 128,
                    "bucket_step": 32},
        "network": {"dim": 4, "alpha": 2.0},
        "train": {"max_steps": 3, "device": "cpu", "seed": 3, "threads": 1},
        "optimizer": {"lr": 1e-3},
        "output": {"dir": str(out)},
    }
    return build_config(method, data, overrides)


def _tensors(path: str) -> dict[str, Any]:
    return modelkit.load(path, dtype="float32")


def test_lora_with_text_encoder_exports_kohya_safetensors(tiny_model: dict[str, str], tmp_path: Path) -> None:
    result = train(_config(tiny_model, tmp_path, "lora", "network.train_text_encoder=true"))
    assert result.steps == 3 and math.isfinite(result.loss) and all(math.isfinite(x) for x in result.losses)
    assert result.output == str(tmp_path / "lora.safetensors") and result.base == "sd1"
    with modelkit.open_model(result.output) as mf:
        keys, meta = set(mf), dict(mf.metadata)
    det = modelkit.detect(result.output)
    assert det.kind == "lora" and det.subtype == "lora" and det.base == "sd1"
    assert det.details["key_style"] == "kohya" and det.details["ranks"] == [4] and det.details["alphas"] == [2.0]
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= keys
        assert m.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_"))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in modules
    assert "lora_unet_mid_block_attentions_0_proj_in" in modules
    assert "lora_te_text_model_encoder_layers_11_self_attn_q_proj" in modules
    assert not any("resnets" in m for m in modules)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_tag_frequency"])["."]["red square"] == 1
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_steps"] == "3"
    assert os.path.isfile(os.path.join(result.states[-1], "state.json"))


def test_diffusers_load_lora_weights_reads_the_export(tiny_model: dict[str, str], tmp_path: Path) -> None:
    """diffusers' kohya loader applies exactly up @ down * alpha / rank, convolutions included."""
    from diffusers import StableDiffusionPipeline

    from modelkit.train.base import load_base

    cfg = _config(tiny_model, tmp_path, "locon", "network.train_text_encoder=true", "train.max_steps=1",
                  "output.save_state=false", "output.dtype=float32")
    result = train(cfg)
    det = modelkit.detect(result.output)
    assert det.kind == "lora" and det.subtype == "locon" and det.details["conv_ranks"] == [4]
    lora = _tensors(result.output)
    base = load_base(cfg.model)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    checks = {"lora_unet_down_blocks_0_resnets_0_conv1": (base.unet, "down_blocks.0.resnets.0.conv1"),
              "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2": (
                  base.unet, "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"),
              "lora_te_text_model_encoder_layers_3_mlp_fc1": (base.text_encoders[0], "encoder.layers.3.mlp.fc1")}
    before = {k: owner.get_submodule(name).weight.detach().clone() for k, (owner, name) in checks.items()}
    pipe.load_lora_weights(result.output)
    pipe.fuse_lora()
    for k, (owner, name) in checks.items():
        layer = owner.get_submodule(name)
        after = getattr(layer, "base_layer", layer).weight.detach()
        down, up, alpha = lora[f"{k}.lora_down.weight"], lora[f"{k}.lora_up.weight"], lora[f"{k}.alpha"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(after.shape) * (alpha / down.shape[0])
        assert float(delta.abs().max()) > 0
        torch.testing.assert_close(after - before[k], delta, rtol=1e-4, atol=1e-6)


def test_textual_inversion_exports_emb_params(tiny_model: dict[str, str], tmp_path: Path) -> None:
    result = train(_config(tiny_model, tmp_path, "ti", "ti.token=<tiny-thing>", "ti.init_word=circle",
                           "ti.vectors=2", "output.dtype=float32"))
    assert result.steps == 3 and math.isfinite(result.loss)
    tensors = _tensors(result.output)
    assert set(tensors) == {"emb_params"} and tuple(tensors["emb_params"].shape) == (2, 32)
    det = modelkit.detect(result.output)
    assert det.kind == "embedding" and det.subtype == "emb_params" and det.details["vectors"] == 2
    with modelkit.open_model(result.output) as mf:
        assert mf.metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"


def test_ti_captions_and_initialisation(tiny_model: dict[str, str], tmp_path: Path) -> None:
    from modelkit.train.base import load_base
    from modelkit.train.methods import make_method

    cfg = resolved(_config(tiny_model, tmp_path, "ti", "ti.token=<tok>", "ti.init_word=red circle", "ti.vectors=3"))
    base = load_base(cfg.model)
    table = base.text_encoders[0].get_input_embeddings().weight.detach().clone()
    method = make_method(cfg, base)
    method.prepare()
    init = base.tokenizers[0]("red circle", add_special_tokens=False).input_ids
    rows = method.trainable()["embedding_0"].detach()
    torch.testing.assert_close(rows, table[[init[0], init[1], init[0]]])
    assert method.caption("a photo of <tok>, blue") == "a photo of <tok> <tok>_1 <tok>_2, blue"
    assert method.caption("a photo") == "<tok> <tok>_1 <tok>_2, a photo"
    ids = base.tokenizers[0]("<tok> <tok>_1").input_ids
    assert ids[1:3] == [49408, 49409]


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tiny_model: dict[str, str], tmp_path: Path) -> None:
    extra = ("train.max_steps=4", "train.batch_size=2", "dataset.shuffle_tags=true", "dataset.flip=true",
             "train.noise_offset=0.05", "scheduler.name=cosine", "scheduler.warmup_steps=1", "output.dtype=float32")
    straight = train(_config(tiny_model, tmp_path / "a", "lora", *extra, "output.save_every_steps=2"))
    state = str(tmp_path / "a" / "lora-step000002-state")
    assert straight.states[0] == state and straight.saved[0].endswith("lora-step000002.safetensors")
    resumed = train(_config(tiny_model, tmp_path / "b", "lora", *extra, f"output.resume={state}"))
    assert resumed.steps == 4 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-5)
    a, b = _tensors(straight.output), _tensors(resumed.output)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_state_restores_step_and_optimizer(tiny_model: dict[str, str], tmp_path: Path) -> None:
    from modelkit.train.base import load_base
    from modelkit.train.loop import _fingerprint, make_optimizer
    from modelkit.train.methods import make_method
    from modelkit.train.state import load_state

    cfg = resolved(_config(tiny_model, tmp_path, "lora", "train.max_steps=2"))
    result = train(cfg)
    saved = _tensors(os.path.join(result.states[-1], "state.safetensors"))
    method = make_method(cfg, load_base(cfg.model))
    optimizer = make_optimizer(cfg, method.prepare())
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler("constant", optimizer)
    counters = load_state(result.states[-1], method.trainable(), optimizer, scheduler, None, _fingerprint(cfg))
    assert (counters.step, counters.micro) == (2, 2)
    params = method.trainable()
    first = next(iter(params))
    torch.testing.assert_close(params[first].detach(), saved[f"param.{first}"])
    st = optimizer.state_dict()["state"]
    assert len(st) == len(params) and float(st[0]["step"]) == 2.0
    torch.testing.assert_close(st[0]["exp_avg_sq"], saved["optim.0.exp_avg_sq"])
    other = resolved(_config(tiny_model, tmp_path, "lora", "network.dim=8"))
    with pytest.raises(TrainingError, match="network"):
        load_state(result.states[-1], params, optimizer, scheduler, None, _fingerprint(other))


def test_loss_on_a_fixed_batch_goes_down(tiny_model: dict[str, str], tmp_path: Path) -> None:
    from modelkit.train import data
    from modelkit.train.base import load_base
    from modelkit.train.loop import make_optimizer
    from modelkit.train.methods import make_method
    from modelkit.train.step import compute_loss, load_batch

    for method_name, lr in (("lora", 3e-3), ("ti", 3e-2), ("hypernetwork", 1e-3)):
        cfg = resolved(_config(tiny_model, tmp_path, method_name, "ti.token=<t>", f"optimizer.lr={lr}"))
        base = load_base(cfg.model)
        method = make_method(cfg, base)
        optimizer = make_optimizer(cfg, method.prepare())
        ds = data.scan(cfg.dataset)
        batch = load_batch(ds, [0], cfg, 0, method.caption)
        losses = []
        for _ in range(6):
            loss = compute_loss(cfg, base, base.unet, batch, 0, "cpu", torch.float32, any(method.train_text))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0], (method_name, losses)


def test_v_prediction_min_snr_and_clip_skip_run(tiny_model: dict[str, str], tmp_path: Path) -> None:
    result = train(_config(tiny_model, tmp_path, "lora", "model.prediction=v_prediction", "train.min_snr_gamma=5",
                           "model.clip_skip=2", "train.max_steps=1", "train.gradient_checkpointing=true",
                           "train.attention=eager", "train.grad_accum=2"))
    assert result.prediction == "v_prediction" and math.isfinite(result.loss)
    with modelkit.open_model(result.output) as mf:
        assert mf.metadata["ss_v_parameterization"] == "True" and mf.metadata["modelspec.prediction_type"] == "v"


def test_nan_loss_stops_with_a_clear_message(tiny_model: dict[str, str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import modelkit.train.loop as loop

    monkeypatch.setattr(loop, "compute_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match="loss became nan at step 1"):
        train(_config(tiny_model, tmp_path))
    assert not (tmp_path / "lora.safetensors").exists()


def test_existing_output_is_refused_before_training(tiny_model: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "lora.safetensors").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        train(_config(tiny_model, tmp_path, "lora", "model.path=/nonexistent/model.safetensors"))
    assert (tmp_path / "lora.safetensors").read_bytes() == b"x"


def test_diffusers_folder_base_and_cli(tiny_model: dict[str, str], tmp_path: Path) -> None:
    """A local diffusers folder (written with the tiny weights) trains through the CLI, JSON out."""
    from modelkit.train.base import load_base

    cfg = _config(tiny_model, tmp_path, "lora")
    base = load_base(cfg.model)
    folder = tmp_path / "diffusers"
    base.unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    base.text_encoders[0].save_pretrained(folder / "text_encoder")
    base.scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    toml = tmp_path / "train.toml"
    # json.dumps: a TOML basic string, its backslashes escaped (Windows paths)
    toml.write_text(f'[model]\npath = {json.dumps(str(folder))}\n[dataset]\npath = {json.dumps(tiny_model["images"])}\n'
                    'resolution = 64\n'
                    'min_bucket = 32\nmax_bucket = 128\nbucket_step = 32\n[train]\nmax_steps = 1\ndevice = "cpu"\n'
                    '[output]\ndir = "out"\n')
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(toml), "--set", "network.dim=2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["steps"] == 1 and doc["base"] == "sd1" and doc["output"] == str(tmp_path / "out" / "lora.safetensors")
    assert modelkit.detect(doc["output"]).details["ranks"] == [2]
    r = CliRunner().invoke(cli, ["train", "dreambooth", "--config", str(toml), "--json", "--set", "train.max_steps=1"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)["output"]
    assert out == str(tmp_path / "out" / "dreambooth")  # a diffusers folder base gives a diffusers folder
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert load_base(build_config("lora", {"model": {"path": out}, "dataset": {"path": "d"}}).model).family == "sd1"


def test_hypernetwork_in_a1111_structure(tiny_model: dict[str, str], tmp_path: Path) -> None:
    result = train(_config(tiny_model, tmp_path, "hypernetwork", "hypernetwork.layer_structure=[1, 2, 2, 1]",
                           "hypernetwork.activation=relu", "hypernetwork.layer_norm=true", "hypernetwork.dropout=true",
                           "optimizer.lr=1e-3", "output.dtype=float32"))
    assert result.steps == 3 and math.isfinite(result.loss)
    tensors = _tensors(result.output)
    # Linear, ReLU, LayerNorm, Dropout | Linear, ReLU, LayerNorm | Linear, LayerNorm: A1111's Sequential indices
    layers = {k.split(".", 2)[2] for k in tensors}
    assert layers == {f"linear.{i}.{p}" for i in (0, 2, 4, 6, 7, 8) for p in ("weight", "bias")}
    assert {k.split(".")[0] for k in tensors} == {"32", "64"} and {k.split(".")[1] for k in tensors} == {"0", "1"}
    assert tuple(tensors["32.0.linear.0.weight"].shape) == (64, 32) and tuple(tensors["64.1.linear.7.weight"].shape) == (64, 128)
    det = modelkit.detect(result.output)
    assert det.kind == "hypernetwork" and det.details["layer_structure_from_shapes"] == [1.0, 2.0, 2.0, 1.0]
    with modelkit.open_model(result.output) as mf:
        meta = mf.metadata
    assert meta["modelkit.layout"] == "a1111-hypernetwork/1" and json.loads(meta["layer_structure"]) == [1, 2, 2, 1]
    assert json.loads(meta["activation_func"]) == "relu" and json.loads(meta["dropout_structure"]) == [0, 0.3, 0, 0]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/hypernetwork" and meta["step"] == "3"


def test_dreambooth_with_prior_preservation_writes_an_ldm_checkpoint(tiny_model: dict[str, str], tmp_path: Path) -> None:
    from . import tiny

    classes = tiny.write_images(str(tmp_path / "class"), captions=("a", "b", "c"))
    result = train(_config(tiny_model, tmp_path, "dreambooth", f"dreambooth.class_path={classes}",
                           "dreambooth.class_prompt=a photo of a shape", "dreambooth.train_text_encoder=true",
                           "train.max_steps=2", "optimizer.lr=1e-4", "dataset.default_caption=sks shape",
                           "output.save_state=false"))
    assert result.output == str(tmp_path / "dreambooth.safetensors") and math.isfinite(result.loss)
    with modelkit.open_model(tiny_model["checkpoint"]) as src, modelkit.open_model(result.output) as out:
        assert set(out) == set(src)
        changed = {k for k in src if src[k].dtype.is_float and not torch.equal(src[k].read(), out[k].read())}
        assert {k.split(".")[0] for k in changed} == {"model", "cond_stage_model"}
        assert any(k.startswith("model.diffusion_model.output_blocks.") for k in changed)
        assert out.metadata["modelspec.architecture"] == "stable-diffusion-v1"
    det = modelkit.detect(result.output)
    assert det.kind == "checkpoint" and set(det.details["components"]) == {"unet", "vae", "text_encoder"}
    from modelkit.train.base import load_base

    again = load_base(_config(tiny_model, tmp_path, "lora", f"model.path={result.output}").model)
    assert again.family == "sd1"


def _toml_file(tiny_model: dict[str, str], tmp_path: Path) -> Path:
    toml = tmp_path / "train.toml"
    # json.dumps: a TOML basic string, its backslashes escaped (Windows paths)
    toml.write_text(f'[model]\npath = {json.dumps(tiny_model["checkpoint"])}\nbase = "sd1"\n'
                    f'configs = {json.dumps(tiny_model["configs"])}\n'
                    f'[dataset]\npath = {json.dumps(tiny_model["images"])}\nresolution = 64\n'
                    'min_bucket = 32\nmax_bucket = 128\nbucket_step = 32\n[network]\ndim = 2\n'
                    '[train]\nmax_steps = 3\ndevice = "cpu"\nthreads = 1\n[output]\ndir = "out"\nsave_state = false\n')
    return toml


def test_cli_logs_progress_lines_off_a_terminal_and_force_replaces(tiny_model: dict[str, str], tmp_path: Path) -> None:
    toml = _toml_file(tiny_model, tmp_path)
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(toml), "--set", "output.log_every=2"])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert lines[0].startswith("modelkit train lora: base sd1 (") and "images in" in lines[0]
    assert "3 steps" in lines[0] and "cpu (1 thread)" in lines[0]
    assert str(tmp_path / "out" / "lora.safetensors") in lines[1] and "lora.config.toml" in lines[1]
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/3", "3/3"]  # every 2 steps, and the last
    assert all(" loss " in line and " lr 1.00e-04 " in line and " it/s " in line and " ETA " in line for line in steps)
    assert "config " in r.stdout
    # the output exists: refused, and the error's remedy (--force) works
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(toml)])
    assert r.exit_code == 2 and "--force" in r.stderr and "lora.safetensors" in r.stderr
    before = (tmp_path / "out" / "lora.safetensors").stat().st_mtime_ns
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(toml), "--force", "-q", "--set", "train.max_steps=1"])
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # -q: no start-up summary, no step lines; the result stays, its notes go
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("lora: 1 steps ")
    assert lines[1].startswith(f"  wrote {tmp_path / 'out' / 'lora.safetensors'} (")
    assert (tmp_path / "out" / "lora.safetensors").stat().st_mtime_ns != before


def test_threads_default_to_the_usable_cores_and_the_config_is_saved(tiny_model: dict[str, str],
                                                                    tmp_path: Path) -> None:
    from modelkit.portable import usable_cpus
    from modelkit.train.config import load_config

    seen: list[int] = []
    starts: list[Any] = []
    before = torch.get_num_threads()
    result = train(_config(tiny_model, tmp_path, "lora", "train.threads=0", "train.max_steps=1"),
                   progress=lambda *a: seen.append(torch.get_num_threads()), on_start=starts.append)
    assert seen == [usable_cpus()] and starts[0].threads == usable_cpus() and starts[0].steps == 1
    assert torch.get_num_threads() == before  # put back after the run
    assert result.config_file == str(tmp_path / "lora.config.toml") == starts[0].config_file
    saved = load_config(result.config_file, "lora")
    assert saved.train.threads == usable_cpus() and saved.optimizer.lr == 1e-3 and saved.network.dim == 4
    assert saved.model == resolved(_config(tiny_model, tmp_path)).model
    seen.clear()
    train(_config(tiny_model, tmp_path / "two", "lora", "train.threads=2", "train.max_steps=1"),
          progress=lambda *a: seen.append(torch.get_num_threads()))
    assert seen == [2]
