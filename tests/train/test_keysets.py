"""The missing-key sets of ``detect.keysets`` against the diffusers/transformers models of the shipped configs.

Both directions, on the meta device (no tensor memory):

- diffusers -> LDM: every parameter of the UNet and text encoders, renamed with the project's own
  map (``ldm_names``, as the DreamBooth single-file export does), gives exactly the required keys,
  with the layout's shapes. The VAE has no such map in the project; it is checked the other way.
- LDM -> diffusers: the full layout, through diffusers' own single-file converters
  (``convert_ldm``), gives exactly the models' parameters, with their shapes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import torch  # noqa: E402

from modelkit.detect import keysets, layouts  # noqa: E402
from modelkit.train import convert_ldm  # noqa: E402
from modelkit.train.ldm_names import openclip_ldm_state, unet_ldm_name  # noqa: E402
from modelkit.train.tokenizer import configs_root  # noqa: E402

UNET = "model.diffusion_model."


def _json(*parts: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(configs_root().joinpath(*parts).read_text())
    return data


def _shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}


def _bare(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """CLIP shapes without ``text_model.`` (transformers 5 keeps it only in the projection model)."""
    return _shapes({k.removeprefix("text_model."): v for k, v in state.items()})


def _ldm_text(state: dict[str, Any], family: str, index: int) -> dict[str, Any]:
    """As the DreamBooth export names a text encoder's tensors (``methods/dreambooth.py``)."""
    kind, prefix = convert_ldm.TEXT_ENCODERS[family][index]
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if kind == "openclip":
        return openclip_ldm_state(state, prefix)
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


@pytest.mark.parametrize(("base", "config"), [("sd1", "sd1"), ("sd2", "sd2"), ("sd2", "sd2-v"), ("sdxl", "sdxl")])
def test_required_keys_are_the_diffusers_models_in_ldm_names(base: str, config: str) -> None:
    from modelkit.train.base import _clip_model, _diffusers_model

    full = FULL[base]()
    shape = {k: s for k, (s, _) in full.items()}
    required = keysets.required_keys(base)
    ucfg, vcfg = _json(config, "unet", "config.json"), _json(config, "vae", "config.json")
    unet = _diffusers_model("UNet2DConditionModel", ucfg)
    vae = _diffusers_model("AutoencoderKL", vcfg)
    subs = ["text_encoder", "text_encoder_2"] if base == "sdxl" else ["text_encoder"]
    encoders = [_clip_model(_json(config, s, "config.json")) for s in subs]

    ldm = {UNET + unet_ldm_name(k, ucfg): v for k, v in unet.state_dict().items()}
    for i, te in enumerate(encoders):
        ldm.update(_ldm_text(te.state_dict(), base, i))
    got = _shapes(ldm)
    assert set(got) == {k for k in required if not k.startswith("first_stage_model.")}
    assert got == {k: shape[k] for k in got}

    state = {k: torch.empty(s, device="meta") for k, (s, dt) in full.items() if dt == "float32"}
    parts = convert_ldm.convert(state, base, ucfg, vcfg)
    assert _shapes(parts.unet) == _shapes(unet.state_dict())
    assert _shapes(parts.vae) == _shapes(vae.state_dict())
    assert {k for k in required if k.startswith("first_stage_model.")} == {
        k for k in full if k.startswith("first_stage_model.")}
    for i, te in enumerate(encoders):
        text = convert_ldm.text_encoder(state, base, i, te)
        assert _bare(text) == _bare(te.state_dict())


FULL = {"sd1": lambda: layouts.sd1_layout(schedule=False), "sd2": lambda: layouts.sd2_layout(schedule=False),
        "sdxl": layouts.sdxl_layout}
