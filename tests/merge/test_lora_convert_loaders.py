"""``lora convert --to diffusers`` and ``--to peft`` give LoRAs that diffusers and PEFT apply as they
are, with the change ``modelkit merge lora`` bakes.

A kohya LoRA on every layer of a tiny SD1 (and SDXL) model that a loader can adapt (attention,
ResNet and sampler convolutions, 1x1 projections, every text-encoder projection, SDXL's fused
OpenCLIP q/k/v), with ranks and alphas that differ between modules, is converted; the diffusers
file goes through ``pipe.load_lora_weights`` + ``fuse_lora``, each PEFT folder through
``PeftModel.from_pretrained``. Every weight and the models' outputs must equal those of the same
model loaded from the checkpoint that ``merge lora`` baked, no library may warn, and the adapted
weights must really have changed.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402

import modelkit  # noqa: E402
from fixtures import merge_layouts as ml  # noqa: E402
from modelkit.cli.main import cli  # noqa: E402
from modelkit.errors import OutputExistsError  # noqa: E402
from modelkit.ops.lora.keymap import KeyMap, Target  # noqa: E402
from modelkit.ops.lora.tools import convert_lora  # noqa: E402
from modelkit.train.base import load_base  # noqa: E402
from modelkit.train.config import ModelConfig  # noqa: E402
from tests.train import tiny  # noqa: E402

#: (rank, alpha) cycled over the modules: three ranks, alphas that are not powers of two.
RANKS = ((4, 3.0), (2, 1.5), (3, 0.7), (4, 5.0))
#: The one warning allowed: PEFT 0.21 reads transformers 5's old ``is_gradient_checkpointing`` name
#: on any text model it wraps, whatever the adapter.
UNRELATED = ("`is_gradient_checkpointing` is deprecated",)
#: The last layer of the tiny SD2's OpenCLIP tower: diffusers' text encoder does not have it.
SHORT = {"sd2": "cond_stage_model.model.transformer.resblocks.2."}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sd1")
    ckpt = tiny.write_checkpoint(str(root / "tiny-sd1.safetensors"))
    return _prepared(root, ckpt, tiny.write_configs(str(root / "configs")), "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sd2")
    ckpt, configs, _ = tiny.family_checkpoint("sd2", str(root))
    return _prepared(root, ckpt, configs, "sd2")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sdxl")
    ckpt, configs, _ = tiny.family_checkpoint("sdxl", str(root))
    return _prepared(root, ckpt, configs, "sdxl")


def _prepared(root: Path, ckpt: str, configs: str, base: str) -> dict[str, str]:
    """A kohya LoRA on every loader-adaptable layer of ``ckpt``, and ``ckpt`` with it baked in."""
    with modelkit.open_model(ckpt) as mf:
        km = KeyMap.build({k: r.shape for k, r in mf.items()}, base)
    lora, mods = str(root / "kohya.safetensors"), {}
    targets = [t for t in km.targets if t.component != "unet" or t.path != t.ldm]
    for i, t in enumerate(targets):
        rank, alpha = RANKS[i % len(RANKS)]
        mods[km.name_for(t, "kohya")] = ml.module("lora", t.shape, rank=rank, alpha=alpha, seed=i)
    ml.lora_file(lora, mods)
    baked = str(root / "baked.safetensors")
    modelkit.merge_lora(ckpt, [lora], baked, compute_dtype="fp64")
    short = SHORT.get(base)
    loadable = [t for t in targets if short is None or not t.key.startswith(short)]
    return {"checkpoint": ckpt, "configs": configs, "lora": lora, "baked": baked, "base": base,
            "modules": str(len(targets)), "loadable": str(len(loadable)), "root": str(root)}


def _load(model: dict[str, str], which: str) -> Any:
    return load_base(ModelConfig(path=model[which], configs=model["configs"], base=model["base"]))


@contextmanager
def _no_warnings() -> Iterator[list[str]]:
    """Every Python warning and every WARNING+ record of diffusers, transformers and PEFT (whose
    loggers do not propagate to the root) is collected; the caller asserts there are none."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.name}: {record.getMessage()}")

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen += [f"{w.category.__name__}: {w.message}" for w in caught if not str(w.message).startswith(UNRELATED)]
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def _weights(module: Any) -> dict[str, torch.Tensor]:
    """A module's tensors under their plain names (a fused PEFT layer keeps its in ``base_layer``)."""
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}


def _same_as_baked(got: Any, baked: Any, original: Any, what: str) -> int:
    """Assert ``got`` holds ``baked``'s weights; return how many differ from ``original``'s."""
    g, b, o = _weights(got), _weights(baked), _weights(original)
    assert set(g) == set(b), what
    changed = 0
    for k, v in b.items():
        torch.testing.assert_close(g[k], v, rtol=1e-5, atol=1e-6, msg=f"{what} {k}")
        changed += int(not torch.equal(o[k], v))
    return changed


def _outputs(text_encoders: list[Any], unet: Any) -> list[torch.Tensor]:
    """The UNet's output on a fixed noisy latent, and each text encoder's last hidden state."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    outs = [te(ids).last_hidden_state for te in text_encoders]
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}}
    outs.append(unet(x, torch.tensor([10, 500]), ctx, **extra).sample)
    return outs


def _pipeline(base: Any) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if base.family == "sdxl":
        return StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoders[0],
                                         text_encoder_2=base.text_encoders[1], tokenizer=base.tokenizers[0],
                                         tokenizer_2=base.tokenizers[1], unet=base.unet, scheduler=base.scheduler)
    return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_file_loads_with_load_lora_weights_as_merge_bakes(family: str, request: pytest.FixtureRequest,
                                                                    tmp_path: Path) -> None:
    model = request.getfixturevalue(family)
    out = tmp_path / "lora.safetensors"
    r = CliRunner().invoke(cli, ["lora", "convert", model["lora"], "-o", str(out), "--to", "diffusers",
                                 "--base", family, "--checkpoint", model["checkpoint"]])
    assert r.exit_code == 0, r.output
    assert ("modules on the last layer of the SD 2 text encoder left out" in r.output) == (family == "sd2")
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert len(keys) == 2 * int(model["loadable"])
    prefixes = {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert {k.split(".")[0] for k in keys} == prefixes
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    config = json.loads(meta["lora_adapter_metadata"])
    for prefix in prefixes:  # ranks and alphas differ between modules: the patterns carry them
        assert config[f"{prefix}.r"] in (2, 3, 4) and config[f"{prefix}.peft_type"] == "LORA"
        assert config[f"{prefix}.rank_pattern"] and config[f"{prefix}.alpha_pattern"], prefix

    original, baked, base = _load(model, "checkpoint"), _load(model, "baked"), _load(model, "checkpoint")
    pipe = _pipeline(base)
    with _no_warnings() as seen, torch.no_grad():
        pipe.load_lora_weights(str(out))
        live = _outputs(base.text_encoders, base.unet)  # the LoRA layers running, not yet fused
        pipe.fuse_lora()
        fused = _outputs(base.text_encoders, base.unet)
    assert seen == []
    with torch.no_grad():
        want, before = _outputs(baked.text_encoders, baked.unet), _outputs(original.text_encoders, original.unet)
    for a, b, w, o in zip(live, fused, want, before):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, w, rtol=1e-4, atol=1e-5)
        assert float((w - o).abs().max()) > 1e-3  # the LoRA changes what the model computes
    changed = _same_as_baked(base.unet, baked.unet, original.unet, "unet")
    for i, te in enumerate(base.text_encoders):
        changed += _same_as_baked(te, baked.text_encoders[i], original.text_encoders[i], f"text_encoder {i}")
    assert changed == int(model["loadable"])  # every adapted weight moved, and nothing else


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_peft_folders_load_with_peft_model_from_pretrained_as_merge_bakes(family: str, request: pytest.FixtureRequest,
                                                                         tmp_path: Path) -> None:
    model = request.getfixturevalue(family)
    out = tmp_path / "adapters"
    res = convert_lora(model["lora"], out, to="peft", base=family, checkpoint=model["checkpoint"])
    parts = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    assert sorted(os.listdir(out)) == sorted(parts) and res.modules == int(model["loadable"])
    assert not [n for n in os.listdir(tmp_path) if n != "adapters"]  # no temp folder left beside it
    original, baked = _load(model, "checkpoint"), _load(model, "baked")
    models = [("unet", _load(model, "checkpoint").unet, baked.unet, original.unet)]
    for i, name in enumerate(parts[1:]):
        models.append((name, _load(model, "checkpoint").text_encoders[i], baked.text_encoders[i],
                       original.text_encoders[i]))
    changed = 0
    for name, fresh, want, before in models:
        folder = out / name
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] is None and cfg["rank_pattern"]
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            assert all(k.startswith("base_model.model.") for k in f.keys())
        with _no_warnings() as seen, torch.no_grad():
            pm = peft.PeftModel.from_pretrained(fresh, str(folder))
            if name == "unet":
                got, exp, old = (_outputs([], m)[-1] for m in (pm, want, before))
            else:
                ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(3))
                got, exp, old = (m(ids).last_hidden_state for m in (pm, want, before))
            merged = pm.merge_and_unload()
        assert seen == [], name
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5, msg=name)
        assert float((exp - old).abs().max()) > 1e-3, name
        changed += _same_as_baked(merged, want, before, name)
    assert changed == int(model["loadable"])


def _lora_on(model: dict[str, str], algo: str, path: Path) -> None:
    with modelkit.open_model(model["checkpoint"]) as mf:
        km = KeyMap.build({k: r.shape for k, r in mf.items()}, "sd1")
    t: Target = next(t for t in km.targets if t.path.endswith("attn2.to_k"))
    conv: Target = next(t for t in km.targets if t.path.endswith("resnets.0.conv1"))
    ml.lora_file(str(path), {km.name_for(t, "kohya"): ml.module("lora", t.shape, rank=2),
                             km.name_for(conv, "kohya"): ml.module(algo, conv.shape, rank=2, seed=1)})


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora", "lora-mid"])
@pytest.mark.parametrize("to", ["diffusers", "peft"])
def test_what_a_loader_cannot_hold_is_refused_in_one_line(sd1: dict[str, str], tmp_path: Path, algo: str,
                                                          to: str) -> None:
    src = tmp_path / "in.safetensors"
    _lora_on(sd1, algo, src)
    out = tmp_path / ("out.safetensors" if to == "diffusers" else "out")
    r = CliRunner().invoke(cli, ["lora", "convert", str(src), "-o", str(out), "--to", to, "--base", "sd1",
                                 "--checkpoint", sd1["checkpoint"]])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert f"which a {to} LoRA cannot hold" in r.stderr and "conv1" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_peft_folder_is_refused_when_it_exists_and_replaced_with_force(sd1: dict[str, str], tmp_path: Path) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "adapters"
    _lora_on(sd1, "lora", src)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_lora(src, out, to="peft", checkpoint=sd1["checkpoint"], base="sd1")
    assert os.listdir(out) == ["keep.txt"]
    res = convert_lora(src, out, to="peft", checkpoint=sd1["checkpoint"], base="sd1", force=True)
    assert res.status == "written" and res.tensors == 4 and sorted(os.listdir(out)) == ["unet"]
    cfg = json.loads((out / "unet" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                                             "down_blocks.0.resnets.0.conv1"]
    assert sorted(os.listdir(tmp_path)) == ["adapters", "in.safetensors"]  # the old folder and the temp one gone
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a folder"):
        convert_lora(src, tmp_path / "a-file", to="peft", checkpoint=sd1["checkpoint"], base="sd1", force=True)
    assert (tmp_path / "a-file").read_text() == "mine"
    dry = convert_lora(src, tmp_path / "dry", to="peft", checkpoint=sd1["checkpoint"], base="sd1", dry_run=True)
    assert dry.status == "dry-run" and not (tmp_path / "dry").exists()
    assert dry.size == (out / "unet" / "adapter_model.safetensors").stat().st_size
    r = CliRunner().invoke(cli, ["lora", "convert", str(src), "-o", str(tmp_path / "cli"), "--to", "peft", "--base",
                                 "sd1", "--checkpoint", sd1["checkpoint"], "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["output"] == str(tmp_path / "cli") and got["style"] == "peft" and got["tensors"] == 4
    sha = got["metadata"]["modelkit.source_sha256"]
    assert len(sha) == 64 and set(sha) != {"0"}  # the hash as written, not the placeholder


def test_convert_with_a_checkpoint_that_is_not_one_is_refused(sd1: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    _lora_on(sd1, "lora", src)
    r = CliRunner().invoke(cli, ["lora", "convert", str(src), "-o", str(tmp_path / "o.safetensors"), "--to",
                                 "diffusers", "--checkpoint", str(src)])
    assert r.exit_code == 2 and "is not a checkpoint" in r.stderr, r.output


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_modelkit_bakes_its_diffusers_and_peft_outputs_bit_for_bit(family: str, request: pytest.FixtureRequest,
                                                                  tmp_path: Path) -> None:
    """``merge lora`` reads the ranks and alphas back (``lora_adapter_metadata``, ``adapter_config.json``
    with per-module patterns) and bakes exactly what the kohya file bakes."""
    model = request.getfixturevalue(family)
    want = modelkit.load(model["baked"])
    diffusers_file, folder = tmp_path / "d.safetensors", tmp_path / "p"
    convert_lora(model["lora"], diffusers_file, to="diffusers", checkpoint=model["checkpoint"], base=family)
    convert_lora(model["lora"], folder, to="peft", checkpoint=model["checkpoint"], base=family)
    back = tmp_path / "k.safetensors"  # and back to kohya: the alphas return, the diffusers header does not
    convert_lora(diffusers_file, back, to="kohya", checkpoint=model["checkpoint"], base=family)
    with safe_open(str(back), "pt") as f:
        assert "lora_adapter_metadata" not in f.metadata()
    uses = [[str(diffusers_file)], [str(back)]]
    if family == "sd1":  # SDXL's two text encoders share PEFT's names: their folders say which is which
        uses.append([str(folder / p / "adapter_model.safetensors") for p in ("unet", "text_encoder")])
    for i, loras in enumerate(uses):
        out = tmp_path / f"o{i}.safetensors"
        res = modelkit.merge_lora(model["checkpoint"], loras, out, compute_dtype="fp64")
        assert sum(u.matched for u in res.loras) == int(model["modules"])
        got = modelkit.load(out)
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k], v), (loras, k)
