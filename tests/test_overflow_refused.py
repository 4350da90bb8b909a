"""A cast that turns finite values into inf is refused (exit 2, nothing written) unless --allow-overflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import modelkit
from fixtures import build
from fixtures import merge_layouts as ml
from modelkit.cli.main import cli
from modelkit.errors import CastOverflowError, ModelkitError

K2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _left(folder: Path) -> list[str]:
    """Everything in ``folder`` but the inputs: no output, no temp file."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("in"))


@pytest.fixture()
def big(tmp_path: Path) -> Path:
    """An fp32 checkpoint with values beyond fp16's 65504 in two tensors (one inf that is not counted)."""
    src = tmp_path / "in.safetensors"
    build.write_safetensors(str(src), {
        "model.diffusion_model.a.weight": torch.tensor([1.0, 70000.0, -1e9, float("inf")]),
        "model.diffusion_model.b.weight": torch.tensor([1e6, 2.0]),
        "ok": torch.ones(3),
    })
    return src


def test_prune_fp16_overflow_is_refused(big: Path) -> None:
    r = _run("prune", str(big), "--dtype", "fp16")
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("modelkit: error: ") and r.stderr.count("\n") == 1, r.stderr
    line = r.stderr
    assert "in.pruned.safetensors" in line and "3 finite values would overflow to inf in fp16 in 2 tensors" in line
    assert "model.diffusion_model.a.weight (2)" in line and "model.diffusion_model.b.weight (1)" in line
    assert "--allow-overflow" in line and "--dtype fp32/bf16" in line
    assert _left(big.parent) == []
    r = _run("prune", str(big), "--dtype", "fp16", "--json")
    (entry,) = json.loads(r.stdout)["files"]
    assert r.exit_code == 2 and entry["status"] == "error" and entry["error"] == "CastOverflowError"
    assert _left(big.parent) == []


def test_prune_allow_overflow_writes_with_a_warning(big: Path) -> None:
    r = _run("prune", str(big), "--dtype", "fp16", "--allow-overflow")
    assert r.exit_code == 0, r.output
    assert "3 values in 2 tensors overflowed to inf in fp16" in r.stderr
    got = load_file(big.parent / "in.pruned.safetensors")
    assert got["model.diffusion_model.a.weight"].isinf().sum() == 3


def test_prune_bf16_and_dry_run_are_not_refused(big: Path) -> None:
    assert _run("prune", str(big), "--dtype", "fp16", "--dry-run").exit_code == 0  # nothing is cast in a dry run
    assert _run("prune", str(big), "--dtype", "bf16").exit_code == 0


def test_api_raises_the_error_class(big: Path) -> None:
    with pytest.raises(CastOverflowError) as info:
        modelkit.prune(big, dtype="fp16")
    err = info.value
    assert isinstance(err, ModelkitError) and isinstance(err, ValueError)
    assert err.counts == {"model.diffusion_model.a.weight": 2, "model.diffusion_model.b.weight": 1}
    assert _left(big.parent) == []


def test_more_than_three_tensors_are_summed(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    build.write_safetensors(str(src), {f"t{i}": torch.full((i + 1,), 1e5) for i in range(5)})
    with pytest.raises(CastOverflowError) as info:
        modelkit.prune(src, dtype="fp16")
    msg = str(info.value)
    assert "15 finite values would overflow to inf in fp16 in 5 tensors: t0 (1), t1 (2), t2 (3) and 2 more" in msg


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ovf")
    base, lora = d / "in_base.safetensors", d / "in_style.safetensors"
    sd = ml.checkpoint(str(base), ml.sd1(), seed=0)
    ml.lora_file(str(lora), {ml.kohya_name(K2): ml.module("lora", tuple(sd[K2].shape))})
    return base, lora


def test_merge_lora_huge_ratio_is_refused(tmp_path: Path, lora_pair: tuple[Path, Path]) -> None:
    base, lora = lora_pair
    out = tmp_path / "out.safetensors"
    r = _run("merge", "lora", str(base), f"{lora}:1e30", "-o", str(out))
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and K2 in r.stderr and "overflow to inf" in r.stderr
    assert "--allow-overflow" in r.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CastOverflowError):
        modelkit.merge_lora(base, [(str(lora), 1e30)], out)
    assert list(tmp_path.iterdir()) == []
    r = _run("merge", "lora", str(base), f"{lora}:1e30", "-o", str(out), "--allow-overflow")
    assert r.exit_code == 0, r.output
    assert "overflowed to inf" in r.stderr and load_file(out)[K2].isinf().any()


def test_merge_models_overflow_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "in_a.safetensors", tmp_path / "in_b.safetensors"
    w = "model.diffusion_model.x.weight"
    build.write_safetensors(str(a), {w: torch.tensor([1.0, 60000.0]), "model.diffusion_model.y.weight": torch.ones(2)})
    build.write_safetensors(str(b), {w: torch.tensor([1.0, -60000.0]), "model.diffusion_model.y.weight": torch.ones(2)})
    out = tmp_path / "m.safetensors"
    r = _run("merge", "models", str(a), str(b), "--alpha", "-1", "-o", str(out), "--dtype", "fp16")  # A*2 - B = 180000
    assert r.exit_code == 2, r.output
    assert f"{w} (1)" in r.stderr and r.stderr.count("\n") == 1
    assert _left(tmp_path) == []
    r = _run("merge", "models", str(a), str(b), "--alpha", "-1", "-o", str(out), "--dtype", "fp16", "--allow-overflow")
    assert r.exit_code == 0, r.output
    assert "overflowed to inf" in r.stderr and load_file(out)[w].isinf().sum() == 1



def test_lora_merge_overflow_is_refused(tmp_path: Path) -> None:
    """lora merge writes fp16 by default: a ratio that blows the factors past 65504 is refused."""
    shape = ml.sd1_real_subset([K2])[K2][0]  # LoRA tools check real shapes
    lora = tmp_path.parent / f"{tmp_path.name}-a.safetensors"  # outside tmp_path, which must stay empty
    second = tmp_path.parent / f"{tmp_path.name}-b.safetensors"
    ml.lora_file(str(lora), {ml.kohya_name(K2): ml.module("lora", shape, rank=4, seed=1)})
    ml.lora_file(str(second), {ml.kohya_name(K2): ml.module("lora", shape, rank=4, seed=2)})
    out = tmp_path / "merged.safetensors"
    r = _run("lora", "merge", f"{lora}:1e30", f"{second}:1", "-o", str(out))
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and "overflow to inf" in r.stderr and "--allow-overflow" in r.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CastOverflowError):
        modelkit.ops.lora.tools.merge_loras([(str(lora), 1e30), (str(second), 1.0)], out)
    r = _run("lora", "merge", f"{lora}:1e30", f"{second}:1", "-o", str(out), "--allow-overflow")
    assert r.exit_code == 0, r.output
    assert any(t.isinf().any() for t in load_file(out).values())
    r = _run("lora", "merge", f"{lora}:1e30", f"{second}:1", "-o", str(tmp_path / "wide.safetensors"), "--dtype", "fp32")
    assert r.exit_code == 0, r.output  # fp32 holds it


def test_lora_extract_overflow_is_refused(tmp_path: Path) -> None:
    base, tuned = tmp_path / "in_base.safetensors", tmp_path / "in_tuned.safetensors"
    sd = ml.checkpoint(str(base), ml.sd1(), dtype=torch.float32)
    build.write_safetensors(str(tuned), {k: (v * 1e6 if k == K2 else v) for k, v in sd.items()})
    out = tmp_path / "x.safetensors"
    r = _run("lora", "extract", str(base), str(tuned), "-o", str(out), "--rank", "2")
    assert r.exit_code == 2, r.output
    assert "overflow to inf" in r.stderr and not out.exists()
    r = _run("lora", "extract", str(base), str(tuned), "-o", str(out), "--rank", "2", "--allow-overflow")
    assert r.exit_code == 0, r.output


def test_the_overflow_warning_says_what_happened_in_each_dtype() -> None:
    """Written anyway (allow_overflow): float16 values became inf; float8_e4m3fn has no inf, torch saturates."""
    from modelkit.dtypes import BY_NAME
    from modelkit.formats.safetensors_write import OutTensor
    from modelkit.ops.streaming import overflow_warning

    half = [OutTensor("a", BY_NAME["float16"], (2,), data=b"\0" * 4)]
    e4 = [OutTensor("a", BY_NAME["float8_e4m3fn"], (2,), data=b"\0" * 2)]
    assert overflow_warning({"a": 3}, half) == "3 values in 1 tensors overflowed to inf: a (3)"
    assert "saturated to +-448" in overflow_warning({"a": 3}, e4)
