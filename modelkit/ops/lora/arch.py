"""Reference layouts: the weight keys and shapes of SD 1.x, SD 2.x and SDXL single-file checkpoints.

A LoRA tool that has no checkpoint at hand (``lora convert``, ``lora merge``) still needs the key
table of the base the LoRA was made for. These layouts are generated from a few numbers per base
(``UNETS``, ``TEXT``): the construction loops of the LDM/SGM ``UNetModel`` and of the CLIP and
OpenCLIP text towers, emitting only the weights a LoRA can adapt (linear and convolution weights,
OpenCLIP's fused ``in_proj_weight``). ``keymap.KeyMap`` is built from them exactly as it is built
from a real checkpoint's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class UNetSpec:
    """The numbers that fix an LDM/SGM UNet's weight keys and shapes.

    Attributes:
        channels: model channels; mult: channel multiplier per level; res_blocks: ResBlocks per
        level; attention: levels with transformers; depth: transformer depth per attention level;
        mid_depth: the middle transformer's depth; context: cross-attention context width;
        linear_proj: ``proj_in``/``proj_out`` are linear (SD2, SDXL) rather than 1x1 convs (SD1);
        adm: the ``label_emb`` input width (SDXL), or None.
    """

    channels: int
    mult: tuple[int, ...]
    res_blocks: int
    attention: tuple[int, ...]
    depth: tuple[int, ...]
    mid_depth: int
    context: int
    linear_proj: bool
    adm: int | None = None


UNETS: dict[str, UNetSpec] = {
    "sd1": UNetSpec(320, (1, 2, 4, 4), 2, (0, 1, 2), (1, 1, 1), 1, 768, False),
    "sd2": UNetSpec(320, (1, 2, 4, 4), 2, (0, 1, 2), (1, 1, 1), 1, 1024, True),
    "sdxl": UNetSpec(320, (1, 2, 4), 2, (1, 2), (2, 10), 10, 2048, True, 2816),
}

#: Text encoders per base: (checkpoint prefix, layout, width, layers). The MLP is 4 x width wide.
TEXT: dict[str, tuple[tuple[str, str, int, int], ...]] = {
    "sd1": (("cond_stage_model.transformer.", "hf", 768, 12),),
    "sd2": (("cond_stage_model.model.", "openclip", 1024, 24),),
    "sdxl": (("conditioner.embedders.0.transformer.", "hf", 768, 12),
             ("conditioner.embedders.1.model.", "openclip", 1280, 32)),
}

UNET_PREFIX = "model.diffusion_model."


class _Out:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.shapes: dict[str, Shape] = {}

    def linear(self, name: str, cout: int, cin: int) -> None:
        self.shapes[f"{self.prefix}{name}.weight"] = (cout, cin)

    def conv(self, name: str, cout: int, cin: int, k: int) -> None:
        self.shapes[f"{self.prefix}{name}.weight"] = (cout, cin, k, k)


def _res(o: _Out, name: str, cin: int, cout: int, emb: int) -> None:
    o.conv(f"{name}.in_layers.2", cout, cin, 3)
    o.linear(f"{name}.emb_layers.1", cout, emb)
    o.conv(f"{name}.out_layers.3", cout, cout, 3)
    if cin != cout:
        o.conv(f"{name}.skip_connection", cout, cin, 1)


def _transformer(o: _Out, name: str, c: int, spec: UNetSpec, depth: int) -> None:
    proj = o.linear if spec.linear_proj else (lambda n, a, b: o.conv(n, a, b, 1))
    proj(f"{name}.proj_in", c, c)
    for d in range(depth):
        b = f"{name}.transformer_blocks.{d}"
        for attn, ctx in (("attn1", c), ("attn2", spec.context)):
            o.linear(f"{b}.{attn}.to_q", c, c)
            o.linear(f"{b}.{attn}.to_k", c, ctx)
            o.linear(f"{b}.{attn}.to_v", c, ctx)
            o.linear(f"{b}.{attn}.to_out.0", c, c)
        o.linear(f"{b}.ff.net.0.proj", 8 * c, c)
        o.linear(f"{b}.ff.net.2", c, 4 * c)
    proj(f"{name}.proj_out", c, c)


def unet_shapes(spec: UNetSpec, prefix: str = UNET_PREFIX) -> dict[str, Shape]:
    """The linear and convolution weights of an LDM/SGM UNet, ``key -> shape``."""
    o = _Out(prefix)
    mc = spec.channels
    emb = 4 * mc
    o.linear("time_embed.0", emb, mc)
    o.linear("time_embed.2", emb, emb)
    if spec.adm:
        o.linear("label_emb.0.0", emb, spec.adm)
        o.linear("label_emb.0.2", emb, emb)
    o.conv("input_blocks.0.0", mc, 4, 3)
    ch, idx, skips = mc, 1, [mc]
    for level, m in enumerate(spec.mult):
        for _ in range(spec.res_blocks):
            _res(o, f"input_blocks.{idx}.0", ch, mc * m, emb)
            ch = mc * m
            if level in spec.attention:
                _transformer(o, f"input_blocks.{idx}.1", ch, spec, spec.depth[spec.attention.index(level)])
            skips.append(ch)
            idx += 1
        if level != len(spec.mult) - 1:
            o.conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            skips.append(ch)
            idx += 1
    _res(o, "middle_block.0", ch, ch, emb)
    _transformer(o, "middle_block.1", ch, spec, spec.mid_depth)
    _res(o, "middle_block.2", ch, ch, emb)
    idx = 0
    for level, m in reversed(list(enumerate(spec.mult))):
        for i in range(spec.res_blocks + 1):
            _res(o, f"output_blocks.{idx}.0", ch + skips.pop(), mc * m, emb)
            ch, layer = mc * m, 1
            if level in spec.attention:
                _transformer(o, f"output_blocks.{idx}.1", ch, spec, spec.depth[spec.attention.index(level)])
                layer = 2
            if level and i == spec.res_blocks:
                o.conv(f"output_blocks.{idx}.{layer}.conv", ch, ch, 3)
            idx += 1
    o.conv("out.2", 4, ch, 3)
    return o.shapes


def text_shapes(prefix: str, layout: str, width: int, layers: int) -> dict[str, Shape]:
    """The adaptable weights of a CLIP (``hf``) or OpenCLIP text tower under ``prefix``."""
    o = _Out(prefix)
    ff = 4 * width
    for n in range(layers):
        if layout == "hf":
            b = f"text_model.encoder.layers.{n}"
            for p in ("k_proj", "v_proj", "q_proj", "out_proj"):
                o.linear(f"{b}.self_attn.{p}", width, width)
            o.linear(f"{b}.mlp.fc1", ff, width)
            o.linear(f"{b}.mlp.fc2", width, ff)
        else:
            b = f"transformer.resblocks.{n}"
            o.shapes[f"{prefix}{b}.attn.in_proj_weight"] = (3 * width, width)
            o.linear(f"{b}.attn.out_proj", width, width)
            o.linear(f"{b}.mlp.c_fc", ff, width)
            o.linear(f"{b}.mlp.c_proj", width, ff)
    return o.shapes


def reference_shapes(base: str) -> dict[str, Shape]:
    """The adaptable weights of a ``base`` checkpoint (``sd1``, ``sd2`` or ``sdxl``), ``key -> shape``.

    Raises:
        KeyError: a base without a reference layout.
    """
    out = unet_shapes(UNETS[base])
    for prefix, layout, width, layers in TEXT[base]:
        out.update(text_shapes(prefix, layout, width, layers))
    return out
