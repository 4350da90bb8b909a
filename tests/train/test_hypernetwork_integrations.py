"""The A1111 extension and the ComfyUI node in integrations/ load a hypernetwork that ``modelkit train``
wrote (and one ``modelkit convert`` made from an A1111 ``.pt``), through modelkit's safe reader.

Neither host is installed here. Each integration is imported from its file as the host would
import it; the host's own modules are stood in for by small modules written into ``tmp_path``
(A1111's ``modules.hypernetworks.hypernetwork`` with its ``torch.load`` call, ComfyUI's
``folder_paths`` and a model with ``clone``/``set_model_attn*_patch``).
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import torch  # noqa: E402

import modelkit  # noqa: E402
from modelkit.train import train  # noqa: E402
from modelkit.train.config import build_config  # noqa: E402
from modelkit.train.methods.hypernetwork import build_module, dropout_structure  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
A1111 = ROOT / "integrations" / "a1111" / "modelkit-hypernetworks" / "scripts" / "modelkit_hypernetworks.py"
COMFY = ROOT / "integrations" / "comfyui" / "modelkit_hypernetworks" / "__init__.py"
#: what A1111's Hypernetwork.load reads from the object it torch.loads
A1111_FIELDS = ("layer_structure", "activation_func", "weight_initialization", "is_layer_norm", "dropout_structure",
                "use_dropout", "activate_output", "last_layer_dropout", "name", "step", "sd_checkpoint",
                "sd_checkpoint_name")
SETTINGS = ("hypernetwork.layer_structure=[1, 2, 2, 1]", "hypernetwork.activation=relu", "hypernetwork.layer_norm=true",
            "hypernetwork.dropout=true", "hypernetwork.last_layer_dropout=false")


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tiny_model: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny hypernetwork trained by modelkit (float32 output), and its settings."""
    out = tmp_path_factory.mktemp("hn")
    cfg = build_config("hypernetwork", {
        "model": {"path": tiny_model["checkpoint"], "base": "sd1", "configs": tiny_model["configs"]},
        "dataset": {"path": tiny_model["images"], "resolution": 64, "min_bucket": 32, "max_bucket": 128, "bucket_step": 32},
        "train": {"max_steps": 2, "device": "cpu", "seed": 3, "threads": 1},
        "optimizer": {"lr": 1e-2}, "output": {"dir": str(out), "dtype": "float32", "save_state": False},
    }, SETTINGS)
    result = train(cfg)
    return {"path": result.output, "cfg": cfg.hypernetwork, "tensors": modelkit.load(result.output), "dir": out}


def _a1111_pt(trained: dict[str, Any], path: Path) -> dict[Any, Any]:
    """The same hypernetwork as A1111's ``Hypernetwork.save`` writes it (torch.save of this object)."""
    cfg = trained["cfg"]
    obj: dict[Any, Any] = {}
    for name, t in trained["tensors"].items():
        size, which, key = name.split(".", 2)
        obj.setdefault(int(size), ({}, {}))[int(which)][key] = t.clone()
    drops = dropout_structure(cfg.layer_structure, cfg.dropout, cfg.last_layer_dropout)
    obj.update({"step": 2, "name": "hypernetwork", "layer_structure": list(cfg.layer_structure),
                "activation_func": cfg.activation, "is_layer_norm": cfg.layer_norm,
                "weight_initialization": cfg.weight_init, "sd_checkpoint": None, "sd_checkpoint_name": None,
                "activate_output": cfg.activate_output, "use_dropout": cfg.dropout, "dropout_structure": drops,
                "last_layer_dropout": drops[-2] != 0, "optional_info": None})
    torch.save(obj, path)
    return obj


def _same_object(got: dict[Any, Any], want: dict[Any, Any]) -> None:
    sizes = sorted(k for k in want if isinstance(k, int))
    assert sorted(k for k in got if isinstance(k, int)) == sizes == [32, 64]
    for size in sizes:
        assert isinstance(got[size], tuple) and len(got[size]) == 2
        for g, w in zip(got[size], want[size]):
            assert list(g) == list(w)
            assert all(torch.equal(g[k], w[k]) and g[k].dtype == w[k].dtype for k in w)
    for field in A1111_FIELDS:
        assert got.get(field) == want.get(field), field
        assert type(got.get(field)) is type(want.get(field)), field


def test_integrations_import_without_their_hosts() -> None:
    a1111 = _import(A1111, "mk_a1111_plain")
    comfy = _import(COMFY, "mk_comfy_plain")
    assert not a1111._in_webui() and "modules" not in sys.modules and "folder_paths" not in sys.modules
    node = comfy.NODE_CLASS_MAPPINGS["ModelkitHypernetworkLoader"]
    assert node.RETURN_TYPES == ("MODEL",) and node.FUNCTION == "load_hypernetwork" and callable(node.INPUT_TYPES)


def test_a1111_reads_the_object_its_own_pt_holds(trained: dict[str, Any], tmp_path: Path) -> None:
    """From modelkit's .safetensors (trained, and converted from an A1111 .pt), the extension hands
    A1111's unchanged ``Hypernetwork.load`` the very object A1111's own ``.pt`` gives ``torch.load``."""
    a1111 = _import(A1111, "mk_a1111_read")
    pt = tmp_path / "hn.pt"
    _a1111_pt(trained, pt)
    want = torch.load(pt, weights_only=True)
    _same_object(a1111.read_hypernetwork(trained["path"]), want)
    converted = modelkit.convert(pt, tmp_path / "converted.safetensors").output
    _same_object(a1111.read_hypernetwork(converted), want)
    _same_object(a1111.read_hypernetwork(str(pt)), want)  # a .pt, read without unpickling code


def test_a1111_extension_lists_and_loads_safetensors(trained: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     request: pytest.FixtureRequest) -> None:
    host = tmp_path / "webui"
    (host / "modules" / "hypernetworks").mkdir(parents=True)
    (host / "modules" / "__init__.py").write_text("")
    (host / "modules" / "hypernetworks" / "__init__.py").write_text("")
    # A1111's calls the extension relies on: list_hypernetworks(path) over **/*.pt, and
    # Hypernetwork.load(filename) reading the object with the module's torch.load.
    (host / "modules" / "hypernetworks" / "hypernetwork.py").write_text(textwrap.dedent("""
        import glob
        import os

        import torch


        def list_hypernetworks(path):
            return {os.path.splitext(os.path.basename(f))[0]: f
                    for f in sorted(glob.iglob(os.path.join(path, "**/*.pt"), recursive=True))}


        class Hypernetwork:
            def load(self, filename):
                self.filename = filename
                self.state_dict = torch.load(filename, map_location="cpu", weights_only=True)
        """))
    monkeypatch.syspath_prepend(str(host))
    assert "modules" not in sys.modules

    def forget_host() -> None:
        for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
            del sys.modules[name]

    request.addfinalizer(forget_host)
    a1111 = _import(A1111, "mk_a1111_host")  # installs itself, as at web UI start-up
    hn = sys.modules["modules.hypernetworks.hypernetwork"]
    assert hn._modelkit_installed and a1111._in_webui()
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    st = models / "sub" / "style.safetensors"
    st.write_bytes(Path(trained["path"]).read_bytes())
    pt = models / "old.pt"
    want = _a1111_pt(trained, pt)
    assert hn.list_hypernetworks(str(models)) == {"old": str(pt), "style": str(st)}

    seen: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: seen.append(str(f)) or real_load(f, *a, **k))
    loaded = hn.Hypernetwork()
    loaded.load(str(st))
    assert seen == [] and hn.torch is torch  # the .safetensors went through modelkit; torch is itself again
    _same_object(loaded.state_dict, torch.load(pt, weights_only=True))
    old = hn.Hypernetwork()
    old.load(str(pt))
    assert seen[-1] == str(pt) and old.state_dict.keys() == want.keys()  # .pt files load as before


def _expected_types(cfg: Any) -> list[type]:
    """A1111's ``HypernetworkModule`` order per layer: Linear, the activation (not after the last
    layer unless activate_output), LayerNorm when is_layer_norm, Dropout where the structure has one."""
    n = len(cfg.layer_structure)
    drops = dropout_structure(cfg.layer_structure, cfg.dropout, cfg.last_layer_dropout)
    out: list[type] = []
    for i in range(n - 1):
        out.append(torch.nn.Linear)
        if i < n - 2 or cfg.activate_output:
            out.append(torch.nn.ReLU)
        if cfg.layer_norm:
            out.append(torch.nn.LayerNorm)
        if drops[i + 1] > 0:
            out.append(torch.nn.Dropout)
    return out


@pytest.mark.parametrize("source", ["trained", "converted-pt"])
def test_comfyui_node_builds_a1111_layers_and_patches_attention(trained: dict[str, Any], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    comfy = _import(COMFY, f"mk_comfy_{source}")
    cfg = trained["cfg"]
    path = trained["path"]
    if source == "converted-pt":
        _a1111_pt(trained, tmp_path / "hn.pt")
        path = modelkit.convert(tmp_path / "hn.pt", tmp_path / "hn.safetensors").output
    layers = comfy.build_layers(path)
    assert sorted(layers) == [32, 64]
    types = _expected_types(cfg)
    assert types == [torch.nn.Linear, torch.nn.ReLU, torch.nn.LayerNorm, torch.nn.Dropout, torch.nn.Linear,
                     torch.nn.ReLU, torch.nn.LayerNorm, torch.nn.Linear, torch.nn.LayerNorm]
    for size, pair in layers.items():
        assert len(pair) == 2
        for j, seq in enumerate(pair):
            assert [type(m) for m in seq] == types and not seq.training
            # the very module modelkit trained (A1111's structure), filled with the file's tensors
            ref = build_module(size, cfg)
            ref.load_state_dict({k.split(".", 2)[2]: v for k, v in trained["tensors"].items()
                                 if k.startswith(f"{size}.{j}.")})
            for a, b in zip(seq, ref.linear):
                assert type(a) is type(b)
                if isinstance(a, torch.nn.Dropout):
                    assert a.p == b.p == 0.3
                if isinstance(a, torch.nn.LayerNorm):
                    assert a.normalized_shape == b.normalized_shape and a.eps == b.eps
                if isinstance(a, torch.nn.Linear):
                    assert (a.in_features, a.out_features) == (b.in_features, b.out_features)
            own = {k: v for k, v in seq.state_dict().items()}
            assert own.keys() == {k.removeprefix("linear.") for k in ref.state_dict()}
            assert all(torch.equal(own[k.removeprefix("linear.")], v) for k, v in ref.state_dict().items())

    # The node, in a stand-in ComfyUI: folder_paths and a model patcher.
    folder_paths = ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda kind: ["hn.safetensors"] if kind == "hypernetworks" else []  # type: ignore[attr-defined]
    folder_paths.get_full_path = lambda kind, name: path if (kind, name) == ("hypernetworks", "hn.safetensors") else None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    node = comfy.NODE_CLASS_MAPPINGS["ModelkitHypernetworkLoader"]
    assert node.INPUT_TYPES()["required"]["hypernetwork_name"] == (["hn.safetensors"],)
    patches: dict[str, Any] = {}
    model = SimpleNamespace(clone=lambda: SimpleNamespace(
        set_model_attn1_patch=lambda p: patches.__setitem__("attn1", p),
        set_model_attn2_patch=lambda p: patches.__setitem__("attn2", p)))
    (patched,) = node().load_hypernetwork(model, "hn.safetensors", 0.7)
    patch = patches["attn1"]
    assert patches["attn2"] is patch and patched is not model
    q, k, v = torch.randn(2, 5, 64), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    q2, k2, v2 = patch(q, k, v, {})
    with torch.no_grad():
        assert q2 is q
        torch.testing.assert_close(k2, k + layers[32][0](k) * 0.7)
        torch.testing.assert_close(v2, v + layers[32][1](v) * 0.7)
        assert not torch.equal(k2, k)
        same = patch(q, torch.randn(2, 7, 48), torch.randn(2, 7, 48), {})  # no modules for width 48
        assert same[1].shape[-1] == 48
    assert patch.to("cpu") is patch


def test_comfyui_reads_a1111_defaults_and_refuses_unknown_activations(tmp_path: Path) -> None:
    comfy = _import(COMFY, "mk_comfy_defaults")
    # A1111's defaults when fields are missing: layer_structure [1, 2, 1], no dropout, activate_output True
    assert comfy.dropout_structure({}) == [0.0, 0.0, 0.0]
    assert comfy.dropout_structure({"layer_structure": [1, 2, 2, 1], "use_dropout": True}) == [0.0, 0.3, 0.0, 0.0]
    st = {"linear.0.weight": torch.randn(8, 4), "linear.0.bias": torch.randn(8), "linear.2.weight": torch.randn(4, 8),
          "linear.2.bias": torch.randn(4)}
    seq = comfy.build_module(4, st, {"activation_func": "gelu"})
    assert [type(m) for m in seq] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear, torch.nn.GELU]
    assert [type(m) for m in comfy.build_module(4, st, {"activation_func": "swish", "activate_output": False})] == [
        torch.nn.Linear, torch.nn.Hardswish, torch.nn.Linear]
    with pytest.raises(ValueError, match="unsupported activation"):
        comfy.build_module(4, st, {"activation_func": "nope"})
