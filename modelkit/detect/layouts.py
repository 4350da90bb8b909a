"""The key names and tensor shapes of original-format Stable Diffusion 1.x, 2.x and SDXL checkpoints.

A single-file SD 1.x checkpoint (for example ``v1-5-pruned-emaonly.ckpt`` as AUTOMATIC1111 loads
it) is the ``state_dict`` of CompVis's ``LatentDiffusion`` module. This module rebuilds that
layout from the architecture itself: it walks the same construction loops as the original code
(``UNetModel`` with ``SpatialTransformer`` blocks, the ``AutoencoderKL`` ``Encoder``/``Decoder``, and
the CLIP ViT-L/14 text transformer) and emits each parameter's name, shape and dtype in the order
``torch.nn.Module.state_dict`` would. Nothing is copied from a real file or a key table, and no
tensors are allocated, so the full-size layout costs nothing to produce.

Order follows ``state_dict``: a module's own parameters and buffers come before its children's,
so the diffusion-schedule buffers (registered on the top module) come first, then
``model.diffusion_model.*``, ``model_ema.*`` (when asked for), ``first_stage_model.*`` and
``cond_stage_model.*``.

SD 2.x (:func:`sd2_layout`) and SDXL base (:func:`sdxl_layout`) are built by the same writers from
their configs (``v2-inference.yaml``, SGM's ``sd_xl_base.yaml``): the UNet with linear projections,
64-channel heads and per-level transformer depths, the OpenCLIP text towers with their fused
``in_proj``. ``keysets`` turns these layouts into the keys a genuine file must have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

Shape = tuple[int, ...]
#: Insertion-ordered ``name -> (shape, dtype name)``.
Layout = dict[str, tuple[Shape, str]]

#: Buffers ``DDPM.register_schedule`` keeps in the state dict, in registration order.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
TIMESTEPS = 1000
#: Token positions of the CLIP text encoder.
MAX_POSITIONS = 77

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
#: Residual blocks of SD 2.x's OpenCLIP ViT-H/14 text tower.
SD2_TEXT_LAYERS = 24


class _Writer:
    """Appends parameter entries to a layout under a fixed prefix."""

    def __init__(self, out: Layout, prefix: str) -> None:
        self.out = out
        self.prefix = prefix

    def tensor(self, name: str, shape: Shape, dtype: str = "float32") -> None:
        key = self.prefix + name
        if key in self.out:
            raise ValueError(f"duplicate key {key}")
        self.out[key] = (shape, dtype)

    def conv(self, name: str, cout: int, cin: int, k: int) -> None:
        self.tensor(f"{name}.weight", (cout, cin, k, k))
        self.tensor(f"{name}.bias", (cout,))

    def linear(self, name: str, cout: int, cin: int, bias: bool = True) -> None:
        self.tensor(f"{name}.weight", (cout, cin))
        if bias:
            self.tensor(f"{name}.bias", (cout,))

    def norm(self, name: str, c: int) -> None:
        """GroupNorm or LayerNorm: an affine weight and bias of ``c``."""
        self.tensor(f"{name}.weight", (c,))
        self.tensor(f"{name}.bias", (c,))


# --- UNet (ldm/modules/diffusionmodules/openaimodel.py, ldm/modules/attention.py) -------------

def _res_block(w: _Writer, name: str, cin: int, cout: int, emb: int) -> None:
    w.norm(f"{name}.in_layers.0", cin)
    w.conv(f"{name}.in_layers.2", cout, cin, 3)
    w.linear(f"{name}.emb_layers.1", cout, emb)
    w.norm(f"{name}.out_layers.0", cout)
    w.conv(f"{name}.out_layers.3", cout, cout, 3)
    if cin != cout:
        w.conv(f"{name}.skip_connection", cout, cin, 1)


def _attention(w: _Writer, name: str, dim: int, inner: int, context: int) -> None:
    w.linear(f"{name}.to_q", inner, dim, bias=False)
    w.linear(f"{name}.to_k", inner, context, bias=False)
    w.linear(f"{name}.to_v", inner, context, bias=False)
    w.linear(f"{name}.to_out.0", dim, inner)


def _spatial_transformer(w: _Writer, name: str, c: int, heads: int, context: int, depth: int = 1,
                         linear: bool = False) -> None:
    """A ``SpatialTransformer`` of ``depth`` blocks; ``linear`` projections (SD 2.x/SDXL) or 1x1 convs (SD 1.x)."""
    if c % heads:
        raise ValueError(f"{c} channels do not split into {heads} heads")
    inner = heads * (c // heads)
    w.norm(f"{name}.norm", c)
    (w.linear(f"{name}.proj_in", inner, c) if linear else w.conv(f"{name}.proj_in", inner, c, 1))
    for d in range(depth):
        block = f"{name}.transformer_blocks.{d}"
        _attention(w, f"{block}.attn1", inner, inner, inner)
        w.linear(f"{block}.ff.net.0.proj", 2 * 4 * inner, inner)  # GEGLU: value and gate halves
        w.linear(f"{block}.ff.net.2", inner, 4 * inner)
        _attention(w, f"{block}.attn2", inner, inner, context)
        for i in (1, 2, 3):
            w.norm(f"{block}.norm{i}", inner)
    (w.linear(f"{name}.proj_out", c, inner) if linear else w.conv(f"{name}.proj_out", c, inner, 1))


def _unet(w: _Writer, *, mc: int, mult: Sequence[int], nrb: int, attn: Sequence[int], heads: int,
          context: int, cin: int, cout: int, depth: Sequence[int] | None = None, linear: bool = False,
          head_channels: int | None = None, adm: int | None = None) -> None:
    """``UNetModel``: ``depth`` gives the transformer depth per level (the middle block takes the
    last level's), ``head_channels`` fixes the head width instead of the head count, ``adm`` adds
    the ``label_emb`` of an SDXL-style UNet."""
    emb = 4 * mc
    depths = list(depth) if depth is not None else [1] * len(mult)

    def transformer(name: str, c: int, level: int) -> None:
        n = c // head_channels if head_channels else heads
        _spatial_transformer(w, name, c, n, context, depths[level], linear)

    w.linear("time_embed.0", emb, mc)
    w.linear("time_embed.2", emb, emb)
    if adm:
        w.linear("label_emb.0.0", emb, adm)
        w.linear("label_emb.0.2", emb, emb)
    w.conv("input_blocks.0.0", mc, cin, 3)
    skips = [mc]  # channels of every input block's output, consumed by the output blocks
    ch, idx = mc, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            _res_block(w, f"input_blocks.{idx}.0", ch, mc * m, emb)
            ch = mc * m
            if level in attn:
                transformer(f"input_blocks.{idx}.1", ch, level)
            skips.append(ch)
            idx += 1
        if level != len(mult) - 1:
            w.conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            skips.append(ch)
            idx += 1
    _res_block(w, "middle_block.0", ch, ch, emb)
    transformer("middle_block.1", ch, len(mult) - 1)
    _res_block(w, "middle_block.2", ch, ch, emb)
    idx = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            _res_block(w, f"output_blocks.{idx}.0", ch + skips.pop(), mc * m, emb)
            ch, layer = mc * m, 1
            if level in attn:
                transformer(f"output_blocks.{idx}.1", ch, level)
                layer = 2
            if level and i == nrb:
                w.conv(f"output_blocks.{idx}.{layer}.conv", ch, ch, 3)
            idx += 1
    w.norm("out.0", ch)
    w.conv("out.2", cout, ch, 3)


# --- VAE (ldm/modules/diffusionmodules/model.py, AutoencoderKL) --------------------------------

def _vae_res_block(w: _Writer, name: str, cin: int, cout: int) -> None:
    w.norm(f"{name}.norm1", cin)
    w.conv(f"{name}.conv1", cout, cin, 3)
    w.norm(f"{name}.norm2", cout)
    w.conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        w.conv(f"{name}.nin_shortcut", cout, cin, 1)


def _vae_mid(w: _Writer, name: str, c: int) -> None:
    _vae_res_block(w, f"{name}.block_1", c, c)
    w.norm(f"{name}.attn_1.norm", c)
    for proj in ("q", "k", "v", "proj_out"):
        w.conv(f"{name}.attn_1.{proj}", c, c, 1)
    _vae_res_block(w, f"{name}.block_2", c, c)


def _vae(w: _Writer, *, ch: int, mult: Sequence[int], nrb: int, z: int, embed: int, rgb: int = 3) -> None:
    # Encoder: conv_in, down, mid, norm_out, conv_out (double_z).
    w.conv("encoder.conv_in", ch, rgb, 3)
    block_in = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            _vae_res_block(w, f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if i != len(mult) - 1:
            w.conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    _vae_mid(w, "encoder.mid", block_in)
    w.norm("encoder.norm_out", block_in)
    w.conv("encoder.conv_out", 2 * z, block_in, 3)
    # Decoder: built from the deepest level up, but ``up`` is indexed (and saved) by level.
    block_in = ch * mult[-1]
    w.conv("decoder.conv_in", block_in, z, 3)
    _vae_mid(w, "decoder.mid", block_in)
    ups: dict[int, list[tuple[str, int, int]]] = {}
    for i in reversed(range(len(mult))):
        ups[i] = []
        for j in range(nrb + 1):
            ups[i].append((f"block.{j}", block_in, ch * mult[i]))
            block_in = ch * mult[i]
        if i != 0:
            ups[i].append(("upsample.conv", block_in, block_in))
    for i in range(len(mult)):
        for part, cin, cout in ups[i]:
            if part == "upsample.conv":
                w.conv(f"decoder.up.{i}.{part}", cout, cin, 3)
            else:
                _vae_res_block(w, f"decoder.up.{i}.{part}", cin, cout)
    w.norm("decoder.norm_out", block_in)
    w.conv("decoder.conv_out", rgb, block_in, 3)
    w.conv("quant_conv", 2 * embed, 2 * z, 1)
    w.conv("post_quant_conv", z, embed, 1)


# --- Text encoder (HF CLIPTextModel, ViT-L/14 text tower) -------------------------------------

def _text(w: _Writer, *, width: int, layers: int, ff: int, vocab: int) -> None:
    # ``position_ids`` is a buffer of the embeddings module, so it precedes its children.
    w.tensor("embeddings.position_ids", (1, MAX_POSITIONS), "int64")
    w.tensor("embeddings.token_embedding.weight", (vocab, width))
    w.tensor("embeddings.position_embedding.weight", (MAX_POSITIONS, width))
    for n in range(layers):
        layer = f"encoder.layers.{n}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):  # CLIPAttention's order
            w.linear(f"{layer}.self_attn.{proj}", width, width)
        w.norm(f"{layer}.layer_norm1", width)
        w.linear(f"{layer}.mlp.fc1", ff, width)
        w.linear(f"{layer}.mlp.fc2", width, ff)
        w.norm(f"{layer}.layer_norm2", width)
    w.norm("final_layer_norm", width)


def _openclip(w: _Writer, *, width: int, layers: int, embed: int, vocab: int, ff: int | None = None) -> None:
    """The OpenCLIP ``CLIP`` model a ``FrozenOpenCLIPEmbedder`` keeps (its visual tower deleted).

    The model's own parameters come first, then its children ``transformer``, ``token_embedding``
    and ``ln_final``; ``attn_mask`` is a non-persistent buffer. q/k/v are one fused ``in_proj``.
    """
    w.tensor("positional_embedding", (MAX_POSITIONS, width))
    w.tensor("text_projection", (width, embed))
    w.tensor("logit_scale", ())
    for n in range(layers):
        block = f"transformer.resblocks.{n}"
        w.norm(f"{block}.ln_1", width)
        w.tensor(f"{block}.attn.in_proj_weight", (3 * width, width))
        w.tensor(f"{block}.attn.in_proj_bias", (3 * width,))
        w.linear(f"{block}.attn.out_proj", width, width)
        w.norm(f"{block}.ln_2", width)
        w.linear(f"{block}.mlp.c_fc", ff or 4 * width, width)
        w.linear(f"{block}.mlp.c_proj", width, ff or 4 * width)
    w.tensor("token_embedding.weight", (vocab, width))
    w.norm("ln_final", width)


# --- Public API -------------------------------------------------------------------------------

def sd1_layout(*, model_channels: int = 320, channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
               attention_levels: Sequence[int] = (0, 1, 2), num_heads: int = 8, context_dim: int = 768,
               in_channels: int = 4, vae_ch: int = 128, vae_ch_mult: Sequence[int] = (1, 2, 4, 4),
               text_width: int = 768, text_layers: int = 12, text_ff: int = 3072, vocab: int = 49408,
               ema: bool = False, schedule: bool = True) -> Layout:
    """Return the ordered ``name -> (shape, dtype name)`` layout of an SD 1.x LDM checkpoint.

    The defaults give SD 1.x exactly (``in_channels=9`` gives the inpainting UNet). ``schedule``
    adds the twelve ``[1000]`` diffusion-schedule buffers; ``ema`` adds ``model_ema.decay``,
    ``model_ema.num_updates`` and one ``model_ema.*`` copy of each UNet parameter, named as
    ``LitEma`` names them (the ``diffusion_model.*`` name with its dots removed). Weights are
    ``"float32"``; ``position_ids`` is ``"int64"`` and ``num_updates`` ``"int32"``.
    """
    out: Layout = {}
    if schedule:
        top = _Writer(out, "")
        for name in SCHEDULE_BUFFERS:
            top.tensor(name, (TIMESTEPS,))
    unet: Layout = {}
    _unet(_Writer(unet, "diffusion_model."), mc=model_channels, mult=channel_mult, nrb=num_res_blocks,
          attn=attention_levels, heads=num_heads, context=context_dim, cin=in_channels, cout=4)
    out.update((f"model.{key}", value) for key, value in unet.items())
    if ema:
        out["model_ema.decay"] = ((), "float32")
        out["model_ema.num_updates"] = ((), "int32")
        out.update((f"model_ema.{key.replace('.', '')}", value) for key, value in unet.items())
    _vae(_Writer(out, VAE_PREFIX), ch=vae_ch, mult=vae_ch_mult, nrb=num_res_blocks, z=4, embed=4)
    _text(_Writer(out, TEXT_PREFIX), width=text_width, layers=text_layers, ff=text_ff, vocab=vocab)
    return out


#: Settings of :func:`tiny_sd1_layout`. Every GroupNorm sees a multiple of 32 channels. The
#: channel multipliers (1, 2, 1, 1) keep the real file's pattern of channel changes (a change
#: entering levels 1 and 2, none entering level 3), so every ``skip_connection`` and
#: ``nin_shortcut`` of the real layout exists here too; (1, 2, 4, 4) at 32 channels would cost
#: about 14 million parameters. The text encoder keeps all 12 layers (they are cheap at width 32)
#: so that the key set matches :func:`sd1_layout` exactly.
TINY: dict[str, Any] = {
    "model_channels": 32, "channel_mult": (1, 2, 1, 1), "num_heads": 2, "context_dim": 32,
    "vae_ch": 32, "vae_ch_mult": (1, 2, 1, 1),
    "text_width": 32, "text_layers": 12, "text_ff": 64, "vocab": 1000,
}


def tiny_sd1_layout(**overrides: Any) -> Layout:
    """:func:`sd1_layout` with the same key names and tiny shapes; ``overrides`` go to it."""
    return sd1_layout(**{**TINY, **overrides})


def sd2_layout(*, model_channels: int = 320, head_channels: int = 64, context_dim: int = 1024,
               in_channels: int = 4, vae_ch: int = 128, text_width: int = 1024, text_layers: int = SD2_TEXT_LAYERS,
               text_embed: int = 1024, vocab: int = 49408, schedule: bool = True) -> Layout:
    """The ordered layout of an SD 2.x LDM checkpoint (``v2-inference.yaml`` / ``v2-inference-v.yaml``).

    The 512 eps and 768 v models share it. The UNet is SD 1.x's with 64-channel heads, linear
    transformer projections and a 1024-wide context; the VAE is SD 1.x's; the text encoder is
    OpenCLIP ViT-H/14 under ``cond_stage_model.model.``, all 24 layers, ``text_projection`` and
    ``logit_scale`` included, as Stability's files keep it. ``in_channels=9`` gives the inpainting
    UNet, 5 the depth one (whose ``depth_model.*`` is not generated).
    """
    out: Layout = {}
    if schedule:
        top = _Writer(out, "")
        for name in SCHEDULE_BUFFERS:
            top.tensor(name, (TIMESTEPS,))
    _unet(_Writer(out, UNET_PREFIX), mc=model_channels, mult=(1, 2, 4, 4), nrb=2, attn=(0, 1, 2), heads=0,
          head_channels=head_channels, linear=True, context=context_dim, cin=in_channels, cout=4)
    _vae(_Writer(out, VAE_PREFIX), ch=vae_ch, mult=(1, 2, 4, 4), nrb=2, z=4, embed=4)
    _openclip(_Writer(out, SD2_TEXT_PREFIX), width=text_width, layers=text_layers, embed=text_embed, vocab=vocab)
    return out


def sdxl_layout(*, model_channels: int = 320, head_channels: int = 64, context_dim: int = 2048,
                adm_in_channels: int = 2816, in_channels: int = 4, vae_ch: int = 128, clip_width: int = 768,
                clip_ff: int = 3072, big_width: int = 1280, big_embed: int = 1280, vocab: int = 49408) -> Layout:
    """The ordered layout of an SDXL base checkpoint (``sd_xl_base.yaml``, SGM ``DiffusionEngine``).

    UNet: three levels (320/640/1280), attention at the second and third with transformer depths
    2 and 10 (10 in the middle block), linear projections, 64-channel heads, ``label_emb`` for the
    2816-wide ADM vector. Then the conditioner: CLIP ViT-L/14 in Hugging Face naming
    (``conditioner.embedders.0.transformer.``) and OpenCLIP ViT-bigG/14
    (``conditioner.embedders.1.model.``); then the VAE (SD 1.x's layout). SGM keeps no schedule
    buffers. ``in_channels=9`` gives the inpainting UNet.
    """
    out: Layout = {}
    _unet(_Writer(out, UNET_PREFIX), mc=model_channels, mult=(1, 2, 4), nrb=2, attn=(1, 2), depth=(1, 2, 10),
          heads=0, head_channels=head_channels, linear=True, context=context_dim, cin=in_channels, cout=4,
          adm=adm_in_channels)
    _text(_Writer(out, SDXL_CLIP_PREFIX + "text_model."), width=clip_width, layers=12, ff=clip_ff, vocab=vocab)
    _openclip(_Writer(out, SDXL_BIGG_PREFIX), width=big_width, layers=32, embed=big_embed, vocab=vocab)
    _vae(_Writer(out, VAE_PREFIX), ch=vae_ch, mult=(1, 2, 4, 4), nrb=2, z=4, embed=4)
    return out


#: Settings of :func:`tiny_sd2_layout` and :func:`tiny_sdxl_layout`: every key of the full-size
#: layout, tiny widths, and the real context and ADM widths detection decides on.
TINY_SD2: dict[str, Any] = {"model_channels": 4, "head_channels": 4, "vae_ch": 4, "text_width": 8, "text_embed": 8,
                            "vocab": 16}
TINY_SDXL: dict[str, Any] = {"model_channels": 4, "head_channels": 4, "vae_ch": 4, "clip_width": 8, "clip_ff": 16,
                             "big_width": 8, "big_embed": 8, "vocab": 16}


def tiny_sd2_layout(**overrides: Any) -> Layout:
    """:func:`sd2_layout` with the same key names and tiny shapes."""
    return sd2_layout(**{**TINY_SD2, **overrides})


def tiny_sdxl_layout(**overrides: Any) -> Layout:
    """:func:`sdxl_layout` with the same key names and tiny shapes."""
    return sdxl_layout(**{**TINY_SDXL, **overrides})


def param_count(layout: Layout) -> int:
    """Total number of elements over every tensor in ``layout``."""
    return sum(math.prod(shape) for shape, _ in layout.values())


def sd1_keys() -> frozenset[str]:
    """The key set of a standard SD 1.x checkpoint (no EMA); ``keysets.required_keys`` is what a file must have."""
    return _SD1_KEYS


_SD1_KEYS: frozenset[str] = frozenset(sd1_layout())


def component_layout(kind: str, **settings: Any) -> Layout:
    """One component's layout, unprefixed: ``unet`` (``_unet``'s settings), ``vae``, ``clip`` or ``openclip``
    (their writers' settings); ``modelkit.layout`` builds it from a diffusers config to check shapes."""
    out: Layout = {}
    writers: dict[str, Callable[..., None]] = {"unet": _unet, "vae": _vae, "clip": _text, "openclip": _openclip}
    writers[kind](_Writer(out, ""), **settings)
    return out
