"""``lora extract`` (SVD), ``lora merge`` (exact concatenation and SVD re-rank), ``lora convert``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modelkit
from fixtures import build
from fixtures import merge_layouts as ml
from modelkit.errors import UsageError
from modelkit.ops.lora.tools import convert_lora, merge_loras
from tests.conftest import same_bits
from tests.merge.reference import delta

P = "model.diffusion_model."
Q = P + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = P + "input_blocks.1.0.in_layers.2.weight"
K2 = P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # its 768 input tells LoRA detection: sd1
TE_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def _lowrank(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) * 0.1
    down = torch.randn(rank, int(torch.tensor(shape[1:]).prod()), generator=g, dtype=torch.float64) * 0.1
    return (up @ down).reshape(shape)


def _product(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    up, down = sd[f"{name}.lora_up.weight"].double(), sd[f"{name}.lora_down.weight"].double()
    scale = float(sd[f"{name}.alpha"]) / down.shape[0]
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * scale


def test_extract_recovers_a_low_rank_fine_tune(tmp_path: Path) -> None:
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    sd = ml.checkpoint(str(base), ml.sd1(), dtype=torch.float32)
    changes = {Q: _lowrank(tuple(sd[Q].shape), 3, 1), CONV: _lowrank(tuple(sd[CONV].shape), 2, 2),
               TE_Q: _lowrank(tuple(sd[TE_Q].shape), 4, 3)}
    build.write_safetensors(str(tuned), {k: (v.double() + changes[k]).float() if k in changes else v
                                         for k, v in sd.items()})
    out = tmp_path / "x.safetensors"
    res = modelkit.extract_lora(base, tuned, out, rank=4, conv_rank=2, dtype="fp32", compute_dtype="fp64")
    assert res.modules == 3 and res.skipped > 100
    lora = load_file(out)
    names = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": Q,
             "lora_unet_down_blocks_0_resnets_0_conv1": CONV, "lora_te_text_model_encoder_layers_0_self_attn_q_proj": TE_Q}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora} == set(names)
    assert lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    for name, key in names.items():
        want = (tuned_v := load_file(tuned)[key].double()) - sd[key].double()
        got = _product(lora, name).reshape(want.shape)
        assert torch.allclose(got, want, atol=1e-6), name
        del tuned_v
    meta = modelkit.open_model(out).metadata
    assert meta["ss_network_dim"] == "4" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    baked = tmp_path / "baked.safetensors"
    modelkit.merge_lora(base, [str(out)], baked)
    back, ref = load_file(baked), load_file(tuned)
    for key in names.values():
        assert torch.allclose(back[key], ref[key], atol=1e-6)


def test_extract_rank_above_every_layer_is_said(tmp_path: Path) -> None:
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    sd = ml.checkpoint(str(base), ml.sd1(), dtype=torch.float32)
    build.write_safetensors(str(tuned), {**sd, Q: (sd[Q].double() + _lowrank(tuple(sd[Q].shape), 3, 1)).float()})
    out = tmp_path / "x.safetensors"
    res = modelkit.extract_lora(base, tuned, out, rank=100_000, dtype="fp32")
    full = min(sd[Q].shape)
    assert any("more than any layer's full rank" in w for w in res.warnings)
    assert modelkit.open_model(out).metadata["ss_network_dim"] == str(full)
    assert load_file(out)["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == full


def test_extract_truncates_to_the_best_rank(tmp_path: Path) -> None:
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    sd = ml.checkpoint(str(base), ml.sd1(), dtype=torch.float32)
    change = _lowrank(tuple(sd[Q].shape), 6, 5)
    build.write_safetensors(str(tuned), {**sd, Q: (sd[Q].double() + change).float()})
    out = tmp_path / "x.safetensors"
    modelkit.extract_lora(base, tuned, out, rank=2, dtype="fp32", compute_dtype="fp64")
    diff = load_file(tuned)[Q].double() - sd[Q].double()
    u, s, vh = torch.linalg.svd(diff)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    got = _product(load_file(out), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
    assert torch.allclose(got, best, atol=1e-6)
    with pytest.raises(UsageError, match="no adaptable layer differs"):
        modelkit.extract_lora(base, base, tmp_path / "y.safetensors")


def _two_loras(tmp_path: Path) -> tuple[Path, Path, dict, dict, dict[str, tuple[int, ...]]]:
    shapes = {k: s for k, (s, _) in ml.sd1_real_subset([K2, CONV, TE_Q]).items()}  # LoRA tools check real shapes
    a_mods = {K2: ml.module("lora", shapes[K2], rank=4, alpha=2.0, seed=1),
              CONV: ml.module("lora", shapes[CONV], rank=4, alpha=8.0, seed=2),
              TE_Q: ml.module("lora", shapes[TE_Q], rank=4, alpha=4.0, seed=3)}
    b_mods = {K2: ml.module("peft", shapes[K2], rank=2, seed=4), CONV: ml.module("peft", shapes[CONV], rank=2, seed=5)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ml.lora_file(str(a), {ml.kohya_name(k): p for k, p in a_mods.items()})
    ml.lora_file(str(b), {"unet." + ml.KNOWN_PATH[k]: p for k, p in b_mods.items()})
    return a, b, a_mods, b_mods, shapes


def test_lora_merge_exact_concatenates_ranks(tmp_path: Path) -> None:
    a, b, a_mods, b_mods, shapes = _two_loras(tmp_path)
    out = tmp_path / "m.safetensors"
    res = merge_loras([f"{a}:0.6", f"{b}:-0.4"], out, dtype="fp32")
    assert res.modules == 3 and res.base == "sd1"
    lora = load_file(out)
    for key in (K2, CONV, TE_Q):
        name = ml.kohya_name(key)
        want = 0.6 * delta(a_mods[key], shapes[key]) + (-0.4 * delta(b_mods[key], shapes[key]) if key in b_mods else 0)
        assert lora[f"{name}.lora_down.weight"].shape[0] == (6 if key in b_mods else 4)
        assert torch.allclose(_product(lora, name).reshape(want.shape), want, atol=1e-6), key


def test_lora_merge_svd_rerank_and_refusals(tmp_path: Path) -> None:
    a, b, a_mods, b_mods, shapes = _two_loras(tmp_path)
    c = tmp_path / "c.safetensors"
    c_mods = {K2: ml.module("loha", shapes[K2], rank=3, seed=6)}
    ml.lora_file(str(c), {ml.kohya_name(K2): c_mods[K2]})
    out = tmp_path / "m.safetensors"
    merge_loras([f"{a}:1.0", f"{c}:0.5"], out, rank=3, dtype="fp32")
    total = delta(a_mods[K2], shapes[K2]) + 0.5 * delta(c_mods[K2], shapes[K2])
    u, s, vh = torch.linalg.svd(total)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    got = _product(load_file(out), ml.kohya_name(K2))
    assert torch.allclose(got, best, atol=1e-5)
    with pytest.raises(UsageError, match="exact merge concatenates"):
        merge_loras([str(a), str(c)], tmp_path / "n.safetensors")


def test_convert_round_trip_gives_the_same_merge(tmp_path: Path) -> None:
    a, _b, _am, _bm, _shapes = _two_loras(tmp_path)
    mid, back = tmp_path / "diffusers.safetensors", tmp_path / "kohya.safetensors"
    res = convert_lora(a, mid, to="diffusers")
    assert res.modules == 3
    keys = set(load_file(mid))
    assert "unet." + ml.KNOWN_PATH[K2] + ".lora_A.weight" in keys
    assert any(k.startswith("text_encoder.") and k.endswith(".lora_B.weight") for k in keys)
    convert_lora(mid, back, to="kohya")
    base = tmp_path / "sd1.safetensors"
    ml.checkpoint(str(base), ml.sd1_real_subset([K2, CONV, TE_Q]))
    outs = []
    for i, lora in enumerate((a, mid, back)):
        out = tmp_path / f"o{i}.safetensors"
        modelkit.merge_lora(base, [f"{lora}:0.8"], out)
        outs.append(load_file(out))
    for k in outs[0]:  # the scales are powers of two, so folding them into lora_B is exact
        assert same_bits(outs[0][k], outs[1][k]) and same_bits(outs[0][k], outs[2][k]), k


def test_convert_sdxl_diffusers_names_to_kohya_ldm_names(tmp_path: Path) -> None:
    src = tmp_path / "d.safetensors"
    flat = {"unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(2, 2048),
            "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(1280, 2),
            "text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_A.weight": torch.zeros(2, 1280),
            "text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_B.weight": torch.zeros(5120, 2)}
    build.write_safetensors(str(src), flat)
    out = tmp_path / "k.safetensors"
    convert_lora(src, out, to="kohya")
    assert set(load_file(out)) == {
        "lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
        "lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
        "lora_te2_text_model_encoder_layers_3_mlp_fc1.lora_down.weight",
        "lora_te2_text_model_encoder_layers_3_mlp_fc1.lora_up.weight"}
    with pytest.raises(UsageError, match="PEFT adapters are folders"):
        convert_lora(src, tmp_path / "p.safetensors", to="peft")
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("side", ["tuned", "base"])
def test_extract_from_a_checkpoint_with_nan_names_it(tmp_path: Path, side: str) -> None:
    """A NaN or inf weight made the SVD raise a LinAlgError traceback; now one line naming the file."""
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    sd = ml.checkpoint(str(base), ml.sd1(), dtype=torch.float32)
    damaged = sd[Q].clone()
    damaged[0, 0] = float("nan") if side == "tuned" else float("inf")
    build.write_safetensors(str(tuned), {**sd, Q: (sd[Q] + 0.01) if side == "base" else damaged})
    if side == "base":
        build.write_safetensors(str(base), {**sd, Q: damaged})
    out = tmp_path / "x.safetensors"
    r = CliRunner().invoke(cli, ["lora", "extract", str(base), str(tuned), "-o", str(out), "--rank", "2"])
    bad = tuned if side == "tuned" else base
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert str(bad) in r.stderr and "holds NaN or inf values" in r.stderr and Q in r.stderr
    assert not out.exists()
