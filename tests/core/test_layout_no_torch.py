"""``convert --to diffusers`` and ``--to single`` work in the core install: torch, safetensors and
diffusers blocked in the child, an SD2-layout file (OpenCLIP in_proj split and fused again, VAE
attention reshaped, text_projection kept aside) goes to a folder and back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fixtures import torchfree
from modelkit.detect.layouts import tiny_sd2_layout
from modelkit.formats import open_model
from tests.core.test_no_torch import _child

UNET = {"_class_name": "UNet2DConditionModel", "block_out_channels": [4, 8, 16, 16], "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 1024,
        "use_linear_projection": True, "in_channels": 4, "out_channels": 4, "attention_head_dim": [1, 2, 4, 4]}
VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [4, 8, 16, 16], "layers_per_block": 2,
       "latent_channels": 4, "in_channels": 3, "out_channels": 3,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
TEXT = {"_class_name": "CLIPTextModel", "architectures": ["CLIPTextModel"], "hidden_size": 8, "num_hidden_layers": 23,
        "intermediate_size": 32, "vocab_size": 16, "projection_dim": 8, "hidden_act": "gelu",
        "num_attention_heads": 2, "max_position_embeddings": 77}


def test_to_diffusers_and_back_without_torch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in tiny_sd2_layout().items()}
    src = tmp_path / "sd2.safetensors"
    torchfree.save_safetensors(tensors, str(src), {"note": "kept"})
    configs = tmp_path / "configs"
    for sub, cfg in (("unet", UNET), ("vae", VAE), ("text_encoder", TEXT)):
        (configs / sub).mkdir(parents=True)
        (configs / sub / "config.json").write_text(json.dumps(cfg))
    folder = tmp_path / "folder"
    r = _child("cli", "convert", str(src), "--to", "diffusers", "--configs", str(configs), "--prediction", "v",
               "-o", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)["files"][0]
    assert doc["components"] == ["unet", "vae", "text_encoder"]
    assert "cond_stage_model.model.text_projection" in doc["kept"]
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    with open_model(folder / "text_encoder" / "model.safetensors") as te:
        q = te["text_model.encoder.layers.0.self_attn.q_proj.weight"].read("numpy")
        assert np.array_equal(q, tensors["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"][:8])
    with open_model(folder / "vae" / "diffusion_pytorch_model.safetensors") as vae:
        assert vae["encoder.mid_block.attentions.0.to_q.weight"].shape == (16, 16)
    back = tmp_path / "back.safetensors"
    r = _child("cli", "convert", str(folder), "--to", "single", "-o", str(back))
    assert r.returncode == 0, r.stderr
    with open_model(src) as a, open_model(back) as b:
        assert sorted(a) == sorted(b)
        for k in a:
            assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
            assert a[k].read_raw() == b[k].read_raw(), k
        assert b.metadata["note"] == "kept"
