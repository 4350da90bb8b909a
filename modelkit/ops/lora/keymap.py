"""The forward key table: every name a LoRA may give a module -> the checkpoint tensor it adapts.

The table is built from the target checkpoint's own keys (or from ``arch.reference_shapes`` when
there is no checkpoint), never by guessing from a LoRA's names. For every adaptable weight it
derives the module's paths, then registers the module under every name each key style gives it:

* the LDM path (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``) and, for the UNet, the
  diffusers path (``down_blocks.1.attentions.0...``). The diffusers block numbers come from the
  checkpoint's own structure (which input blocks are downsamplers, which output blocks end with an
  upsampler), so any depth of UNet maps correctly; the names inside a ResBlock come from
  ``RESNET_NAMES``;
* the text encoder's Hugging Face CLIP path (``text_model.encoder.layers.0.self_attn.q_proj``), and
  for the diffusers and PEFT styles also without ``text_model.``, as transformers 5 names
  ``CLIPTextModel``'s modules.
  An OpenCLIP tower (SD2, SDXL's second encoder) stores q/k/v fused in ``attn.in_proj_weight``: a
  LoRA on ``q_proj``/``k_proj``/``v_proj`` adapts one third of its rows (``OPENCLIP_TO_HF``);
* then each style's prefix and separator (``UNET_STYLES``, ``TEXT_STYLES``): kohya
  (``lora_unet_`` + path with ``_``), diffusers (``unet.`` / ``text_encoder.``), PEFT
  (``base_model.model.``), ComfyUI (``diffusion_model.`` + LDM path), and the old diffusers
  attention-processor names (``attn1.processor.to_q``).

A Flux.1 or SD3.x transformer is registered by ``dit`` from ``families.RULES`` instead (original and
diffusers names; a module on a fused weight the checkpoint keeps apart, or the reverse, is cut by
rows: ``splits``, ``pieces``). The T5-XXL encoder of their single files (``text_encoders.t5xxl.``,
component ``t5``) takes kohya's ``lora_te3_`` (its Flux and SD3 trainers; ComfyUI also reads
OneTrainer's ``lora_te2_`` for Flux) and diffusers' ``text_encoder_2.`` (Flux) / ``text_encoder_3.``
(SD3) names (``T5_STYLES``).

What differs between SD1, SD2 and SDXL is data: which text encoders sit under which prefix
(``TEXT_LAYOUTS``) and which path kohya uses for the UNet (``KOHYA_UNET_PATHS``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Shape = tuple[int, ...]

UNET_PREFIX = "model.diffusion_model."

#: Text encoders inside a single-file checkpoint: (key prefix, tower layout, LoRA component).
TEXT_LAYOUTS = (
    ("cond_stage_model.transformer.", "hf", "te"),           # SD 1.x: CLIP ViT-L
    ("cond_stage_model.model.", "openclip", "te"),           # SD 2.x: OpenCLIP ViT-H
    ("conditioner.embedders.0.transformer.", "hf", "te1"),   # SDXL: CLIP ViT-L
    ("conditioner.embedders.1.model.", "openclip", "te2"),   # SDXL: OpenCLIP ViT-bigG
    ("text_encoders.clip_l.transformer.", "hf", "te1"),      # Flux, SD3 single files: CLIP ViT-L
    ("text_encoders.clip_g.transformer.", "hf", "te2"),      # SD3: CLIP ViT-bigG (Hugging Face layout)
)

#: OpenCLIP weight under ``transformer.resblocks.N.`` -> (HF path under ``encoder.layers.N.``, third of rows).
OPENCLIP_TO_HF = (
    ("attn.in_proj_weight", "self_attn.q_proj", 0),
    ("attn.in_proj_weight", "self_attn.k_proj", 1),
    ("attn.in_proj_weight", "self_attn.v_proj", 2),
    ("attn.out_proj.weight", "self_attn.out_proj", None),
    ("mlp.c_fc.weight", "mlp.fc1", None),
    ("mlp.c_proj.weight", "mlp.fc2", None),
)

#: LDM ResBlock layer -> diffusers ResnetBlock2D layer.
RESNET_NAMES = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
#: LDM layers outside the blocks -> diffusers.
TOP_NAMES = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}
#: Diffusers attention projection -> its old attention-processor module name (``attnN.processor.X``).
ATTNPROC_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}

#: UNet module names: (style, prefix, which path, separator).
UNET_STYLES = (
    ("kohya", "lora_unet_", "ldm", "_"),
    ("kohya", "lora_unet_", "diffusers", "_"),
    ("diffusers", "unet.", "diffusers", "."),
    ("diffusers", "", "diffusers", "."),
    ("peft", "base_model.model.", "diffusers", "."),
    ("comfyui", "diffusion_model.", "ldm", "."),
)
#: Text-encoder module names per component: (style, prefix, separator).
TEXT_STYLES = {
    "te": (("kohya", "lora_te_", "_"), ("diffusers", "text_encoder.", "."), ("diffusers", "", "."),
           ("peft", "base_model.model.", ".")),
    "te1": (("kohya", "lora_te1_", "_"), ("diffusers", "text_encoder.", "."), ("peft", "base_model.model.", ".")),
    "te2": (("kohya", "lora_te2_", "_"), ("diffusers", "text_encoder_2.", ".")),
}
#: The T5-XXL encoder in a Flux/SD3 single file, and its adaptable linear layers.
T5_PREFIX = "text_encoders.t5xxl.transformer."
T5_LINEAR = re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(?:SelfAttention\.[qkvo]|DenseReluDense\.(?:wi_0|wi_1|wi|wo))")
#: T5 module names per family: (style, prefix, separator).
T5_STYLES = {
    "flux": (("kohya", "lora_te3_", "_"), ("kohya", "lora_te2_", "_"), ("diffusers", "text_encoder_2.", ".")),
    "sd3": (("kohya", "lora_te3_", "_"), ("diffusers", "text_encoder_3.", ".")),
}
#: Which UNet path kohya's names use, per base (its SDXL trainer names the UNet in LDM style).
KOHYA_UNET_PATHS = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "ldm"}
#: Output naming per style: UNet prefix and path, text-encoder prefix per component, separator.
OUTPUT_STYLES = {
    "kohya": ("lora_unet_", None, {"te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_", "t5": "lora_te3_"}, "_"),
    "diffusers": ("unet.", "diffusers", {"te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2.",
                                         "t5": "text_encoder_3."}, "."),
    "peft": ("base_model.model.", "diffusers", {"te": "base_model.model.", "te1": "base_model.model."}, "."),
}


@dataclass(frozen=True)
class Target:
    """One adaptable weight (or one third of a fused one) of a checkpoint.

    Attributes:
        key: the checkpoint tensor.
        shape: the shape a module must produce (the slice's shape for a fused q/k/v third).
        rows: ``(begin, end)`` rows of ``key`` for a fused third, else None.
        component: ``unet``, ``te``, ``te1``, ``te2`` or ``t5`` (T5-XXL).
        path: the diffusers (UNet) or Hugging Face (text) path; the LDM path where the UNet layer
            has no diffusers name.
        ldm: the LDM path of a UNet layer (None for text encoders).
        block: ``attention``, ``resnet``, ``sampler``, ``top`` (UNet) or ``text``.
    """

    key: str
    shape: Shape
    rows: tuple[int, int] | None
    component: str
    path: str
    ldm: str | None
    block: str


@dataclass
class KeyMap:
    """Module name (in any key style) -> Target, for one checkpoint or reference layout.

    Attributes:
        names: every registered module name -> its target.
        targets: the targets, one per adaptable weight (or third).
        ambiguous: names two targets claimed (left out of ``names``).
        base: the base model, when known (it decides kohya's UNet naming).
    """

    names: dict[str, Target] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    ambiguous: set[str] = field(default_factory=set)
    base: str | None = None
    splits: dict[str, list[tuple[Target, tuple[int, int]]]] = field(default_factory=dict)

    @classmethod
    def build(cls, shapes: Mapping[str, Shape], base: str | None = None) -> KeyMap:
        """The table for a checkpoint whose tensors have these ``key -> shape``.

        Args:
            shapes: the checkpoint's tensors (only multi-dimensional weights are used).
            base: ``sd1``, ``sd2`` or ``sdxl`` when known (decides ``name_for`` kohya naming).
        """
        from . import dit

        km = cls(base=base)
        lay = dit.layout(shapes)
        covered = dit.add(km, shapes, *lay) if lay is not None else set()
        blocks = _unet_blocks(k[len(UNET_PREFIX):] for k in shapes if k.startswith(UNET_PREFIX)) if lay is None else {}
        family = lay[0] if lay is not None else base
        for key, shape in shapes.items():
            if len(shape) < 2 or key in covered or (lay is not None and key.startswith(UNET_PREFIX)):
                continue
            if key.startswith(T5_PREFIX):
                km._add_t5(key, shape, family)
                continue
            if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
                km._add_unet(key, shape, blocks)
                continue
            for prefix, layout, comp in TEXT_LAYOUTS:
                if key.startswith(prefix):
                    km._add_text(key, shape, prefix, layout, comp)
                    break
        return km

    @classmethod
    def reference(cls, base: str) -> KeyMap:
        """The table of a base model's reference layout (``arch.reference_shapes``)."""
        from .arch import reference_shapes

        return cls.build(reference_shapes(base), base)

    def lookup(self, name: str) -> Target | None:
        """The target of a LoRA module name, or None."""
        return self.names.get(name)

    def pieces(self, name: str) -> list[tuple[Target, tuple[int, int] | None]] | None:
        """The targets of a module name with the rows of the module's ``up`` each takes (None: all), or None.

        A module on a fused weight the checkpoint keeps apart (or on rows stored elsewhere) has
        several pieces; see ``dit``.
        """
        t = self.names.get(name)
        if t is not None:
            return [(t, None)]
        split = self.splits.get(name)
        return None if split is None else [(t, rows) for t, rows in split]

    def _register(self, name: str, target: Target) -> None:
        if name in self.ambiguous:
            return
        old = self.names.get(name)
        if old is not None and old != target:
            del self.names[name]
            self.ambiguous.add(name)
            return
        self.names[name] = target

    def _add_unet(self, key: str, shape: Shape, blocks: dict[str, tuple[str, str]]) -> None:
        ldm = key[len(UNET_PREFIX):-len(".weight")]
        diffusers, block = _to_diffusers(ldm, blocks)
        t = Target(key, shape, None, "unet", diffusers or ldm, ldm, block)
        self.targets.append(t)
        for _style, prefix, which, sep in UNET_STYLES:
            path = ldm if which == "ldm" else diffusers
            if path is not None:
                self._register(prefix + path.replace(".", sep), t)
        if diffusers is not None and (proc := _attnproc(diffusers)) is not None:
            self._register(proc, t)

    def _add_text(self, key: str, shape: Shape, prefix: str, layout: str, comp: str) -> None:
        rest = key[len(prefix):]
        found: list[tuple[str, tuple[int, int] | None]] = []
        if layout == "hf":
            if rest.startswith("text_model.encoder.layers.") and rest.endswith(".weight"):
                found.append((rest[:-len(".weight")], None))
        else:
            m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", rest)
            if m is not None:
                for suffix, hf, third in OPENCLIP_TO_HF:
                    if m.group(2) == suffix:
                        rows = None
                        if third is not None:
                            w = shape[0] // 3
                            rows = (third * w, (third + 1) * w)
                        found.append((f"text_model.encoder.layers.{m.group(1)}.{hf}", rows))
        for path, rows in found:
            sub = shape if rows is None else (rows[1] - rows[0], *shape[1:])
            t = Target(key, sub, rows, comp, path, None, "text")
            self.targets.append(t)
            for style, pre, sep in TEXT_STYLES[comp]:
                self._register(pre + path.replace(".", sep), t)
                if style != "kohya":  # transformers 5 names CLIPTextModel's modules without ``text_model.``
                    self._register(pre + path.removeprefix("text_model."), t)

    def _add_t5(self, key: str, shape: Shape, family: str | None) -> None:
        path = key[len(T5_PREFIX):].removesuffix(".weight")
        if not key.endswith(".weight") or len(shape) != 2 or not T5_LINEAR.fullmatch(path):
            return
        t = Target(key, shape, None, "t5", path, None, "text")
        self.targets.append(t)
        for _style, pre, sep in T5_STYLES["sd3" if family == "sd3" else "flux"]:
            self._register(pre + path.replace(".", sep), t)

    def name_for(self, target: Target, style: str) -> str:
        """The module name ``style`` (``kohya``, ``diffusers`` or ``peft``) gives ``target``.

        Raises:
            KeyError: the style has no name for this component (PEFT and a second text encoder).
        """
        unet_prefix, unet_path, te_prefixes, sep = OUTPUT_STYLES[style]
        if target.component == "t5" and style == "diffusers" and self.base != "sd3":
            return "text_encoder_2." + target.path  # FluxPipeline's T5 is its second text encoder
        if target.component == "unet":
            which = unet_path or KOHYA_UNET_PATHS.get(self.base or "", "diffusers")
            path = target.ldm if which == "ldm" and target.ldm else target.path
            return unet_prefix + path.replace(".", sep)
        return te_prefixes[target.component] + target.path.replace(".", sep)


def _attnproc(diffusers: str) -> str | None:
    head, _, last = diffusers.rpartition(".")
    if last == "0" and head.endswith(".to_out"):
        head, last = head[:-len(".to_out")], "to_out.0"
    proc = ATTNPROC_NAMES.get(last)
    if proc is None or not re.search(r"\.attn\d$", head):
        return None
    return f"{head}.processor.{proc}"


def _unet_blocks(paths: Iterable[str]) -> dict[str, tuple[str, str]]:
    """LDM block prefix -> (diffusers block prefix, kind), from the UNet's own structure.

    An input block is a downsampler when it has ``.0.op``; it ends a level. An output block ends a
    level when it has an upsampler (``.1.conv`` or ``.2.conv``).
    """
    inputs: dict[int, set[str]] = {}
    outputs: dict[int, set[str]] = {}
    for p in paths:
        parts = p.split(".")
        if len(parts) > 2 and parts[0] in ("input_blocks", "output_blocks") and parts[1].isdigit():
            (inputs if parts[0] == "input_blocks" else outputs).setdefault(int(parts[1]), set()).add(
                ".".join(parts[2:]))
    out: dict[str, tuple[str, str]] = {}
    level = j = 0
    for i in sorted(n for n in inputs if n > 0):
        subs = inputs[i]
        if any(s.startswith("0.op.") for s in subs):
            out[f"input_blocks.{i}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", "sampler")
            level, j = level + 1, 0
            continue
        out[f"input_blocks.{i}.0"] = (f"down_blocks.{level}.resnets.{j}", "resnet")
        out[f"input_blocks.{i}.1"] = (f"down_blocks.{level}.attentions.{j}", "attention")
        j += 1
    out["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    out["middle_block.1"] = ("mid_block.attentions.0", "attention")
    out["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    level = j = 0
    for i in sorted(outputs):
        subs = outputs[i]
        out[f"output_blocks.{i}.0"] = (f"up_blocks.{level}.resnets.{j}", "resnet")
        sampler = next((n for n in ("1", "2") if any(s.startswith(f"{n}.conv.") for s in subs)), None)
        if sampler != "1":
            out[f"output_blocks.{i}.1"] = (f"up_blocks.{level}.attentions.{j}", "attention")
        if sampler is not None:
            out[f"output_blocks.{i}.{sampler}.conv"] = (f"up_blocks.{level}.upsamplers.0.conv", "sampler")
            level, j = level + 1, 0
        else:
            j += 1
    return out


def _to_diffusers(ldm: str, blocks: dict[str, tuple[str, str]]) -> tuple[str | None, str]:
    """(diffusers path or None, block kind) of one LDM UNet layer path."""
    if ldm in TOP_NAMES:
        return TOP_NAMES[ldm], "top"
    parts = ldm.split(".")
    for n in (4, 3, 2):  # ``input_blocks.3.0.op`` (4 parts) before ``input_blocks.4.1`` (3) before ``middle_block.1`` (2)
        head = ".".join(parts[:n])
        if head in blocks:
            prefix, kind = blocks[head]
            rest = ".".join(parts[n:])
            if kind == "sampler":
                return (prefix, kind) if not rest else (None, kind)
            if kind == "resnet":
                return (f"{prefix}.{RESNET_NAMES[rest]}", kind) if rest in RESNET_NAMES else (None, kind)
            return f"{prefix}.{rest}", kind
    return None, "top"
