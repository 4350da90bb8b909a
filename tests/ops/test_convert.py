"""``modelkit.convert``: bit-exact from every container, type-aware, provenance, no torch when not needed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

import modelkit
from fixtures import build, hostile
from fixtures.sd_layout import tiny_sd1_layout
from modelkit.errors import OutputExistsError, UnsafeFileError
from tests.conftest import same_bits

SAVEABLE = {k: v for k, v in build.all_dtypes_state().items() if v.dtype != torch.complex128}
MODES = ("zip", "legacy", "pickle", "pickle4", "cuda", "zip-renamed")


def _meta(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


@pytest.mark.parametrize("mode", MODES)
def test_bit_exact_from_every_container(tmp_path: Path, mode: str) -> None:
    """Every dtype safetensors stores, views, shared storages, 0-d and empty tensors."""
    src = tmp_path / f"all.{mode}.pt"
    build.save_torch(SAVEABLE, str(src), mode)
    before = src.read_bytes()
    r = modelkit.convert(src)
    assert r.status == "written" and r.output == str(tmp_path / f"all.{mode}.safetensors")
    got = load_file(r.output)
    assert set(got) == set(SAVEABLE)
    for k, v in SAVEABLE.items():
        assert same_bits(got[k], v.detach()), k
    assert src.read_bytes() == before
    assert r.stats is not None and r.stats.casts == 0


def test_checkpoint_loses_wrapper_and_keeps_provenance(tmp_path: Path) -> None:
    src = tmp_path / "sd.ckpt"
    sd = build.sd_checkpoint(str(src), tiny_sd1_layout())
    r = modelkit.convert(src)
    got = load_file(r.output)
    assert set(got) == set(sd) and all(same_bits(got[k], v) for k, v in sd.items())
    meta = _meta(r.output)
    assert meta["global_step"] == "840000" and meta["epoch"] == "6"
    assert meta["modelkit.source"] == "sd.ckpt"
    assert meta["modelkit.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["modelkit.version"] == modelkit.__version__
    changes = json.loads(meta["modelkit.changes"])
    assert "container torch-zip -> safetensors" in changes and "state_dict wrapper removed" in changes
    assert meta == r.metadata
    assert r.kind == "checkpoint"
    # The Lightning callback is not carried over, and says so.
    assert any(k.startswith("callbacks.") for k in r.dropped)
    assert any("not carried over" in w for w in r.warnings)


def test_safetensors_input_keeps_its_metadata(tmp_path: Path) -> None:
    src = tmp_path / "lora.safetensors"
    build.write_safetensors(str(src), {"w": torch.ones(3)}, {"ss_network_dim": "4", "modelspec.title": "mine"})
    r = modelkit.convert(src, tmp_path / "copy.safetensors")
    meta = _meta(r.output)
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "mine"
    assert "modelkit.source_sha256" in meta
    with pytest.raises(OutputExistsError, match="is the input"):
        modelkit.convert(src, force=True)


@pytest.mark.parametrize("mode", ("zip", "legacy"))
def test_embedding_becomes_emb_params(tmp_path: Path, mode: str) -> None:
    src = tmp_path / "my-style.pt"
    emb = build.a1111_embedding(str(src), mode=mode)
    r = modelkit.convert(src)
    assert r.kind == "embedding"
    got = load_file(r.output)
    assert list(got) == ["emb_params"] and same_bits(got["emb_params"], emb)
    meta = _meta(r.output)
    assert meta["name"] == "my-style" and meta["step"] == "1500"
    assert meta["sd_checkpoint"] == "cc6cb27103"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.title"] == "my-style"
    assert "string_to_param.* -> emb_params" in r.changes
    assert "string_to_token.*" in r.dropped  # reported, not silently lost


@pytest.mark.parametrize("shape", [(768,), (3, 768)])
def test_diffusers_embedding_becomes_emb_params(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """diffusers' learned_embeds.bin ({"<token>": vectors}) gets the layout A1111 and ComfyUI read:
    a 2-D emb_params, the token in the metadata."""
    src = tmp_path / "learned_embeds.bin"
    vec = torch.randn(*shape)
    build.save_torch({"<cat-toy>": vec}, str(src))
    r = modelkit.convert(src)
    assert r.kind == "embedding"
    got = load_file(r.output)
    assert list(got) == ["emb_params"] and same_bits(got["emb_params"], vec.reshape(-1, 768))
    meta = _meta(r.output)
    assert meta["name"] == "<cat-toy>"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert modelkit.detect(r.output).kind == "embedding"


def test_lora_keeps_its_keys_and_says_what_it_is(tmp_path: Path) -> None:
    src = tmp_path / "style.safetensors"
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    save_file(lora, str(src))
    r = modelkit.convert(src, tmp_path / "out.safetensors")
    assert r.kind == "lora"
    got = load_file(r.output)
    assert set(got) == set(lora) and all(same_bits(got[k], v) for k, v in lora.items())


def test_sdxl_embedding_pair_keeps_names(tmp_path: Path) -> None:
    src = tmp_path / "xl.pt"
    pair = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    build.save_torch(pair, str(src))
    r = modelkit.convert(src)
    got = load_file(r.output)
    assert r.kind == "embedding" and set(got) == {"clip_l", "clip_g"}
    assert _meta(r.output)["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"


def test_hypernetwork_layout_and_structure(tmp_path: Path) -> None:
    def module(dim: int, seed: int) -> OrderedDict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return OrderedDict([("linear.0.weight", torch.randn(dim * 2, dim, generator=g)),
                            ("linear.0.bias", torch.randn(dim * 2, generator=g)),
                            ("linear.1.weight", torch.randn(dim, dim * 2, generator=g)),
                            ("linear.1.bias", torch.randn(dim, generator=g))])

    hn = {768: [module(8, 0), module(8, 1)], 320: [module(4, 2), module(4, 3)], "step": 100, "name": "hn",
          "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False, "use_dropout": False,
          "weight_initialization": "Normal", "sd_checkpoint": "abc", "optimizer_name": "AdamW"}
    src = tmp_path / "hn.pt"
    build.save_torch(hn, str(src))
    r = modelkit.convert(src)
    assert r.kind == "hypernetwork"
    got = load_file(r.output)
    assert "768.0.linear.0.weight" in got and "320.1.linear.1.bias" in got
    assert same_bits(got["768.1.linear.1.weight"], hn[768][1]["linear.1.weight"])
    meta = _meta(r.output)
    assert json.loads(meta["layer_structure"]) == [1, 2, 1]
    assert json.loads(meta["activation_func"]) == "relu" and json.loads(meta["is_layer_norm"]) is False
    assert meta["modelkit.layout"] == "a1111-hypernetwork/1"
    assert meta["name"] == "hn" and meta["step"] == "100"
    assert r.dropped == {"optimizer_name": "AdamW"}


def test_sidecars_are_copied(tmp_path: Path) -> None:
    src = tmp_path / "x.vae.pt"
    build.save_torch({"encoder.conv_in.weight": torch.ones(2, 2)}, str(src))
    for suffix in (".preview.png", ".json", ".civitai.info", ".txt"):
        (tmp_path / f"x.vae{suffix}").write_text(suffix)
    (tmp_path / "x.vae.other").write_text("not a sidecar")
    r = modelkit.convert(src, out_dir=tmp_path / "out")
    assert r.output == str(tmp_path / "out" / "x.vae.safetensors")
    assert sorted(Path(p).name for p in r.sidecars) == sorted(
        ["x.vae.preview.png", "x.vae.json", "x.vae.civitai.info", "x.vae.txt"])
    assert (tmp_path / "out" / "x.vae.json").read_text() == ".json"
    assert not (tmp_path / "out" / "x.vae.other").exists()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "e.pt"
    build.a1111_embedding(str(src))
    r = modelkit.convert(src, dry_run=True)
    assert r.status == "dry-run" and r.stats is None and r.size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.pt"]


def test_unsafe_input_is_refused(tmp_path: Path, marker: str) -> None:
    evil = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(evil), marker, payload="os_system")
    with pytest.raises(UnsafeFileError, match="unsafe"):
        modelkit.convert(evil)
    # --ignore-scan still reads only through the allow-list, which refuses it too.
    with pytest.raises(UnsafeFileError):
        modelkit.convert(evil, ignore_scan=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt"]


def test_ignore_scan_reads_only_what_the_allow_list_reads(tmp_path: Path, marker: str) -> None:
    evil = tmp_path / "extra.ckpt"
    hostile.hostile_extra_member(str(evil), marker)
    with pytest.raises(UnsafeFileError):
        modelkit.convert(evil)
    r = modelkit.convert(evil, ignore_scan=True)
    assert r.scan == "unsafe" and r.tensors == 0
    assert any("--ignore-scan" in w for w in r.warnings)


def test_same_dtype_convert_never_imports_torch(tmp_path: Path) -> None:
    """Views, shared storages, big-endian and inline storages all pass without torch."""
    state = {**SAVEABLE}
    src = tmp_path / "m.ckpt"
    build.save_torch({"state_dict": state}, str(src), "legacy")
    plain = tmp_path / "p.pkl"
    build.save_torch(state, str(plain), "pickle")
    build.numpy_files(str(tmp_path))
    code = (
        "import sys, modelkit\n"
        f"for p in [{str(src)!r}, {str(plain)!r}, {str(tmp_path / 'compressed.npz')!r}]:\n"
        "    modelkit.convert(p)\n"
        "assert 'torch' not in sys.modules, 'convert imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[2]))
    got = load_file(tmp_path / "m.safetensors")
    assert all(same_bits(got[k], v.detach()) for k, v in state.items())
