"""``modelkit convert --to single|diffusers``: diffusers folders <-> LDM single files, SD1/SD2/SDXL.

The tiny models come from seeded diffusers/transformers modules (``tests/train/tiny.py``). The key
maps are checked against diffusers' own converters, the folders are loaded by diffusers'
``from_pretrained`` offline, and a round trip single -> folder -> single is bit-identical.
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

from modelkit.cli.main import cli
from modelkit.layout import plan as lp
from modelkit.layout.bpe import configs_root
from modelkit.layout.folder import open_folder
from modelkit.reading import open_model
from tests.conftest import same_bits
from tests.train import tiny

FAMILIES = ("sd1", "sd2", "sdxl")


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def _load(path: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no Mapping


def _meta(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


class Tiny:
    """One tiny family: its single file, configs folder and the source modules' state dicts."""

    def __init__(self, family: str, root: Path):
        self.family = family
        folder = root / family
        folder.mkdir()
        if family == "sd1":
            self.file = tiny.write_checkpoint(str(folder / "tiny-sd1.safetensors"))
            self.configs = tiny.write_configs(str(folder / "configs"))
            s = tiny.diffusers_state(0)
            self.originals = {"unet": s["unet"], "vae": s["vae"], "text_encoder": s["text"]}
        else:
            self.file, self.configs, orig = tiny.family_checkpoint(family, str(folder))
            self.originals = dict(orig)
        self.folder = folder / "diffusers"
        r = _run("convert", self.file, "--to", "diffusers", "--configs", self.configs, "-o", str(self.folder),
                 *(["--prediction", "eps"] if family == "sd2" else []))
        assert r.exit_code == 0, r.output

    def config(self, sub: str) -> dict[str, Any]:
        return json.loads(Path(self.configs, sub, "config.json").read_text())


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Tiny]]:
    root = tmp_path_factory.mktemp("layout")
    yield {f: Tiny(f, root) for f in FAMILIES}


# --- the maps are diffusers' maps ---------------------------------------------------------------

def _mine(t: Tiny) -> dict[str, dict[str, torch.Tensor]]:
    """Our LDM -> diffusers split of the tiny file, read into torch."""
    with open_model(t.file) as mf:
        sp = lp.split(mf, lp.parts_of(t.family), t.config)
        assert not sp.problems, sp.problems
        return {sub: {o.name: o.ref.read("torch").clone() for o in outs if o.ref is not None}
                for sub, outs in sp.components.items()}


def _hf(key: str) -> str:
    """A text model's key as saved files spell it (transformers 5 drops ``text_model.`` in memory)."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def _text_model(t: Tiny, sub: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {k: v for k, v in t.config(sub).items() if not k.startswith("_")}
    cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
    return cls(CLIPTextConfig(**cfg))


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_equal_diffusers_converters(tinies: dict[str, Tiny], family: str) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    t = tinies[family]
    state = _load(t.file)
    mine = _mine(t)
    theirs = {"unet": convert_ldm_unet_checkpoint(state, t.config("unet")),
              "vae": convert_ldm_vae_checkpoint(state, t.config("vae"))}
    for sub, kind, prefix in lp.names.TEXT_ENCODERS[family]:
        model = _text_model(t, sub)
        picked = {k: v for k, v in state.items() if k.startswith(prefix)}
        got = (convert_ldm_clip_checkpoint(picked, prefix) if kind == "clip"
               else convert_open_clip_checkpoint(model, picked, prefix=prefix))
        wanted = {_hf(k) for k in model.state_dict()}
        # diffusers loads non-strictly: what it converts beyond the model (SD2's last layer and
        # text_projection, position_ids) is ignored there, and kept in ldm_extra.safetensors here
        theirs[sub] = {k: v for k, v in got.items() if k in wanted}
        assert set(mine[sub]) == wanted
    assert set(mine) == set(theirs)
    for sub in theirs:
        assert set(mine[sub]) == set(theirs[sub]), sub
        for k, v in theirs[sub].items():
            assert same_bits(mine[sub][k], v.contiguous()), (sub, k)


@pytest.mark.parametrize("shipped", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_shipped_configs_describe_the_real_models(shipped: str) -> None:
    """The full-size layouts our shape check expects, mapped to diffusers names, are exactly the real
    models' parameters and shapes (built on the meta device: no memory, no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = "sd2" if shipped.startswith("sd2") else shipped
    root = configs_root().joinpath(shipped)
    for part in lp.parts_of(family):
        cfg = json.loads(root.joinpath(part.folder, "config.json").read_text())
        with torch.device("meta"):
            if part.kind == "unet":
                model = UNet2DConditionModel.from_config(cfg)
            elif part.kind == "vae":
                model = AutoencoderKL.from_config(cfg)
            else:
                cls = CLIPTextModelWithProjection if lp.has_projection(part, cfg) else CLIPTextModel
                model = cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
        real = {_hf(k) if part.kind != "unet" and part.kind != "vae" else k: tuple(v.shape)
                for k, v in model.state_dict().items()}
        want = lp.expected(part.kind, cfg)
        mapped: dict[str, tuple[int, ...]] = {}
        for rest, shape in want.items():
            if lp._spare(part, rest, int(cfg.get("num_hidden_layers") or 0), lp.has_projection(part, cfg)):
                continue
            for o in lp._convert(part, cfg, rest, _fake(rest, shape), len(cfg.get("block_out_channels") or ())):
                mapped[o.name] = o.shape
        assert mapped == real, (shipped, part.folder, set(mapped) ^ set(real))


def _fake(name: str, shape: tuple[int, ...]) -> Any:
    from modelkit import dtypes
    from modelkit.model import TensorRef

    strides = tuple(int(torch.tensor(shape[i + 1:]).prod()) for i in range(len(shape)))
    nbytes = int(torch.tensor(shape).prod()) * 4  # a storage as big as the tensor: views must stay inside it
    return TensorRef(name, dtypes.ALIASES["fp32"], shape, strides, 0, 0, nbytes)


# --- folders diffusers loads --------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_in_diffusers_with_the_source_weights(tinies: dict[str, Tiny], family: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = tinies[family]
    d = str(t.folder)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(d, local_files_only=True)
    assert type(pipe) is cls
    if family != "sdxl":
        assert pipe.safety_checker is None
    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    for sub, original in t.originals.items():
        model, info = loaders[sub].from_pretrained(d, subfolder=sub, local_files_only=True, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (sub, info)
        loaded = model.state_dict()
        want = {k if k in loaded else k.removeprefix("text_model."): v for k, v in original.items()}
        assert set(loaded) == set(want), sub
        for k, v in want.items():
            assert same_bits(loaded[k], v), (sub, k)
        assert same_bits(getattr(pipe, sub).state_dict()[next(iter(loaded))], loaded[next(iter(loaded))])
    tok = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer", local_files_only=True)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    index = json.loads((t.folder / "model_index.json").read_text())
    if family != "sdxl":
        assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]


# --- round trip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical(tinies: dict[str, Tiny], family: str, tmp_path: Path) -> None:
    t = tinies[family]
    back = tmp_path / "back.safetensors"
    r = _run("convert", str(t.folder), "--to", "single", "-o", str(back), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)["files"][0]
    assert doc["to"] == "single" and doc["family"] == family
    a, b = _load(t.file), _load(back)
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert same_bits(a[k], b[k]), k
    if family == "sdxl":  # every tensor of the tiny SDXL file has its place in the folder
        assert not (t.folder / lp.EXTRA_FILE).exists()
        return
    kept = _load(t.folder / lp.EXTRA_FILE)
    if family == "sd2":  # the last OpenCLIP layer and text_projection have no place in CLIPTextModel
        assert "cond_stage_model.model.text_projection" in kept
        assert any(".resblocks.2." in k for k in kept)
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in kept and "betas" in kept


def test_metadata_and_ema(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """EMA copies are dropped with a note; the file's metadata travels in ldm_extra.safetensors."""
    from modelkit.train.export import save_tensors

    t = tinies["sd1"]
    state = _load(t.file)
    state["model_ema.decay"] = torch.tensor(0.999)
    state["model_ema.diffusion_modelout2weight"] = state["model.diffusion_model.out.2.weight"].clone()
    src = tmp_path / "ema.safetensors"
    save_tensors(str(src), state, {"ss_note": "hello"})
    r = _run("convert", str(src), "--to", "diffusers", "--configs", t.configs, "-o", str(tmp_path / "f"), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)["files"][0]
    assert sorted(doc["dropped"]) == ["model_ema.decay", "model_ema.diffusion_modelout2weight"]
    assert "EMA" in r.stderr
    r = _run("convert", str(tmp_path / "f"), "--to", "single", "-o", str(tmp_path / "b.safetensors"))
    assert r.exit_code == 0, r.output
    assert _meta(tmp_path / "b.safetensors")["ss_note"] == "hello"
    assert set(_load(tmp_path / "b.safetensors")) == {k for k in state if not k.startswith("model_ema.")}


# --- one component ------------------------------------------------------------------------------

def test_part_single_file_to_component_folder_and_back(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    t = tinies["sdxl"]
    for part, loader, sub in (("unet", UNet2DConditionModel, "unet"), ("vae", AutoencoderKL, "vae"),
                              ("te2", CLIPTextModelWithProjection, "text_encoder_2")):
        out = tmp_path / part
        r = _run("convert", t.file, "--to", "diffusers", "--part", part, "--configs", t.configs, "-o", str(out))
        assert r.exit_code == 0, r.output
        weights = "model.safetensors" if part == "te2" else "diffusion_pytorch_model.safetensors"
        assert sorted(os.listdir(out)) == ["config.json", weights]
        model, info = loader.from_pretrained(str(out), local_files_only=True, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        for k, v in t.originals[sub].items():
            assert same_bits(model.state_dict()[k], v), k
    src = _load(t.file)
    # a component folder -> the LDM keys of that part alone (a VAE alone: the bare names A1111 loads)
    for part, prefix in (("unet", "model.diffusion_model."), ("vae", "first_stage_model."),
                         ("te2", "conditioner.embedders.1.model.")):
        for where in (str(tmp_path / part), str(t.folder)):
            out = tmp_path / f"{part}-{len(where)}.safetensors"
            r = _run("convert", where, "--to", "single", "--part", part, "-o", str(out))
            assert r.exit_code == 0, r.output
            got = _load(out)
            strip = prefix if part == "vae" else ""
            want = {k[len(strip):]: v for k, v in src.items() if k.startswith(prefix)}
            if part == "te2":  # logit_scale has no place in the folder; the pipeline keeps it aside
                want = {k: v for k, v in want.items() if k in got or where == str(t.folder)}
            assert set(got) == set(want), (part, where, set(got) ^ set(want))
            for k in want:
                assert same_bits(got[k], want[k]), k
    # and from the single file itself: the bare VAE
    r = _run("convert", t.file, "--to", "single", "--part", "vae", "-o", str(tmp_path / "vae-only.safetensors"))
    assert r.exit_code == 0, r.output
    assert set(_load(tmp_path / "vae-only.safetensors")) == {k[len("first_stage_model."):] for k in src
                                                               if k.startswith("first_stage_model.")}


# --- folder inputs in the other ops -------------------------------------------------------------

def test_open_folder_is_the_single_file(tinies: dict[str, Tiny]) -> None:
    for family, t in tinies.items():
        with open_folder(t.folder) as mf, open_model(t.file) as single:
            assert set(mf) == set(single), family
            for k in single:
                assert mf[k].name == k and same_bits(mf[k].read("torch"), single[k].read("torch")), (family, k)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prune_and_merges_on_a_folder_equal_on_the_file(tinies: dict[str, Tiny], family: str,
                                                        tmp_path: Path) -> None:
    t = tinies[family]
    for label, args in (("prune", ["prune", "{src}", "--dtype", "fp16", "-o", "{out}"]),
                        ("models", ["merge", "models", "{src}", "{src2}", "--alpha", "0.25", "-o", "{out}"])):
        outs = []
        for i, src in enumerate((t.file, str(t.folder))):
            out = tmp_path / f"{label}-{i}.safetensors"
            r = _run(*[a.format(src=src, src2=t.file, out=out) for a in args])
            assert r.exit_code == 0, (label, r.output)
            outs.append(_load(out))
        assert set(outs[0]) == set(outs[1]), (label, len(outs[0]), len(outs[1]), sorted(set(outs[0]) ^ set(outs[1]))[:3])
        for k in outs[0]:
            assert same_bits(outs[0][k], outs[1][k]), (label, k)


def test_merge_lora_on_a_folder_equals_on_the_file(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    t = tinies["sd1"]
    g = torch.Generator().manual_seed(1)
    w = _load(t.file)["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = {f"{base}.lora_down.weight": torch.randn(4, w.shape[1], generator=g),
            f"{base}.lora_up.weight": torch.randn(w.shape[0], 4, generator=g), f"{base}.alpha": torch.tensor(4.0)}
    save_file(lora, str(tmp_path / "l.safetensors"))
    outs = []
    for i, src in enumerate((t.file, str(t.folder))):
        out = tmp_path / f"lora-{i}.safetensors"
        r = _run("merge", "lora", src, str(tmp_path / "l.safetensors"), "-o", str(out))
        assert r.exit_code == 0, r.output
        outs.append(_load(out))
    assert set(outs[0]) == set(outs[1])
    for k in outs[0]:
        assert same_bits(outs[0][k], outs[1][k]), k


def test_lora_extract_from_folders_equals_from_files(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """``lora extract`` takes diffusers folders for the base, the tuned model or both: the same modules as
    from the single files."""
    t = tinies["sd1"]
    g = torch.Generator().manual_seed(2)
    sd = _load(t.file)
    for k in [k for k in sd if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")][:3]:
        sd[k] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g, dtype=sd[k].dtype)
    from safetensors.torch import save_file

    tuned = tmp_path / "tuned.safetensors"
    save_file(sd, str(tuned))
    tuned_folder = tmp_path / "tuned-diffusers"
    r = _run("convert", str(tuned), "--to", "diffusers", "--configs", t.configs, "-o", str(tuned_folder))
    assert r.exit_code == 0, r.output
    outs = []
    for i, (b, tu) in enumerate(((t.file, tuned), (t.folder, tuned_folder), (t.folder, tuned))):
        out = tmp_path / f"x{i}.safetensors"
        r = _run("lora", "extract", str(b), str(tu), "--rank", "4", "-o", str(out))
        assert r.exit_code == 0, r.output
        outs.append(_load(out))
    assert len(outs[0]) == 9  # three modules
    for o in outs[1:]:
        assert set(o) == set(outs[0]) and all(same_bits(o[k], outs[0][k]) for k in o)


# --- bad inputs: one line, exit 2, nothing written ----------------------------------------------

def _one_line_error(r: Any, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelkit: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _no_leftovers(folder: Path, before: set[str]) -> None:
    assert set(os.listdir(folder)) == before, set(os.listdir(folder)) ^ before


def test_bad_inputs(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    t1, t2 = tinies["sd1"], tinies["sd2"]
    broken = tmp_path / "broken"
    shutil.copytree(t1.folder, broken)
    shutil.rmtree(broken / "vae")
    before = set(os.listdir(tmp_path))
    r = _run("convert", str(broken), "--to", "single", "-o", str(tmp_path / "x.safetensors"))
    _one_line_error(r, "has no vae/ folder")
    _no_leftovers(tmp_path, before)
    # shapes that do not fit the shipped configs
    r = _run("convert", t1.file, "--to", "diffusers", "-o", str(tmp_path / "f"))
    _one_line_error(r, "shapes do not fit the shipped sd1 configs", "--configs FOLDER")
    _no_leftovers(tmp_path, before)
    # an SD2 file that does not say eps or v
    r = _run("convert", t2.file, "--to", "diffusers", "-o", str(tmp_path / "f"))
    _one_line_error(r, "prediction type (eps or v) is unknown", "--prediction")
    _no_leftovers(tmp_path, before)
    # outputs that exist: a folder and a file, untouched without --force
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "keep").write_text("mine")
    r = _run("convert", t1.file, "--to", "diffusers", "--configs", t1.configs, "-o", str(tmp_path / "f"))
    _one_line_error(r, "already exists")
    assert os.listdir(tmp_path / "f") == ["keep"]
    (tmp_path / "x.safetensors").write_bytes(b"mine")
    r = _run("convert", str(t1.folder), "--to", "single", "-o", str(tmp_path / "x.safetensors"))
    _one_line_error(r, "already exists")
    assert (tmp_path / "x.safetensors").read_bytes() == b"mine"
    # --force replaces the folder whole
    r = _run("convert", t1.file, "--to", "diffusers", "--configs", t1.configs, "-o", str(tmp_path / "f"), "--force")
    assert r.exit_code == 0, r.output
    assert "keep" not in os.listdir(tmp_path / "f") and (tmp_path / "f" / "model_index.json").is_file()
    assert not [n for n in os.listdir(tmp_path) if "modelkit-tmp" in n]


def test_prediction_v_uses_the_v_scheduler(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    t = tinies["sd2"]
    out = tmp_path / "v"
    r = _run("convert", t.file, "--to", "diffusers", "--configs", t.configs, "--prediction", "v", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_sharded_and_bin_components_read_the_same(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """A UNet in two shards with an index json and a text encoder as pytorch_model.bin (read by the
    safe reader, behind the scan) give the same LDM tensors as the plain folder."""
    from safetensors.torch import save_file

    t = tinies["sd2"]
    folder = tmp_path / "sharded"
    shutil.copytree(t.folder, folder)
    unet = _load(folder / "unet" / "diffusion_pytorch_model.safetensors")
    names = sorted(unet)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: unet[k] for k in keys}, str(folder / "unet" / f"diffusion_pytorch_model-{shard}"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f"diffusion_pytorch_model-{s}" for s, ks in halves.items() for k in ks}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    te = _load(folder / "text_encoder" / "model.safetensors")
    torch.save(te, folder / "text_encoder" / "pytorch_model.bin")
    (folder / "text_encoder" / "model.safetensors").unlink()
    out = tmp_path / "back.safetensors"
    r = _run("convert", str(folder), "--to", "single", "-o", str(out))
    assert r.exit_code == 0, r.output
    a, b = _load(t.file), _load(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert same_bits(a[k], b[k]), k
    # a shard outside the folder is refused
    index["weight_map"][names[0]] = "../escape.safetensors"
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    r = _run("convert", str(folder), "--to", "single", "-o", str(tmp_path / "x.safetensors"))
    _one_line_error(r, "names a shard outside its folder")
    assert not (tmp_path / "x.safetensors").exists()


def test_source_sha256_of_a_folder_is_its_listing_hash(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    import hashlib

    t = tinies["sd1"]
    out = tmp_path / "o.safetensors"
    assert _run("convert", str(t.folder), "--to", "single", "-o", str(out)).exit_code == 0
    lines = sorted((p.relative_to(t.folder).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
                   for p in t.folder.rglob("*") if p.is_file())
    listing = "".join(f"{h}  {rel}\n" for rel, h in lines)
    assert _meta(out)["modelkit.source_sha256"] == hashlib.sha256(listing.encode()).hexdigest()


def test_standalone_vae_file_and_part_mismatch(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """A standalone VAE file (bare ``encoder.*`` names, as A1111 keeps them) -> a diffusers VAE folder
    and back; a component folder refuses another --part."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    t = tinies["sd1"]
    vae = {k[len("first_stage_model."):]: v for k, v in _load(t.file).items() if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    r = _run("convert", str(tmp_path / "vae.safetensors"), "--to", "diffusers", "--part", "vae",
             "--configs", t.configs, "-o", str(tmp_path / "vae"))
    assert r.exit_code == 0, r.output
    model, info = AutoencoderKL.from_pretrained(str(tmp_path / "vae"), local_files_only=True, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    for k, v in t.originals["vae"].items():
        assert same_bits(model.state_dict()[k], v), k
    r = _run("convert", str(tmp_path / "vae"), "--to", "single", "-o", str(tmp_path / "back.safetensors"))
    assert r.exit_code == 0, r.output
    back = _load(tmp_path / "back.safetensors")
    assert sorted(back) == sorted(vae) and all(same_bits(back[k], vae[k]) for k in vae)
    r = _run("convert", str(tmp_path / "vae"), "--to", "single", "--part", "unet", "-o", str(tmp_path / "u.safetensors"))
    _one_line_error(r, "holds the vae, not the unet")


def test_dry_run_writes_nothing(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    t = tinies["sdxl"]
    r = _run("convert", t.file, "--to", "diffusers", "--configs", t.configs, "-o", str(tmp_path / "f"), "--dry-run",
             "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)["files"][0]
    assert doc["status"] == "dry-run" and doc["components"] == ["unet", "vae", "text_encoder", "text_encoder_2"]
    r = _run("convert", str(t.folder), "--to", "single", "-o", str(tmp_path / "x.safetensors"), "--dry-run")
    assert r.exit_code == 0 and "would write" in r.stdout, r.output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_outputs_carry_a_valid_modelspec_block(tinies: dict[str, Tiny], family: str, tmp_path: Path) -> None:
    """The single file and every component's weights pass the ModelSpec validator; the single file
    says LDM naming, the components diffusers."""
    from tests.ops.modelspec_validator import problems

    t = tinies[family]
    back = tmp_path / "back.safetensors"
    r = _run("convert", str(t.folder), "--to", "single", "-o", str(back))
    assert r.exit_code == 0, r.output
    assert not problems(back), problems(back)
    meta = _meta(back)
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}[family]
    assert meta["modelspec.architecture"].startswith(arch) and "/" not in meta["modelspec.architecture"]
    assert meta["modelspec.implementation"] != "diffusers" and meta["modelspec.title"] == "back"
    weights = sorted(t.folder.glob("*/*.safetensors"))
    assert weights
    for w in weights:
        assert not problems(w), (w, problems(w))
        m = _meta(w)
        assert m["format"] == "pt" and m["modelspec.implementation"] == "diffusers", w


def test_a_converted_a1111_embedding_loads_with_load_textual_inversion(tinies: dict[str, Tiny], tmp_path: Path) -> None:
    """convert's emb_params layout is what diffusers' own textual-inversion loader reads."""
    from diffusers import StableDiffusionPipeline

    from fixtures import build

    t = tinies["sd1"]
    vectors = build.a1111_embedding(str(tmp_path / "tok.pt"), vectors=2, width=32, name="tok")
    r = _run("convert", str(tmp_path / "tok.pt"), "-o", str(tmp_path / "tok.safetensors"))
    assert r.exit_code == 0, r.output
    pipe = StableDiffusionPipeline.from_pretrained(str(t.folder), local_files_only=True)
    pipe.load_textual_inversion(str(tmp_path / "tok.safetensors"), token="<my-tok>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<my-tok>", "<my-tok>_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    assert same_bits(rows, vectors.to(rows.dtype))
