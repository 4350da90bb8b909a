"""Reference layouts of Flux.1 and SD3.x: the adaptable weights of their single files, from a few numbers.

``lora convert`` and ``lora merge`` have no checkpoint at hand; as ``arch`` does for SD 1/2/XL, these
tables stand in for one, so that ``keymap.KeyMap`` is built from them exactly as from a real file. The
transformer is laid out in the original keys (BFL / Stability, no prefix) or, with ``diffusers=True``, in
diffusers' keys (from ``families.RULES``); the text encoders sit under ``text_encoders.`` as in
ComfyUI's single files (CLIP-L, SD3's CLIP-G, T5-XXL).

SD3.x comes in sizes: ``VARIANTS`` lists them, and a LoRA is read against the first one its module
shapes fit (``tools`` decides). Models of other sizes take ``--checkpoint``.
"""

from __future__ import annotations

from .. import families as fam
from .arch import text_shapes
from .keymap import T5_PREFIX

Shape = tuple[int, ...]

#: Flux.1 [dev]: hidden width, double blocks, single blocks, MLP width, input channels, T5 width, pooled
#: CLIP width, timestep width (schnell has no ``guidance_in``: a LoRA on it simply does not use it).
FLUX = {"hidden": 3072, "double": 19, "single": 38, "mlp": 12288, "in": 64, "context": 4096, "vec": 768, "time": 256}
#: SD3.x variants: (name, hidden width, joint blocks, blocks with the second x attention (3.5 medium)).
VARIANTS = {"sd3": (("sd3-medium", 1536, 24, 0), ("sd3.5-medium", 1536, 24, 13), ("sd3.5-large", 2432, 38, 0))}
#: T5-XXL encoder: width, blocks, feed-forward width (gated: ``wi_0``, ``wi_1``).
T5XXL = (4096, 24, 10240)


def flux_shapes() -> dict[str, Shape]:
    """The original keys and shapes of Flux.1's adaptable transformer weights."""
    h, m, f = FLUX["hidden"], FLUX["mlp"], FLUX
    out: dict[str, Shape] = {"img_in.weight": (h, f["in"]), "txt_in.weight": (h, f["context"]),
                             "time_in.in_layer.weight": (h, f["time"]), "time_in.out_layer.weight": (h, h),
                             "vector_in.in_layer.weight": (h, f["vec"]), "vector_in.out_layer.weight": (h, h),
                             "guidance_in.in_layer.weight": (h, f["time"]), "guidance_in.out_layer.weight": (h, h),
                             "final_layer.linear.weight": (f["in"], h), "final_layer.adaLN_modulation.1.weight": (2 * h, h)}
    for i in range(f["double"]):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            out.update({f"{b}_mod.lin.weight": (6 * h, h), f"{b}_attn.qkv.weight": (3 * h, h),
                        f"{b}_attn.proj.weight": (h, h), f"{b}_mlp.0.weight": (m, h), f"{b}_mlp.2.weight": (h, m)})
    for i in range(f["single"]):
        b = f"single_blocks.{i}"
        out.update({f"{b}.linear1.weight": (3 * h + m, h), f"{b}.linear2.weight": (h, h + m),
                    f"{b}.modulation.lin.weight": (3 * h, h)})
    return out


def sd3_shapes(hidden: int, depth: int, dual: int) -> dict[str, Shape]:
    """The original keys and shapes of an SD3.x MMDiT's adaptable weights (``dual``: blocks with ``attn2``)."""
    h = hidden
    out: dict[str, Shape] = {"x_embedder.proj.weight": (h, 16, 2, 2), "context_embedder.weight": (h, 4096),
                             "t_embedder.mlp.0.weight": (h, 256), "t_embedder.mlp.2.weight": (h, h),
                             "y_embedder.mlp.0.weight": (h, 2048), "y_embedder.mlp.2.weight": (h, h),
                             "final_layer.linear.weight": (64, h), "final_layer.adaLN_modulation.1.weight": (2 * h, h)}
    for i in range(depth):
        for s in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{s}"
            last = s == "context_block" and i == depth - 1  # the last context block only modulates its input
            out[f"{b}.attn.qkv.weight"] = (3 * h, h)
            out[f"{b}.adaLN_modulation.1.weight"] = (2 * h if last else (9 if s == "x_block" and i < dual else 6) * h, h)
            if not last:
                out.update({f"{b}.attn.proj.weight": (h, h), f"{b}.mlp.fc1.weight": (4 * h, h),
                            f"{b}.mlp.fc2.weight": (h, 4 * h)})
            if s == "x_block" and i < dual:
                out.update({f"{b}.attn2.qkv.weight": (3 * h, h), f"{b}.attn2.proj.weight": (h, h)})
    return out


def t5_shapes(prefix: str = T5_PREFIX) -> dict[str, Shape]:
    """The linear weights of T5-XXL's encoder under ``prefix`` (``encoder.block.N.layer...``)."""
    d, blocks, ff = T5XXL
    out: dict[str, Shape] = {}
    for n in range(blocks):
        for p in "qkvo":
            out[f"{prefix}encoder.block.{n}.layer.0.SelfAttention.{p}.weight"] = (d, d)
        out[f"{prefix}encoder.block.{n}.layer.1.DenseReluDense.wi_0.weight"] = (ff, d)
        out[f"{prefix}encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight"] = (ff, d)
        out[f"{prefix}encoder.block.{n}.layer.1.DenseReluDense.wo.weight"] = (d, ff)
    return out


def to_diffusers_shapes(shapes: dict[str, Shape], family: str) -> dict[str, Shape]:
    """The same transformer in diffusers' keys (``transformer_blocks.N.attn.to_q.weight`` ...)."""
    out: dict[str, Shape] = {}
    for _path, (shape, split, dpaths) in fam.original_weights(shapes, family, "").items():
        for _a, _b, dpath, _da, _db, drows in fam.segments(split, dpaths, shape):
            out[f"{dpath}.weight"] = (drows, *shape[1:])
    return out


def reference_layouts(family: str, *, diffusers: bool = False) -> list[tuple[str, dict[str, Shape]]]:
    """``(variant, key -> shape)`` of each size of ``family`` (``flux`` or ``sd3``), text encoders included.

    Raises:
        KeyError: not a DiT family.
    """
    if family == "flux":
        sizes = [("flux-1", flux_shapes())]
        text = text_shapes("text_encoders.clip_l.transformer.", "hf", 768, 12)
    else:
        sizes = [(name, sd3_shapes(h, d, dual)) for name, h, d, dual in VARIANTS[family]]
        text = {**text_shapes("text_encoders.clip_l.transformer.", "hf", 768, 12),
                **text_shapes("text_encoders.clip_g.transformer.", "hf", 1280, 32)}
    text.update(t5_shapes())
    return [(name, {**(to_diffusers_shapes(s, family) if diffusers else s), **text}) for name, s in sizes]
