"""``merge_models``: weighted sum, add difference, block weights, components, VAE, against float64."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modelkit
from fixtures import build
from fixtures import merge_layouts as ml
from modelkit.errors import UsageError
from modelkit.ops.merge import block_names
from tests.conftest import same_bits
from tests.merge.reference import assert_all_within_ulp

UNET = "model.diffusion_model."
SD1_BLOCKS = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]


@pytest.fixture(scope="module")
def abc(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    d = tmp_path_factory.mktemp("models")
    paths = [d / f"{n}.safetensors" for n in "abc"]
    layout = ml.sd1()
    sds = [ml.checkpoint(str(p), layout, seed=i) for i, p in enumerate(paths)]
    return paths, sds


def block(key: str) -> str | None:
    """The usual block-weight convention, written out: which weight a key takes (None: BASE)."""
    if not key.startswith(UNET):
        return None
    rest = key[len(UNET):]
    if rest.startswith("time_embed."):
        return "IN00"
    if rest.startswith("out."):
        return "OUT11"
    if m := re.match(r"input_blocks\.(\d+)\.", rest):
        return f"IN{int(m.group(1)):02d}"
    if rest.startswith("middle_block."):
        return "M00"
    if m := re.match(r"output_blocks\.(\d+)\.", rest):
        return f"OUT{int(m.group(1)):02d}"
    return None


def _expect(sds: list[dict[str, torch.Tensor]], key: str, alpha: float) -> torch.Tensor:
    a, b = sds[0][key].to(torch.float64), sds[1][key].to(torch.float64)
    if len(sds) == 3:
        return a + (b - sds[2][key].to(torch.float64)) * alpha
    return a * (1 - alpha) + b * alpha


def _check(got: dict[str, torch.Tensor], sds: list[dict[str, torch.Tensor]], weight_of) -> None:
    a = sds[0]
    assert set(got) == set(a)
    pairs = {}
    for k, t in a.items():
        merged_part = k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model."))
        w = weight_of(k) if merged_part else 0  # schedule buffers and other tensors stay A's
        if not t.is_floating_point() or w == 0:
            assert same_bits(got[k], t), k
        elif w == 1 and len(sds) == 2:
            assert same_bits(got[k], sds[1][k]), k
        else:
            pairs[k] = (got[k], _expect(sds, k, w))
    assert_all_within_ulp(pairs)


def test_weighted_sum(tmp_path: Path, abc) -> None:
    paths, sds = abc
    out = tmp_path / "ws.safetensors"
    res = modelkit.merge_models(paths[0], paths[1], out=out, alpha=0.3)
    assert res.mode == "weighted-sum" and res.merged > 0
    _check(load_file(out), sds[:2], lambda k: 0.3)
    record = json.loads(modelkit.open_model(out).metadata["modelkit.merge"])
    assert record["models"] == ["a.safetensors", "b.safetensors"] and record["alpha"] == 0.3


def test_add_difference(tmp_path: Path, abc) -> None:
    paths, sds = abc
    out = tmp_path / "ad.safetensors"
    res = modelkit.merge_models(*paths, out=out, alpha=0.7)
    assert res.mode == "add-difference"
    _check(load_file(out), sds, lambda k: 0.7)


def test_the_same_file_twice_is_said(tmp_path: Path, abc) -> None:
    paths, sds = abc
    res = modelkit.merge_models(paths[0], paths[1], paths[1], out=tmp_path / "ad.safetensors", alpha=0.7)
    assert any("B and C are the same file" in w and "the result is A" in w for w in res.warnings)
    got = load_file(tmp_path / "ad.safetensors")
    differ = [k for k, t in sds[0].items() if not torch.equal(got[k], t)]  # +0 for -0 is fine
    assert not differ, (differ[:3], [(got[k].dtype, sds[0][k].dtype) for k in differ[:3]])
    res = modelkit.merge_models(paths[0], paths[0], out=tmp_path / "ws.safetensors", alpha=0.3)
    assert any("A and B are the same file" in w for w in res.warnings)


def test_block_weights_26_with_base_first(tmp_path: Path, abc) -> None:
    paths, sds = abc
    ws = [round(0.04 * i, 2) for i in range(25)]
    ws[3], ws[20] = 0.0, 1.0  # IN03 copies A, OUT07 copies B
    out = tmp_path / "bw.safetensors"
    res = modelkit.merge_models(paths[0], paths[1], out=out, block_weights=",".join(map(str, [0.25, *ws])))
    weights = dict(zip(SD1_BLOCKS, ws))
    assert res.block_weights == {"BASE": 0.25, **weights}
    _check(load_file(out), sds[:2], lambda k: weights[b] if (b := block(k)) else 0.25)


def test_block_weights_25_use_alpha_as_base_and_counts_are_checked(tmp_path: Path, abc) -> None:
    paths, sds = abc
    ws = [0.5] * 12 + [0.9] + [0.1] * 12
    out = tmp_path / "bw25.safetensors"
    modelkit.merge_models(paths[0], paths[1], out=out, alpha=0.6, block_weights=ws, components=["unet", "te"])
    weights = dict(zip(SD1_BLOCKS, ws))
    vae = lambda k: k.startswith("first_stage_model.")  # noqa: E731
    _check(load_file(out), sds[:2], lambda k: 0 if vae(k) else (weights[b] if (b := block(k)) else 0.6))
    with pytest.raises(UsageError, match=r"25 block weights .* or 26 with BASE first, not 3"):
        modelkit.merge_models(paths[0], paths[1], out=tmp_path / "x.safetensors", block_weights="1,2,3")


def test_sdxl_has_its_own_block_count(tmp_path: Path) -> None:
    layout = ml.sdxl()
    names = block_names(list(layout))
    assert names == [f"IN{i:02d}" for i in range(6)] + ["M00"] + [f"OUT{i:02d}" for i in range(6)]


def test_components_and_baked_vae(tmp_path: Path, abc) -> None:
    paths, sds = abc
    vae = {k[len("first_stage_model."):]: (torch.randn(t.shape) * 0.1).to(torch.float32)
           for k, t in sds[0].items() if k.startswith("first_stage_model.")}
    vae_path = tmp_path / "my.vae.safetensors"
    build.write_safetensors(str(vae_path), vae)
    out = tmp_path / "cv.safetensors"
    res = modelkit.merge_models(paths[0], paths[1], out=out, alpha=0.4, components=["te"], vae=vae_path)
    got = load_file(out)
    pairs = {}
    for k, t in sds[0].items():
        if k.startswith("first_stage_model."):
            assert same_bits(got[k], vae[k[len("first_stage_model."):]].to(t.dtype)), k
        elif k.startswith("cond_stage_model.") and t.is_floating_point():
            pairs[k] = (got[k], _expect(sds[:2], k, 0.4))
        else:
            assert same_bits(got[k], t), k
    assert pairs
    assert_all_within_ulp(pairs)
    assert res.vae_tensors == len(vae)
    bad = tmp_path / "bad.vae.safetensors"
    build.write_safetensors(str(bad), {"decoder.conv_in.weight": torch.zeros(3)})
    with pytest.raises(UsageError, match="lacks"):
        modelkit.merge_models(paths[0], paths[1], out=tmp_path / "x.safetensors", vae=bad)


def test_different_bases_are_refused(tmp_path: Path, abc) -> None:
    paths, _ = abc
    other = tmp_path / "sd2.safetensors"
    ml.checkpoint(str(other), ml.sd2())
    with pytest.raises(UsageError, match=r"differ in shape .* A is sd1, this is sd2"):
        modelkit.merge_models(paths[0], other, out=tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="three models"):
        modelkit.merge_models(paths[0], paths[1], out=tmp_path / "x.safetensors", mode="add-difference")
    with pytest.raises(UsageError, match="components"):
        modelkit.merge_models(paths[0], paths[1], out=tmp_path / "x.safetensors", components=["clip"])


def test_output_dtype_cast_and_ema_dropped(tmp_path: Path) -> None:
    layout = ml.sd1()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sa = ml.checkpoint(str(a), {**layout, "model_ema.decay": ((), "float32")}, seed=1)
    sb = ml.checkpoint(str(b), layout, seed=2)
    out = tmp_path / "o.safetensors"
    res = modelkit.merge_models(a, b, out=out, alpha=0.5, dtype="fp32", compute_dtype="fp64")
    got = load_file(out)
    assert "model_ema.decay" not in got and any("EMA" in c for c in res.changes)
    pairs = {}
    for k in layout:
        if sa[k].is_floating_point() and not k.startswith(("model.diffusion_model.", "cond_stage_model.",
                                                            "first_stage_model.")):
            assert same_bits(got[k], sa[k].to(torch.float32)), k
        elif sa[k].is_floating_point():
            assert got[k].dtype == torch.float32
            pairs[k] = (got[k], sa[k].to(torch.float64) * 0.5 + sb[k].to(torch.float64) * 0.5)
    assert_all_within_ulp(pairs)
