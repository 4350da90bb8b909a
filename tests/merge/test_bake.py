"""``merge_lora``: every format, every key style, SD1/SD2/SDXL, against float64 references (1 ulp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modelkit
from fixtures import merge_layouts as ml
from modelkit.errors import OutputExistsError, UsageError
from tests.conftest import same_bits
from tests.merge.reference import assert_within_ulp, merged

P = "model.diffusion_model."
K = {  # short names for the keys the cases use
    "q": P + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "v": P + "input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight",
    "k2": P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "proj_in": P + "input_blocks.1.1.proj_in.weight",
    "conv1": P + "input_blocks.1.0.in_layers.2.weight",
    "shortcut": P + "input_blocks.4.0.skip_connection.weight",
    "op": P + "input_blocks.3.0.op.weight",
    "ff0": P + "input_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight",
    "out0": P + "middle_block.1.transformer_blocks.0.attn1.to_out.0.weight",
    "mconv2": P + "middle_block.2.out_layers.3.weight",
    "up0": P + "output_blocks.2.1.conv.weight",
    "up1": P + "output_blocks.5.2.conv.weight",
    "emb": P + "output_blocks.6.0.emb_layers.1.weight",
    "ff2": P + "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
    "te_q": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "te_fc2": "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
}
CASES = [
    ("lora", "q"), ("lora", "k2"), ("lora", "conv1"), ("lora", "shortcut"), ("lora", "te_q"),
    ("lora-mid", "mconv2"), ("loha", "ff0"), ("loha", "conv1"), ("loha-tucker", "up0"),
    ("lokr", "ff2"), ("lokr", "up1"), ("lokr-ab", "emb"), ("lokr-full", "out0"), ("lokr-tucker", "op"),
    ("ia3", "te_q"), ("ia3-in", "te_fc2"), ("dora", "k2"), ("dora", "up1"), ("lora", "proj_in"),
]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("sd1") / "sd1.safetensors"
    return path, ml.checkpoint(str(path), ml.sd1())


def _bake(tmp: Path, base: Path, loras: list[tuple[Path, float]], **kw) -> tuple[modelkit.MergeLoraResult,
                                                                                  dict[str, torch.Tensor]]:
    out = tmp / "out.safetensors"
    res = modelkit.merge_lora(base, [(str(p), r) for p, r in loras], out, **kw)
    return res, load_file(out)


def _check(sd: dict[str, torch.Tensor], got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
           dtype: torch.dtype | None = None) -> None:
    """Touched tensors within 1 ulp of their float64 reference; all others bit-equal to the input."""
    assert set(got) == set(sd)
    for k, t in sd.items():
        want_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        assert got[k].dtype == want_dtype, k
        if k in expected:
            assert_within_ulp(got[k], expected[k], k)
        else:
            assert same_bits(got[k], t.to(want_dtype)), k


@pytest.mark.parametrize(("algo", "where"), CASES, ids=[f"{a}-{w}" for a, w in CASES])
def test_each_format_is_exact(tmp_path: Path, sd1, algo: str, where: str) -> None:
    base, sd = sd1
    key = K[where]
    parts = ml.module(algo.removesuffix("-in"), tuple(sd[key].shape), seed=len(where), on_input=algo.endswith("-in"))
    lora = tmp_path / "l.safetensors"
    ml.lora_file(str(lora), {ml.kohya_name(key): parts})
    res, got = _bake(tmp_path, base, [(lora, 0.7)])
    assert res.touched == 1 and res.loras[0].matched == 1
    _check(sd, got, {key: merged(sd[key], parts, 0.7)})


STYLE_SUFFIXES = {  # style -> (down, up) suffixes for the UNet, and for the text encoder
    "kohya-ldm": ((".lora_down.weight", ".lora_up.weight"),) * 2,
    "comfyui": ((".lora_down.weight", ".lora_up.weight"),) * 2,
    "diffusers-old": ((".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")),
    "diffusers": ((".lora_A.weight", ".lora_B.weight"),) * 2,
    "peft": ((".lora_A.weight", ".lora_B.weight"),) * 2,
    "attnproc": (("_lora.down.weight", "_lora.up.weight"),) * 2,
}


def _style_name(style: str, key: str) -> str:
    comp = "te" if key.startswith("cond") else "unet"
    path, ldm = ml.KNOWN_PATH[key], key[len(P):-len(".weight")]
    return {
        "kohya-ldm": "lora_unet_" + ldm.replace(".", "_"),
        "comfyui": "diffusion_model." + ldm,
        "diffusers-old": ("unet." if comp == "unet" else "text_encoder.") + path,
        "diffusers": ("unet." if comp == "unet" else "text_encoder.") + path,
        "peft": "base_model.model." + path,
        "attnproc": path.replace(".to_out.0", ".processor.to_out").replace(".to_q", ".processor.to_q"),
    }[style]


@pytest.mark.parametrize("style", list(STYLE_SUFFIXES))
def test_every_key_style_reaches_the_same_weights(tmp_path: Path, sd1, style: str) -> None:
    from fixtures import build

    base, sd = sd1
    keys = [K["q"], K["out0"]] + ([K["te_q"]] if style in ("diffusers-old", "diffusers", "peft") else [])
    flat, expected = {}, {}
    for i, key in enumerate(keys):
        parts = ml.module("lora", tuple(sd[key].shape), seed=i, alpha=None)
        down_s, up_s = STYLE_SUFFIXES[style][1 if key.startswith("cond") else 0]
        name = _style_name(style, key)
        flat[name + down_s], flat[name + up_s] = parts["lora_down.weight"], parts["lora_up.weight"]
        expected[key] = merged(sd[key], parts, 0.5)
    lora = tmp_path / "l.safetensors"
    build.write_safetensors(str(lora), flat)
    res, got = _bake(tmp_path, base, [(lora, 0.5)])
    assert res.loras[0].matched == len(keys), res.loras[0]
    _check(sd, got, expected)


def test_several_loras_apply_in_order_with_component_ratios(tmp_path: Path, sd1) -> None:
    base, sd = sd1
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    pa = {k: ml.module(alg, tuple(sd[K[k]].shape), seed=i) for i, (alg, k) in enumerate([("lora", "q"), ("dora", "v"),
                                                                                           ("lora", "te_q")])}
    pb = {k: ml.module(alg, tuple(sd[K[k]].shape), seed=9 + i) for i, (alg, k) in enumerate([("loha", "q"), ("ia3", "v")])}
    ml.lora_file(str(a), {ml.kohya_name(K[k]): p for k, p in pa.items()})
    ml.lora_file(str(b), {ml.kohya_name(K[k]): p for k, p in pb.items()})
    res, got = _bake(tmp_path, base, [(a, 0.8), (b, -0.3)], unet_ratio=0.5, te_ratio=2.0)
    expected = {
        K["q"]: merged(merged(sd[K["q"]], pa["q"], 0.4), pb["q"], -0.15),
        K["v"]: merged(merged(sd[K["v"]], pa["v"], 0.4), pb["v"], -0.15),
        K["te_q"]: merged(sd[K["te_q"]], pa["te_q"], 1.6),
    }
    _check(sd, got, expected)
    assert res.touched == 3
    meta = json.loads(modelkit.open_model(tmp_path / "out.safetensors").metadata["modelkit.merge"])
    assert [(x["file"], x["ratio"]) for x in meta["loras"]] == [("a.safetensors", 0.8), ("b.safetensors", -0.3)]
    assert meta["unet_ratio"] == 0.5 and meta["te_ratio"] == 2.0 and len(meta["loras"][0]["sha256"]) == 64


@pytest.mark.parametrize(("dtype", "compute"), [("bf16", "fp32"), ("fp32", "fp64")])
def test_output_dtype_and_compute_dtype(tmp_path: Path, sd1, dtype: str, compute: str) -> None:
    base, sd = sd1
    parts = ml.module("lora", tuple(sd[K["ff0"]].shape), seed=3)
    lora = tmp_path / "l.safetensors"
    ml.lora_file(str(lora), {ml.kohya_name(K["ff0"]): parts})
    _res, got = _bake(tmp_path, base, [(lora, 1.0)], dtype=dtype, compute_dtype=compute)
    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    _check(sd, got, {K["ff0"]: merged(sd[K["ff0"]], parts, 1.0)}, dtype=tdt)


def test_sd2_openclip_fused_qkv_gets_the_right_third(tmp_path: Path) -> None:
    base = tmp_path / "sd2.safetensors"
    sd = ml.checkpoint(str(base), ml.sd2())
    te = "cond_stage_model.model.transformer.resblocks.1."
    w = sd[te + "attn.in_proj_weight"].shape[1]
    mods, exp = {}, {}
    fused = sd[te + "attn.in_proj_weight"].to(torch.float64)
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        parts = ml.module("lora", (w, w), seed=i)
        mods[f"lora_te_text_model_encoder_layers_1_self_attn_{proj}"] = parts
        rows = slice(i * w, (i + 1) * w)
        fused[rows] = merged(sd[te + "attn.in_proj_weight"][rows], parts, 0.9)
    exp[te + "attn.in_proj_weight"] = fused
    for name, key in (("self_attn_out_proj", "attn.out_proj.weight"), ("mlp_fc1", "mlp.c_fc.weight")):
        parts = ml.module("lora", tuple(sd[te + key].shape), seed=7)
        mods[f"lora_te_text_model_encoder_layers_1_{name}"] = parts
        exp[te + key] = merged(sd[te + key], parts, 0.9)
    unet = P + "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"  # level 1, first attention
    parts = ml.module("lora", tuple(sd[unet].shape), seed=11)
    mods["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"] = parts
    exp[unet] = merged(sd[unet], parts, 0.9)
    lora = tmp_path / "l.safetensors"
    ml.lora_file(str(lora), mods)
    res, got = _bake(tmp_path, base, [(lora, 0.9)])
    assert res.base == "sd2" and res.touched == 4
    _check(sd, got, exp)


def test_sdxl_both_text_encoders_and_ldm_names(tmp_path: Path) -> None:
    base = tmp_path / "sdxl.safetensors"
    sd = ml.checkpoint(str(base), ml.sdxl())
    te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    te2 = "conditioner.embedders.1.model.transformer.resblocks.1."
    w = sd[te2 + "attn.in_proj_weight"].shape[1]
    cases = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (te1, None),
        "lora_te2_text_model_encoder_layers_1_self_attn_v_proj": (te2 + "attn.in_proj_weight", slice(2 * w, 3 * w)),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": (te2 + "mlp.c_fc.weight", None),
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k": (P + "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight", None),
        "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_q": (P + "input_blocks.5.1.transformer_blocks.0.attn1.to_q.weight", None),
    }
    mods, exp = {}, {}
    for i, (name, (key, rows)) in enumerate(cases.items()):
        full = sd[key]
        part = full if rows is None else full[rows]
        mods[name] = ml.module("loha" if i % 2 else "lora", tuple(part.shape), seed=i)
        value = full.to(torch.float64)
        if rows is None:
            value = merged(full, mods[name], 1.2)
        else:
            value[rows] = merged(part, mods[name], 1.2)
        exp[key] = value
    lora = tmp_path / "l.safetensors"
    ml.lora_file(str(lora), mods)
    res, got = _bake(tmp_path, base, [(lora, 1.2)])
    assert res.base == "sdxl" and res.touched == 5
    _check(sd, got, exp)


def test_unmatched_modules_fail_unless_allowed(tmp_path: Path, sd1) -> None:
    base, sd = sd1
    lora = tmp_path / "l.safetensors"
    ml.lora_file(str(lora), {ml.kohya_name(K["q"]): ml.module("lora", tuple(sd[K["q"]].shape)),
                             "lora_unet_no_such_layer": ml.module("lora", (4, 4))})
    with pytest.raises(UsageError, match=r"1 of its 2 modules match no weight.*lora_unet_no_such_layer"):
        _bake(tmp_path, base, [(lora, 1.0)])
    assert not (tmp_path / "out.safetensors").exists()
    res, _got = _bake(tmp_path, base, [(lora, 1.0)], allow_unmatched=True)
    assert res.loras[0].unmatched == ("lora_unet_no_such_layer",) and res.touched == 1
    assert any("matched nothing" in w for w in res.warnings)


def test_a_lora_for_another_base_is_caught_by_shapes(tmp_path: Path, sd1) -> None:
    base, _sd = sd1
    sd2 = ml.sd2()
    key = P + "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    lora = tmp_path / "sd2-lora.safetensors"
    ml.lora_file(str(lora), {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
                             ml.module("lora", sd2[key][0])})
    with pytest.raises(UsageError, match=r"do not fit .*\(sd1\); it looks made for sd2.*makes \[64, 1024\] but the weight is \[64, 768\]"):
        _bake(tmp_path, base, [(lora, 1.0)])


def test_inputs_must_be_what_they_claim(tmp_path: Path, sd1) -> None:
    base, sd = sd1
    lora = tmp_path / "l.safetensors"
    ml.lora_file(str(lora), {ml.kohya_name(K["q"]): ml.module("lora", tuple(sd[K["q"]].shape))})
    with pytest.raises(UsageError, match="is not a LoRA"):
        modelkit.merge_lora(base, [str(base)], tmp_path / "o.safetensors")
    with pytest.raises(UsageError, match="is not a checkpoint"):
        modelkit.merge_lora(lora, [str(lora)], tmp_path / "o.safetensors")
    with pytest.raises(UsageError, match="ratio"):
        modelkit.merge_lora(base, [f"{lora}:abc"], tmp_path / "o.safetensors")


def test_output_rules_dry_run_force_provenance(tmp_path: Path, sd1) -> None:
    base, sd = sd1
    lora = tmp_path / "l.safetensors"
    ml.lora_file(str(lora), {ml.kohya_name(K["q"]): ml.module("lora", tuple(sd[K["q"]].shape))})
    out = tmp_path / "out.safetensors"
    dry = modelkit.merge_lora(base, [f"{lora}:0.5"], out, dry_run=True)
    assert dry.status == "dry-run" and not out.exists() and dry.loras[0].ratio == 0.5
    res = modelkit.merge_lora(base, [f"{lora}:0.5"], out)
    assert res.size == out.stat().st_size == dry.size
    with pytest.raises(OutputExistsError):
        modelkit.merge_lora(base, [f"{lora}:0.5"], out)
    with pytest.raises(OutputExistsError, match="input"):
        modelkit.merge_lora(base, [f"{lora}:0.5"], base, force=True)
    modelkit.merge_lora(base, [f"{lora}:0.5"], out, force=True)
    with modelkit.open_model(out) as mf:
        md = mf.metadata
    assert md["modelkit.source"] == base.name and len(md["modelkit.source_sha256"]) == 64
    assert md["modelkit.source_sha256"] != "0" * 64
    assert any("l.safetensors at ratio 0.5" in c for c in json.loads(md["modelkit.changes"]))
    assert list(tmp_path.glob(".*modelkit-tmp")) == []


@pytest.mark.parametrize(("spec", "want"), [
    ("a.safetensors", ("a.safetensors", 1.0)),
    ("a.safetensors:0.8", ("a.safetensors", 0.8)),
    ("a.safetensors:-1.5", ("a.safetensors", -1.5)),
    ("http://127.0.0.1:8000/a.safetensors", ("http://127.0.0.1:8000/a.safetensors", 1.0)),
    ("http://127.0.0.1:8000/a.safetensors:0.3", ("http://127.0.0.1:8000/a.safetensors", 0.3)),
    ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0)),
    ("C:\\loras\\a.safetensors:2", ("C:\\loras\\a.safetensors", 2.0)),
])
def test_lora_specs_split_a_ratio_off_but_never_a_port_or_a_drive(spec: str, want: tuple[str, float]) -> None:
    from modelkit.ops.lora.bake import parse_spec

    assert parse_spec(spec) == want
