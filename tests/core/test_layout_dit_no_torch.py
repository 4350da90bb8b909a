"""``convert --to diffusers`` and ``--to single`` of a Flux transformer in the core install: torch,
safetensors and diffusers blocked in the child; fused q/k/v and linear1 become row views, the final
modulation's halves are swapped, and the way back is bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fixtures import torchfree
from modelkit.formats import open_model
from tests.core.test_no_torch import _child

H, HEAD, MLP = 8, 4, 32  # hidden width, head width, MLP width (one double and one single block)
CONFIG = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 4, "num_layers": 1,
          "num_single_layers": 1, "attention_head_dim": HEAD, "num_attention_heads": H // HEAD,
          "joint_attention_dim": 6, "pooled_projection_dim": 5, "guidance_embeds": True, "axes_dims_rope": [2, 2]}


def _flux_shapes() -> dict[str, tuple[int, ...]]:
    """A tiny Flux transformer in the original (BFL) keys."""
    lin = {"img_in": (H, 4), "txt_in": (H, 6), "time_in.in_layer": (H, 256), "time_in.out_layer": (H, H),
           "vector_in.in_layer": (H, 5), "vector_in.out_layer": (H, H), "guidance_in.in_layer": (H, 256),
           "guidance_in.out_layer": (H, H), "final_layer.linear": (4, H), "final_layer.adaLN_modulation.1": (2 * H, H),
           "single_blocks.0.linear1": (3 * H + MLP, H), "single_blocks.0.linear2": (H, H + MLP),
           "single_blocks.0.modulation.lin": (3 * H, H)}
    for s in ("img", "txt"):
        lin |= {f"double_blocks.0.{s}_mod.lin": (6 * H, H), f"double_blocks.0.{s}_attn.qkv": (3 * H, H),
                f"double_blocks.0.{s}_attn.proj": (H, H), f"double_blocks.0.{s}_mlp.0": (MLP, H),
                f"double_blocks.0.{s}_mlp.2": (H, MLP)}
    out = {f"{k}.weight": v for k, v in lin.items()} | {f"{k}.bias": v[:1] for k, v in lin.items()}
    for n in ("double_blocks.0.img_attn.norm", "double_blocks.0.txt_attn.norm", "single_blocks.0.norm"):
        out |= {f"{n}.query_norm.scale": (HEAD,), f"{n}.key_norm.scale": (HEAD,)}
    return out


def test_flux_transformer_to_diffusers_and_back_without_torch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in _flux_shapes().items()}
    src = tmp_path / "flux.safetensors"
    torchfree.save_safetensors(tensors, str(src), {"note": "kept"})
    (tmp_path / "configs" / "transformer").mkdir(parents=True)
    (tmp_path / "configs" / "transformer" / "config.json").write_text(json.dumps(CONFIG))
    folder = tmp_path / "folder"
    r = _child("cli", "convert", str(src), "--to", "diffusers", "--configs", str(tmp_path / "configs"),
               "-o", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"][0]["components"] == ["transformer"]
    with open_model(folder / "diffusion_pytorch_model.safetensors") as t:
        linear1 = tensors["single_blocks.0.linear1.weight"]
        assert np.array_equal(t["single_transformer_blocks.0.attn.to_k.weight"].read("numpy"), linear1[H:2 * H])
        assert np.array_equal(t["single_transformer_blocks.0.proj_mlp.weight"].read("numpy"), linear1[3 * H:])
        ada = tensors["final_layer.adaLN_modulation.1.weight"]
        assert np.array_equal(t["norm_out.linear.weight"].read("numpy"), np.concatenate([ada[H:], ada[:H]]))
    back = tmp_path / "back.safetensors"
    r = _child("cli", "convert", str(folder), "--to", "single", "-o", str(back))
    assert r.returncode == 0, r.stderr
    with open_model(src) as a, open_model(back) as b:
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].read_raw() == b[k].read_raw(), k
