"""Key tables for detection: data only, no logic.

Every pattern is a regular expression searched in a tensor name. The names and widths come from
the public code that writes these files (CompVis/Stability ``ldm``/``sgm``, diffusers, kohya
sd-scripts, LyCORIS, AUTOMATIC1111, ComfyUI, BasicSR, TencentARC, the IP-Adapter authors); each
table says what it encodes. ``engine.RULES`` decides the order in which the signatures are tried.
"""

from __future__ import annotations

# --- Signatures: which rule may look at a file ----------------------------------------------
#: ``any``: some key matches one of these; ``all``: each pattern matches some key; ``none``: no
#: key matches any of these; ``only``: every key matches one of these; ``max_keys``: at most
#: this many tensors; ``extras_any``: one of these non-tensor entries exists.
_DENOISER = (r"^model\.diffusion_model\.", r"(^|\.)double_blocks\.\d+\.img_attn\.", r"(^|\.)joint_blocks\.\d+\.")
_WRAP = r"^(?:params_ema\.|params\.)?"

SIGNATURES: dict[str, dict[str, tuple[str, ...] | int]] = {
    "optimizer-state": {"any": (r"^optimizer_state_dict\.state\.",), "extras_any": ("optimizer_name",)},
    "hypernetwork": {
        "any": (r"^\d+\.[01]\.linear(?:\.\d+|[12])\.(?:weight|bias)$",),
        "only": (r"^\d+\.[01]\.linear(?:\.\d+|[12])\.(?:weight|bias)$", r"^optimizer_state_dict\."),
    },
    # the original textual-inversion layout (rinongal) keeps its token ids as tensors and its
    # vectors in an nn.ParameterDict: string_to_token.* and string_to_param._parameters.*
    "embedding.a1111": {"any": (r"^string_to_param\.",), "only": (r"^string_to_param\.", r"^string_to_token\.")},
    "embedding.emb_params": {"only": (r"^emb_params$",), "any": (r"^emb_params$",)},
    "embedding.sdxl": {"all": (r"^clip_l$", r"^clip_g$"), "only": (r"^clip_[lg]$",)},
    "embedding.single": {"max_keys": 1},
    "ip-adapter": {"all": (r"^image_proj\.", r"^ip_adapter\."), "none": (r"^model\.diffusion_model\.",)},
    "ip-adapter.flux": {"any": (r"\.ip_adapter_double_stream_k_proj\.weight$",)},
    "controlnet.control-lora": {"any": (r"^lora_controlnet$",)},
    "controlnet.ldm": {"any": (r"^(?:control_model\.)?zero_convs\.0\.0\.weight$",
                               r"^(?:control_model\.)?input_hint_block\.0\.weight$")},
    "controlnet.diffusers": {"any": (r"^controlnet_cond_embedding\.conv_in\.weight$",
                                     r"^controlnet_down_blocks\.0\.weight$")},
    "controlnet.mmdit": {"any": (r"^controlnet_blocks\.0\.weight$", r"^controlnet_single_blocks\.0\.weight$")},
    "controlnet.lllite": {"any": (r"^lllite_unet_.*\.conditioning1\.0\.weight$",)},
    "t2i-adapter": {
        "any": (r"^(?:adapter\.)?body\.\d+\.(?:resnets\.\d+\.)?block1\.weight$", r"^(?:adapter\.)?body\.0\.in_conv\.weight$"),
        "none": (r"^(?:model\.diffusion_model\.)?input_blocks\.", r"^down_blocks\."),
    },
    "lora": {"any": (
        r"\.(?:lora_down|lora_up|lora_A|lora_B|lora_A\.default|lora_B\.default)\.weight$",
        r"(?:\.lora|_lora|\.lora_linear_layer)\.(?:down|up)\.weight$",
        r"\.(?:hada_w[12]_[ab]|lokr_w[12](?:_[ab])?|dora_scale|on_input|oft_blocks|oft_diag|lora_magnitude_vector)$",
        r"^lora_(?:unet|te\d?)_[^.]+\.(?:diff|diff_b|[ab][12]\.weight)$",
        r"_lora[12]\.(?:down|up)\.weight$",
    )},
    "checkpoint.sd3": {"any": (r"(?:^|\.)joint_blocks\.\d+\.(?:context|x)_block\.attn\.qkv\.weight$",)},
    "checkpoint.flux": {"any": (r"(?:^|\.)double_blocks\.\d+\.img_attn\.qkv\.weight$",)},
    "checkpoint.ldm": {"any": (r"^(?:model\.diffusion_model\.|diffusion_model\.|model\.)?input_blocks\.0\.0\.weight$",),
                       "none": (r"^control_model\.", r"^(?:control_model\.)?zero_convs\.")},
    "checkpoint.diffusers-unet": {"all": (r"^conv_in\.weight$", r"^down_blocks\.0\.resnets\.0\.conv1\.weight$"),
                                  "none": (r"^controlnet_",)},
    "checkpoint.diffusers-flux": {"all": (r"^x_embedder\.weight$", r"^single_transformer_blocks\.0\."),
                                  "none": (r"^controlnet_",)},
    "checkpoint.diffusers-sd3": {"all": (r"^pos_embed\.proj\.weight$", r"^transformer_blocks\.0\.attn\.add_q_proj\.weight$"),
                                 "none": (r"^controlnet_",)},
    "vae-approx": {"all": (r"^conv1\.weight$", r"^conv8\.weight$"), "only": (r"^conv[1-8]\.(?:weight|bias)$",)},
    "vae.ldm": {"any": (r"(?:^|\.)decoder\.up\.0\.block\.0\.conv1\.weight$", r"(?:^|\.)encoder\.down\.0\.block\.0\.conv1\.weight$"),
                "none": _DENOISER},
    "vae.diffusers": {"any": (r"(?:^|\.)decoder\.up_blocks\.0\.resnets\.0\.conv1\.weight$",
                              r"(?:^|\.)encoder\.down_blocks\.0\.resnets\.0\.conv1\.weight$"),
                      "none": (*_DENOISER, r"^down_blocks\.")},
    "text-encoder.clip": {"any": (r"(?:^|\.)text_model\.encoder\.layers\.0\.self_attn\.q_proj\.weight$",),
                          "none": _DENOISER},
    "text-encoder.openclip": {"any": (r"^(?!.*visual\.)(?:.*\.)?transformer\.resblocks\.0\.attn\.in_proj_weight$",),
                              "all": (r"(?:^|\.)token_embedding\.weight$",), "none": _DENOISER},
    "text-encoder.t5": {"any": (r"(?:^|\.)encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$",), "none": _DENOISER},
    "upscaler.esrgan-old": {"all": (r"^model\.0\.weight$", r"^model\.1\.sub\.0\.RDB1\.conv1\.0\.weight$")},
    "upscaler.esrgan": {"all": (r"^conv_first\.weight$", r"^RRDB_trunk\.0\.RDB1\.conv1\.weight$")},
    "upscaler.real-esrgan": {"all": (_WRAP + r"conv_first\.weight$", _WRAP + r"body\.0\.rdb1\.conv1\.weight$")},
    "upscaler.compact": {"all": (_WRAP + r"body\.0\.weight$",), "only": (_WRAP + r"body\.\d+\.(?:weight|bias)$",)},
}

# --- Widths that decide a base model --------------------------------------------------------
#: Cross-attention context width (``attn2.to_k`` input) -> base.
CONTEXT_WIDTH_BASE = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
#: ``label_emb.0.0.weight`` / ``add_embedding.linear_1.weight`` input width -> (base, subtype).
ADM_WIDTH = {2816: ("sdxl", None), 2560: ("sdxl-refiner", None), 2048: ("sd2", "unclip"), 1536: ("sd2", "unclip")}
#: UNet ``conv_in`` input channels -> checkpoint subtype.
IN_CHANNELS_SUBTYPE = {4: "standard", 9: "inpaint", 8: "instruct-pix2pix", 5: "depth"}
#: Textual-inversion vector width -> base.
EMBEDDING_WIDTH_BASE = {768: "sd1", 1024: "sd2", 1280: "sdxl"}
#: The most vectors per token an embedding can have in a 77-token prompt.
MAX_VECTORS = 75
#: Hypernetwork module sizes that are a cross-attention context width -> base.
HYPERNET_CONTEXT_BASE = {768: "sd1", 1024: "sd2"}
#: Text-encoder width -> family; family -> the base it implies (None: shared) and who uses it.
TEXT_WIDTH_FAMILY = {768: "clip-l", 1024: "openclip-h", 1280: "openclip-g"}
TEXT_FAMILY_BASE = {"clip-l": None, "openclip-h": "sd2", "openclip-g": None, "t5-xxl": None, "t5": None}
TEXT_FAMILY_USERS = {
    "clip-l": "SD1, SDXL, SD3 and Flux", "openclip-h": "SD2", "openclip-g": "SDXL, the SDXL refiner and SD3",
    "t5-xxl": "SD3 and Flux", "t5": "no SD base at this width",
}
#: T5 encoder d_model -> family.
T5_WIDTH_FAMILY = {4096: "t5-xxl"}
#: DiT hidden width (attention input) -> base, for LoRAs that name only ``transformer_blocks``.
DIT_HIDDEN_BASE = {3072: "flux", 1536: "sd3", 2432: "sd3"}
#: Flux ``img_in`` / ``x_embedder`` input width (latent channels x 2x2 patch) -> variant.
FLUX_IMG_IN_VARIANT = {64: None, 384: "fill", 128: "control"}
#: SD3 family by (depth, has x_block.attn2, has qk RMS norm); the first matching row wins.
SD3_VARIANTS = ((38, None, None, "3.5-large"), (24, True, None, "3.5-medium"), (24, False, True, "3.5-medium"),
                (24, False, False, "3-medium"))
#: VAE latent channels -> why the base cannot be told from shapes alone.
VAE_SHARED = {4: "SD1, SD2 and SDXL VAEs share shapes", 16: "SD3 and Flux VAEs share shapes"}
#: T2I-Adapter ``conv_in`` input (pixel-unshuffled image channels) -> base.
T2I_CIN_BASE = {64: "sd1", 192: "sd1", 256: "sdxl", 768: "sdxl"}
#: Default native resolution per base (SD2 depends on the model, so it is read from metadata).
BASE_RESOLUTION = {"sd1": 512, "sdxl": 1024, "sdxl-refiner": 1024}

# --- Checkpoints ----------------------------------------------------------------------------
#: Where a denoiser may sit, tried in order.
DENOISER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")
#: Key prefix -> component of a single-file checkpoint (first match wins).
COMPONENT_PREFIXES = (
    ("model.diffusion_model.", "unet"), ("model_ema.", "ema"), ("first_stage_model.", "vae"), ("vae.", "vae"),
    ("cond_stage_model.", "text_encoder"), ("conditioner.embedders.0.", "text_encoder_1"),
    ("conditioner.embedders.1.", "text_encoder_2"), ("text_encoders.clip_l.", "clip_l"),
    ("text_encoders.clip_g.", "clip_g"), ("text_encoders.t5xxl.", "t5xxl"), ("embedder.", "image_embedder"),
    ("depth_model.", "depth_model"), ("loss.", "training_loss"),
)
#: Top-level tensors a single-file checkpoint may carry beside its components (schedule buffers,
#: sampling markers, quantisation scales).
CHECKPOINT_EXTRAS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max",
    "edm_vpred.sigma_min", "scaled_fp8", "denoiser.sigmas", "denoiser.log_sigmas",
)
#: Text-encoder key prefix inside an LDM/SGM checkpoint -> the base that layout belongs to.
TEXT_PREFIX_BASE = (
    ("cond_stage_model.transformer.", "sd1"), ("cond_stage_model.model.", "sd2"),
    ("conditioner.embedders.0.transformer.", "sdxl"), ("conditioner.embedders.1.model.", "sdxl"),
    ("conditioner.embedders.0.model.", "sdxl-refiner"),
)
#: Keys some checkpoints carry as markers of their sampling (ComfyUI reads the same ones).
PREDICTION_MARKERS = (("edm_vpred.sigma_max", "v-edm"), ("edm_mean", "edm"), ("v_pred", "v"))
ZSNR_MARKER = "ztsnr"
#: Marker keys of special SD1/SD2 checkpoints -> subtype.
SUBTYPE_MARKERS = (("depth_model.model.pretrained.act_postprocess3.0.project.0.bias", "depth"),
                   ("embedder.model.ln_final.weight", "unclip"))

# --- LoRA family ----------------------------------------------------------------------------
#: Tensor-name suffix -> (algorithm or None, role). Suffixes are tried longest first.
LORA_SUFFIXES = (
    (".lora_down.weight", "lora", "down"), (".lora_up.weight", "lora", "up"), (".lora_mid.weight", "lora", "mid"),
    (".lora_linear_layer.down.weight", "lora", "down"), (".lora_linear_layer.up.weight", "lora", "up"),
    (".lora.down.weight", "lora", "down"), (".lora.up.weight", "lora", "up"),
    ("_lora.down.weight", "lora", "down"), ("_lora.up.weight", "lora", "up"),
    ("_lora1.down.weight", "lora", "down"), ("_lora1.up.weight", "lora", "up"),
    ("_lora2.down.weight", "lora", "down"), ("_lora2.up.weight", "lora", "up"),
    (".lora_A.default.weight", "lora", "down"), (".lora_B.default.weight", "lora", "up"),
    (".lora_A.weight", "lora", "down"), (".lora_B.weight", "lora", "up"),
    (".lora_magnitude_vector.weight", "dora", "magnitude"), (".lora_magnitude_vector", "dora", "magnitude"),
    (".dora_scale", "dora", "magnitude"),
    (".hada_w1_a", "loha", "w1_a"), (".hada_w1_b", "loha", "w1_b"), (".hada_w2_a", "loha", "w2_a"),
    (".hada_w2_b", "loha", "w2_b"), (".hada_t1", "loha", "t1"), (".hada_t2", "loha", "t2"),
    (".lokr_w1_a", "lokr", "w1_a"), (".lokr_w1_b", "lokr", "w1_b"), (".lokr_w2_a", "lokr", "w2_a"),
    (".lokr_w2_b", "lokr", "w2_b"), (".lokr_w1", "lokr", "w1"), (".lokr_w2", "lokr", "w2"),
    (".lokr_t1", "lokr", "t1"), (".lokr_t2", "lokr", "t2"),
    (".a1.weight", "glora", "a1"), (".a2.weight", "glora", "a2"), (".b1.weight", "glora", "b1"),
    (".b2.weight", "glora", "b2"),
    (".diff_b", "full", "diff_b"), (".diff", "full", "diff"),
    (".oft_blocks", "oft", "blocks"), (".oft_diag", "oft", "blocks"), (".rescale", "oft", "rescale"),
    (".on_input", "ia3", "on_input"), (".alpha", None, "alpha"), (".scale", None, "scale"),
)
#: Module-name prefix -> (component, key style). First match wins.
LORA_NAMESPACES = (
    (r"^lora_unet_", "unet", "kohya"), (r"^lora_te1_", "te1", "kohya"), (r"^lora_te2_", "te2", "kohya"),
    (r"^lora_te3_", "te3", "kohya"), (r"^lora_te_", "te", "kohya"), (r"^bundle_emb\.", "bundle", "kohya"),
    (r"^unet\.", "unet", "diffusers"), (r"^transformer\.", "unet", "diffusers"),
    (r"^text_encoder\.", "te", "diffusers"), (r"^text_encoder_2\.", "te2", "diffusers"),
    (r"^text_encoder_3\.", "te3", "diffusers"),
    (r"^base_model\.model\.(?:text_model|encoder)\.", "te", "peft"), (r"^base_model\.model\.", "unet", "peft"),
    (r"^diffusion_model\.", "unet", "comfyui"),
    (r"^(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\..*\.processor\.", "unet", "diffusers-attnproc"),
    (r"^(?:down_blocks|mid_block|up_blocks)\.", "unet", "diffusers"),
    (r"^(?:double_blocks|single_blocks)\.\d+\.processor\.", "unet", "xlabs"),
    (r"^(?:double_blocks|single_blocks)\.", "unet", "bfl"),
    (r"^text_model\.", "te", "diffusers"),
)
#: A module that projects the cross-attention context (its input width is the context width).
CROSS_ATTN_MODULE = r"attn2[._](?:processor[._])?to_[kv]$"
#: A text-encoder attention projection (its input width is the encoder width).
TEXT_ATTN_MODULE = r"self_attn[._](?:q_proj|k_proj|v_proj)$"
#: Module-name markers of a DiT denoiser -> base.
DIT_MARKERS = (
    (r"(?:^|[._])(?:double_blocks|single_blocks)[._]", "flux"),
    (r"(?:^|[._])single_transformer_blocks[._]", "flux"),
    (r"(?:^|[._])joint_blocks[._]", "sd3"),
)
#: Diffusers DiT attention projection (``transformer.transformer_blocks.N.attn.to_q``).
DIT_ATTN_MODULE = r"transformer_blocks[._]\d+[._]attn[._]to_[qkv]$"
#: A UNet transformer block numbered 2 or more (depth above 2) exists only in the SDXL family;
#: ``attn1``/``attn2`` keep DiT blocks (``transformer_blocks.N.attn``) out.
SDXL_DEPTH_MODULE = r"transformer_blocks[._][2-9][._]attn[12][._]"
#: UNet modules whose LoRA makes it a LoCon (ResBlock and sampler convolutions).
LOCON_MODULE = (
    r"resnets[._]\d+[._](?:conv1|conv2|conv_shortcut)$", r"(?:in_layers[._]2|out_layers[._]3|skip_connection)$",
    r"(?:downsamplers|upsamplers)[._]0[._]conv$", r"[._]op$", r"[._]conv$",
)
#: Metadata values that name the LoRA algorithm (kohya ``ss_network_module`` / ``ss_network_args``).
NETWORK_MODULE_SUBTYPE = (("dylora", "dylora"), ("lycoris", None), ("networks.lora", None))

# --- Metadata -------------------------------------------------------------------------------
#: ``modelspec.architecture`` prefix (lower case) -> (base, prediction or None).
MODELSPEC_ARCH = (
    ("stable-diffusion-xl-v1-refiner", "sdxl-refiner", None), ("stable-diffusion-xl", "sdxl", None),
    ("stable-diffusion-v2-768-v", "sd2", "v"), ("stable-diffusion-v2-512", "sd2", "eps"),
    ("stable-diffusion-v2", "sd2", None), ("stable-diffusion-v1", "sd1", None),
    ("stable-diffusion-3", "sd3", None), ("stable-diffusion-v3", "sd3", None),
    ("flux-1", "flux", None), ("flux.1", "flux", None),
)
#: kohya ``ss_base_model_version`` prefix (lower case) -> base.
SS_BASE_VERSION = (("sdxl_refiner", "sdxl-refiner"), ("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"),
                   ("sd3", "sd3"), ("flux", "flux"))
#: Prediction spellings -> our names.
PREDICTION_NAMES = {"v": "v", "v_prediction": "v", "v-prediction": "v", "epsilon": "eps", "eps": "eps"}
#: A ``.yaml`` beside a checkpoint: the line that names its prediction, and what SGM configs name.
YAML_PARAMETERIZATION = r"^\s*parameterization\s*:\s*[\"']?(v|eps|x0)[\"']?\s*(?:#.*)?$"
YAML_SGM_SCALING = (("VScaling", "v"), ("EpsScaling", "eps"))

# --- Diffusers folders ----------------------------------------------------------------------
#: ``model_index.json`` ``_class_name`` prefix -> base (checked against the denoiser's shapes).
PIPELINE_BASE = (
    ("StableDiffusionXLImg2ImgPipeline", None), ("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"),
    ("Flux", "flux"), ("StableDiffusion", None),
)
#: Weight files of one diffusers component, in order of preference.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "model.safetensors", "model.fp16.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.bin", "pytorch_model.bin", "pytorch_model.fp16.bin")
DIFFUSERS_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                     "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json")
