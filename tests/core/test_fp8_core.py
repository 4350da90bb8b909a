"""fp8 without torch: prune writes plain, saturated and scaled fp8 with ``numcast`` (whose casts
``tests/core/test_numcast.py`` proves equal to torch's), and inspect, verify and diff read scaled
files. Runs in the core install too (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import modelkit
from fixtures import fp8 as fx
from fixtures import torchfree
from modelkit import numcast
from modelkit.formats import safetensors_write


def test_prune_to_fp8_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetensors_write, "have_torch", lambda: False)
    tensors = fx.fp16_model(3)
    src = tmp_path / "m.safetensors"
    torchfree.save_safetensors(tensors, str(src))
    for mode in (None, "clamp", "scaled"):
        out = tmp_path / f"{mode}.safetensors"
        modelkit.prune(src, out, dtype="fp8_e5m2", fp8=mode)
        assert modelkit.verify(src, out).ok, mode
        with modelkit.open_model(out) as mf:
            w = mf["double_blocks.0.img_mlp.0.weight"]
            x = tensors["double_blocks.0.img_mlp.0.weight"].astype(np.float32)
            assert w.dtype.name == "float8_e5m2"
            if mode == "scaled":
                scale = np.float32(np.abs(x).max()) / np.float32(57344.0)
                assert mf["double_blocks.0.img_mlp.0.weight_scale"].read("numpy") == scale
                want = numcast.to_fp8_bits(x / scale, "float8_e5m2")
            else:
                want = numcast.to_fp8_bits(x, "float8_e5m2")
            assert np.array_equal(w.read("numpy").reshape(-1), want.reshape(-1)), mode
            assert mf["img_in.weight"].dtype.name == "float16"
    info = modelkit.inspect(tmp_path / "scaled.safetensors")
    assert info.quantization["scaled"] == 3 and info.quantization["formats"] == ["float8_e5m2"]
    d = {e.name: e for e in modelkit.diff(src, tmp_path / "scaled.safetensors").entries}
    assert d["single_blocks.0.linear1.weight"].change == "dtype"
