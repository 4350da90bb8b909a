"""``verify`` follows every layout change ``convert`` makes: convert, then verify, on every kind of
fixture the tests build and on every real file in ../shared/realdata; a tampered output is caught.

The renames ``modelkit.ops.convert`` makes, each covered below: the ``state_dict`` wrapper removed
(SD ``.ckpt``), an A1111 ``string_to_param.*`` embedding to ``emb_params`` (its ``string_to_token``
ids dropped), a diffusers ``{"<token>": vectors}`` embedding to a 2-D ``emb_params`` (token in the
metadata), A1111 hypernetworks flattened to ``{dim}.{0|1}.linear.{i}.*``, views and shared storages
written as copies, big-endian arrays written little-endian; every other kind keeps its names.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import modelkit
from fixtures import build, detect_layouts
from fixtures.sd_layout import tiny_sd1_layout
from tests.conftest import REALDATA

SAVEABLE = {k: v for k, v in build.all_dtypes_state().items() if v.dtype != torch.complex128}


def _hypernetwork(path: Path, **kw: object) -> None:
    obj = detect_layouts.hypernetwork(sizes=(768, 320), **kw)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(5)
    for size in (768, 320):
        for module in obj[size]:
            for k in module:
                module[k] = torch.randn(module[k].shape, generator=g)
    build.save_torch(obj, str(path))


def _numpy(path: Path) -> None:
    build.numpy_files(str(path.parent))
    (path.parent / "compressed.npz").rename(path)


def _npy_big_endian(path: Path) -> None:
    np.save(str(path), np.arange(6, dtype=">f2").reshape(2, 3))


def _layout(layout: dict[str, tuple[tuple[int, ...], str]], container: str = "safetensors",
            wrap: str | None = None) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        # int tensors are position ids: 0, 1, 2 ... as in real files
        state = {k: torch.randn(shape) if dt.startswith("float") else
                 torch.arange(math.prod(shape), dtype=getattr(torch, dt)).reshape(shape)
                 for k, (shape, dt) in layout.items()}
        if container == "safetensors":
            build.write_safetensors(str(path), state)
        else:
            build.save_torch({wrap: state} if wrap else state, str(path), container)
    return make


def _original_ti(path: Path) -> None:
    """The original textual-inversion layout: token ids as tensors beside the vectors."""
    build.save_torch({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.randn(3, 768)},
                      "name": "orig", "step": 10}, str(path))


#: name -> (file name, builder). Every kind of input the convert/verify/detect tests build.
KINDS: dict[str, tuple[str, Callable[[Path], None]]] = {
    **{f"all-dtypes-{m}": ("all.pt", lambda p, m=m: build.save_torch(SAVEABLE, str(p), m))  # type: ignore[misc]
       for m in ("zip", "legacy", "pickle", "pickle4", "cuda", "zip-renamed")},
    "sd1-ckpt-state_dict-wrapper": ("sd.ckpt", lambda p: build.sd_checkpoint(str(p), tiny_sd1_layout())),
    "sd1-ckpt-legacy": ("sd.ckpt", lambda p: build.sd_checkpoint(str(p), tiny_sd1_layout(), mode="legacy")),
    "sd1-ema-safetensors": ("ema.safetensors", _layout(detect_layouts.sd1_checkpoint(ema=True))),
    "sdxl-safetensors": ("xl.safetensors", _layout(detect_layouts.sdxl_checkpoint())),
    "vae-pt-state_dict": ("v.vae.pt", _layout(detect_layouts.ldm_vae(""), "zip", wrap="state_dict")),
    "diffusers-vae": ("dv.safetensors", _layout(detect_layouts.diffusers_vae())),
    "vae-approx": ("approx.pt", _layout(detect_layouts.vae_approx(), "zip")),
    "kohya-lora": ("l.safetensors", lambda p: build.write_safetensors(str(p), build.kohya_lora(tiny_sd1_layout()))),
    "locon-pt": ("lc.pt", _layout(detect_layouts.lora_layout(detect_layouts.sd1_targets(conv=True), "locon")[0], "zip")),
    "controlnet": ("cn.pth", _layout(detect_layouts.controlnet_ldm(), "zip")),
    "esrgan": ("x4.pth", _layout(detect_layouts.esrgan_old(), "legacy")),
    "ip-adapter-nested": ("ip.bin", lambda p: build.save_torch(detect_layouts.nested(detect_layouts.ip_adapter()),
                                                                str(p))),
    "a1111-embedding-zip": ("e.pt", lambda p: build.a1111_embedding(str(p))),
    "a1111-embedding-legacy": ("e.pt", lambda p: build.a1111_embedding(str(p), mode="legacy")),
    "original-ti-token-tensors": ("o.pt", _original_ti),
    "diffusers-embedding-1d": ("learned_embeds.bin", lambda p: build.save_torch({"<cat>": torch.randn(768)}, str(p))),
    "diffusers-embedding-2d": ("learned_embeds.bin",
                               lambda p: build.save_torch({"<cat>": torch.randn(3, 768)}, str(p))),
    "emb_params-pt": ("ep.pt", lambda p: build.save_torch({"emb_params": torch.randn(2, 768)}, str(p))),
    "sdxl-embedding-pair": ("xl.pt", lambda p: build.save_torch({"clip_l": torch.randn(2, 768),
                                                                 "clip_g": torch.randn(2, 1280)}, str(p))),
    "hypernetwork": ("hn.pt", _hypernetwork),
    "hypernetwork-layer-norm": ("hn.pt", lambda p: _hypernetwork(p, structure=(1, 2, 1), layer_norm=True)),
    "hypernetwork-novelai-old": ("hn.pt", lambda p: _hypernetwork(p, old=True)),
    "views-legacy": ("views.pt", lambda p: build.save_torch(OrderedDict(
        (f"{i}.t", build.sample_tensor(dt, (4, 6), seed=i).t()) for i, dt in enumerate(build.TORCH_DTYPES)
        if dt != torch.complex128), str(p), "legacy")),
    "numpy-npz": ("arrays.npz", _numpy),
    "numpy-big-endian": ("be.npy", _npy_big_endian),
}


#: what convert takes some of them for, so each rename rule above is really exercised
CONVERT_KIND = {"sd1-ckpt-state_dict-wrapper": "checkpoint", "vae-pt-state_dict": "vae", "hypernetwork": "hypernetwork",
                "hypernetwork-layer-norm": "hypernetwork", "a1111-embedding-zip": "embedding",
                "original-ti-token-tensors": "embedding", "diffusers-embedding-1d": "embedding",
                "diffusers-embedding-2d": "embedding", "sdxl-embedding-pair": "embedding", "kohya-lora": "lora"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_verify_accepts_convert_output_of_every_fixture_kind(tmp_path: Path, kind: str) -> None:
    name, make = KINDS[kind]
    src = tmp_path / name
    make(src)
    r = modelkit.convert(src, tmp_path / "out.safetensors")
    assert r.kind == CONVERT_KIND.get(kind, r.kind)
    v = modelkit.verify(src, r.output)
    assert v.ok, (kind, r.changes, v.mismatches[:3])
    assert v.checked == r.tensors > 0 and v.cast == 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_verify_accepts_prune_output_of_every_fixture_kind(tmp_path: Path, kind: str) -> None:
    """prune applies convert's renames too (and drops EMA copies, junk): verify follows them."""
    name, make = KINDS[kind]
    src = tmp_path / name
    make(src)
    r = modelkit.prune(src, tmp_path / "out.safetensors")
    v = modelkit.verify(src, r.output)
    assert v.ok, (kind, r.changes, v.mismatches[:3])
    assert v.checked == r.tensors > 0


REAL = sorted(p.name for p in REALDATA.iterdir()) if REALDATA.is_dir() else []


@pytest.mark.parametrize("name", [n for n in REAL if n.endswith((".pt", ".bin", ".ckpt", ".pth", ".safetensors"))]
                         or ["(no realdata)"])
def test_verify_accepts_convert_output_of_every_real_file(realdata: Path, tmp_path: Path, name: str) -> None:
    src = realdata / name
    r = modelkit.convert(src, tmp_path / "out.safetensors")
    v = modelkit.verify(src, r.output)
    assert v.ok, (name, r.changes, v.mismatches[:3])
    assert v.checked == r.tensors


def _tamper(path: str, name: str) -> None:
    """Flip one bit of tensor ``name``'s first byte in place (the header is left as it was)."""
    import json

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin = json.loads(f.read(n))[name]["data_offsets"][0]
        f.seek(8 + n + begin)
        b = f.read(1)
        f.seek(8 + n + begin)
        f.write(bytes([b[0] ^ 1]))


@pytest.mark.parametrize("kind", ["diffusers-embedding-1d", "a1111-embedding-zip", "hypernetwork",
                                  "sd1-ckpt-state_dict-wrapper"])
def test_verify_reports_a_tampered_output(tmp_path: Path, kind: str) -> None:
    name, make = KINDS[kind]
    src = tmp_path / name
    make(src)
    out = modelkit.convert(src, tmp_path / "out.safetensors").output
    with modelkit.open_model(out) as mf:
        victim = next(k for k, ref in mf.items() if ref.nbytes and ref.dtype.is_float)
    _tamper(out, victim)
    v = modelkit.verify(src, out)
    assert not v.ok and [m.name for m in v.mismatches] == [victim]
    assert v.mismatches[0].source is not None and "values differ" in v.mismatches[0].problem


def test_a_renamed_tensor_is_not_followed(tmp_path: Path) -> None:
    """Only the renames convert makes are followed: a second tensor beside a diffusers token is not."""
    src = tmp_path / "two.bin"
    build.save_torch({"<a>": torch.randn(768), "<b>": torch.randn(768)}, str(src))
    out = tmp_path / "out.safetensors"
    build.write_safetensors(str(out), {"emb_params": torch.randn(1, 768)}, {"name": "<a>"})
    v = modelkit.verify(src, out)
    assert not v.ok and v.mismatches[0].problem == "not in the source"
