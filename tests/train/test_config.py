"""The training config and the CLI's behaviour without the [train] extra; no heavy dependency needed."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from modelkit.cli.main import cli
from modelkit.errors import ConfigError, MissingExtraError
from modelkit.train.config import build_config, load_config, parse_override, render_toml, resolved
from modelkit.train.extra import PIP_COMMAND, TRAIN_MODULES, missing_extras, require_extras

ROOT = Path(__file__).resolve().parents[2]
BASIC: dict[str, Any] = {"model": {"path": "m.safetensors"}, "dataset": {"path": "data"}}


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    return pytest.importorskip("tomli")


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "train.toml"
    p.write_text(text)
    return p


def test_pyproject_train_extra_lists_the_training_stack() -> None:
    data = _toml().loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extra = data["project"]["optional-dependencies"]["train"]
    names = {re.split(r"[<>=;\[ ]", req, maxsplit=1)[0].lower(): req for req in extra}
    for dist in ("diffusers", "peft", "transformers", "accelerate", "pillow", "tensorboard", "tomli"):
        assert dist in names, f"the [train] extra lacks {dist}"
    assert "python_version" in names["tomli"] and "3.11" in names["tomli"]
    assert set(TRAIN_MODULES.values()) <= set(names)
    package_data = data["tool"]["setuptools"]["package-data"]["modelkit"]
    assert any(p.startswith("layout/configs/") for p in package_data)


def test_without_the_extra_train_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for module in ("diffusers", "peft"):
        monkeypatch.setitem(sys.modules, module, None)  # find_spec now fails as if not installed
    assert missing_extras()[:2] == ["diffusers", "peft"]
    with pytest.raises(MissingExtraError, match=re.escape(PIP_COMMAND)):
        require_extras()
    cfg = _write(tmp_path, '[model]\npath = "x"\n[dataset]\npath = "d"\n')
    for method in ("lora", "locon", "ti", "hypernetwork", "dreambooth"):
        r = CliRunner().invoke(cli, ["train", method, "--config", str(cfg)])
        assert r.exit_code == 2, r.output
        assert PIP_COMMAND in r.stderr and r.stderr.count("\n") == 1
    assert CliRunner().invoke(cli, ["train", "lora", "--help"]).exit_code == 0


def test_file_overrides_and_relative_paths(tmp_path: Path) -> None:
    p = _write(tmp_path, 'method = "lora"\n[model]\npath = "models/m.safetensors"\n[dataset]\npath = "data"\n'
                         '[optimizer]\nlr = 2e-4\nbetas = [0.8, 0.99]\n[train]\nmixed_precision = "bf16"\n')
    c = load_config(p, "lora", ["optimizer.lr=1e-5", "train.max_steps=7", "dataset.caption_extensions=.txt",
                                "network.unet_lr=none", "output.dir=out"])
    assert c.optimizer.lr == 1e-5 and c.optimizer.betas == (0.8, 0.99) and c.train.max_steps == 7
    assert c.train.mixed_precision == "bf16" and c.dataset.caption_extensions == (".txt",)
    assert c.model.path == str(tmp_path / "models" / "m.safetensors") and c.dataset.path == str(tmp_path / "data")
    assert c.output.dir == str(tmp_path / "out") and c.network.unet_lr is None


@pytest.mark.parametrize(("overrides", "key"), [
    (["optimizer.lrr=1"], "optimizer.lrr"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["train.batch_size=abc"], "train.batch_size"),
    (["train.batch_size=0"], "train.batch_size"),
    (["dataset.tag_dropout=1.5"], "dataset.tag_dropout"),
    (["network.train_unet=maybe"], "network.train_unet"),
    (["optimizer.betas=[0.9]"], "optimizer.betas"),
    (["dataset.resolution=100"], "dataset.resolution"),
])
def test_a_bad_key_is_one_line_naming_it(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config("lora", BASIC, overrides)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_optimizer_args_from_a_file_and_set_merge_and_each_mistake_names_its_source(tmp_path: Path) -> None:
    p = _write(tmp_path, '[model]\npath = "m.safetensors"\n[dataset]\npath = "d"\n'
                         '[optimizer]\nname = "prodigy"\n[optimizer.args]\nd_coef = 2.0\nsafeguard_warmup = true\n')
    c = load_config(p, "lora", ["optimizer.args.d_coef=0.5", "optimizer.args.betas3=[1, 2]"])
    assert c.optimizer.args == {"d_coef": 0.5, "safeguard_warmup": True, "betas3": (1, 2)}
    assert "args = {d_coef = 0.5, safeguard_warmup = true, betas3 = [1, 2]}" in render_toml(c)
    with pytest.raises(ConfigError) as info:  # a mistake in --set is --set's
        load_config(p, "lora", ["optimizer.args.x={a = 1}"])
    assert str(info.value).startswith("--set: key optimizer.args.x")
    bad = _write(tmp_path, '[model]\npath = "m"\n[dataset]\npath = "d"\n[optimizer.args]\nx = {a = 1}\n')
    with pytest.raises(ConfigError) as info:  # and one in the file is the file's, --set or not
        load_config(bad, "lora", ["optimizer.args.y=1"])
    assert str(info.value).startswith(f"{bad}: key optimizer.args.x")
    for text, why in (("optimizer.args.k=True", "write true"), ("optimizer.args.k=None", "leave it out"),
                      ("optimizer.args.1k=2", "not an argument name")):
        with pytest.raises(ConfigError, match=why):
            build_config("lora", BASIC, [text])


def test_unknown_section_missing_path_and_method_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[optimiser\]"):
        build_config("lora", {**BASIC, "optimiser": {"lr": 1.0}})
    with pytest.raises(ConfigError, match="model.path"):
        build_config("lora", {"dataset": {"path": "d"}})
    with pytest.raises(ConfigError, match="method"):
        build_config("ti", {**BASIC, "method": "lora"})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[model\n"), "lora")
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_override("lr=1")
    with pytest.raises(ConfigError, match="ti.token"):
        build_config("ti", BASIC, ["ti.token=two words"])


def test_locon_defaults_and_render_round_trip() -> None:
    c = resolved(build_config("locon", BASIC, ["network.dim=16", "network.alpha=8"]))
    assert (c.network.conv_dim, c.network.conv_alpha, c.output.name) == (16, 8.0, "locon")
    text = render_toml(c)
    data = _toml().loads(text)
    assert data["method"] == "locon" and data["network"]["dim"] == 16 and data["optimizer"]["betas"] == [0.9, 0.999]
    again = resolved(build_config("locon", data))
    assert again == c


def test_print_config_cli(tmp_path: Path) -> None:
    if missing_extras():
        pytest.skip("the [train] extra is not installed")
    cfg = _write(tmp_path, '[model]\npath = "m.ckpt"\n[dataset]\npath = "d"\n')
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(cfg), "--set", "optimizer.lr=3e-4", "--print-config"])
    assert r.exit_code == 0, r.output
    assert "lr = 0.0003" in r.stdout and r.stdout.startswith('method = "lora"')
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(cfg), "--set", "optimizer.lr=-1", "--print-config"])
    assert r.exit_code == 2 and "optimizer.lr" in r.stderr and r.stderr.count("\n") == 1


def test_docs_training_example_is_a_valid_config() -> None:
    text = (ROOT / "docs" / "train.md").read_text(encoding="utf-8")
    block = text.split("# Training: `modelkit train`", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    c = build_config("lora", _toml().loads(block))
    assert c.network.alpha == 8.0 and c.train.mixed_precision == "bf16" and c.dataset.keep_tokens == 1


@pytest.mark.parametrize("override", ["optimizer.lr=nan", "network.alpha=inf", "network.alpha=-inf",
                                      "optimizer.betas=[0.9, nan]", "network.alpha=1e400", f"network.alpha={10**400}"])
def test_numbers_must_be_finite(tmp_path: Path, override: str) -> None:
    """nan passed every range check (nan <= 0 is false): every float key refuses what is not finite."""
    if missing_extras():
        pytest.skip("the [train] extra is not installed (the CLI asks for it before reading the config)")
    cfg = _write(tmp_path, '[model]\npath = "x"\n[dataset]\npath = "d"\n')
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(cfg), "--set", override, "--print-config"])
    key = override.split("=")[0]
    assert r.exit_code == 2 and f"key {key}: expected a finite number" in r.stderr and r.stderr.count("\n") == 1
    text = '[model]\npath = "x"\n[dataset]\npath = "d"\n[optimizer]\nlr = nan\n'
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(_write(tmp_path, text)), "--print-config"])
    assert r.exit_code == 2 and "key optimizer.lr: expected a finite number" in r.stderr


@pytest.mark.parametrize("method", ["lora", "locon", "ti", "hypernetwork", "dreambooth"])
def test_template_of_defaults_parses_to_the_defaults(method: str) -> None:
    from modelkit.train.template import render_template

    text = render_template(method)
    assert text.count("\n# ") > 10  # commented
    data = _toml().loads(text)
    assert data["model"]["path"] == "" and data["dataset"]["path"] == ""
    data["model"]["path"], data["dataset"]["path"] = BASIC["model"]["path"], BASIC["dataset"]["path"]
    assert resolved(build_config(method, data)) == resolved(build_config(method, BASIC))
    own = {"lora": "network", "locon": "network", "ti": "ti", "hypernetwork": "hypernetwork", "dreambooth": "dreambooth"}
    assert {own[method]} == set(data) & {"network", "ti", "hypernetwork", "dreambooth"}


def test_print_config_without_config_prints_the_template(tmp_path: Path) -> None:
    if missing_extras():
        pytest.skip("the [train] extra is not installed")
    r = CliRunner().invoke(cli, ["train", "hypernetwork", "--print-config"])
    assert r.exit_code == 0, r.output
    data = _toml().loads(r.stdout)
    assert data["method"] == "hypernetwork" and data["optimizer"]["lr"] == 1e-5
    r = CliRunner().invoke(cli, ["train", "ti", "--print-config", "--json"])
    assert r.exit_code == 0, r.output
    assert '"lr": 0.005' in r.stdout


def test_per_method_learning_rates_and_ti_init_word() -> None:
    lrs = {m: resolved(build_config(m, BASIC)).optimizer.lr for m in ("lora", "locon", "ti", "hypernetwork", "dreambooth")}
    assert lrs == {"lora": 1e-4, "locon": 1e-4, "ti": 5e-3, "hypernetwork": 1e-5, "dreambooth": 5e-6}
    assert build_config("ti", BASIC).optimizer.lr is None  # unset until resolved
    assert resolved(build_config("ti", BASIC, ["optimizer.lr=1e-3"])).optimizer.lr == 1e-3
    ti = resolved(build_config("ti", BASIC)).ti
    assert ti.init_word == "thing" != "*"
    assert resolved(build_config("ti", BASIC, ["ti.init_word=dog"])).ti.init_word == "dog"


def test_threads_and_log_every_are_checked() -> None:
    c = build_config("lora", BASIC, ["train.threads=3", "output.log_every=5"])
    assert (c.train.threads, c.output.log_every) == (3, 5)
    assert build_config("lora", BASIC).train.threads == 0
    for key in ("train.threads", "output.log_every"):
        with pytest.raises(ConfigError, match=re.escape(key)):
            build_config("lora", BASIC, [f"{key}=-1"])


def test_docs_document_model_configs_and_sample_names() -> None:
    text = (ROOT / "docs" / "train.md").read_text(encoding="utf-8").split("# Training: `modelkit train`", 1)[1]
    assert "configs = " in text and "unet/config.json" in text
    from modelkit.train.sample import sample_paths

    cfg = resolved(build_config("lora", BASIC, ['sample.prompts=["a", "b"]', "output.name=n"]))
    name = Path(sample_paths(cfg, 250)[1]).name
    assert name == "n-step000250-01.png" and "<name>-step<NNNNNN>-<II>.png" in text
