"""The LoRA family: every algorithm and key style, base from the cross-attention context width."""

from __future__ import annotations

from pathlib import Path

import pytest

import modelkit
from fixtures import detect_layouts as L
from tests.detect.helpers import assert_json_ready, lora

ATTN = [t for t in L.sd1_targets(te=False) if ".attn" in t[1]]
CROSS = [t for t in L.sd1_targets(te=False) if ".attn2." in t[1]]

CASES = {
    # name: (targets, algo, style, file name, subtype, base)
    "kohya-sd1": (L.sd1_targets(), "lora", "kohya", "a.safetensors", "lora", "sd1"),
    "kohya-sd1-pt": (L.sd1_targets(), "lora", "kohya", "a.pt", "lora", "sd1"),
    "kohya-sd2": (L.sd1_targets(context=1024), "lora", "kohya", "a.safetensors", "lora", "sd2"),
    "kohya-sdxl": (L.sdxl_targets(), "lora", "kohya", "a.safetensors", "lora", "sdxl"),
    "locon": (L.sd1_targets(conv=True), "lora", "kohya", "a.safetensors", "locon", "sd1"),
    "loha": (L.sd1_targets(), "loha", "kohya", "a.safetensors", "loha", "sd1"),
    "lokr": (L.sd1_targets(), "lokr", "kohya", "a.safetensors", "lokr", "sd1"),
    "lokr-sdxl": (L.sdxl_targets(te=False), "lokr", "kohya", "a.safetensors", "lokr", "sdxl"),
    "glora": (L.sd1_targets(), "glora", "kohya", "a.safetensors", "glora", "sd1"),
    "full": (CROSS, "full", "kohya", "a.safetensors", "full", "sd1"),
    "dora": (L.sd1_targets(), "dora", "kohya", "a.safetensors", "dora", "sd1"),
    "oft-sdxl": (L.sdxl_targets(), "oft", "kohya", "a.safetensors", "oft", "sdxl"),
    "diffusers-sd1": (L.sd1_targets(), "lora", "diffusers", "pytorch_lora_weights.safetensors", "diffusers", "sd1"),
    "diffusers-sd1-bin": (L.sd1_targets(), "lora", "diffusers", "pytorch_lora_weights.bin", "diffusers", "sd1"),
    "peft-sdxl": (L.sdxl_targets(diffusers_names=True), "lora", "peft", "a.safetensors", "diffusers", "sdxl"),
    "peft-raw-sd2": (L.sd1_targets(context=1024, te=False), "lora", "peft-raw", "adapter_model.safetensors", "peft", "sd2"),
    "attnproc-sd1": (ATTN, "lora", "attnproc", "pytorch_lora_weights.bin", "diffusers-attnproc", "sd1"),
    "flux-kohya": (L.flux_targets(), "lora", "kohya", "a.safetensors", "lora", "flux"),
    "flux-diffusers": (L.flux_targets(True), "lora", "transformer", "a.safetensors", "diffusers", "flux"),
    "flux-comfy": (L.flux_targets(), "lora", "comfyui", "a.safetensors", "lora", "flux"),
    "sd3-diffusers": (L.sd3_targets(True), "lora", "transformer", "a.safetensors", "diffusers", "sd3"),
    "sd3-kohya": (L.sd3_targets(False), "lora", "kohya", "a.safetensors", "lora", "sd3"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_flavour_and_base(tmp_path: Path, case: str) -> None:
    targets, algo, style, name, subtype, base = CASES[case]
    det = lora(tmp_path, targets, algo, style, name)
    level = "medium" if algo == "oft" else "high"  # OFT blocks hide the widths; te2 still says SDXL
    assert (det.kind, det.subtype, det.base, det.confidence) == ("lora", subtype, base, level), det.evidence
    assert det.details["module_count"] == len(targets)
    assert_json_ready(det)


def test_ranks_alphas_modules_and_unet_only(tmp_path: Path) -> None:
    det = lora(tmp_path, L.sdxl_targets(), rank=8, alpha=4.0)
    d = det.details
    assert d["ranks"] == [8] and d["alphas"] == [4.0]
    assert d["modules"] == {"unet": len(L.sdxl_targets(te=False)), "te1": 12, "te2": 12}
    assert d["unet_only"] is False and d["key_style"] == "kohya"
    assert any("attn2_to_k.lora_down.weight [8, 2048]" in e for e in det.evidence)
    unet = lora(tmp_path, L.sd1_targets(te=False), name="u.safetensors")
    assert unet.details["unet_only"] is True and unet.details["modules"] == {"unet": 48}


def test_locon_reports_conv_ranks(tmp_path: Path) -> None:
    det = lora(tmp_path, L.sd1_targets(conv=True), rank=4)
    assert det.subtype == "locon" and det.details["conv_ranks"] == [4]
    assert det.details["algorithms"]["locon"] == 4


def test_ia3_reads_its_on_input_flag_to_find_the_context_width(tmp_path: Path) -> None:
    det = lora(tmp_path, L.sd1_targets(te=False), "ia3", on_input=r"attn2\.to_[kv]$")
    assert (det.subtype, det.base) == ("ia3", "sd1")
    assert any("on_input=1" in e and "768" in e for e in det.evidence)
    blind = lora(tmp_path, L.sd1_targets(te=False), "ia3", name="b.safetensors", on_input=None)
    assert (blind.kind, blind.base, blind.confidence) == ("lora", None, "medium")


def test_text_encoder_only_lora_is_based_on_its_width(tmp_path: Path) -> None:
    sd1 = lora(tmp_path, L.sd1_targets(unet=False))
    assert (sd1.base, sd1.confidence, sd1.details["text_encoder_only"]) == ("sd1", "medium", True)
    sd2 = lora(tmp_path, L.text_targets("te", 1024), name="b.safetensors")
    assert sd2.base == "sd2"
    xl = lora(tmp_path, L.text_targets("te1", 768) + L.text_targets("te2", 1280), name="c.safetensors")
    assert xl.base == "sdxl"


def test_dylora_is_named_by_metadata_only(tmp_path: Path) -> None:
    det = lora(tmp_path, L.sd1_targets(), metadata={"ss_network_module": "networks.dylora"})
    assert det.subtype == "dylora" and det.base == "sd1"
    assert det.details["network_module"] == "networks.dylora"


def test_metadata_claiming_sdxl_on_an_sd1_lora_loses_to_shapes(tmp_path: Path) -> None:
    md = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    det = lora(tmp_path, L.sd1_targets(), metadata=md)
    assert det.base == "sd1" and det.kind == "lora"
    conflict = [e for e in det.evidence if e.startswith("conflict:")]
    assert conflict and "sdxl" in conflict[0] and "shapes say sd1" in conflict[0]
    assert det.details["conflicts"] == conflict


def test_metadata_fills_in_when_shapes_cannot_tell(tmp_path: Path) -> None:
    self_attn_only = [t for t in L.sd1_targets(te=False) if ".attn1." in t[1]]
    blind = lora(tmp_path, self_attn_only)
    assert (blind.base, blind.confidence) == (None, "medium")
    told = lora(tmp_path, self_attn_only, name="m.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    assert (told.base, told.confidence) == ("sd1", "medium")
    assert "metadata ss_base_model_version=sd_v1" in told.evidence


def test_sdxl_depth_is_a_hint_when_no_cross_attention_is_trained(tmp_path: Path) -> None:
    self_attn = [t for t in L.sdxl_targets(te=False) if ".attn1." in t[1]]
    det = lora(tmp_path, self_attn)
    assert det.base == "sdxl" and det.confidence == "medium"


def test_bundled_embeddings_are_listed(tmp_path: Path) -> None:
    layout, values = L.lora_layout(L.sd1_targets(), "lora")
    layout["bundle_emb.mychar.string_to_param.*"] = ((2, 768), "float16")
    path = tmp_path / "bundle.safetensors"
    L.write(layout, str(path), values=values)
    det = modelkit.detect(path)
    assert det.kind == "lora" and det.details["bundled_embeddings"] == ["mychar"]
