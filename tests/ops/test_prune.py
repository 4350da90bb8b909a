"""``modelkit.prune``: EMA, junk, casts that leave ints alone, overflow, broken keys, parts."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelkit
from fixtures import build
from fixtures.sd_layout import tiny_sd1_layout
from modelkit.errors import UsageError
from modelkit.ops.prune import ema_name
from tests.conftest import same_bits

POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def ema_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny SD 1.x fp32 checkpoint with EMA, optimizer state and a loss module."""
    folder = tmp_path_factory.mktemp("ema")
    path = folder / "sd.ckpt"
    layout = tiny_sd1_layout(ema=True)
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = OrderedDict()
    for name, (shape, dt) in layout.items():
        if dt == "int64":
            sd[name] = torch.arange(shape[-1]).reshape(shape)
        elif dt == "int32":
            sd[name] = torch.tensor(1234, dtype=torch.int32)
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.02
    sd["loss.discriminator.main.0.weight"] = torch.ones(4, 3)
    build.save_torch({"state_dict": sd, "global_step": 10, "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}],
                      "lr_schedulers": [{"last_epoch": 3}]}, str(path))
    return path, sd


def test_ema_only_swaps_ema_into_the_unet(ema_ckpt: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, sd = ema_ckpt
    r = modelkit.prune(src, tmp_path / "o.safetensors", ema="only")
    got = load_file(r.output)
    unet = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert r.ema_swapped == len(unet) > 0
    for k in unet:
        assert same_bits(got[k], sd[ema_name(k)]), k
        assert not same_bits(got[k], sd[k])
    assert not any(k.startswith(("model_ema.", "loss.", "optimizer", "lr_scheduler")) for k in got)
    assert ema_name("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    assert r.removed["ema"] == len(unet) + 2 and r.removed["junk"] >= 2
    assert got[POS].dtype == torch.int64


def test_ema_drop_and_keep(ema_ckpt: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, sd = ema_ckpt
    got = load_file(modelkit.prune(src, tmp_path / "d.safetensors", ema="drop").output)
    assert not any(k.startswith("model_ema.") for k in got)
    assert all(same_bits(got[k], sd[k]) for k in got)
    got = load_file(modelkit.prune(src, tmp_path / "k.safetensors", ema="keep").output)
    assert "model_ema.decay" in got and "model_ema.num_updates" in got
    assert "loss.discriminator.main.0.weight" not in got


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_casts_floats_only(ema_ckpt: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, dtype: str,
                                 torch_dtype: torch.dtype) -> None:
    src, sd = ema_ckpt
    r = modelkit.prune(src, tmp_path / "c.safetensors", ema="keep", dtype=dtype)
    got = load_file(r.output)
    assert got["model_ema.num_updates"].dtype == torch.int32 and int(got["model_ema.num_updates"]) == 1234
    assert got[POS].dtype == torch.int64 and got[POS].tolist() == [list(range(77))]
    k = "model.diffusion_model.out.2.weight"
    assert same_bits(got[k], sd[k].to(torch_dtype))
    assert r.casts == sum(1 for v in got.values() if v.is_floating_point())
    assert r.overflow == {}


def test_fp16_overflow_is_counted(tmp_path: Path) -> None:
    src = tmp_path / "big.safetensors"
    build.write_safetensors(str(src), {"w": torch.tensor([1.0, 70000.0, -1e9, float("inf")]), "ok": torch.ones(2)})
    r = modelkit.prune(src, dtype="fp16", allow_overflow=True)  # refused without it: tests/test_overflow_refused.py
    assert r.overflow == {"w": 2}  # the inf that was already inf does not count
    assert any("overflowed to inf" in w for w in r.warnings)
    assert load_file(r.output)["w"].isinf().sum() == 3


@pytest.mark.parametrize("bad", ["float", "wrong"])
def test_position_ids_are_fixed(tmp_path: Path, bad: str) -> None:
    ids = torch.arange(77).reshape(1, 77)
    value = ids.float() if bad == "float" else ids.clone().index_fill_(1, torch.tensor([40, 41]), 3)
    src = tmp_path / "te.ckpt"
    build.save_torch({"state_dict": {POS: value, "cond_stage_model.x": torch.ones(2)}}, str(src))
    r = modelkit.prune(src)
    got = load_file(r.output)
    assert got[POS].dtype == torch.int64 and torch.equal(got[POS], ids)
    assert POS in r.fixed and ("float32" in r.fixed[POS] if bad == "float" else "2 wrong" in r.fixed[POS])
    # A correct one is left alone.
    good = tmp_path / "good.ckpt"
    build.save_torch({"state_dict": {POS: ids}}, str(good))
    assert modelkit.prune(good).fixed == {}


def test_part_vae_drops_its_prefix(ema_ckpt: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, sd = ema_ckpt
    r = modelkit.prune(src, out_dir=tmp_path, part="vae")
    assert r.output == str(tmp_path / "sd.vae.safetensors")
    got = load_file(r.output)
    vae = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    assert set(got) == set(vae) and all(same_bits(got[k], v) for k, v in vae.items())
    assert "encoder.conv_in.weight" in got and "decoder.conv_out.bias" in got
    te = load_file(modelkit.prune(src, out_dir=tmp_path, part="te").output)
    assert te and all(k.startswith("cond_stage_model.") for k in te)
    unet = load_file(modelkit.prune(src, out_dir=tmp_path, part="unet", ema="only").output)
    assert all(k.startswith("model.diffusion_model.") for k in unet)
    k = "model.diffusion_model.out.2.weight"
    assert same_bits(unet[k], sd[ema_name(k)])


def test_bad_options_and_empty_part(tmp_path: Path) -> None:
    src = tmp_path / "v.safetensors"
    build.write_safetensors(str(src), {"w": torch.ones(2)})
    with pytest.raises(UsageError, match="--dtype"):
        modelkit.prune(src, dtype="int8")
    with pytest.raises(UsageError, match="--ema"):
        modelkit.prune(src, ema="sometimes")
    with pytest.raises(modelkit.FormatError, match="no vae tensors"):
        modelkit.prune(src, part="vae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def test_memory_tracks_the_largest_tensor_not_the_model(tmp_path: Path) -> None:
    """32 tensors of 2 MiB: Python-side peak stays near one tensor (plus the 4 MiB hash buffer)."""
    src = tmp_path / "m.ckpt"
    build.save_torch({f"w{i}": torch.full((512, 1024), float(i)) for i in range(32)}, str(src))
    tracemalloc.start()
    try:
        r = modelkit.prune(src, dtype="fp16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.stats is not None and r.stats.buffer_bytes < 4 << 20
    assert peak < 12 << 20, peak  # the model is 64 MiB
    got = load_file(r.output)
    assert got["w31"].dtype == torch.float16 and float(got["w31"][0, 0]) == 31.0


def test_torch_leaves_a_core_to_the_source_hash_and_gets_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """During a cast-heavy write the background sha256 keeps one core; torch's pool is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _prune_and_count_threads(tmp_path, monkeypatch)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _prune_and_count_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkit.formats import safetensors_write

    seen: list[int] = []
    real = safetensors_write._cast_stepped

    def spy(*a: Any, **k: Any) -> int:
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(safetensors_write, "_cast_stepped", spy)
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64), "b": torch.randn(64)}, str(src))
    r = modelkit.prune(src, dtype="fp16")
    assert seen == [1, 1]
    assert r.metadata["modelkit.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_ema_only_without_ema_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.randn(4, 4)}, str(src))
    with pytest.raises(UsageError, match="has no EMA weights"):
        modelkit.prune(src, ema="only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("name", ["out.ckpt", "out.pt", "out.safetensors.tmp", "out"])
def test_outputs_must_be_named_safetensors(tmp_path: Path, name: str) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(src))
    for call in (lambda: modelkit.convert(src, tmp_path / name), lambda: modelkit.prune(src, tmp_path / name)):
        with pytest.raises(UsageError, match="is not a .safetensors name"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert modelkit.convert(src, tmp_path / "OUT.SafeTensors").output.endswith("OUT.SafeTensors")


def test_nothing_to_prune_is_said(tmp_path: Path) -> None:
    src = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.randn(2, 4, dtype=torch.float16)}, str(src))
    r = modelkit.prune(src)
    assert any(w.startswith("nothing to prune") for w in r.warnings)
    assert not any(w.startswith("nothing to prune") for w in modelkit.prune(src, dtype="fp32", force=True).warnings)
