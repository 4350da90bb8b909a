"""The core suite's files, written without torch, are what torch writes and reads: ``data.pkl``
equal to torch.save's byte for byte, and torch.load / safetensors read every tensor back, views
sharing storage included. (These checks need torch; the core install skips them and runs the
core tests on the files.)"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fixtures import torchfree

torch = pytest.importorskip("torch", reason="comparing with torch's own files needs torch")

DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
          "complex64", "float8_e4m3fn", "float8_e5m2"]


def _pair() -> tuple[OrderedDict[str, object], OrderedDict[str, object]]:
    """The same state dict as numpy (for torchfree) and as torch tensors."""
    g = torch.Generator().manual_seed(0)
    mine: OrderedDict[str, object] = OrderedDict()
    ref: OrderedDict[str, object] = OrderedDict()
    for i, name in enumerate(DTYPES):
        dt = getattr(torch, name)
        t = (torch.randn(3, 4, generator=g) * 10).to(dt) if dt.is_floating_point or dt.is_complex else \
            torch.randint(0, 100, (3, 4), generator=g).to(dt)
        ref[f"t{i}"] = t
        if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            width = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.uint16)}[t.element_size()]
            mine[f"t{i}"] = torchfree.Bits(t.view(width[0]).numpy().view(width[1]), name)
        else:
            mine[f"t{i}"] = t.numpy()
    ref["view"] = ref["t0"].t()
    mine["view"] = torchfree.View("t0", 0, (4, 3), (1, 4))
    ref["row"] = ref["t0"][1]
    mine["row"] = torchfree.View("t0", 4, (4,), (1,))
    ref["scalar"] = torch.tensor(2.5)
    mine["scalar"] = np.array(2.5, dtype=np.float32)
    return mine, ref


def test_data_pkl_is_torch_saves(tmp_path: Path) -> None:
    mine, ref = _pair()
    torch.save(ref, tmp_path / "ref.pt")
    assert zipfile.ZipFile(tmp_path / "ref.pt").read("ref/data.pkl") == torchfree.data_pkl(mine)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_torch_reads_what_torchfree_writes(tmp_path: Path, fmt: str) -> None:
    mine, ref = _pair()
    path = tmp_path / f"m.{fmt}"
    if fmt == "zip":
        torchfree.save_zip(mine, str(path))
    elif fmt == "legacy":  # torch cannot read back its own legacy files of fp8 (UntypedStorage has no dtype)
        drop = [k for k, v in mine.items() if isinstance(v, torchfree.Bits) and v.dtype.startswith("float8")]
        for k in drop:
            del mine[k], ref[k]
        torchfree.save_legacy(mine, str(path))
    else:
        mine = OrderedDict((k, v) for k, v in mine.items() if not isinstance(v, torchfree.View))
        torchfree.save_safetensors(mine, str(path))
        from safetensors.torch import load_file

        got = load_file(str(path))
        assert set(got) == set(mine)
        for k in mine:
            assert got[k].dtype == ref[k].dtype and torch.equal(got[k].reshape(-1).view(torch.uint8), ref[k].contiguous().reshape(-1).view(torch.uint8))
        return
    got = torch.load(path, weights_only=True)
    assert list(got) == list(ref)
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and got[k].stride() == t.stride()
        assert torch.equal(got[k].contiguous().reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), k
    assert got["view"].untyped_storage().data_ptr() == got["t0"].untyped_storage().data_ptr()
