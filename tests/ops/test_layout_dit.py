"""``modelkit convert --to diffusers|single`` for Flux.1 and SD3.x single files, transformer-only files
and diffusers folders.

Tiny pipelines (``fixtures/dit_layouts.py``: transformer, 16-channel VAE, CLIP-L, SD3's CLIP-G, T5) are
saved in the ComfyUI single-file layout; the folder loads in diffusers/transformers offline with no
missing or unexpected keys and the weights diffusers' own single-file converters give; the way back
is bit-identical; the shipped configs describe the real models' shapes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures import dit_layouts as dl
from modelkit.cli.main import cli
from modelkit.errors import FormatError
from modelkit.layout import dit
from modelkit.layout import plan as lp
from modelkit.layout.bpe import configs_root
from modelkit.layout.folder import open_folder
from modelkit.ops import families as fam
from modelkit.reading import open_model
from tests.conftest import same_bits

pytestmark = pytest.mark.filterwarnings("ignore")  # diffusers/transformers deprecation chatter
P = "model.diffusion_model."
FAMILIES = ("flux", "sd3")


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def _load(path: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no Mapping


def _meta(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


class Tiny:
    """One tiny Flux or SD3 pipeline: its modules, single file, configs folder and diffusers folder."""

    def __init__(self, family: str, root: Path):
        self.family = family
        self.root = root / family
        self.root.mkdir()
        self.mods = dl.components(family)
        self.configs = str(self.root / "configs")
        dl.write_configs(self.mods, self.configs)
        sd = dl.single_file(family, self.mods)
        if family == "flux":  # ComfyUI saves CLIP-L's projection too: Flux's CLIPTextModel has no place for it
            sd["text_encoders.clip_l.transformer.text_projection.weight"] = torch.randn(16, 16)
        self.file = str(self.root / f"tiny-{family}.safetensors")
        save_file(sd, self.file, {"note": "kept"})
        self.folder = self.root / "diffusers"
        r = _run("convert", self.file, "--to", "diffusers", "--configs", self.configs, "-o", str(self.folder))
        assert r.exit_code == 0, r.output

    def config(self, sub: str) -> dict[str, Any]:
        return json.loads(Path(self.configs, sub, "config.json").read_text())


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Tiny]]:
    root = tmp_path_factory.mktemp("dit-layout")
    yield {f: Tiny(f, root) for f in FAMILIES}


def _same_dicts(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    assert set(mine) == set(theirs), (what, sorted(set(mine) ^ set(theirs))[:5])
    for k, v in theirs.items():
        assert same_bits(mine[k], v.contiguous()), (what, k)


# --- the maps are diffusers' maps ---------------------------------------------------------------

def test_maps_equal_diffusers_converters(tinies: dict[str, Tiny]) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_sd3_t5_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    for family, t in tinies.items():
        state = _load(t.file)
        folder = t.folder
        if family == "sd3":  # diffusers' Flux converter assumes the real width: checked below on a full-width model
            theirs = convert_sd3_transformer_checkpoint_to_diffusers({k: v for k, v in state.items() if k.startswith(P)})
            _same_dicts(_load(folder / "transformer" / "diffusion_pytorch_model.safetensors"), theirs, "transformer")
        vprefix = "vae." if family == "flux" else "first_stage_model."
        vae = convert_ldm_vae_checkpoint({"first_stage_model." + k[len(vprefix):]: v for k, v in state.items()
                                          if k.startswith(vprefix)}, t.config("vae"))
        _same_dicts(_load(folder / "vae" / "diffusion_pytorch_model.safetensors"), vae, "vae")
        for sub, prefix in dl.PIPELINE[family][1:]:
            picked = {k: v for k, v in state.items() if k.startswith(prefix)}
            got = (convert_sd3_t5_checkpoint_to_diffusers(picked) if "t5xxl" in prefix
                   else convert_ldm_clip_checkpoint(picked, prefix))
            if family == "flux" and sub == "text_encoder":
                got.pop("text_projection.weight")  # kept in ldm_extra.safetensors
            if family == "sd3" and sub == "text_encoder":  # SD3's CLIP-L pools unprojected, as in diffusers
                got["text_projection.weight"] = torch.eye(16)
            _same_dicts(_load(folder / sub / "model.safetensors"), got, sub)


def test_flux_transformer_map_equals_diffusers_at_full_width(tmp_path: Path) -> None:
    """diffusers' Flux converter splits linear1 by the real width (3072): a full-width model of
    ``[rows, 1]`` tensors follows every row through both."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    orig = dl.to_original(dl.fake_flux_full_width(), "flux")
    save_file(orig, str(tmp_path / "t.safetensors"))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(orig))
    with open_model(tmp_path / "t.safetensors") as mf:
        mine, used, problems = dit.to_diffusers(dict(mf.tensors), "flux", "t")
        assert not problems and sorted(used) == sorted(orig)
        _same_dicts({k: r.read("torch") for k, r in mine.items()}, theirs, "flux transformer")


@pytest.mark.parametrize("shipped", ["flux-dev", "flux-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_shipped_configs_describe_the_real_models(shipped: str) -> None:
    """The real models (built on the meta device) have the shapes their shipped configs say: the
    transformer's config follows from its shapes, the VAE and T5 are the layouts the split expects."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    family = "flux" if shipped.startswith("flux") else "sd3"
    root = configs_root().joinpath(shipped)
    cfg = json.loads(root.joinpath("transformer", "config.json").read_text())
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        model = cls.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    orig: dict[str, tuple[int, ...]] = {p + ".weight": s for p, (s, _, _) in fam.diffusers_weights(shapes, family).items()}
    for dtemplate, otemplate in dit.NORMS[family]:
        for i in range(64):
            if dtemplate.format(i=i) in shapes:
                orig[otemplate.format(i=i)] = shapes[dtemplate.format(i=i)]
    derived = dit.derived_config(orig, family, cfg)
    assert dit.config_problems(cfg, derived) == []
    assert dit.shipped_variant(family, derived) == shipped
    vcfg = json.loads(root.joinpath("vae", "config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vcfg)
    want = lp.expected("vae", vcfg)
    mapped = {}
    for rest, shape in want.items():
        name, conv = lp.names.vae_diffusers_name(rest, len(vcfg["block_out_channels"]))
        mapped[name] = shape[:2] if conv else shape
    assert mapped == {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    t5cfg = json.loads(root.joinpath("text_encoder_2" if family == "flux" else "text_encoder_3", "config.json").read_text())
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**{k: v for k, v in t5cfg.items() if not k.startswith("_")}))
    real = {k: tuple(v.shape) for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert lp.expected("t5", t5cfg) == real


# --- folders diffusers loads --------------------------------------------------------------------

def test_folder_loads_in_diffusers_with_the_source_weights(tinies: dict[str, Tiny], monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import (
        AutoencoderKL,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for family, t in tinies.items():
        d = str(t.folder)
        loaders = {"transformer": FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel,
                   "vae": AutoencoderKL,
                   "text_encoder": CLIPTextModel if family == "flux" else CLIPTextModelWithProjection,
                   "text_encoder_2": T5EncoderModel if family == "flux" else CLIPTextModelWithProjection,
                   "text_encoder_3": T5EncoderModel}
        for sub, module in t.mods.items():
            model, info = loaders[sub].from_pretrained(d, subfolder=sub, local_files_only=True, output_loading_info=True)
            assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (family, sub, info)
            loaded, want = model.state_dict(), dict(module.state_dict())
            if family == "sd3" and sub == "text_encoder":
                want["text_projection.weight"] = torch.eye(16)
            assert set(loaded) == set(want), (family, sub)
            for k, v in want.items():
                assert same_bits(loaded[k], v), (family, sub, k)
        cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
        t5_tok = "tokenizer_2" if family == "flux" else "tokenizer_3"
        # no SentencePiece model offline: the user passes the T5 tokenizer (None here)
        pipe = cls.from_pretrained(d, local_files_only=True, **{t5_tok: None})
        assert type(pipe) is cls and getattr(pipe, t5_tok) is None
        assert same_bits(pipe.transformer.state_dict()["proj_out.weight"], t.mods["transformer"].state_dict()["proj_out.weight"])
        index = json.loads((t.folder / "model_index.json").read_text())
        assert index[t5_tok] == [None, None]
        assert json.loads((t.folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
            "FlowMatchEulerDiscreteScheduler"
        tok = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer", local_files_only=True)
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# --- the way back -------------------------------------------------------------------------------

def _identical(a_path: str | Path, b_path: str | Path) -> None:
    with open_model(a_path) as a, open_model(b_path) as b:
        assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:5]
        for k in a:
            assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
            assert a[k].read_raw() == b[k].read_raw(), k


def test_round_trip_is_bit_identical(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    for family, t in tinies.items():
        back = tmp_path / f"{family}.safetensors"
        r = _run("convert", str(t.folder), "--to", "single", "-o", str(back))
        assert r.exit_code == 0, r.output
        _identical(t.file, back)
        assert _meta(back)["note"] == "kept"
    # an SD3 file without CLIP-L's projection: the identity diffusers needs is not carried back
    t = tinies["sd3"]
    sd = dl.single_file("sd3", t.mods, projection=False)
    src = tmp_path / "noproj.safetensors"
    save_file(sd, str(src))
    folder, back = tmp_path / "noproj", tmp_path / "noproj-back.safetensors"
    assert _run("convert", str(src), "--to", "diffusers", "--configs", t.configs, "-o", str(folder)).exit_code == 0
    assert not (folder / lp.EXTRA_FILE).exists()
    assert _run("convert", str(folder), "--to", "single", "-o", str(back)).exit_code == 0
    _identical(src, back)


def test_open_folder_is_the_single_file(tinies: dict[str, Tiny]) -> None:
    for family, t in tinies.items():
        with open_folder(t.folder) as mf, open_model(t.file) as single:
            assert mf.family == family and set(mf) == set(single)
            for k in single:
                assert mf[k].read_raw() == single[k].read_raw(), (family, k)


def test_lora_extract_from_folders_equals_from_files(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """``lora extract`` takes Flux/SD3 diffusers folders (base, tuned or both): the same modules, on the
    fused original weights, as from the single files."""
    g = torch.Generator().manual_seed(3)
    for family, t in tinies.items():
        sd = _load(t.file)
        picked = [k for k in sd if k.startswith("model.diffusion_model.") and k.endswith(".weight") and sd[k].dim() == 2]
        for k in picked[:4]:
            sd[k] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g, dtype=sd[k].dtype)
        tuned = tmp_path / f"{family}-tuned.safetensors"
        save_file(sd, str(tuned))
        tuned_folder = tmp_path / f"{family}-tuned"
        assert _run("convert", str(tuned), "--to", "diffusers", "--configs", t.configs, "-o",
                    str(tuned_folder)).exit_code == 0
        outs = []
        for i, (b, tu) in enumerate(((t.file, tuned), (t.folder, tuned_folder), (t.file, tuned_folder))):
            out = tmp_path / f"{family}-x{i}.safetensors"
            r = _run("lora", "extract", str(b), str(tu), "--rank", "4", "-o", str(out))
            assert r.exit_code == 0, (family, r.output)
            outs.append(_load(out))
        assert len(outs[0]) == 12, (family, sorted(outs[0]))  # four modules
        for o in outs[1:]:
            assert set(o) == set(outs[0]) and all(same_bits(o[k], outs[0][k]) for k in o), family


def test_transformer_only_file_and_parts(tinies: dict[str, Tiny], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = tinies["flux"]
    # the transformer of the single file, in ComfyUI's diffusion_models/ names (prefix gone)
    part = tmp_path / "transformer.safetensors"
    r = _run("convert", str(t.folder), "--to", "single", "--part", "transformer", "-o", str(part))
    assert r.exit_code == 0, r.output
    state = _load(t.file)
    assert set(_load(part)) == {k[len(P):] for k in state if k.startswith(P)}
    # a transformer-only file -> a component folder -> back, bit for bit
    comp = tmp_path / "comp"
    r = _run("convert", str(part), "--to", "diffusers", "--configs", t.configs, "-o", str(comp))
    assert r.exit_code == 0, r.output
    model, info = FluxTransformer2DModel.from_pretrained(str(comp), local_files_only=True, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _same_dicts(model.state_dict(), t.mods["transformer"].state_dict(), "transformer")
    back = tmp_path / "back.safetensors"
    assert _run("convert", str(comp), "--to", "single", "-o", str(back)).exit_code == 0
    _identical(part, back)
    # a transformer file in diffusers keys gives the same folder
    dkeys, comp2 = tmp_path / "diffusers-keys.safetensors", tmp_path / "comp2"
    shutil.copyfile(comp / "diffusion_pytorch_model.safetensors", dkeys)
    r = _run("convert", str(dkeys), "--to", "diffusers", "--configs", t.configs, "-o", str(comp2))
    assert r.exit_code == 0, r.output
    _identical(comp / "diffusion_pytorch_model.safetensors", comp2 / "diffusion_pytorch_model.safetensors")
    # --part t5xxl of the single file: a T5EncoderModel folder
    t5 = tmp_path / "t5"
    r = _run("convert", t.file, "--to", "diffusers", "--part", "t5xxl", "--configs", t.configs, "-o", str(t5))
    assert r.exit_code == 0, r.output
    model, info = T5EncoderModel.from_pretrained(str(t5), local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _same_dicts(model.state_dict(), t.mods["text_encoder_2"].state_dict(), "t5")
    # and --part on a pipeline folder or a single file gives the same file
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _run("convert", str(t.folder), "--to", "single", "--part", "t5xxl", "-o", str(a)).exit_code == 0
    assert _run("convert", t.file, "--to", "single", "--part", "t5xxl", "-o", str(b)).exit_code == 0
    _identical(a, b)


def test_shipped_configs_pick_the_variant_and_adapt_channels(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """Without --configs the tiny files do not fit the real sizes: one line names the variant chosen."""
    for family, shipped in (("flux", "flux-dev"), ("sd3", "sd3.5-medium")):
        r = _run("convert", tinies[family].file, "--to", "diffusers", "-o", str(tmp_path / family))
        _one_line_error(r, f"shapes do not fit the shipped {shipped} configs", "--configs FOLDER")
    cfg = json.loads(configs_root().joinpath("flux-dev", "transformer", "config.json").read_text())
    derived = {"in_channels": 384, "out_channels": 64}
    out = dit.adapted(cfg, "flux", derived)
    assert (out["in_channels"], out["out_channels"]) == (384, 64)
    assert dit.adapted(cfg, "flux", {"in_channels": 64, "out_channels": 64})["out_channels"] is None


# --- ops on a folder equal the ops on the file ---------------------------------------------------

def test_prune_and_merge_on_a_folder_equal_on_the_file(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    t = tinies["sd3"]
    for label, args in (("prune", ["prune", "{src}", "--dtype", "fp16", "-o", "{out}"]),
                        ("part", ["prune", "{src}", "--part", "transformer", "-o", "{out}"]),
                        ("models", ["merge", "models", "{src}", "{src2}", "--alpha", "0.25", "-o", "{out}"])):
        outs = []
        for i, src in enumerate((t.file, str(t.folder))):
            out = tmp_path / f"{label}-{i}.safetensors"
            r = _run(*[a.format(src=src, src2=t.file, out=out) for a in args])
            assert r.exit_code == 0, (label, r.output)
            outs.append(_load(out))
        _same_dicts(outs[1], outs[0], label)


def test_merge_lora_on_a_folder_equals_on_the_file(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    t = tinies["flux"]
    g = torch.Generator().manual_seed(1)
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=g),
            "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.randn(4, 32, generator=g),
            "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.randn(128, 4, generator=g)}
    save_file(lora, str(tmp_path / "l.safetensors"))
    outs = []
    for i, src in enumerate((t.file, str(t.folder))):
        out = tmp_path / f"lora-{i}.safetensors"
        r = _run("merge", "lora", src, str(tmp_path / "l.safetensors"), "-o", str(out))
        assert r.exit_code == 0, r.output
        outs.append(_load(out))
    _same_dicts(outs[1], outs[0], "merge lora")
    assert not same_bits(outs[0][P + "double_blocks.0.img_attn.qkv.weight"], _load(t.file)[P + "double_blocks.0.img_attn.qkv.weight"])


# --- bad inputs: one line, nothing written -------------------------------------------------------

def _one_line_error(r: Any, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelkit: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    t = tinies["flux"]
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    before = set(os.listdir(tmp_path))
    r = _run("convert", str(tmp_path / "lora.safetensors"), "--to", "diffusers", "-o", str(tmp_path / "f"))
    _one_line_error(r, "is not an SD1, SD2, SDXL, SD3 or Flux checkpoint")
    data = Path(t.file).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    before.add("cut.safetensors")
    r = _run("convert", str(tmp_path / "cut.safetensors"), "--to", "diffusers", "--configs", t.configs,
             "-o", str(tmp_path / "f"))
    _one_line_error(r)
    r = _run("convert", t.file, "--to", "diffusers", "--part", "clip_g", "--configs", t.configs, "-o", str(tmp_path / "f"))
    _one_line_error(r, "no clip_g")
    # a pipeline folder whose transformer holds a foreign tensor
    broken = tmp_path / "broken"
    shutil.copytree(t.folder, broken)
    w = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = _load(w)
    sd["stray.weight"] = torch.zeros(2)
    save_file(sd, str(w))
    before.add("broken")
    r = _run("convert", str(broken), "--to", "single", "-o", str(tmp_path / "x.safetensors"))
    _one_line_error(r, "stray.weight")
    assert set(os.listdir(tmp_path)) == before


# --- fused weights whose parts do not fit: one line, never a neighbour's bytes -------------------

class Bare:
    """A tiny transformer of one family alone: its diffusers state dict, its config folder, and files
    built from edited copies of it (nothing else in the folder, so "nothing written" is a listing)."""

    def __init__(self, family: str, root: Path):
        model = dl.tiny(family)
        self.family, self.root = family, root
        self.sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        self.configs = str(root / "configs")
        dl.write_configs({"transformer": model}, self.configs)
        self.files = root / "files"
        self.files.mkdir()

    def original(self, name: str, **edits: torch.Tensor) -> str:
        """A transformer-only file in the original keys, ``edits`` (original names) put in."""
        sd = {**dl.to_original(self.sd, self.family), **edits}
        path = self.files / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return str(path)

    def diffusers(self, name: str, **edits: torch.Tensor) -> str:
        """A transformer file in diffusers keys, ``edits`` (diffusers names) put in."""
        path = self.files / f"{name}.safetensors"
        save_file({**self.sd, **edits}, str(path))
        return str(path)

    def folder(self, name: str, **edits: torch.Tensor) -> str:
        """A diffusers component folder (config.json and weights), ``edits`` put in."""
        path = self.files / name
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(Path(self.configs) / "transformer", path)
        save_file({**self.sd, **edits}, str(path / "diffusion_pytorch_model.safetensors"))
        return str(path)

    def convert(self, src: str, to: str) -> Any:
        out = self.root / ("out" if to == "diffusers" else "out.safetensors")
        return _run("convert", src, "--to", to, "--configs", self.configs, "-o", str(out)) if to == "diffusers" \
            else _run("convert", src, "--to", to, "-o", str(out))

    def nothing_written(self) -> None:
        assert sorted(os.listdir(self.root)) == ["configs", "files"]


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bare]:
    root = tmp_path_factory.mktemp("dit-bare")
    out = {}
    for family in FAMILIES:
        (root / family).mkdir()
        out[family] = Bare(family, root / family)
    return out


def test_bare_files_convert(bare: dict[str, Bare]) -> None:
    """The unedited files of the fixture convert both ways (so each failure below is its edit's)."""
    for t in bare.values():
        for src, to in ((t.original("ok-orig"), "diffusers"), (t.diffusers("ok-diff"), "diffusers"),
                        (t.folder("ok-folder"), "single")):
            r = t.convert(src, to)
            assert r.exit_code == 0, r.output
            shutil.rmtree(t.root / "out", ignore_errors=True)
            (t.root / "out.safetensors").unlink(missing_ok=True)
        t.nothing_written()


def test_view_outside_its_storage_is_refused(tmp_path: Path) -> None:
    """``plan.view`` refuses a view that starts before or ends past its tensor's bytes, naming both."""
    save_file({"a": torch.arange(6.0).reshape(3, 2), "b": torch.arange(4.0)}, str(tmp_path / "t.safetensors"))
    with open_model(tmp_path / "t.safetensors") as mf:
        a = mf["a"]
        assert lp.view(a, "a2", (2, 2), (2, 1), 2).read("torch").tolist() == [[2.0, 3.0], [4.0, 5.0]]
        for shape, strides, offset in (((2, 2), (2, 1), 4), ((4, 2), (2, 1), 0), ((2, 2), (2, 1), -2),
                                       ((2, 4), (4, 1), 0), ((3, 2), (4, 1), 0)):
            with pytest.raises(FormatError) as e:
                lp.view(a, "a2", shape, strides, offset)
            assert e.value.path == str(tmp_path / "t.safetensors") and "a2" in str(e.value) and "of a " in str(e.value)
        for a_, b_ in ((0, 4), (2, 2), (-1, 1)):  # rows outside the tensor, or none
            with pytest.raises(ValueError, match="rows"):
                dit._rows(a, a_, b_, "a2")


def test_fused_parts_that_do_not_fit(bare: dict[str, Bare], tmp_path: Path) -> None:
    # original -> diffusers: a qkv bias shorter than its weight's rows (the bias views went into the weight)
    w = torch.arange(12.0).reshape(6, 2) + 100
    save_file({"double_blocks.0.img_attn.qkv.weight": w, "double_blocks.0.img_attn.qkv.bias": torch.tensor([1.0, 2, 3])},
              str(tmp_path / "qkv.safetensors"))
    with open_model(tmp_path / "qkv.safetensors") as mf:
        out, _, problems = dit.to_diffusers(dict(mf.tensors), "flux", "qkv")
        assert problems == ["double_blocks.0.img_attn.qkv.bias is [3], not one value per row of its [6, 2] weight"]
        assert not any(k.endswith(".bias") for k in out)
        assert out["transformer_blocks.0.attn.to_k.weight"].read("torch").tolist() == [[104.0, 105.0], [106.0, 107.0]]
    # diffusers -> original: q, k, v of 1, 2 and 3 rows (qkv took rows past to_q and to_k)
    parts = {f"transformer_blocks.0.attn.to_{n}.weight": torch.full((i + 1, 2), float(i + 1)) for i, n in enumerate("qkv")}
    save_file(parts, str(tmp_path / "uneven.safetensors"))
    with open_model(tmp_path / "uneven.safetensors") as mf, pytest.raises(ValueError) as e:
        dit.to_original(dict(mf.tensors), "flux", "uneven")
    assert str(e.value) == ("transformer_blocks.0.attn.to_q.weight [1, 2] does not fit double_blocks.0.img_attn.qkv.weight, "
                            "which needs [2, 2] there")

    # the same through the CLI: one line that names the tensor, nothing written
    for family, t in bare.items():
        h = t.sd["transformer_blocks.0.attn.to_q.weight"].shape[0]
        qkv = "double_blocks.0.img_attn.qkv" if family == "flux" else "joint_blocks.0.x_block.attn.qkv"
        r = t.convert(t.original("short-bias", **{qkv + ".bias": torch.ones(3 * h - 1)}), "diffusers")
        _one_line_error(r, f"is a {family} transformer whose fused weights do not split (1 problem; first: "
                           f"{qkv}.bias is [{3 * h - 1}], not one value per row of its [{3 * h}, {h}] weight)")
        for name, tensor in (("to_k.weight", torch.ones(h - 1, h)), ("to_k.weight", torch.ones(h, h + 1)),
                             ("to_v.bias", torch.ones(h + 1)), ("to_q.bias", torch.ones(h, 1))):
            edit = {f"transformer_blocks.0.attn.{name}": tensor}
            for src, to in ((t.diffusers("uneven", **edit), "diffusers"), (t.folder("uneven", **edit), "single")):
                _one_line_error(t.convert(src, to), f"transformer_blocks.0.attn.{name} {list(tensor.shape)}",
                                f"{qkv}.{name.split('.')[1]}")
        t.nothing_written()
    # Flux's linear1: a proj_mlp of other trailing size than q, k, v
    t = bare["flux"]
    edit = {"single_transformer_blocks.0.proj_mlp.weight": torch.ones(4, 3)}
    _one_line_error(t.convert(t.diffusers("mlp", **edit), "diffusers"),
                    "proj_mlp.weight [4, 3] does not fit single_blocks.0.linear1.weight, which needs [4, 32] there")
    t.nothing_written()


def test_transformer_shapes_that_make_no_config(bare: dict[str, Bare]) -> None:
    """What used to escape as a ValueError or ZeroDivisionError traceback is one line."""
    t = bare["flux"]
    hidden = t.sd["proj_out.weight"].shape[1]
    # a diffusers Flux file whose final modulation has odd rows: they do not halve into scale and shift
    odd = {"norm_out.linear.weight": torch.ones(2 * hidden - 1, hidden), "norm_out.linear.bias": torch.ones(2 * hidden - 1)}
    for src, to in ((t.diffusers("odd", **odd), "diffusers"), (t.folder("odd", **odd), "single")):
        _one_line_error(t.convert(src, to), f"norm_out.linear.weight [{2 * hidden - 1}, {hidden}] cannot make final_layer.adaLN_modulation.1.weight",
                        f"{2 * hidden - 1} rows do not halve")
    # original keys: a 1-D img_in, an empty query norm
    for edit, needle in (({"img_in.weight": torch.ones(hidden)}, f"img_in.weight is [{hidden}], with no dimension 1"),
                         ({"double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(0)},
                          "double_blocks.0.img_attn.norm.query_norm.scale is [0], empty")):
        _one_line_error(t.convert(t.original("shape", **edit), "diffusers"), "flux transformer whose shapes make no config",
                        needle)
    t.nothing_written()
    # SD3 without qk norm takes the head size from its config: one that is not a number is the config's fault
    t = bare["sd3"]
    cfg_path = Path(t.configs, "transformer", "config.json")
    good = cfg_path.read_text()
    try:
        for bad in ("x", -8, [8]):
            cfg_path.write_text(json.dumps({**json.loads(good), "attention_head_dim": bad}))
            _one_line_error(t.convert(t.original("ok"), "diffusers"), "transformer/config.json does not fit",
                            f"attention_head_dim is {bad!r}")
    finally:
        cfg_path.write_text(good)
    t.nothing_written()


def test_remote_input_is_refused(tmp_path: Path) -> None:
    """A URL is refused as every command that writes refuses one, not reported missing."""
    for to, out in (("diffusers", "f"), ("single", "f.safetensors")):
        r = _run("convert", "http://host/x.ckpt", "--to", to, "-o", str(tmp_path / out))
        _one_line_error(r, "http://host/x.ckpt: a remote file is read by scan, inspect, detect and hash, and "
                           "downloaded by convert and prune; this command takes local inputs")
    assert os.listdir(tmp_path) == []


def test_dit_parts_on_other_files_are_one_line_and_diffusers_keys_transformers_go_to_original_keys(
        tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """``--part transformer|clip_l|clip_g|t5xxl`` asked of an SD file is refused in one line (it was a KeyError);
    a diffusers-keys Flux/SD3 transformer file ``--to single --part transformer`` becomes the original-keys
    transformer file, the bytes ``--part transformer`` takes out of the single file."""
    from tests.train import tiny

    sd1 = tiny.write_checkpoint(str(tmp_path / "sd1.safetensors"))
    for to in ("diffusers", "single"):
        for part in ("transformer", "clip_l", "t5xxl"):
            out = tmp_path / (f"x-{part}.safetensors" if to == "single" else f"x-{part}")
            r = _run("convert", sd1, "--to", to, "--part", part, "-o", str(out))
            _one_line_error(r, f"--part {part} is a part of Flux and SD3 files")
    for family, t in tinies.items():
        tr = t.folder / "transformer" / "diffusion_pytorch_model.safetensors"
        want, got = tmp_path / f"{family}-want.safetensors", tmp_path / f"{family}-got.safetensors"
        assert _run("convert", t.file, "--to", "single", "--part", "transformer", "-o", str(want)).exit_code == 0
        r = _run("convert", str(tr), "--to", "single", "--part", "transformer", "-o", str(got))
        assert r.exit_code == 0, (family, r.output)
        a, b = _load(want), _load(got)
        assert set(a) == set(b) and all(same_bits(a[k], b[k]) for k in a), family
        r = _run("convert", str(tr), "--to", "single", "--part", "clip_l", "-o", str(tmp_path / "c.safetensors"))
        _one_line_error(r, "--part clip_l")


def test_to_gguf_takes_original_keys_keeps_sd3_embedders_and_refuses_what_comfyui_gguf_cannot_load(
        tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """A diffusers-keys Flux/SD3 transformer goes to GGUF in its original keys (the same file as from the single
    file's transformer); SD3's embedders and positional embedding stay at full precision, as ComfyUI-GGUF's
    lcpp_sd3 patch keeps them; a LoRA, a VAE or a diffusers-keys SD UNet is refused in one line."""
    gguf = pytest.importorskip("gguf")
    for family, t in tinies.items():
        single_tr = tmp_path / f"{family}-tr.safetensors"
        assert _run("convert", t.file, "--to", "single", "--part", "transformer", "-o", str(single_tr)).exit_code == 0
        outs = []
        for i, src in enumerate((single_tr, t.folder / "transformer" / "diffusion_pytorch_model.safetensors")):
            out = tmp_path / f"{family}-{i}.gguf"
            r = _run("convert", str(src), "--to", "gguf", "--quant", "Q8_0", "--base", family, "-o", str(out))
            assert r.exit_code == 0, (family, r.output)
            outs.append({x.name: (x.tensor_type.name, bytes(x.data)) for x in gguf.GGUFReader(str(out)).tensors})
        assert outs[0] == outs[1], family
        if family == "sd3":
            kept = {n: q for n, (q, _b) in outs[0].items()
                    if n.startswith(("context_embedder.", "t_embedder.", "x_embedder.", "pos_embed"))}
            assert kept and all(q in ("F32", "F16", "BF16") for q in kept.values()), kept
    vae = t.folder / "vae" / "diffusion_pytorch_model.safetensors"
    r = _run("convert", str(vae), "--to", "gguf", "-o", str(tmp_path / "v.gguf"))
    _one_line_error(r, "is a vae, not a checkpoint")


def test_fp8_casts_the_same_layers_in_either_key_layout(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """prune --dtype fp8_e4m3fn of a transformer in original keys and of the same one in diffusers' keys casts
    the same weights (the modulation layers both ways; the final layer and the embedders neither way)."""
    for family, t in tinies.items():
        single_tr = tmp_path / f"{family}-tr.safetensors"
        assert _run("convert", t.file, "--to", "single", "--part", "transformer", "-o", str(single_tr)).exit_code == 0
        diff_tr = t.folder / "transformer" / "diffusion_pytorch_model.safetensors"
        sizes = []
        for i, src in enumerate((single_tr, diff_tr)):
            out = tmp_path / f"{family}-fp8-{i}.safetensors"
            assert _run("prune", str(src), "--dtype", "fp8_e4m3fn", "--fp8", "clamp", "-o", str(out)).exit_code == 0
            got = _load(out)
            sizes.append(sum(v.numel() for v in got.values() if v.dtype == torch.float8_e4m3fn))
            kept = [k for k, v in got.items() if v.dim() == 2 and v.dtype != torch.float8_e4m3fn]
            assert kept and all(any(w in k for w in ("in", "embed", "final_layer", "proj_out", "norm_out", "t_embedder"))
                                for k in kept), (family, i, kept)
        assert sizes[0] == sizes[1] > 0, (family, sizes)
