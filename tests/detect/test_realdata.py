"""Real files from public repositories (../shared/realdata); skipped where the folder is absent."""

from __future__ import annotations

from pathlib import Path

import modelkit
from tests.detect.helpers import assert_json_ready


def _detect(realdata: Path, name: str) -> modelkit.Detection:
    det = modelkit.detect(realdata / name)
    assert_json_ready(det)
    return det


def test_easynegative_emb_params(realdata: Path) -> None:
    det = _detect(realdata, "EasyNegative.pt")
    assert (det.kind, det.subtype, det.base, det.confidence) == ("embedding", "emb_params", "sd1", "high")
    assert (det.details["vectors"], det.details["width"]) == (8, 768)


def test_bad_hands_a1111_embedding(realdata: Path) -> None:
    det = _detect(realdata, "bad-hands-5.pt")
    assert (det.kind, det.subtype, det.base) == ("embedding", "a1111", "sd1")
    assert det.details["vectors"] == 2 and det.details["name"] == "bad-hands-5"
    assert det.details["sd_checkpoint_name"] == "blossom-extract"


def test_diffusers_learned_embeds(realdata: Path) -> None:
    det = _detect(realdata, "learned_embeds.bin")
    assert (det.kind, det.subtype, det.base) == ("embedding", "diffusers", "sd1")
    assert det.details["token"] == "<birb-style>" and det.details["vectors"] == 1


def test_vae_approx_is_not_a_vae(realdata: Path) -> None:
    det = _detect(realdata, "vae-approx-sd1.pt")
    assert (det.kind, det.confidence) == ("vae-approx", "high")
    assert det.details["latent_channels"] == 4


def test_old_diffusers_attention_processor_lora(realdata: Path) -> None:
    det = _detect(realdata, "diffusers-attnproc-lora-sd1-cuda-storages.bin")
    assert (det.kind, det.subtype, det.base, det.confidence) == ("lora", "diffusers-attnproc", "sd1", "high")
    assert det.details["ranks"] == [4] and det.details["unet_only"] is True
    assert det.details["module_count"] == 128


def test_empty_container_is_unknown(realdata: Path) -> None:
    assert _detect(realdata, "empty.pt").kind == "unknown"
