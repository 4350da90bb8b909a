"""The benign corpus: real Stable Diffusion file layouts must scan ``safe`` and open cleanly.

A scanner that cries wolf on an SD 1.x checkpoint or an A1111 optimizer sidecar gets switched
off, so false positives are bugs too. Every file here is written by the real writer
(``torch.save`` in each of its modes, ``pickle``, ``numpy.save``), in the layouts the tools that
people use produce: CompVis/Lightning checkpoints, AUTOMATIC1111 embeddings and hypernetworks,
diffusers ``.bin`` weights, training states, plain pickles and numpy arrays. Each tensor that
modelkit reads is compared bit for bit with the one that was saved.
"""

from __future__ import annotations

import argparse
import pickle
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import modelkit
from fixtures import build
from fixtures.sd_layout import tiny_sd1_layout
from modelkit.scan.report import FileReport
from tests.conftest import same_bits

KeyPath = tuple[Any, ...]


def tensors_by_keypath(obj: Any, keypath: KeyPath = ()) -> Iterator[tuple[KeyPath, torch.Tensor]]:
    """Every tensor in a saved structure with its key path (dict keys, list indices, object state)."""
    if isinstance(obj, torch.Tensor):
        yield keypath, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_by_keypath(v, keypath + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_by_keypath(v, keypath + (i,))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from tensors_by_keypath(vars(obj), keypath)


def assert_benign(path: Path, saved: Any, *, placeholders: tuple[str, ...] = ()) -> FileReport:
    """Scans safe, opens without error, and every saved tensor reads back bit-identical."""
    report = modelkit.scan(path).files[0]
    assert report.verdict == "safe", "; ".join(f"{f.rule} {f.message}" for f in report.findings)
    for q in placeholders:
        assert q in report.globals_seen, f"{q} was not seen"
    expected = list(tensors_by_keypath(saved))
    with modelkit.open_model(path) as mf:
        by_path = {tuple(kp): name for name, kp in mf.key_paths.items()}
        assert len(mf) == len(expected), f"{len(mf)} tensors read, {len(expected)} saved"
        for keypath, tensor in expected:
            assert keypath in by_path, f"tensor at {keypath!r} is missing"
            assert same_bits(mf[by_path[keypath]].read(), tensor.detach()), keypath
    return report


def small_state_dict(dtype: torch.dtype = torch.float16, n: int = 40, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """The first ``n`` tensors of the SD 1.x layout (real key names, tiny shapes)."""
    g = torch.Generator().manual_seed(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, (shape, dt) in list(tiny_sd1_layout().items())[:n]:
        if dt == "int64":
            sd[name] = torch.arange(shape[-1] if shape else 1, dtype=torch.int64).reshape(shape)
        else:
            sd[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return sd


# -- Stable Diffusion 1.x checkpoints -------------------------------------------------------------------


def test_numpy_scalar_is_pickled_with_numpy_globals() -> None:
    """What numpy writes for a scalar (numpy 2: numpy._core.multiarray.scalar) is what the allow-list expects."""
    data = pickle.dumps(np.int64(840000), protocol=2)
    assert b"numpy._core.multiarray\nscalar" in data or b"numpy.core.multiarray\nscalar" in data
    assert b"cnumpy\ndtype" in data


@pytest.mark.parametrize("mode", ["zip", "legacy"])
def test_sd1_checkpoint_lightning_1_4_layout(tmp_path: Path, mode: str) -> None:
    """An sd-v1-4.ckpt-style file: Lightning 1.4 keys, ModelCheckpoint class as a callbacks key, numpy global_step."""
    sd = small_state_dict(n=len(tiny_sd1_layout()))
    path = tmp_path / "sd-v1-4.ckpt"
    with build.fake_class("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") as cb_cls:
        obj = {
            "epoch": 6, "global_step": np.int64(470000), "pytorch-lightning_version": "1.4.2", "state_dict": sd,
            "callbacks": {cb_cls: {"monitor": None, "best_model_score": None, "best_model_path": "",
                                   "current_score": None, "dirpath": "logs/checkpoints"}},
            "optimizer_states": [], "lr_schedulers": [],
        }
        build.save_torch(obj, str(path), mode)
    assert_benign(path, obj, placeholders=("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",))
    with modelkit.open_model(path) as mf:
        assert mf.wrappers == ["state_dict"]
        assert "model.diffusion_model.out.2.weight" in mf
        assert mf.extras["global_step"] == 470000


def test_sd1_checkpoint_with_callback_instance(tmp_path: Path) -> None:
    """fixtures.build.sd_checkpoint: a ModelCheckpoint *instance* holding a tensor score, plus a numpy global_step."""
    sd = small_state_dict(dtype=torch.float32, n=60, seed=1)
    path = tmp_path / "model.ckpt"
    with build.fake_class("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") as cb_cls:
        cb = cb_cls()
        cb.__dict__.update({"monitor": "val/loss", "save_top_k": -1, "best_model_score": torch.tensor(0.125),
                            "kth_value": torch.tensor(float("inf")), "dirpath": "logs/ckpt"})
        obj = {"state_dict": sd, "global_step": np.int64(840000), "epoch": np.int64(6),
               "callbacks": {"ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": cb}}
        torch.save(obj, path)
    assert_benign(path, obj, placeholders=("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",))
    with modelkit.open_model(path) as mf:
        assert mf.placeholders == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]


def test_sd1_checkpoint_from_fixture_builder(tmp_path: Path) -> None:
    """The project's own SD 1.x builder (fixtures.build.sd_checkpoint), full tiny layout, fp16."""
    path = tmp_path / "v1-5-pruned-emaonly.ckpt"
    sd = build.sd_checkpoint(str(path), tiny_sd1_layout())
    report = modelkit.scan(path).files[0]
    assert report.verdict == "safe", report.findings
    with modelkit.open_model(path) as mf:
        assert len(mf) == len(sd)
        name = "model.diffusion_model.input_blocks.0.0.weight"
        assert same_bits(mf[name].read(), sd[name])


# -- AUTOMATIC1111 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["zip", "legacy"])
def test_a1111_textual_inversion_embedding(tmp_path: Path, mode: str) -> None:
    """An A1111 embedding (string_to_token / string_to_param), zip and legacy torch.save."""
    path = tmp_path / "my-style.pt"
    build.a1111_embedding(str(path), mode=mode)
    saved = torch.load(path, weights_only=True)
    assert_benign(path, saved)


def test_a1111_embedding_with_grad_tensor(tmp_path: Path) -> None:
    """A1111 saves the embedding vector as it was trained: a leaf tensor with requires_grad=True."""
    vec = torch.randn(2, 768, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    obj = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "grad-style", "step": 3000,
           "sd_checkpoint": "e1441589a6", "sd_checkpoint_name": "v1-5-pruned"}
    path = tmp_path / "grad-style.pt"
    torch.save(obj, path)
    assert_benign(path, obj)


class _HypernetworkModule(torch.nn.Module):
    """The layer shape of A1111's HypernetworkModule (Linear, activation, Linear) under ``linear``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Sequential(torch.nn.Linear(dim, dim * 2), torch.nn.ReLU(), torch.nn.Linear(dim * 2, dim))


def test_a1111_hypernetwork_and_optimizer_sidecar(tmp_path: Path) -> None:
    """An A1111 hypernetwork .pt (int-keyed layer pairs) and its .pt.optim sidecar with an AdamW state_dict."""
    torch.manual_seed(0)
    layers = {size: (_HypernetworkModule(8), _HypernetworkModule(8)) for size in (320, 640, 768, 1280)}
    params = [p for pair in layers.values() for m in pair for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-6)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # a trained hypernetwork: the optimizer holds step, exp_avg and exp_avg_sq per parameter

    state: dict[Any, Any] = {size: (a.state_dict(), b.state_dict()) for size, (a, b) in layers.items()}
    state.update({"step": 2000, "name": "anime-hn", "layer_structure": [1, 2, 1], "activation_func": "relu",
                  "is_layer_norm": False, "weight_initialization": "Normal", "sd_checkpoint": "cc6cb27103",
                  "sd_checkpoint_name": "v1-5-pruned-emaonly", "activate_output": False, "use_dropout": False,
                  "dropout_structure": [0.0, 0.0, 0.0], "last_layer_dropout": False, "optional_info": None})
    hn_path = tmp_path / "anime-hn.pt"
    torch.save(state, hn_path)
    sidecar = {"optimizer_name": "AdamW", "hash": "a1b2c3d4", "optimizer_state_dict": opt.state_dict()}
    optim_path = tmp_path / "anime-hn.pt.optim"
    torch.save(sidecar, optim_path)

    assert_benign(hn_path, state)
    assert_benign(optim_path, sidecar)
    with modelkit.open_model(optim_path) as mf:
        assert "optimizer_state_dict.state.0.exp_avg" in mf
        assert mf.extras["optimizer_state_dict.param_groups.0.betas"] == [0.9, 0.999]


# -- diffusers, training states, dtypes, devices --------------------------------------------------------


def test_diffusers_bin_state_dict(tmp_path: Path) -> None:
    """A diffusers diffusion_pytorch_model.bin: torch.save of a flat fp32 state dict with diffusers key names."""
    g = torch.Generator().manual_seed(2)
    sd = OrderedDict((f"down_blocks.{b}.attentions.0.transformer_blocks.0.attn1.{p}.weight", torch.randn(8, 8, generator=g))
                     for b in range(2) for p in ("to_q", "to_k", "to_v"))
    sd["conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=g)
    sd["conv_in.bias"] = torch.zeros(8)
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(sd, path)
    assert_benign(path, sd)


@pytest.mark.parametrize("mode", ["legacy", "zip-renamed"])
def test_legacy_and_renamed_torch_files(tmp_path: Path, mode: str) -> None:
    """torch.save(_use_new_zipfile_serialization=False) and a zip whose top folder is not 'archive/'."""
    sd = small_state_dict(dtype=torch.float32, n=30, seed=3)
    path = tmp_path / f"model.{mode}.pt"
    build.save_torch(sd, str(path), mode)
    assert_benign(path, sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["zip", "cuda", "legacy"])
def test_half_precision_and_cuda_tagged_storages(tmp_path: Path, dtype: torch.dtype, mode: str) -> None:
    """fp16 / bf16 weights, with storages tagged cpu or cuda:0 (a checkpoint saved from a GPU)."""
    sd = small_state_dict(dtype=dtype, n=25, seed=4)
    path = tmp_path / f"model.{mode}.ckpt"
    build.save_torch(sd, str(path), mode)
    assert_benign(path, sd)


def test_training_state_with_argparse_namespace(tmp_path: Path) -> None:
    """A training script's checkpoint: torch.save({'args': argparse.Namespace(...), 'model': sd, ...})."""
    sd = small_state_dict(dtype=torch.float32, n=20, seed=6)
    args = argparse.Namespace(lr=1e-4, batch_size=4, resolution=512, mixed_precision="fp16", seed=None)
    obj = {"args": args, "model": sd, "epoch": 3, "step": np.int64(1200)}
    path = tmp_path / "train_state.pt"
    torch.save(obj, path)
    assert_benign(path, obj, placeholders=("argparse.Namespace",))


@pytest.mark.parametrize("mode", ["pickle", "pickle4"], ids=["protocol-2", "protocol-4"])
def test_plain_pickle_of_tensors(tmp_path: Path, mode: str) -> None:
    """pickle.dump(state_dict) with protocols 2 and 4: storages travel as torch.storage._load_from_bytes streams."""
    sd = small_state_dict(dtype=torch.float32, n=12, seed=7)
    sd["half"] = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    path = tmp_path / f"weights.{mode}.pkl"
    build.save_torch(sd, str(path), mode)
    assert_benign(path, sd)


def test_plain_pickle_of_numpy_arrays(tmp_path: Path) -> None:
    """pickle.dump of a dict of numpy arrays (numpy _reconstruct + ndarray BUILD), protocol 2 and 4."""
    arrays = {"w": np.arange(12, dtype="<f4").reshape(3, 4), "b": np.zeros(3, dtype="<f2"), "i": np.arange(4)}
    for proto in (2, 4):
        path = tmp_path / f"arrays.p{proto}.pkl"
        path.write_bytes(pickle.dumps(arrays, protocol=proto))
        report = modelkit.scan(path).files[0]
        assert report.verdict == "safe", report.findings
        with modelkit.open_model(path) as mf:
            for k, a in arrays.items():
                assert np.array_equal(mf[k].read("numpy"), a), k


def test_npy_and_npz_numeric_arrays(tmp_path: Path) -> None:
    """.npy (little/big endian, C/Fortran order, bool) and .npz (stored and deflated) numeric arrays."""
    arrays = build.numpy_files(str(tmp_path))
    files = sorted(tmp_path.glob("*.np[yz]"))
    assert len(files) == len(arrays) + 2
    for path in files:
        report = modelkit.scan(path).files[0]
        assert report.verdict == "safe", (path.name, report.findings)
        with modelkit.open_model(path) as mf:
            if path.suffix == ".npy":
                assert np.array_equal(mf["array"].read("numpy"), arrays[path.stem])
            else:
                for k, a in arrays.items():
                    assert np.array_equal(mf[k].read("numpy"), a), (path.name, k)


def test_kohya_lora_safetensors(tmp_path: Path) -> None:
    """A kohya-format LoRA in .safetensors with training metadata (the format most SD add-ons ship in)."""
    lora = build.kohya_lora(tiny_sd1_layout())
    path = tmp_path / "lora.safetensors"
    build.write_safetensors(str(path), lora, {"ss_network_dim": "4", "ss_network_alpha": "2.0"})
    assert_benign(path, lora)


def test_whole_benign_folder_scans_clean(tmp_path: Path) -> None:
    """A model folder with several of these files: the folder scan is all safe and exits 0."""
    build.a1111_embedding(str(tmp_path / "emb.pt"))
    torch.save(small_state_dict(n=5), tmp_path / "unet.bin")
    build.numpy_files(str(tmp_path))
    report = modelkit.scan(tmp_path)
    assert report.counts["safe"] == len(report.files) > 5
    assert report.exit_code == 0
