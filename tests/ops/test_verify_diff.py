"""verify proves conversions exact; diff shows what differs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

import modelkit
from fixtures import build
from modelkit.cli.main import cli


def test_verify_convert_prune_and_embedding(tmp_path: Path) -> None:
    src = tmp_path / "m.pt"
    build.save_torch(build.all_dtypes_state() | {"w": torch.randn(8, 8)}, str(src), "zip")
    state = build.all_dtypes_state()
    del state["t.complex128"]  # safetensors has no complex128
    src2 = tmp_path / "m2.pt"
    build.save_torch(state | {"w": torch.randn(8, 8)}, str(src2), "legacy")
    out = tmp_path / "m2.safetensors"
    modelkit.convert(src2, out)
    r = modelkit.verify(src2, out)
    assert r.ok and r.checked == len(state) + 1

    pruned = tmp_path / "p.safetensors"
    modelkit.prune(src2, pruned, dtype="fp16")
    r = modelkit.verify(src2, pruned)
    assert r.ok and r.cast > 0  # float32 -> float16, one rounding, bit-exact against torch's cast

    emb = tmp_path / "e.pt"
    build.a1111_embedding(str(emb))
    emb_out = tmp_path / "e.safetensors"
    modelkit.convert(emb, emb_out)
    assert modelkit.verify(emb, emb_out).ok


def test_verify_catches_a_changed_value(tmp_path: Path) -> None:
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    build.write_safetensors(str(a), {"w": torch.zeros(4), "v": torch.ones(2)})
    build.write_safetensors(str(b), {"w": torch.tensor([0.0, 0.0, 1e-7, 0.0]), "v": torch.ones(2)})
    r = modelkit.verify(a, b)
    assert not r.ok and [m.name for m in r.mismatches] == ["w"]
    res = CliRunner().invoke(cli, ["verify", "--json", str(a), str(b)])
    assert res.exit_code == 1 and json.loads(res.stdout)["mismatches"][0]["name"] == "w"


def test_diff_lists_every_kind_of_change(tmp_path: Path) -> None:
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    build.write_safetensors(str(a), {"same": torch.ones(2), "val": torch.zeros(3), "shape": torch.ones(2),
                                     "dt": torch.ones(2), "gone": torch.ones(1)}, metadata={"x": "1"})
    build.write_safetensors(str(b), {"same": torch.ones(2), "val": torch.tensor([0.0, 0.5, 0.0]),
                                     "shape": torch.ones(3), "dt": torch.ones(2).half(), "new": torch.ones(1)},
                            metadata={"x": "2"})
    r = modelkit.diff(a, b)
    by = {e.name: e for e in r.entries}
    assert by["same"].change == "same" and by["val"].change == "values" and by["val"].max_abs == 0.5
    assert by["shape"].change == "shape" and by["dt"].change == "dtype" and by["dt"].max_abs == 0.0
    assert by["gone"].change == "only-a" and by["new"].change == "only-b"
    assert r.metadata_changed == ("x",) and not r.identical
    res = CliRunner().invoke(cli, ["diff", str(a), str(a)])
    assert res.exit_code == 0 and "IDENTICAL" in res.stdout
    res = CliRunner().invoke(cli, ["diff", "--no-values", "--json", str(a), str(b)])
    assert res.exit_code == 1 and json.loads(res.stdout)["counts"]["only-a"] == 1
