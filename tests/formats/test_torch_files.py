"""The torch readers (zip, legacy, plain pickle) against torch.load(weights_only=True)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import modelkit
from fixtures import build
from tests.conftest import same_bits

MODES = ["zip", "legacy", "zip-renamed", "cuda", "pickle", "pickle4"]


def _torch_load(path: Path, mode: str):
    """torch's own reading of our fixture, or None where torch cannot read it."""
    try:
        if mode.startswith("pickle"):
            with open(path, "rb") as f:
                return pickle.load(f)  # our own fixture, built a line above
        return torch.load(path, weights_only=True, map_location="cpu")
    except (AttributeError, RuntimeError):
        # torch cannot reload uint16/32/64 and float8 storages from legacy streams
        assert mode in ("legacy", "pickle", "pickle4")
        return None


@pytest.mark.parametrize("mode", MODES)
def test_every_dtype_and_view_bit_equal_to_torch_load(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"all.{mode}.pt"
    original = build.all_dtypes_state()
    build.save_torch(original, str(path), mode)
    ref = _torch_load(path, mode)
    with modelkit.open_model(path) as mf:
        assert list(mf) == list(original)
        for name, t in original.items():
            got = mf[name].read()
            assert same_bits(got, t), name
            if ref is not None:
                assert same_bits(got, ref[name]), name
            assert mf[name].dtype.name == str(t.dtype).replace("torch.", "")
        expected_container = {"zip": "torch-zip", "zip-renamed": "torch-zip", "cuda": "torch-zip",
                              "legacy": "torch-legacy"}.get(mode, "pickle")
        assert mf.container == expected_container


@pytest.mark.parametrize("mode", ["zip", "legacy"])
def test_views_keep_their_layout_and_share_storage(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "views.pt"
    build.save_torch(build.all_dtypes_state(), str(path), mode)
    with modelkit.open_model(path) as mf:
        base, tr, sl = mf["view.base"], mf["view.transposed"], mf["view.slice"]
        assert base.storage_key == tr.storage_key == sl.storage_key
        assert not tr.is_contiguous and tr.strides == (1, 6)
        assert sl.storage_offset == 8 and sl.shape == (2, 3)
        assert sl.byte_range == (base.storage_start + 32, base.storage_start + 32 + (1 + 6 + 2) * 4)
        got = tr.read()
        assert got.stride() == (1, 6)
        assert torch.equal(got, torch.arange(24.0).reshape(4, 6).t())


def test_renamed_top_folder_and_cuda_storages(tmp_path: Path) -> None:
    p1, p2 = tmp_path / "a.pt", tmp_path / "b.pt"
    build.save_torch({"w": torch.ones(3)}, str(p1), "zip-renamed")
    build.save_torch({"w": torch.ones(3)}, str(p2), "cuda")
    with modelkit.open_model(p1) as a, modelkit.open_model(p2) as b:
        assert a.info["archive_prefix"] == "my_model"
        assert torch.equal(a["w"].read(), b["w"].read())


@pytest.mark.parametrize("mode", ["zip", "legacy"])
def test_sd_checkpoint_wrapper_extras_and_placeholder(tmp_path: Path, mode: str) -> None:
    from fixtures.sd_layout import tiny_sd1_layout

    path = tmp_path / "sd.ckpt"
    sd = build.sd_checkpoint(str(path), tiny_sd1_layout(), mode=mode)
    # torch's own safe loader refuses this file because of the Lightning callback; we must not.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with modelkit.open_model(path) as mf:
        assert mf.wrappers == ["state_dict"]
        assert list(mf) == list(sd)
        assert mf.extras["global_step"] == 840000 and mf.extras["epoch"] == 6
        assert mf.placeholders == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
        assert any(k.startswith("callbacks.") and k.endswith(".dirpath") for k in mf.extras)
        name = "model.diffusion_model.out.2.weight"
        assert torch.equal(mf[name].read(), sd[name])
        assert mf.key_paths[name] == ("state_dict", name)


def test_a1111_embedding_and_hypernetwork_nesting(tmp_path: Path) -> None:
    emb_path = tmp_path / "emb.pt"
    emb = build.a1111_embedding(str(emb_path))
    with modelkit.open_model(emb_path) as mf:
        assert list(mf) == ["string_to_param.*"]
        assert torch.equal(mf["string_to_param.*"].read(), emb)
        assert mf.extras["name"] == "my-style" and mf.extras["string_to_token.*"] == 265
        assert mf.key_paths["string_to_param.*"] == ("string_to_param", "*")

    # A1111 hypernetworks: int keys -> list of two state dicts, plus settings.
    layer = {"linear.0.weight": torch.randn(1536, 768), "linear.0.bias": torch.randn(1536)}
    hn = {768: [layer, dict(layer)], 1024: [layer, layer], "layer_structure": [1, 2, 1],
          "activation_func": "relu", "is_layer_norm": False, "name": "hn", "step": 10}
    hn_path = tmp_path / "hn.pt"
    torch.save(hn, hn_path)
    with modelkit.open_model(hn_path) as mf:
        assert "768.0.linear.0.weight" in mf and "1024.1.linear.0.bias" in mf
        assert mf.key_paths["768.1.linear.0.weight"] == (768, 1, "linear.0.weight")
        assert mf.extras["layer_structure"] == [1, 2, 1]
        assert torch.equal(mf["1024.1.linear.0.weight"].read(), layer["linear.0.weight"])


def test_inspect_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures.sd_layout import tiny_sd1_layout
    from modelkit.model import Source

    path = tmp_path / "sd.ckpt"
    build.sd_checkpoint(str(path), tiny_sd1_layout())
    reads: list[int] = []
    orig = Source.read_into

    def spy(self, buf, offset):  # type: ignore[no-untyped-def]
        reads.append(len(buf))
        return orig(self, buf, offset)

    monkeypatch.setattr(Source, "read_into", spy)
    res = modelkit.inspect(path)
    assert res.tensor_count > 600
    # the central directory, local headers, data.pkl, and a 64-byte head of each storage (probed in
    # case it hides a pickle): a small fraction of the tensor bytes, and it does not grow with them
    assert sum(reads) < res.size // 4
