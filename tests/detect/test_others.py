"""VAEs, VAE-approx, ControlNets, T2I- and IP-Adapters, text encoders and upscalers."""

from __future__ import annotations

from pathlib import Path

import pytest

import modelkit
from fixtures import build
from fixtures import detect_layouts as L
from tests.detect.helpers import assert_json_ready, detect_layout

CASES = {
    # name: (layout, container, kind, subtype, base, confidence)
    "vae-ft-mse.ckpt": (L.ldm_vae(""), "zip-state_dict", "vae", "ldm", None, "high"),
    "vae-prefixed.safetensors": (L.ldm_vae("first_stage_model."), "safetensors", "vae", "ldm", None, "high"),
    "vae-16ch.safetensors": (L.ldm_vae("", z=16, quant=False), "safetensors", "vae", "ldm", None, "high"),
    "vae-diffusers-old.bin": (L.diffusers_vae(old_attention=True), "zip", "vae", "diffusers", None, "high"),
    "vae-diffusers-new.safetensors": (L.diffusers_vae(), "safetensors", "vae", "diffusers", None, "high"),
    "approx.pt": (L.vae_approx(), "zip", "vae-approx", "a1111", None, "high"),
    "cn-sd15.pth": (L.controlnet_ldm(), "zip", "controlnet", "ldm", "sd1", "high"),
    "cn-v11.safetensors": (L.controlnet_ldm(""), "safetensors", "controlnet", "ldm", "sd1", "high"),
    "cn-sd21.safetensors": (L.controlnet_ldm(context=1024), "safetensors", "controlnet", "ldm", "sd2", "high"),
    "cn-sdxl-ldm.safetensors": (L.controlnet_ldm("", sdxl=True), "safetensors", "controlnet", "ldm", "sdxl", "high"),
    "control-lora.safetensors": (L.control_lora(), "safetensors", "controlnet", "control-lora", "sdxl", "high"),
    "lllite.safetensors": (L.controlnet_lllite(), "safetensors", "controlnet", "lllite", "sdxl", "high"),
    "ip-flux.safetensors": (L.ip_adapter_flux(), "safetensors", "ip-adapter", "xlabs", "flux", "high"),
    "cn-sdxl-diffusers.safetensors": (L.controlnet_diffusers(), "safetensors", "controlnet", "diffusers", "sdxl", "high"),
    "cn-sd15-diffusers.bin": (L.controlnet_diffusers(768, None), "zip", "controlnet", "diffusers", "sd1", "high"),
    "cn-flux.safetensors": (L.controlnet_flux(), "safetensors", "controlnet", "diffusers", "flux", "high"),
    "t2i-sd15.pth": (L.t2i_adapter(), "zip", "t2i-adapter", "full", "sd1", "medium"),
    "t2i-sketch.pth": (L.t2i_adapter(cin=64), "zip", "t2i-adapter", "full", "sd1", "medium"),
    "t2i-light.pth": (L.t2i_adapter_light(), "zip", "t2i-adapter", "light", "sd1", "medium"),
    "t2i-sdxl.safetensors": (L.t2i_adapter(768, diffusers_names=True), "safetensors", "t2i-adapter", "diffusers", "sdxl", "high"),
    "ip-plus-sdxl.safetensors": (L.ip_adapter(2048, plus=True), "safetensors", "ip-adapter", "plus", "sdxl", "high"),
    "ip-faceid.safetensors": (L.ip_adapter(768, faceid=True), "safetensors", "ip-adapter", "faceid", "sd1", "high"),
    "clip-l.safetensors": (L.hf_clip("", 768, 1), "safetensors", "text-encoder", "clip-l", None, "high"),
    "clip-g.safetensors": (L.hf_clip("", 1280, 1, projection=True), "safetensors", "text-encoder", "openclip-g", None, "high"),
    "sd2-text.safetensors": (L.hf_clip("", 1024, 1), "safetensors", "text-encoder", "openclip-h", "sd2", "high"),
    "open-clip-h.bin": (L.openclip_text("", 1024, 1), "zip", "text-encoder", "openclip-h", "sd2", "high"),
    "sdxl-clips.safetensors": ({**L.hf_clip("clip_l.transformer.", 768, 1), **L.hf_clip("clip_g.transformer.", 1280, 1)},
                               "safetensors", "text-encoder", "clip-l+openclip-g", None, "high"),
    "t5xxl.safetensors": (L.t5_encoder(), "safetensors", "text-encoder", "t5-xxl", None, "high"),
    "sd1-text-extracted.safetensors": (L.hf_clip("cond_stage_model.transformer.", 768, 1), "safetensors", "text-encoder",
                                       "clip-l", "sd1", "medium"),
    "4x-esrgan.pth": (L.esrgan_old(), "zip", "upscaler", "esrgan-old", None, "high"),
    "esrgan-basicsr.pth": (L.esrgan_basicsr(), "legacy", "upscaler", "esrgan", None, "high"),
    "compact.pth": (L.srvgg_compact(scale=2), "zip-params", "upscaler", "compact", None, "high"),
    "realesrgan-x2.pth": (L.esrgan_basicsr(new_names=True, cin=12), "zip-params_ema", "upscaler", "real-esrgan", None, "high"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kind_subtype_base(tmp_path: Path, name: str) -> None:
    layout, container, kind, subtype, base, level = CASES[name]
    wrap = None
    if container.startswith("zip-"):
        container, wrap = "zip", container[4:]
    det = detect_layout(tmp_path, layout, name, container, wrap=wrap)
    assert (det.kind, det.subtype, det.base, det.confidence) == (kind, subtype, base, level), det.evidence
    assert_json_ready(det)


def test_vae_latent_channels_and_shared_shapes(tmp_path: Path) -> None:
    four = detect_layout(tmp_path, L.ldm_vae(""), "a.safetensors")
    assert four.variant == {"latent_channels": 4}
    assert "SD1, SD2 and SDXL VAEs share shapes" in four.evidence
    sixteen = detect_layout(tmp_path, L.ldm_vae("", z=16, quant=False), "b.safetensors")
    assert sixteen.variant == {"latent_channels": 16} and "SD3 and Flux VAEs share shapes" in sixteen.evidence


def test_vae_base_from_metadata_only_when_shapes_allow_it(tmp_path: Path) -> None:
    xl = detect_layout(tmp_path, L.ldm_vae(""), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})
    assert (xl.base, xl.confidence) == ("sdxl", "medium")
    bad = detect_layout(tmp_path, L.ldm_vae("", z=16, quant=False), "b.safetensors",
                        metadata={"modelspec.architecture": "stable-diffusion-v1"})
    assert bad.base is None and any(e.startswith("conflict") for e in bad.evidence)


def test_diffusers_vae_attention_key_generation(tmp_path: Path) -> None:
    old = detect_layout(tmp_path, L.diffusers_vae(old_attention=True), "a.safetensors")
    new = detect_layout(tmp_path, L.diffusers_vae(), "b.safetensors")
    assert old.details["attention_keys"].startswith("old") and new.details["attention_keys"].startswith("new")


def test_vae_approx_is_not_a_vae(tmp_path: Path) -> None:
    det = detect_layout(tmp_path, L.vae_approx(), "model.pt", "zip")
    assert det.kind == "vae-approx" and det.details["latent_channels"] == 4
    sd3 = detect_layout(tmp_path, L.vae_approx(z=16), "vaeapprox-sd3.pt", "zip")
    assert sd3.kind == "vae-approx" and sd3.variant == {"latent_channels": 16}


def test_controlnet_details(tmp_path: Path) -> None:
    det = detect_layout(tmp_path, L.controlnet_ldm(), "cn.pth", "zip")
    assert det.details["prefixed"] is True and det.details["hint_channels"] == 3 and det.details["context_dim"] == 768
    xl = detect_layout(tmp_path, L.controlnet_diffusers(), "x.safetensors")
    assert xl.details["adm_in_channels"] == 2816


def test_ip_adapter_bin_nests_its_two_parts(tmp_path: Path) -> None:
    path = tmp_path / "ip-adapter_sd15.bin"
    build.save_torch(L.nested(L.ip_adapter(768)), str(path))
    det = modelkit.detect(path)
    assert (det.kind, det.subtype, det.base) == ("ip-adapter", "base", "sd1")
    assert det.details["attention_layers"] == 16


def test_upscaler_scale_and_blocks(tmp_path: Path) -> None:
    old = detect_layout(tmp_path, L.esrgan_old(nb=3), "a.pth", "zip")
    assert old.details["blocks"] == 3 and old.variant == {"scale": 4}
    x2 = detect_layout(tmp_path, L.esrgan_basicsr(new_names=True, cin=12), "b.pth", "zip", wrap="params_ema")
    assert x2.variant == {"scale": 2} and x2.details["wrapper"] == "params_ema"
    compact = detect_layout(tmp_path, L.srvgg_compact(scale=4), "c.pth", "zip", wrap="params")
    assert compact.variant == {"scale": 4}


def test_text_encoder_details(tmp_path: Path) -> None:
    det = detect_layout(tmp_path, L.hf_clip("", 768, 2), "clip_l.safetensors")
    assert det.details["encoders"] == [{"prefix": "", "family": "clip-l", "width": 768, "layers": 2}]
    assert any("SD1, SDXL, SD3 and Flux" in e for e in det.evidence)
