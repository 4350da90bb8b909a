"""Embeddings, hypernetworks and optimizer sidecars, in the containers they really ship in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modelkit
from fixtures import build
from fixtures import detect_layouts as L


def _save(tmp_path: Path, name: str, obj: object, mode: str = "zip") -> modelkit.Detection:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        build.write_safetensors(str(path), obj)  # type: ignore[arg-type]
    else:
        build.save_torch(obj, str(path), mode)
    return modelkit.detect(path)


@pytest.mark.parametrize("mode", ["zip", "legacy"])
@pytest.mark.parametrize(("width", "base"), [(768, "sd1"), (1024, "sd2")])
def test_a1111_embedding(tmp_path: Path, mode: str, width: int, base: str) -> None:
    det = _save(tmp_path, "style.pt", L.a1111_embedding(3, width, name="style"), mode)
    assert (det.kind, det.subtype, det.base, det.confidence) == ("embedding", "a1111", base, "high")
    d = det.details
    assert (d["vectors"], d["width"], d["name"], d["name_matches_file"], d["step"]) == (3, width, "style", True, 500)


def test_internal_name_that_differs_from_the_file_is_reported(tmp_path: Path) -> None:
    det = _save(tmp_path, "renamed.pt", L.a1111_embedding(name="original-name"))
    assert det.details["name"] == "original-name" and det.details["name_matches_file"] is False
    assert any("differs from the file name" in e for e in det.evidence)


def test_dreamartist_negative_half(tmp_path: Path) -> None:
    """DreamArtist writes two A1111 embeddings; the negative one is named ``<name>-neg`` inside."""
    det = _save(tmp_path, "whatever.pt", L.a1111_embedding(5, name="artist-neg"))
    assert (det.kind, det.subtype, det.base) == ("embedding", "dreamartist", "sd1")
    assert det.details["negative"] is True
    positive = _save(tmp_path, "artist.pt", L.a1111_embedding(5, name="artist"))
    assert positive.subtype == "a1111"


@pytest.mark.parametrize("name", ["neg.pt", "neg.safetensors"])
def test_emb_params(tmp_path: Path, name: str) -> None:
    det = _save(tmp_path, name, {"emb_params": torch.zeros(8, 1024)})
    assert (det.kind, det.subtype, det.base, det.details["vectors"]) == ("embedding", "emb_params", "sd2", 8)
    assert "also_matched" not in det.details


def test_sdxl_embedding(tmp_path: Path) -> None:
    det = _save(tmp_path, "xl.safetensors", {"clip_l": torch.zeros(4, 768), "clip_g": torch.zeros(4, 1280)})
    assert (det.kind, det.subtype, det.base) == ("embedding", "sdxl", "sdxl")
    assert det.details["width"] == {"clip_l": 768, "clip_g": 1280} and det.details["vectors"] == 4


def test_sdxl_embedding_with_swapped_widths_is_not_sdxl(tmp_path: Path) -> None:
    det = _save(tmp_path, "odd.safetensors", {"clip_l": torch.zeros(4, 1280), "clip_g": torch.zeros(4, 768)})
    assert det.base is None and det.confidence == "low"


@pytest.mark.parametrize(("shape", "base"), [((768,), "sd1"), ((2, 1024), "sd2")])
def test_diffusers_learned_embeds(tmp_path: Path, shape: tuple[int, ...], base: str) -> None:
    det = _save(tmp_path, "learned_embeds.bin", {"<cat-toy>": torch.zeros(shape)})
    assert (det.kind, det.subtype, det.base, det.confidence) == ("embedding", "diffusers", base, "high")
    assert det.details["token"] == "<cat-toy>"


def test_single_tensor_of_no_embedding_width_is_unknown(tmp_path: Path) -> None:
    assert _save(tmp_path, "x.bin", {"<tok>": torch.zeros(3, 100)}).kind == "unknown"
    assert _save(tmp_path, "y.bin", {"proj.weight": torch.zeros(768)}).kind == "unknown"


def test_aesthetic_gradient_embedding(tmp_path: Path) -> None:
    det = _save(tmp_path, "aesthetic.pt", torch.zeros(1, 768))
    assert (det.kind, det.subtype, det.base, det.confidence) == ("embedding", "aesthetic-gradient", "sd1", "medium")


def test_hypernetwork_a1111(tmp_path: Path) -> None:
    det = _save(tmp_path, "hn.pt", L.hypernetwork())
    assert (det.kind, det.subtype, det.base, det.confidence) == ("hypernetwork", "a1111", "sd1", "high")
    d = det.details
    assert d["sizes"] == [320, 640, 768, 1280]
    assert d["layer_structure"] == [1, 0.25, 1] and d["layer_structure_from_shapes"] == [1.0, 0.25, 1.0]
    assert (d["activation_func"], d["is_layer_norm"], d["use_dropout"]) == ("relu", False, False)
    assert d["layer_norm_from_shapes"] is False


def test_hypernetwork_with_layer_norm_for_sd2(tmp_path: Path) -> None:
    det = _save(tmp_path, "hn2.pt", L.hypernetwork((1024, 320), (1, 0.5, 0.25, 1), layer_norm=True))
    assert det.base == "sd2"
    assert det.details["layer_norm_from_shapes"] is True
    assert det.details["layer_structure_from_shapes"] == [1.0, 0.5, 0.25, 1.0]


def test_hypernetwork_for_both_context_widths_has_no_base(tmp_path: Path) -> None:
    det = _save(tmp_path, "both.pt", L.hypernetwork((768, 1024)))
    assert (det.kind, det.base, det.confidence) == ("hypernetwork", None, "medium")


def test_hypernetwork_with_its_optimizer_state_inside(tmp_path: Path) -> None:
    obj = {**L.hypernetwork((768,)), **L.optimizer_sidecar([(192, 768), (192,)])}
    det = _save(tmp_path, "hn-old.pt", obj)
    assert (det.kind, det.base, det.details["embedded_optimizer_state"]) == ("hypernetwork", "sd1", True)


def test_novelai_hypernetwork(tmp_path: Path) -> None:
    det = _save(tmp_path, "anime.pt", L.hypernetwork((768, 320), old=True), "legacy")
    assert (det.kind, det.subtype, det.base) == ("hypernetwork", "novelai", "sd1")


@pytest.mark.parametrize(("shapes", "likely"), [([(2, 768)], "embedding"), ([(4, 8), (4,), (8, 4)], "hypernetwork")])
def test_optimizer_sidecar(tmp_path: Path, shapes: list[tuple[int, ...]], likely: str) -> None:
    det = _save(tmp_path, "x.pt.optim", L.optimizer_sidecar(shapes))
    assert (det.kind, det.subtype, det.confidence) == ("unknown", "optimizer-state", "high")
    assert det.details["likely_for"] == likely and det.details["optimizer"] == "AdamW"
    assert det.details["for_hash"] == "0123abcd"
