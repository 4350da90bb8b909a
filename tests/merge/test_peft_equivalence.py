"""A LoRA (and a DoRA) saved by PEFT itself gives the same layer outputs once ``merge_lora`` bakes it.

A tiny module tree whose layer names are diffusers paths of the tiny SD1 checkpoint's weights gets
those weights; PEFT adapts it, its adapter is saved with ``save_pretrained`` (keys
``base_model.model.*.lora_A.weight``, ``adapter_config.json`` beside), and every adapted layer's
output through PEFT is compared with the plain layer running the merged weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import modelkit
from fixtures import merge_layouts as ml

peft = pytest.importorskip("peft")

P = "model.diffusion_model."
#: diffusers path -> (checkpoint key, layer kind)
LAYERS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k", "linear"),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (P + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj", "linear"),
    "down_blocks.0.resnets.0.conv1": (P + "input_blocks.1.0.in_layers.2", "conv"),
    "down_blocks.1.resnets.0.conv_shortcut": (P + "input_blocks.4.0.skip_connection", "conv"),
    "text_model.encoder.layers.0.self_attn.q_proj": ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj", "linear"),
}


def _tree(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    root = torch.nn.Module()
    for path, (key, kind) in LAYERS.items():
        w = sd[key + ".weight"]
        bias = sd.get(key + ".bias")
        if kind == "linear":
            layer: torch.nn.Module = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        else:
            layer = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2, bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(w)
            if bias is not None:
                layer.bias.copy_(bias)
        node = root
        parts = path.split(".")
        for p in parts[:-1]:
            if not hasattr(node, p):
                node.add_module(p, torch.nn.Module())
            node = getattr(node, p)
        node.add_module(parts[-1], layer)
    return root


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_merged_gives_the_same_outputs(tmp_path: Path, dora: bool) -> None:
    base = tmp_path / "sd1.safetensors"
    sd = ml.checkpoint(str(base), ml.sd1(), dtype=torch.float32)
    model = _tree(sd)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=list(LAYERS), use_dora=dora)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(tmp_path / "adapter"))
    lora = tmp_path / "adapter" / "adapter_model.safetensors"
    out = tmp_path / "merged.safetensors"
    res = modelkit.merge_lora(base, [str(lora)], out, compute_dtype="fp64")
    assert res.loras[0].matched == len(LAYERS) and res.loras[0].key_style == "peft"
    assert any("adapter_config.json" in w for w in res.warnings)
    merged = load_file(out)
    pm.eval()
    for path, (key, kind) in LAYERS.items():
        layer = pm.get_submodule("base_model.model." + path)
        w, b = merged[key + ".weight"], merged.get(key + ".bias")
        if kind == "linear":
            x = torch.randn(3, w.shape[1], generator=g)
            want = F.linear(x, w, b)
        else:
            x = torch.randn(2, w.shape[1], 6, 6, generator=g)
            want = F.conv2d(x, w, b, padding=w.shape[2] // 2)
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(want, got, rtol=1e-5, atol=1e-5, msg=path)  # fp32 sums in another order
    with torch.no_grad():
        unloaded = pm.merge_and_unload()
    for path, (key, _kind) in LAYERS.items():
        torch.testing.assert_close(merged[key + ".weight"], unloaded.get_submodule(path).weight, rtol=1e-5, atol=1e-6)
