"""inspect's missing-key check for full SD 1.x, SD 2.x and SDXL checkpoints (``detect.keysets``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modelkit
from fixtures import build
from fixtures import detect_layouts as L
from modelkit.detect import keysets, layouts

TINY = {"sd1": layouts.tiny_sd1_layout, "sd2": layouts.tiny_sd2_layout, "sdxl": layouts.tiny_sdxl_layout}
FULL = {"sd1": layouts.sd1_layout, "sd2": layouts.sd2_layout, "sdxl": layouts.sdxl_layout}


def _inspect(tmp_path: Path, layout: L.Layout, drop: tuple[str, ...] = (), name: str = "m.safetensors") -> tuple[
        modelkit.Detection, list[str]]:
    sd = L.tensors({k: v for k, v in layout.items() if k not in drop})
    for k in sd:
        if k.endswith("position_ids"):
            sd[k] = torch.arange(77).reshape(1, 77)
    path = tmp_path / name
    build.write_safetensors(str(path), sd)
    r = modelkit.inspect(path)
    assert r.detection is not None
    return modelkit.detect(path), [d for d in r.defects if "architecture are missing" in d]


def test_tiny_layouts_keep_every_key_of_the_full_size_ones() -> None:
    for base in ("sd2", "sdxl"):
        assert list(TINY[base]()) == list(FULL[base]())
    assert len(layouts.sd2_layout(schedule=False)) == 1228 and len(layouts.sdxl_layout()) == 2515


def test_required_keys_leave_out_only_the_optional_ones() -> None:
    sd2, xl, sd1 = keysets.required_keys("sd2"), keysets.required_keys("sdxl"), keysets.required_keys("sd1")
    assert set(layouts.sd2_layout(schedule=False)) - sd2 == {
        "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
        *(k for k in layouts.sd2_layout() if k.startswith("cond_stage_model.model.transformer.resblocks.23."))}
    assert set(layouts.sdxl_layout()) - xl == {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                                               "conditioner.embedders.1.model.logit_scale"}
    assert "conditioner.embedders.1.model.text_projection" in xl
    assert set(layouts.sd1_layout(schedule=False)) - sd1 == {
        "cond_stage_model.transformer.text_model.embeddings.position_ids"}


@pytest.mark.parametrize(("base", "cin", "subtype"), [("sd2", 4, "standard"), ("sd2", 9, "inpaint"),
                                                      ("sdxl", 4, "standard"), ("sdxl", 9, "inpaint")])
def test_a_complete_checkpoint_has_no_missing_keys(tmp_path: Path, base: str, cin: int, subtype: str) -> None:
    det, missing = _inspect(tmp_path, TINY[base](in_channels=cin))
    assert (det.kind, det.base, det.subtype) == ("checkpoint", base, subtype)
    assert missing == []


def test_optional_keys_are_not_demanded(tmp_path: Path) -> None:
    sd2 = layouts.tiny_sd2_layout()
    drop = tuple(k for k in sd2 if k.startswith("cond_stage_model.model.transformer.resblocks.23.")) + (
        "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale", *layouts.SCHEDULE_BUFFERS)
    assert _inspect(tmp_path, sd2, drop, "sd2.safetensors")[1] == []
    drop = ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
            "conditioner.embedders.1.model.logit_scale")
    assert _inspect(tmp_path, layouts.tiny_sdxl_layout(), drop, "xl.safetensors")[1] == []
    drop = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
    assert _inspect(tmp_path, layouts.tiny_sd1_layout(context_dim=768), drop, "sd1.safetensors")[1] == []


def test_deleted_keys_are_reported_per_component(tmp_path: Path) -> None:
    drop = ("model.diffusion_model.output_blocks.2.2.conv.weight", "model.diffusion_model.label_emb.0.2.bias",
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.bias",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
            "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight")
    det, missing = _inspect(tmp_path, layouts.tiny_sdxl_layout(), drop)
    assert det.base == "sdxl"
    assert missing == [
        "UNet: 2 keys of the SDXL architecture are missing (first: model.diffusion_model.label_emb.0.2.bias)",
        "VAE: 1 keys of the SDXL architecture are missing (first: first_stage_model.encoder.down.1.block.0.nin_shortcut.bias)",
        "text encoder 1 (CLIP-L): 1 keys of the SDXL architecture are missing "
        "(first: conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight)",
        "text encoder 2 (OpenCLIP-bigG): 2 keys of the SDXL architecture are missing "
        "(first: conditioner.embedders.1.model.text_projection)",
    ]
    drop = ("model.diffusion_model.input_blocks.1.1.proj_in.weight",
            "cond_stage_model.model.transformer.resblocks.22.ln_2.bias", "cond_stage_model.model.ln_final.weight")
    det, missing = _inspect(tmp_path, layouts.tiny_sd2_layout(), drop, "sd2.safetensors")
    assert det.base == "sd2"
    assert missing == [
        "UNet: 1 keys of the SD 2.x architecture are missing (first: model.diffusion_model.input_blocks.1.1.proj_in.weight)",
        "text encoder: 2 keys of the SD 2.x architecture are missing (first: cond_stage_model.model.ln_final.weight)",
    ]


@pytest.mark.parametrize("base", ["sd2", "sdxl"])
def test_an_absent_component_is_not_reported(tmp_path: Path, base: str) -> None:
    layout = TINY[base]()
    unet_only = {k: v for k, v in layout.items() if k.startswith("model.diffusion_model.")}
    det, missing = _inspect(tmp_path, unet_only, ("model.diffusion_model.out.2.bias",))
    assert det.base == base
    assert len(missing) == 1 and missing[0].startswith("UNet: 1 keys") and missing[0].endswith("out.2.bias)")
    no_text = {k: v for k, v in layout.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    assert _inspect(tmp_path, no_text, (), "no-text.safetensors")[1] == []


def test_other_variants_are_not_checked(tmp_path: Path) -> None:
    det, missing = _inspect(tmp_path, L.sdxl_refiner_checkpoint())
    assert det.base == "sdxl-refiner" and missing == []
    drop = ("model.diffusion_model.out.2.bias",)
    det, missing = _inspect(tmp_path, layouts.tiny_sd2_layout(in_channels=7), drop, "other.safetensors")
    assert det.subtype == "other" and missing == []
