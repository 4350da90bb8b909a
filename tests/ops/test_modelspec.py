"""Every output modelkit writes carries a valid ModelSpec block (``modelkit.ops.modelspec``), its own title
when it is a new model, and no hash that describes the input's bytes (checked with ``modelspec_validator``)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import safe_open

import modelkit
from fixtures import build, detect_layouts
from fixtures import merge_layouts as ml
from fixtures.sd_layout import tiny_sd1_layout
from modelkit.cli.main import cli
from modelkit.ops import modelspec as ms
from modelkit.ops.lora.tools import convert_lora, merge_loras
from tests.ops.modelspec_validator import check_metadata, problems

P = "model.diffusion_model."
K2 = P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV = P + "input_blocks.1.0.in_layers.2.weight"
TE_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
#: What a downloaded file often carries: hashes of its own bytes, and a title of its own.
STALE = {"sshs_model_hash": "ab" * 32, "sshs_legacy_hash": "0123abcd", "modelspec.hash_sha256": "0x" + "cd" * 32}


def _meta(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _valid(path: str | Path) -> dict[str, str]:
    found = problems(path)
    assert not found, f"{path}: {found}"
    meta = _meta(path)
    assert not set(STALE) & set(meta), f"{path}: stale hash carried over"
    return meta


def _with_meta(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    build.write_safetensors(str(path), sd, metadata)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small inputs of every kind, several with stale hashes in their metadata."""
    d = tmp_path_factory.mktemp("inputs")
    out: dict[str, Path] = {}
    layout = ml.sd1_real_subset([K2, CONV, TE_Q])
    sd = ml.checkpoint(str(d / "tmp.safetensors"), layout, dtype=torch.float32)
    out["base"] = _with_meta(d / "base.safetensors", sd, {**STALE, "modelspec.title": "Base A"})
    g = torch.Generator().manual_seed(5)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) if k in (K2, TE_Q) else v for k, v in sd.items()}
    out["tuned"] = _with_meta(d / "tuned.safetensors", tuned, {"modelspec.title": "Tuned B"})
    shapes = {k: s for k, (s, _) in layout.items()}
    mods = {ml.kohya_name(K2): ml.module("lora", shapes[K2], rank=4, seed=1),
            ml.kohya_name(TE_Q): ml.module("lora", shapes[TE_Q], rank=4, seed=2)}
    ml.lora_file(str(d / "style.safetensors"), mods, {**STALE, "ss_network_module": "networks.lora"})
    out["lora"] = d / "style.safetensors"
    mods2 = {ml.kohya_name(K2): ml.module("lora", shapes[K2], rank=2, seed=3)}
    ml.lora_file(str(d / "other.safetensors"), mods2, {"modelspec.title": "Other LoRA"})
    out["lora2"] = d / "other.safetensors"
    build.sd_checkpoint(str(d / "old.ckpt"), tiny_sd1_layout())
    out["ckpt"] = d / "old.ckpt"
    build.a1111_embedding(str(d / "emb.pt"))
    out["embedding"] = d / "emb.pt"
    build.save_torch({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(d / "xl.pt"))
    out["embedding_xl"] = d / "xl.pt"
    module = OrderedDict([("linear.0.weight", torch.randn(16, 8)), ("linear.0.bias", torch.randn(16)),
                          ("linear.1.weight", torch.randn(8, 16)), ("linear.1.bias", torch.randn(8))])
    build.save_torch({768: [module, module], "layer_structure": [1, 2, 1], "activation_func": "relu",
                      "is_layer_norm": False, "use_dropout": False, "name": "hn"}, str(d / "hn.pt"))
    out["hypernetwork"] = d / "hn.pt"
    build.save_torch(detect_layouts.tensors(detect_layouts.ldm_vae(prefix="")), str(d / "vae.pt"))
    out["vae"] = d / "vae.pt"
    full = ml.checkpoint(str(d / "tmp1.safetensors"), ml.sd1())
    out["full"] = _with_meta(d / "full.safetensors", full, dict(STALE))
    sd2 = ml.checkpoint(str(d / "tmp2.safetensors"), ml.sd2(), dtype=torch.float32)
    out["sd2"] = _with_meta(d / "sd2.safetensors", sd2, {"modelspec.prediction_type": "v"})
    tuned2 = {k: v + 0.01 if k.endswith("attn2.to_k.weight") else v for k, v in sd2.items()}
    out["sd2_tuned"] = _with_meta(d / "sd2t.safetensors", tuned2, {})
    return out


# --- the module ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "pred", "kind", "arch"), [
    ("sd1", None, "checkpoint", "stable-diffusion-v1"),
    ("sd2", "v", "lora", "stable-diffusion-v2-768-v/lora"),
    ("sd2", "v_prediction", "checkpoint", "stable-diffusion-v2-768-v"),
    ("sd2", "eps", "embedding", "stable-diffusion-v2-512/textual-inversion"),
    ("sd2", None, "lora", "stable-diffusion-v2-512/lora"),
    ("sdxl", "epsilon", "hypernetwork", "stable-diffusion-xl-v1-base/hypernetwork"),
    ("sdxl-refiner", None, "checkpoint", "stable-diffusion-xl-v1-refiner"),
    (None, None, "vae", "unknown/vae"),
])
def test_architecture_ids(base: str | None, pred: str | None, kind: str, arch: str) -> None:
    block = ms.modelspec_block(kind=kind, base=base, prediction=pred, title="t")
    assert block["modelspec.architecture"] == arch
    assert not check_metadata(block)


def test_block_has_the_required_keys_and_known_extras() -> None:
    block = ms.modelspec_block(kind="lora", base="sd2", prediction="v", title="x", names=["lora_unet_down_blocks_0"],
                               date=True, merged_from=["a", "b,c"])
    assert block["modelspec.sai_model_spec"] == "1.0.0" and block["modelspec.implementation"] == "diffusers"
    assert block["modelspec.resolution"] == "768x768" and block["modelspec.prediction_type"] == "v"
    assert block["modelspec.merged_from"] == "a, b c" and block["modelspec.date"].endswith("Z")
    assert not check_metadata(block)
    assert ms.implementation("lora", ["lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_x"]) == ms.IMPL_SGM
    assert ms.implementation("checkpoint", [K2]) == ms.IMPL_SGM
    assert ms.implementation("vae", ["encoder.down_blocks.0.resnets.0.conv1.weight"]) == ms.IMPL_DIFFUSERS
    assert ms.implementation("hypernetwork") == ms.IMPL_A1111
    assert ms.kohya_tags("sd2", "v") == {"ss_base_model_version": "sd_v2_v", "ss_v2": "True",
                                         "ss_v_parameterization": "True"}
    assert ms.kohya_tags("sd1")["ss_v2"] == "False" and ms.kohya_tags(None) == {}


def test_fill_keeps_valid_input_values_replaces_invalid_ones_and_drops_hashes() -> None:
    changes: list[str] = []
    old = {"modelspec.title": "Mine", "modelspec.architecture": "stable-diffusion-v2/lora",
           "modelspec.resolution": "512", **STALE, "ss_network_dim": "4"}
    got = ms.fill(old, ms.modelspec_block(kind="lora", base="sd2", prediction="v", title="file"), changes=changes)
    assert got["modelspec.title"] == "Mine" and got["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert got["modelspec.resolution"] == "768x768" and got["ss_network_dim"] == "4"
    assert not set(STALE) & set(got) and not check_metadata(got)
    assert any("sshs_model_hash" in c for c in changes) and any("not a valid ModelSpec value" in c for c in changes)
    forced = ms.fill(old, {"modelspec.title": "new"}, override=("modelspec.title",))
    assert forced["modelspec.title"] == "new"


def test_settled_decides_the_implementation_from_the_names_written() -> None:
    meta = ms.modelspec_block(kind="checkpoint", base="sd1", title="t")
    assert ms.settled(meta, ["unet.down_blocks.0.x"])["modelspec.implementation"] == ms.IMPL_DIFFUSERS
    assert ms.settled(meta, [K2])["modelspec.implementation"] == ms.IMPL_SGM


def test_validator_catches_what_the_spec_forbids() -> None:
    bad = {"modelspec.sai_model_spec": "2", "modelspec.architecture": "stable-diffusion-v2/lora",
           "modelspec.title": " ", "modelspec.resolution": "512", "modelspec.prediction_type": "eps",
           "modelspec.date": "yesterday", "modelspec.hash_sha256": "abc", "ss_base_model_version": "sd_v2"}
    found = " | ".join(check_metadata(bad))
    for word in ("implementation", "title", "sai_model_spec", "not a Stable Diffusion ID", "resolution",
                 "prediction_type", "date", "hash_sha256", "ss_v2"):
        assert word in found, word


# --- every command that writes a file -------------------------------------------------------------


@pytest.mark.parametrize(("name", "arch"), [
    ("ckpt", "unknown"), ("embedding", "stable-diffusion-v1/textual-inversion"),
    ("embedding_xl", "stable-diffusion-xl-v1-base/textual-inversion"),
    ("hypernetwork", "stable-diffusion-v1/hypernetwork"), ("vae", "/vae"), ("lora", "stable-diffusion-v1/lora"),
    ("base", "stable-diffusion-v1"),
])
def test_convert(files: dict[str, Path], tmp_path: Path, name: str, arch: str) -> None:
    r = modelkit.convert(files[name], tmp_path / "out.safetensors")
    meta = _valid(r.output)
    assert meta["modelspec.architecture"].endswith(arch)
    if name == "base":
        assert meta["modelspec.title"] == "Base A"  # the input's own title stays: convert makes no new model
        assert any("sshs_model_hash" in c for c in json.loads(meta["modelkit.changes"]))


@pytest.mark.parametrize("part", [None, "unet", "te", "vae"])
def test_prune(files: dict[str, Path], tmp_path: Path, part: str | None) -> None:
    r = modelkit.prune(files["full"], tmp_path / "out.safetensors", dtype="fp16", part=part)
    meta = _valid(r.output)
    suffix = {None: "", "unet": "/unet", "te": "/text-encoder", "vae": "/vae"}[part]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" + suffix


def test_merge_lora(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "baked.safetensors"
    modelkit.merge_lora(files["base"], [(str(files["lora"]), 0.5)], out)
    meta = _valid(out)
    assert meta["modelspec.title"] == "baked" and meta["modelspec.merged_from"] == "Base A, style"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and "modelspec.date" in meta


@pytest.mark.parametrize("three", [False, True])
def test_merge_models_own_title_and_provenance(files: dict[str, Path], tmp_path: Path, three: bool) -> None:
    import hashlib

    out = tmp_path / "mix.safetensors"
    paths = [files["base"], files["tuned"]] + ([files["base"]] if three else [])
    modelkit.merge_models(*paths, out=out, alpha=0.25)
    meta = _valid(out)
    assert meta["modelspec.title"] == "mix" and meta["modelspec.merged_from"].startswith("Base A, Tuned B")
    record = json.loads(meta["modelkit.merge"])
    weights = [0.75, 0.25] if not three else [1.0, 0.25, -0.25]
    for entry, path, w, role in zip(record["inputs"], paths, weights, "ABC"):
        assert entry == {"role": role, "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                         "weight": w}


def test_merge_models_dry_run_keeps_placeholders(files: dict[str, Path], tmp_path: Path) -> None:
    r = modelkit.merge_models(files["base"], files["tuned"], out=tmp_path / "d.safetensors", dry_run=True)
    assert not check_metadata(r.metadata) and not (tmp_path / "d.safetensors").exists()


def test_lora_extract_sd1_and_sd2(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    modelkit.extract_lora(files["base"], files["tuned"], out, rank=2)
    meta = _valid(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_v2"] == "False"
    assert meta["modelspec.title"] == "x" and meta["ss_base_model_version"] == "sd_v1"
    out2 = tmp_path / "x2.safetensors"
    modelkit.extract_lora(files["sd2"], files["sd2_tuned"], out2, rank=2)
    meta = _valid(out2)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.resolution"] == "768x768" and meta["modelspec.prediction_type"] == "v"


def test_lora_merge(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    merge_loras([str(files["lora"]), str(files["lora2"])], out)
    meta = _valid(out)
    assert meta["modelspec.title"] == "m" and meta["modelspec.merged_from"] == "style, Other LoRA"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_v2"] == "False"


@pytest.mark.parametrize(("to", "impl"), [("kohya", ms.IMPL_DIFFUSERS), ("peft", ms.IMPL_DIFFUSERS),
                                          ("diffusers", ms.IMPL_DIFFUSERS)])
def test_lora_convert_drops_the_stale_hash(files: dict[str, Path], tmp_path: Path, to: str, impl: str) -> None:
    out = tmp_path / (to if to == "peft" else f"{to}.safetensors")
    convert_lora(files["lora"], out, to=to)
    outputs = sorted(out.glob("*/adapter_model.safetensors")) if to == "peft" else [out]
    assert outputs
    for o in outputs:
        meta = _valid(o)
        assert meta["modelspec.implementation"] == impl and meta["ss_base_model_version"] == "sd_v1"
        res = CliRunner().invoke(cli, ["hash", "--check", str(o)])
        assert res.exit_code == 0, res.output


def test_validator_sees_a_stale_hash(files: dict[str, Path]) -> None:
    assert any("stale" in p for p in problems(files["lora"]))


def test_prune_of_a_lora_says_lora(files: dict[str, Path], tmp_path: Path) -> None:
    r = modelkit.prune(files["lora"], tmp_path / "out.safetensors", dtype="fp16")
    assert _valid(r.output)["modelspec.architecture"] == "stable-diffusion-v1/lora"
