"""modelkit.load / load_into on the CPU (CUDA tests skip cleanly without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import modelkit
from fixtures import build, hostile
from modelkit.cli.main import cli
from modelkit.load import load, load_into
from tests.conftest import same_bits

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("mode", ["zip", "legacy", "cuda", "pickle4", "safetensors"])
def test_load_matches_the_reader_on_every_container(tmp_path: Path, mode: str) -> None:
    state = {k: v for k, v in build.all_dtypes_state().items() if v.dtype != torch.complex128}
    path = tmp_path / "m.bin"
    if mode == "safetensors":
        state = {k: v for k, v in state.items() if not k.startswith("view.")}
        build.write_safetensors(str(path), state)
    else:
        build.save_torch(state, str(path), mode)
    sd = load(path)
    assert sorted(sd) == sorted(state)  # safetensors keeps its own (offset) order
    for k, t in state.items():
        assert same_bits(sd[k], t), k


def test_zero_copy_views_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    build.write_safetensors(str(path), {"a": torch.arange(1024, dtype=torch.float32), "b": torch.ones(3)})
    sd = load(path)
    # both tensors are views of one mapping of the file: their addresses are as far apart as in the file
    with modelkit.open_model(path) as mf:
        gap = mf["b"].byte_range[0] - mf["a"].byte_range[0]
    assert sd["b"].data_ptr() - sd["a"].data_ptr() == gap
    sd["a"][0] = 42.0  # private mapping: writes never reach the file
    assert load(path)["a"][0].item() == 0.0


def test_dtype_casts_floats_only_and_keys_subset(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.randn(4, 4), "ids": torch.arange(77), "m": torch.ones(2, dtype=torch.bool)}, path)
    sd = load(path, dtype="float16")
    assert sd["w"].dtype == torch.float16 and sd["ids"].dtype == torch.int64 and sd["m"].dtype == torch.bool
    sub = load(path, keys=["ids"])
    assert list(sub) == ["ids"]
    with pytest.raises(modelkit.ModelkitError, match="not in the file"):
        load(path, keys=["nope"])


def test_load_refuses_hostile_files(tmp_path: Path, marker: str) -> None:
    path = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(path), marker)
    with pytest.raises(modelkit.UnsafeFileError):
        load(path)
    r = CliRunner().invoke(cli, ["load", str(path)])
    assert r.exit_code == 1 and "refused" in r.stderr


def test_load_into_fills_a_module_in_place(tmp_path: Path) -> None:
    src = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    path = tmp_path / "m.ckpt"
    torch.save(src.state_dict(), path)
    dst = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    before = dst[0].weight.data_ptr()
    assert load_into(dst, path) == []
    assert dst[0].weight.data_ptr() == before  # filled in place, no new tensors
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[1].bias, src[1].bias)
    bigger = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    with pytest.raises(modelkit.ModelkitError, match="missing"):
        load_into(bigger, path)
    assert load_into(bigger, path, strict=False) == ["2.weight", "2.bias"]
    wrong = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.LayerNorm(4))
    with pytest.raises(modelkit.ModelkitError, match="shape"):
        load_into(wrong, path, strict=False)


def test_load_cli_bench_json(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    r = CliRunner().invoke(cli, ["load", "--bench", "--repeat", "1", "--json", str(path)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    names = [row["loader"] for row in doc["loaders"]]
    assert names[0] == "modelkit.load" and "torch.load(weights_only)" in names


@CUDA
@pytest.mark.cuda
def test_cuda_load_bit_equal_and_cast_on_gpu(tmp_path: Path) -> None:
    state = {k: v for k, v in build.all_dtypes_state().items() if v.dtype != torch.complex128}
    path = tmp_path / "m.pt"
    build.save_torch(state, str(path), "zip")
    sd = load(path, device="cuda")
    for k, t in state.items():
        assert sd[k].device.type == "cuda"
        assert same_bits(sd[k].cpu(), t), k
    half = load(path, device="cuda", dtype=torch.float16)
    assert half["t.float32"].dtype == torch.float16 and half["t.int64"].dtype == torch.int64


@pytest.mark.parametrize("staging", [64, 1000, 1 << 20])
def test_staged_pipeline_on_the_cpu(tmp_path: Path, staging: int) -> None:
    """The CUDA pipeline's logic (staging fills, alignment, dtype groups, views) run on the CPU
    with tiny staging buffers, so every tensor crosses fill boundaries."""
    from modelkit.load import _load_staged

    state = {k: v for k, v in build.all_dtypes_state().items() if v.dtype != torch.complex128}
    state["big"] = torch.randn(700)
    path = tmp_path / "m.pt"
    build.save_torch(state, str(path), "zip")
    with modelkit.open_model(path) as mf:
        sd = _load_staged(mf, list(mf.values()), torch.device("cpu"), None, staging)
        half = _load_staged(mf, list(mf.values()), torch.device("cpu"), torch.float16, staging)
    for k, t in state.items():
        assert same_bits(sd[k], t), k
    assert half["big"].dtype == torch.float16 and torch.equal(half["big"], state["big"].half())
    assert half["t.int64"].dtype == torch.int64


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("staging", [64, 1000, 1 << 20])
def test_staged_pipeline_on_cuda_with_tiny_staging(tmp_path: Path, staging: int) -> None:
    """Many fills per tensor: every pinned staging buffer is reused while earlier copies may still
    be in flight, so a missing event wait would show as wrong bytes."""
    from modelkit.load import _load_staged

    state = {k: v for k, v in build.all_dtypes_state().items() if v.dtype != torch.complex128}
    state["big"] = torch.randn(70_000)
    path = tmp_path / "m.pt"
    build.save_torch(state, str(path), "zip")
    dev = torch.device("cuda")
    with modelkit.open_model(path) as mf:
        junk = torch.full((1 << 20,), 7, dtype=torch.uint8, device=dev)  # queued work on freed memory
        del junk
        sd = _load_staged(mf, list(mf.values()), dev, None, staging)
        half = _load_staged(mf, list(mf.values()), dev, torch.float16, staging)
    for k, t in state.items():
        assert sd[k].device.type == "cuda" and same_bits(sd[k].cpu(), t), k
    assert torch.equal(half["big"].cpu(), state["big"].half())


@CUDA
@pytest.mark.cuda
def test_cuda_load_into_and_key_subset(tmp_path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2)).cuda()
    want = {k: torch.randn_like(v.cpu()) for k, v in module.state_dict().items()}
    path = tmp_path / "m.safetensors"
    from safetensors.torch import save_file

    save_file(want, str(path))
    assert load_into(module, path) == []
    for k, v in module.state_dict().items():
        assert v.device.type == "cuda" and torch.equal(v.cpu(), want[k]), k
    sub = load(path, device="cuda:0", keys=["0.weight"])
    assert list(sub) == ["0.weight"] and torch.equal(sub["0.weight"].cpu(), want["0.weight"])
