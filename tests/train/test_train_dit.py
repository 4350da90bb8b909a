"""LoRA training on tiny Flux.1 and SD3 diffusers folders, on the CPU: the loss, the output's layouts
(diffusers' ``load_lora_weights``, ``modelkit merge lora``, exact kohya fusion), resume, and the
timestep samplers."""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import modelkit  # noqa: E402
from fixtures import dit_layouts as dl  # noqa: E402
from fixtures import dit_train as dt  # noqa: E402
from modelkit.errors import ConfigError, UsageError  # noqa: E402
from modelkit.ops import families as fam  # noqa: E402
from modelkit.train import flow, train  # noqa: E402
from modelkit.train.base import load_base  # noqa: E402
from modelkit.train.config import Config, FlowConfig, ModelConfig, build_config  # noqa: E402
from tests.ops.modelspec_validator import problems  # noqa: E402

TRANSFORMER = os.path.join("transformer", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny diffusers folders: ``flux``, ``sd3``, ``flux-double`` (Flux without single blocks), and images."""
    root = tmp_path_factory.mktemp("dit")
    return {
        "flux": dt.write_folder("flux", str(root / "flux")),
        "sd3": dt.write_folder("sd3", str(root / "sd3")),
        "flux-double": dt.write_folder("flux", str(root / "flux-double"),
                                       transformer={**dt.FLUX_TRANSFORMER, "num_single_layers": 0}),
        "images": dt.write_images(str(root / "images")),
    }


def _config(bases: dict[str, str], base: str, out: Path, *overrides: str) -> Config:
    data: dict[str, Any] = {
        "model": {"path": bases[base]},
        "dataset": {"path": bases["images"], "resolution": 32, "min_bucket": 32, "max_bucket": 32, "bucket_step": 16,
                    "min_image_size": 16},
        "network": {"dim": 4, "alpha": 2.0},
        "train": {"max_steps": 3, "device": "cpu", "seed": 5, "threads": 1},
        "optimizer": {"lr": 1e-2},
        "output": {"dir": str(out), "dtype": "float32"},
        "flow": {"t5_max_length": 8},
    }
    return build_config("lora", data, overrides)


@pytest.fixture(scope="module")
def runs(bases: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The trained LoRAs every test below reads (a few steps each)."""
    root = tmp_path_factory.mktemp("runs")
    held = ("train.max_steps=24", "train.validation_every=8", f"dataset.validation_path={bases['images']}")
    return {
        "flux": train(_config(bases, "flux", root / "flux", *held)),
        "sd3": train(_config(bases, "sd3", root / "sd3", *held)),
        "flux-diffusers": train(_config(bases, "flux", root / "flux-diffusers", "network.layout=diffusers")),
        "flux-double": train(_config(bases, "flux-double", root / "flux-double")),
        "sd3-kohya": train(_config(bases, "sd3", root / "sd3-kohya", "network.layout=kohya")),
    }


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_the_validation_loss_goes_down(runs: dict[str, Any], name: str) -> None:
    """The held-out loss (fixed noise and timesteps, the training images) falls over 24 steps."""
    result = runs[name]
    values = [v for _step, v in result.validation]
    assert [s for s, _v in result.validation] == [0, 8, 16, 24]  # step 0: the untrained model
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0], values
    assert result.base == name and result.prediction == "flow" and result.steps == 24


def test_outputs_carry_modelspec_and_kohya_metadata(runs: dict[str, Any]) -> None:
    want = {"flux": ("flux-1-dev/lora", "https://github.com/black-forest-labs/flux", "flux1", "networks.lora_flux"),
            "sd3": ("stable-diffusion-3.5-medium/lora", "diffusers", "sd3", None),  # not kohya's network's keys
            "sd3-kohya": ("stable-diffusion-3.5-medium/lora", "https://github.com/Stability-AI/generative-models",
                          "sd3", "networks.lora_sd3")}
    for name, (arch, impl, version, module) in want.items():
        path = runs[name].output
        assert problems(path) == [], name
        with modelkit.open_model(path) as mf:
            meta = dict(mf.metadata)
        assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (arch, impl), name
        assert (meta["ss_base_model_version"], meta.get("ss_network_module")) == (version, module), name
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and meta["ss_steps"] == str(runs[name].steps)
    with modelkit.open_model(runs["flux"].output) as mf:
        meta = dict(mf.metadata)
    assert meta["ss_timestep_sampling"] == "flux_shift" and meta["ss_guidance_scale"] == "1"
    assert all(load_file(runs[n].output)[k].dtype == torch.float32 for n in ("flux", "sd3-kohya")
               for k in load_file(runs[n].output) if k.endswith(".alpha"))
    with modelkit.open_model(runs["sd3"].output) as mf:  # SD3: logit-normal, shift 3 = kohya's "shift"
        meta = dict(mf.metadata)
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"], meta["modelkit.flow.shift"]) == ("shift", "3", "3")


def test_kohya_sampling_names_only_what_kohya_does() -> None:
    """kohya's ``uniform`` and ``sigmoid`` are unshifted, its ``shift``/``flux_shift`` shift a logit-normal draw:
    uniform timesteps with a shift have no kohya name (the ``modelkit.flow.*`` keys say what was done)."""
    from modelkit.train.methods.dit_lora import _kohya_sampling

    assert [_kohya_sampling(s, m) for s in ("uniform", "sigmoid") for m in ("none", "fixed", "resolution")] == [
        "uniform", None, None, "sigmoid", "shift", "flux_shift"]


def _state_parts(result: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module -> (down, up) as trained, from the run's resume state (unfused, float32)."""
    state = load_file(os.path.join(result.states[-1], "state.safetensors"))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("param.") and key.endswith(".lora_down.weight"):
            module = key[len("param."):-len(".lora_down.weight")]
            out[module] = (value, state[f"param.{module}.lora_up.weight"])
    return out


@pytest.mark.parametrize("name, family", [("flux", "flux"), ("sd3-kohya", "sd3")])
def test_kohya_fusion_is_exact(bases: dict[str, str], runs: dict[str, Any], name: str, family: str) -> None:
    """Every fused kohya module (qkv, linear1) is the trained q/k/v(/mlp) modules exactly: the downs
    stacked, the ups block-diagonal (zeros elsewhere), alpha x parts; so baking it with ``modelkit
    merge lora`` adds to each diffusers weight just its own trained delta, alpha/rank x up @ down."""
    lora = load_file(runs[name].output)
    parts = _state_parts(runs[name])
    base_path = os.path.join(bases["flux" if family == "flux" else "sd3"], TRANSFORMER)
    base = load_file(base_path)
    table = fam.diffusers_weights({k: tuple(v.shape) for k, v in base.items()}, family)
    fused = 0
    for path, (_shape, _split, dpaths) in table.items():
        name_k = "lora_unet_" + path.replace(".", "_")
        if f"{name_k}.lora_down.weight" not in lora:
            assert not any(d in parts for d in dpaths), path
            continue
        down, up = lora[f"{name_k}.lora_down.weight"], lora[f"{name_k}.lora_up.weight"]
        assert torch.equal(down, torch.cat([parts[d][0] for d in dpaths]))
        assert torch.equal(up, torch.block_diag(*[parts[d][1] for d in dpaths]))
        assert lora[f"{name_k}.alpha"].item() == 2.0 * len(dpaths)
        fused += len(dpaths) > 1
    # ComfyUI maps lora_unet_<original weight name, dots as underscores> for every original weight
    comfy = {"lora_unet_" + path.replace(".", "_") for path in table}
    assert {k.rsplit(".", 2)[0] if "lora_" in k.rsplit(".", 2)[-2] else k.rsplit(".", 1)[0] for k in lora} <= comfy
    assert fused == (3 if family == "flux" else 5)  # Flux: img/txt qkv, linear1; SD3: x/context qkv x 2, attn2 in 0
    merged = Path(runs[name].output).with_name("merged.safetensors")
    res = modelkit.merge_lora(base_path, [(runs[name].output, 1.0)], merged, compute_dtype="fp64", force=True)
    assert res.base == family and res.loras[0].matched == len({k.rsplit(".", 2)[0] for k in lora})
    got = load_file(str(merged))
    for module, (down, up) in parts.items():
        want = (base[f"{module}.weight"].double() + 0.5 * (up.double() @ down.double())).float()
        torch.testing.assert_close(got[f"{module}.weight"], want, rtol=0, atol=0)  # one rounding, both sides
    untouched = [k for k in base if k.removesuffix(".weight") not in parts]
    assert untouched and all(torch.equal(got[k], base[k]) for k in untouched)


@contextmanager
def _no_warnings() -> Iterator[list[str]]:
    """Python warnings and WARNING+ records of the diffusers, peft and transformers loggers."""
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.name}: {record.getMessage()}")

    handler = Catch(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(f"warning: {w.message}" for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def _pipeline(folder: str) -> Any:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    base = load_base(ModelConfig(path=folder))
    te, tok = base.text_encoders, base.tokenizers
    if base.family == "flux":
        return FluxPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=te[0], tokenizer=tok[0],
                            text_encoder_2=te[1], tokenizer_2=tok[1], transformer=base.unet)
    return StableDiffusion3Pipeline(transformer=base.unet, scheduler=base.scheduler, vae=base.vae, text_encoder=te[0],
                                    tokenizer=tok[0], text_encoder_2=te[1], tokenizer_2=tok[1], text_encoder_3=te[2],
                                    tokenizer_3=tok[2])


@pytest.mark.parametrize("name, folder", [("flux-diffusers", "flux"), ("flux-double", "flux-double"), ("sd3", "sd3")])
def test_diffusers_loads_the_lora_and_fused_equals_modelkit_merge(bases: dict[str, str], runs: dict[str, Any],
                                                                   name: str, folder: str) -> None:
    """``load_lora_weights`` takes the file with no warning (but diffusers' note that it has no
    text-encoder modules); fused, the transformer's weights equal
    ``modelkit merge lora`` of the same file. ``flux-double`` is the kohya layout (fused qkv), on a
    Flux without single blocks: diffusers' kohya converter splits ``linear1`` by the full-size Flux
    widths (3072), so a tiny model's ``linear1`` cannot go through it.

    Tolerance: diffusers adds ``up @ down`` in float32 (kohya files: after scaling the factors by
    powers of two), modelkit in float64 then rounds once; the weights differ by float32 rounding of
    a rank-4 product, well under 1e-6 here (|weights| < 1)."""
    path = runs[name].output
    pipe = _pipeline(bases[folder])
    with _no_warnings() as seen:
        pipe.load_lora_weights(path)
    # diffusers' Flux and SD3 pipelines also try every CLIP encoder and log, for any LoRA without
    # text-encoder modules, that it has none; those lines (one per CLIP encoder) are the only records allowed.
    te_note = re.compile(r"^diffusers\.loaders\.lora_base: No LoRA keys associated to CLIPTextModel(WithProjection)? "
                         r"found with the prefix='(text_encoder|text_encoder_2)'\.")
    assert [m for m in seen if not te_note.match(m)] == []
    assert len(seen) == (1 if folder.startswith("flux") else 2)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = {k: v.detach() for k, v in pipe.transformer.state_dict().items()}
    base = load_file(os.path.join(bases[folder], TRANSFORMER))
    if name != "flux-double":  # ComfyUI reads diffusers-named LoRAs as transformer.<diffusers module>
        modules = {k.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight") for k in load_file(path)}
        assert modules <= {"transformer." + k.removesuffix(".weight") for k in base}
    out = Path(path).with_name(f"{name}-merged.safetensors")
    if folder == "flux-double":  # modelkit tells a diffusers Flux by its single blocks: merge the original keys
        original = out.with_name("flux-double-original.safetensors")
        save_file(dl.to_original(base, "flux"), str(original))
        modelkit.merge_lora(original, [(path, 1.0)], out, compute_dtype="fp64", force=True)
        merged = dl.to_diffusers(load_file(str(out)), "flux", "")
    else:
        modelkit.merge_lora(os.path.join(bases[folder], TRANSFORMER), [(path, 1.0)], out, compute_dtype="fp64",
                            force=True)
        merged = load_file(str(out))
    assert set(merged) == set(fused)
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert len(changed) >= 8
    for key in merged:
        torch.testing.assert_close(fused[key], merged[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("base", ["flux", "sd3"])
def test_resume_is_bit_exact(bases: dict[str, str], tmp_path: Path, base: str) -> None:
    full = train(_config(bases, base, tmp_path / "full", "train.max_steps=4", "output.save_every_steps=2"))
    state = os.path.join(tmp_path / "full", "lora-step000002-state")
    resumed = train(_config(bases, base, tmp_path / "resumed", "train.max_steps=4", f"output.resume={state}"))
    assert resumed.steps == 4 and resumed.losses == full.losses[2:]
    a, b = load_file(full.output), load_file(resumed.output)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_text_and_latent_caches_give_the_same_lora(bases: dict[str, str], tmp_path: Path) -> None:
    """Cached T5/CLIP outputs and VAE latents (batch size 1) give the uncached run bit for bit; the
    second run reuses them."""
    plain = train(_config(bases, "flux", tmp_path / "plain", "train.max_steps=2"))
    caches = ("train.max_steps=2", "dataset.cache_text=true", "dataset.cache_latents=true")
    cached = train(_config(bases, "flux", tmp_path / "cached", *caches))
    again = train(_config(bases, "flux", tmp_path / "cached", *caches, "output.force=true"))
    a, b = load_file(plain.output), load_file(cached.output)
    assert all(torch.equal(a[k], b[k]) for k in a) and cached.losses == plain.losses == again.losses
    assert any(n.startswith("text cache") and "0 encoded" in n for n in again.notes)
    assert any(n.startswith("latent cache") and "0 encoded" in n for n in again.notes)


def test_timestep_samplers_follow_their_distributions() -> None:
    n, sched = 20000, {"shift": 3.0, "use_dynamic_shifting": False}

    def draw(**kw: Any) -> torch.Tensor:
        return flow.sample_sigmas(FlowConfig(**kw), sched, n, torch.Generator().manual_seed(0), 256)

    u = draw(timestep_sampling="uniform", shift_mode="none")
    assert torch.equal(u, torch.rand(n, generator=torch.Generator().manual_seed(0)))
    assert abs(u.mean().item() - 0.5) < 0.01 and 0.0 <= u.min().item() and u.max().item() < 1.0
    logit = torch.logit(draw(shift_mode="none", logit_mean=-0.5, logit_std=1.5).double())
    assert abs(logit.mean().item() + 0.5) < 0.03 and abs(logit.std().item() - 1.5) < 0.03
    plain = draw(shift_mode="none")
    for s in (1.0, 3.0):
        shifted = draw(shift_mode="fixed", shift=s)
        torch.testing.assert_close(shifted, s * plain / (1 + (s - 1) * plain))
    assert abs(draw(shift_mode="fixed").median().item() - 0.75) < 0.01  # scheduler shift 3: median 3/(3+1)
    assert flow.resolution_mu(256, {}) == 0.5 and abs(flow.resolution_mu(4096, {}) - 1.15) < 1e-12
    for tokens in (256, 1024, 4096):
        e = math.exp(flow.resolution_mu(tokens, {}))
        got = flow.sample_sigmas(FlowConfig(shift_mode="resolution"), {}, n, torch.Generator().manual_seed(0), tokens)
        torch.testing.assert_close(got, e * plain / (e * plain + 1 - plain))
    assert flow.shift_mode(FlowConfig(), {"use_dynamic_shifting": True}) == "resolution"
    assert flow.shift_mode(FlowConfig(), {"shift": 3.0}) == "fixed"


def test_flux_packing_round_trips() -> None:
    x = torch.randn(2, 4, 6, 8)
    packed = flow.pack(x)
    assert packed.shape == (2, 12, 16) and torch.equal(flow.unpack(packed, 6, 8), x)
    ids = flow.image_ids(6, 8, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[5].tolist() == [0.0, 1.0, 1.0]


def test_unsupported_settings_are_one_line(bases: dict[str, str], tmp_path: Path) -> None:
    cases = [("locon", (), "locon on a flux base is not supported"),
             ("lora", ("network.train_text_encoder=true",), "network.train_text_encoder on a flux base"),
             ("lora", ("sample.every_steps=1", "sample.prompts=['x']"), "sample images during a flux run"),
             ("lora", ("train.min_snr_gamma=5",), "train.min_snr_gamma on a flux base")]
    for method, overrides, text in cases:
        cfg = replace(_config(bases, "flux", tmp_path / method, *overrides), method=method)
        with pytest.raises(UsageError) as info:
            train(cfg)
        assert text in str(info.value) and "\n" not in str(info.value)
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    toml = tmp_path / "flux.toml"
    toml.write_text(f'[model]\npath = "{bases["flux"]}"\n[dataset]\npath = "{bases["images"]}"\nresolution = 32\n'
                    f'min_bucket = 32\nmax_bucket = 32\nbucket_step = 16\nmin_image_size = 16\n[network]\ntrain_text_encoder = true\n[output]\ndir = "{tmp_path / "cli"}"\n'
                    '[train]\ndevice = "cpu"\n', encoding="utf-8")
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(toml), "-q"])
    assert r.exit_code == 2 and "network.train_text_encoder on a flux base" in r.stderr and r.stderr.count("\n") == 1
    single = tmp_path / "flux-single.safetensors"
    save_file(dl.to_original(dl.tiny("flux").state_dict(), "flux", "model.diffusion_model."), str(single))
    with pytest.raises(ConfigError) as err:
        load_base(ModelConfig(path=str(single)))
    assert "single-file flux checkpoint" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not a diffusers sd3 folder"):
        load_base(ModelConfig(path=bases["flux"], base="sd3"))


def test_docs_flux_block_is_a_valid_config(tmp_path: Path) -> None:
    from modelkit.train.tomlio import read_toml

    text = (Path(__file__).parents[2] / "docs" / "train.md").read_text(encoding="utf-8")
    block = text.split("## Flux and SD3 LoRA", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    (tmp_path / "flux.toml").write_text(block + '\n[dataset]\npath = "data"\n', encoding="utf-8")
    c = build_config("lora", read_toml(str(tmp_path / "flux.toml")))
    assert c.flow == FlowConfig() and c.network.layout == "auto" and c.model.path == "FLUX.1-dev"


class _Stub(torch.nn.Module):
    """A transformer that records what it is called with and answers ``answer(hidden_states)``."""

    def __init__(self, config: Any, answer: Any) -> None:
        super().__init__()
        self.config, self.answer, self.seen = config, answer, {}

    def forward(self, **kwargs: Any) -> tuple[torch.Tensor]:
        self.seen = kwargs
        return (self.answer(kwargs["hidden_states"]),)


@pytest.mark.parametrize("family, sampling", [("flux", "sigmoid"), ("sd3", "uniform")])
def test_flow_loss_feeds_the_transformer_what_diffusers_would(bases: dict[str, str], tmp_path: Path, family: str,
                                                              sampling: str) -> None:
    """``flow_loss`` against diffusers' own math, replaying its generator: the noise levels are the drawn
    timesteps shifted as ``FlowMatchEulerDiscreteScheduler.set_timesteps`` shifts them (Flux: ``mu`` of the
    image tokens as the Flux pipeline's ``calculate_shift`` gives it; SD3: the fixed shift 3), the input is
    ``scale_noise`` of the VAE-shifted-and-scaled latents, the timestep is sigma (Flux) or 1000 sigma (SD3),
    Flux-dev gets ``guidance_scale``, and the target is noise - x0: a transformer that predicts exactly that
    has loss 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from modelkit.train.step import Batch

    cfg = _config(bases, family, tmp_path, f"flow.timestep_sampling={sampling}", "flow.guidance_scale=2.5")
    base = load_base(cfg.model)
    base.tokenizers[-1].model_max_length = 8
    mean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = Batch(None, ["a red square", "a blue circle"], [(32, 32)] * 2, [(0, 0)] * 2, mean, torch.zeros_like(mean))
    vae = base.vae.config
    x0 = (mean - vae.shift_factor) * vae.scaling_factor
    replay = torch.Generator().manual_seed(11)
    torch.randn(mean.shape, generator=replay)  # the latent sample (std 0 here)
    noise = torch.randn(mean.shape, generator=replay)
    u = torch.rand(2, generator=replay) if sampling == "uniform" else torch.sigmoid(torch.randn(2, generator=replay))
    sched = FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
    c = base.scheduler.config
    mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)  # 4x4 patches
    sched.set_timesteps(sigmas=u.tolist(), mu=mu if family == "flux" else None)
    sigma, steps = sched.sigmas[:2], sched.timesteps[:2]
    want_in = sched.scale_noise(x0, steps, noise)
    inner = base.unet.config
    answer = (lambda h: flow.pack(noise - x0)) if family == "flux" else (lambda h: noise - x0)
    stub = _Stub(inner, answer)
    loss = flow.flow_loss(cfg, base, stub, batch, torch.Generator().manual_seed(11), "cpu", torch.float32)
    seen = stub.seen
    assert float(loss) < 1e-12  # the target's sign: noise - x0
    if family == "flux":
        torch.testing.assert_close(seen["hidden_states"], flow.pack(want_in))
        torch.testing.assert_close(seen["timestep"], sigma)  # Flux scales by 1000 itself
        assert seen["guidance"].dtype == torch.float32 and seen["guidance"].tolist() == [2.5, 2.5]
        assert seen["img_ids"].shape == (16, 3) and not seen["txt_ids"].any()
    else:
        torch.testing.assert_close(seen["hidden_states"], want_in)
        torch.testing.assert_close(seen["timestep"], steps)
        torch.testing.assert_close(seen["timestep"], 1000 * sigma)
        assert "guidance" not in seen
    wrong = _Stub(inner, lambda h: -answer(h))  # the opposite sign: 4 x the target's mean square
    loss = flow.flow_loss(cfg, base, wrong, batch, torch.Generator().manual_seed(11), "cpu", torch.float32)
    torch.testing.assert_close(loss, 4 * ((noise - x0) ** 2).mean())


def test_what_a_dit_base_cannot_train_is_refused_before_it_loads(bases: dict[str, str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """DreamBooth (with class images to make), fp16, image sizes off the 16-pixel grid, and a Fill/Canny/
    Depth transformer (more input channels than the latents) are refused in one line before the base is
    loaded and before anything is written."""
    import shutil

    import modelkit.train.base as tbase

    def no_load(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the base was loaded")

    fill = tmp_path / "flux-fill"
    shutil.copytree(bases["flux"], fill)
    conf = fill / "transformer" / "config.json"
    conf.write_text(conf.read_text(encoding="utf-8").replace('"in_channels": 16', '"in_channels": 32'),
                    encoding="utf-8")
    bases = {**bases, "flux-fill": str(fill)}
    monkeypatch.setattr(tbase, "load_base", no_load)
    db = _config(bases, "sd3", tmp_path / "x")
    db = replace(db, method="dreambooth", dreambooth=replace(db.dreambooth, num_class_images=2,
                                                             class_path=str(tmp_path / "class"), class_prompt="a toy"))
    cases: list[tuple[Config, type, str]] = [
        (db, UsageError, "dreambooth on a sd3 base is not supported"),
        (_config(bases, "flux", tmp_path / "x", "train.mixed_precision=fp16"), UsageError,
         'train.mixed_precision = "fp16" on a flux base'),
        (_config(bases, "sd3", tmp_path / "x", "dataset.resolution=40", "dataset.max_bucket=48"), ConfigError,
         "key dataset.resolution: must be a multiple of 16 for a sd3 base"),
        (_config(bases, "sd3", tmp_path / "x", "dataset.bucket_step=8"), ConfigError, "key dataset.bucket_step"),
        (_config(bases, "flux", tmp_path / "x", "dataset.max_bucket=40"), ConfigError, "key dataset.max_bucket"),
        (_config(bases, "flux-fill", tmp_path / "x"), ConfigError, "its transformer takes 32 input channels, not the 16"),
    ]
    for cfg, error, text in cases:
        with pytest.raises(error) as info:
            train(cfg)
        assert text in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not (tmp_path / "x").exists() and not (tmp_path / "class").exists()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="its transformer takes 32 input channels"):
        load_base(ModelConfig(path=str(fill)))


def test_a_kohya_layout_that_cannot_be_written_is_refused_before_step_1(bases: dict[str, str], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets that leave a fused original weight partly trained (here ``to_v`` left out of ``qkv``) are
    refused by ``prepare``, not after training; ``network.layout = "diffusers"`` trains them."""
    from modelkit.train.methods import dit_lora

    monkeypatch.setattr(dit_lora, "TARGETS", re.compile(r"^transformer_blocks\.\d+\.attn\.(?:to_q|to_k)$"))
    steps: list[Any] = []
    with pytest.raises(ConfigError, match=r"double_blocks\.0\.img_attn\.qkv is one weight in the kohya layout") as info:
        train(_config(bases, "flux", tmp_path / "k", "train.max_steps=1"), progress=lambda *a: steps.append(a))
    assert "\n" not in str(info.value) and not steps and not list((tmp_path / "k").glob("*.safetensors"))
    res = train(_config(bases, "flux", tmp_path / "d", "train.max_steps=1", "network.layout=diffusers"))
    assert {k.rsplit(".", 2)[0] for k in load_file(res.output)} == {"transformer.transformer_blocks.0.attn.to_q",
                                                                    "transformer.transformer_blocks.0.attn.to_k"}


def test_diffusers_reads_the_default_kohya_layout_with_a_fused_linear1_at_real_widths(tmp_path: Path) -> None:
    """The default Flux output names kohya's fused modules (``lora_unet_single_blocks_N_linear1``, ``..._qkv``).
    diffusers' kohya converter splits ``linear1`` by the real Flux widths (3072 x 3 + 12288), which the tiny
    training models lack; at real widths (one module, file only) the split it makes is exactly the rows of
    ``up`` for q, k, v and proj_mlp, with the same ``down`` and scale."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    rank, h, mlp = 4, 3072, 12288
    name = "lora_unet_single_blocks_0_linear1"
    down, up = torch.randn(rank, h, generator=g), torch.randn(3 * h + mlp, rank, generator=g)
    path = tmp_path / "flux-kohya.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
              str(path))
    sd = FluxPipeline.lora_state_dict(str(path))
    sd = sd[0] if isinstance(sd, tuple) else sd
    delta = (up @ down) * (2.0 / rank)
    rows = {"attn.to_q": (0, h), "attn.to_k": (h, 2 * h), "attn.to_v": (2 * h, 3 * h), "proj_mlp": (3 * h, 3 * h + mlp)}
    for part, (a, b) in rows.items():
        key = f"transformer.single_transformer_blocks.0.{part}"
        got = sd[f"{key}.lora_B.weight"].float() @ sd[f"{key}.lora_A.weight"].float()
        torch.testing.assert_close(got, delta[a:b], rtol=1e-5, atol=1e-6, msg=part)
