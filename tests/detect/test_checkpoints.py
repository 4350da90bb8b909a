"""Full checkpoints and denoisers: base from context/ADM widths, subtype from conv_in channels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import modelkit
from fixtures import build
from fixtures import detect_layouts as L
from modelkit.detect import detect_folder
from tests.detect.helpers import assert_json_ready, detect_layout

CASES = {
    # name: (layout builder, container, kind, subtype, base, variant subset)
    "sd1.ckpt": (lambda: L.sd1_checkpoint(), "ckpt", "standard", "sd1", {"prediction": "eps", "resolution": 512}),
    "sd1-inpaint.safetensors": (lambda: L.sd1_checkpoint(cin=9), "safetensors", "inpaint", "sd1", {}),
    "sd1-ip2p.safetensors": (lambda: L.sd1_checkpoint(cin=8), "safetensors", "instruct-pix2pix", "sd1", {}),
    "sd2.ckpt": (lambda: L.sd2_checkpoint(), "zip", "standard", "sd2", {"prediction": None}),
    "sd2-inpaint.safetensors": (lambda: L.sd2_checkpoint(cin=9), "safetensors", "inpaint", "sd2", {}),
    "sdxl.safetensors": (lambda: L.sdxl_checkpoint(), "safetensors", "standard", "sdxl", {"prediction": "eps", "resolution": 1024}),
    "sdxl-inpaint.safetensors": (lambda: L.sdxl_checkpoint(cin=9), "safetensors", "inpaint", "sdxl", {}),
    "sdxl-vpred.safetensors": (lambda: L.sdxl_checkpoint(markers=("v_pred", "ztsnr")), "safetensors", "standard", "sdxl",
                               {"prediction": "v", "zsnr": True}),
    "refiner.safetensors": (lambda: L.sdxl_refiner_checkpoint(), "safetensors", "standard", "sdxl-refiner", {}),
    "sd3-medium.safetensors": (lambda: L.sd3_checkpoint(), "safetensors", "standard", "sd3", {"sd3": "3-medium", "depth": 24}),
    "sd35-large.safetensors": (lambda: L.sd3_checkpoint(38, qk_norm=True), "safetensors", "standard", "sd3", {"sd3": "3.5-large"}),
    "sd35-medium.safetensors": (lambda: L.sd3_checkpoint(24, attn2=True, qk_norm=True), "safetensors", "standard", "sd3",
                                {"sd3": "3.5-medium"}),
    "flux-dev.safetensors": (lambda: L.flux_transformer(), "safetensors", "standard", "flux", {"flux": "dev"}),
    "flux-schnell.safetensors": (lambda: L.flux_transformer(guidance=False), "safetensors", "standard", "flux", {"flux": "schnell"}),
    "flux-fill.safetensors": (lambda: L.flux_transformer(img_in=384), "safetensors", "inpaint", "flux", {"flux": "fill"}),
    "flux-depth.safetensors": (lambda: L.flux_transformer(img_in=128), "safetensors", "control", "flux", {"flux": "control"}),
    "flux-comfy.safetensors": (lambda: {**L.flux_transformer("model.diffusion_model."), **L.ldm_vae(z=16, quant=False)},
                               "safetensors", "standard", "flux", {"flux": "dev"}),
    "unet-sd1-diffusers.safetensors": (lambda: L.diffusers_unet(), "safetensors", "standard", "sd1", {}),
    "unet-sdxl-diffusers.bin": (lambda: L.diffusers_unet(context=2048, adm=2816, attn_levels=(1,)), "zip", "standard", "sdxl", {}),
    "unet-sdxl-ldm.safetensors": (lambda: L.ldm_unet(""), "safetensors", "standard", "sdxl", {}),
    "flux-diffusers.safetensors": (lambda: L.diffusers_flux(guidance=False), "safetensors", "standard", "flux", {"flux": "schnell"}),
    "sd3-diffusers.safetensors": (lambda: L.diffusers_sd3(), "safetensors", "standard", "sd3", {"sd3": "3-medium"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_kind_base_subtype_variant(tmp_path: Path, name: str) -> None:
    builder, container, subtype, base, variant = CASES[name]
    det = detect_layout(tmp_path, builder(), name, container)
    assert (det.kind, det.subtype, det.base, det.confidence) == ("checkpoint", subtype, base, "high"), det.evidence
    assert variant.items() <= det.variant.items(), det.variant
    assert det.evidence and all(isinstance(e, str) for e in det.evidence)
    assert_json_ready(det)


def test_sd1_ckpt_reports_components_ema_and_wrapper(tmp_path: Path) -> None:
    det = detect_layout(tmp_path, L.sd1_checkpoint(ema=True), "ema.ckpt", "zip", wrap="state_dict")
    d = det.details
    assert d["components"] == ["text_encoder", "unet", "vae"]
    assert d["ema"] is True and d["ema_keys"] > 100
    assert d["wrappers"] == ["state_dict"]
    assert d["context_dim"] == 768 and d["in_channels"] == 4 and d["layout"] == "ldm"
    assert any("attn2.to_k" in e and "768" in e for e in det.evidence)


def test_sdxl_components_and_unet_only_files(tmp_path: Path) -> None:
    full = detect_layout(tmp_path, L.sdxl_checkpoint(), "full.safetensors")
    assert full.details["components"] == ["text_encoder_1", "text_encoder_2", "unet", "vae"]
    assert full.details["adm_in_channels"] == 2816 and full.details["ema"] is False
    alone = detect_layout(tmp_path, L.ldm_unet(""), "unet.safetensors")
    assert alone.details["components"] == ["unet"]
    sd3 = detect_layout(tmp_path, L.sd3_checkpoint(), "sd3.safetensors")
    assert sd3.details["components"] == ["clip_g", "clip_l", "t5xxl", "transformer", "vae"]


def test_sd2_prediction_from_yaml_beside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "768-v-ema.ckpt"
    L.write(L.sd2_checkpoint(), str(path), "zip")
    assert modelkit.detect(path).variant["prediction"] is None
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    det = modelkit.detect(path)
    assert det.variant["prediction"] == "v"
    assert any("768-v-ema.yaml" in e for e in det.evidence)


def test_sd2_prediction_and_resolution_from_metadata(tmp_path: Path) -> None:
    md = {"modelspec.architecture": "stable-diffusion-v2-768-v", "modelspec.resolution": "768x768"}
    det = detect_layout(tmp_path, L.sd2_checkpoint(), metadata=md)
    assert det.base == "sd2" and det.variant == {"prediction": "v", "resolution": 768}
    eps = detect_layout(tmp_path, L.sd2_checkpoint(), "e.safetensors", metadata={"modelspec.prediction_type": "epsilon"})
    assert eps.variant["prediction"] == "eps"


def test_metadata_claim_loses_to_shapes_and_is_reported(tmp_path: Path) -> None:
    det = detect_layout(tmp_path, L.sdxl_checkpoint(), metadata={"modelspec.architecture": "stable-diffusion-v1"})
    assert det.base == "sdxl"
    assert any(e.startswith("conflict:") and "stable-diffusion-v1" in e for e in det.evidence)
    assert det.details["conflicts"]


def test_v_pred_marker_beats_metadata_and_says_so(tmp_path: Path) -> None:
    det = detect_layout(tmp_path, L.sdxl_checkpoint(markers=("v_pred",)), metadata={"modelspec.prediction_type": "epsilon"})
    assert det.variant["prediction"] == "v"
    assert any("conflict" in e for e in det.evidence)


def test_text_encoder_of_another_base_is_a_conflict(tmp_path: Path) -> None:
    """An SD1 UNet with SD2's OpenCLIP text encoder: the UNet decides, the mismatch is reported."""
    layout = {k: v for k, v in L.sd1_checkpoint().items() if not k.startswith("cond_stage_model.")}
    layout.update(L.openclip_text("cond_stage_model.model."))
    det = detect_layout(tmp_path, layout)
    assert det.base == "sd1" and det.confidence == "medium"
    assert any("text encoders are laid out for sd2" in e for e in det.evidence)


def test_disagreeing_context_and_adm_widths_give_no_base(tmp_path: Path) -> None:
    det = detect_layout(tmp_path, L.ldm_unet("", context=768, adm=2816))
    assert det.kind == "checkpoint" and det.base is None and det.confidence == "low"


def _diffusers_pipeline(root: Path, pipeline: str, unet: L.Layout, prediction: str | None = None) -> None:
    parts = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "safety_checker": [None, None]}
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **parts}))
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        (root / sub).mkdir(parents=True)
    L.write(unet, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    (root / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024}))
    if prediction:
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))


def test_diffusers_folder_sd2_v(tmp_path: Path) -> None:
    _diffusers_pipeline(tmp_path, "StableDiffusionPipeline", L.diffusers_unet(context=1024), "v_prediction")
    det = modelkit.detect(tmp_path)
    assert (det.kind, det.base, det.variant["prediction"]) == ("checkpoint", "sd2", "v")
    assert det.details["layout"] == "diffusers-folder"
    assert det.details["components"] == ["text_encoder", "unet", "vae"]
    assert det.details["pipeline"] == "StableDiffusionPipeline"


def test_diffusers_folder_where_config_and_class_disagree_with_shapes(tmp_path: Path) -> None:
    _diffusers_pipeline(tmp_path, "StableDiffusionXLPipeline", L.diffusers_unet(context=768))
    det = detect_folder(tmp_path)
    assert det.base == "sd1" and det.confidence == "medium"
    assert sum(e.startswith("conflict") for e in det.evidence) == 2


def test_folder_without_diffusers_files_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    assert modelkit.detect(tmp_path).kind == "unknown"


def test_sharded_diffusers_component_folder(tmp_path: Path) -> None:
    layout = L.diffusers_flux()
    names = list(layout)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for shard, keys in shards.items():
        build.write_safetensors(str(tmp_path / shard), L.tensors({k: layout[k] for k in keys}))
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text("{}")
    det = modelkit.detect(tmp_path)
    assert (det.kind, det.base, det.variant) == ("checkpoint", "flux", {"flux": "dev"})


def test_sd2_prediction_from_weight_statistics(tmp_path: Path) -> None:
    """No marker, metadata or yaml: the spread of the last output block's norm1.bias decides."""
    import torch

    from modelkit.detect.layouts import tiny_sd1_layout

    layout = {k: v for k, v in tiny_sd1_layout(context_dim=1024).items() if k.startswith("model.diffusion_model.")}
    bias = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    for spread, want in ((0.2, "v"), (0.02, "eps")):
        sd = {k: torch.zeros(s) for k, (s, _d) in layout.items()}
        sd[bias] = torch.randn(sd[bias].shape, generator=torch.Generator().manual_seed(0)) * spread
        path = tmp_path / f"sd2-{want}.safetensors"
        build.write_safetensors(str(path), sd)
        det = modelkit.detect(path)
        assert (det.kind, det.base, det.variant["prediction"]) == ("checkpoint", "sd2", want)
        assert any("weight statistics" in e for e in det.evidence)
