"""Leftovers of issue 16 (item 7): ``hash --check`` without an embedded hash, ``verify`` of a
``prune --ema only`` output, and file names that are not valid UTF-8."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import modelkit
from fixtures.sd_layout import tiny_sd1_layout
from fixtures.torchfree import save_safetensors, save_zip, sd1_tensors
from modelkit.cli.main import cli
from modelkit.ops.prune import ema_name
from modelkit.ops.verify import verify

UNET_W = "model.diffusion_model.input_blocks.0.0.weight"


def test_hash_check_says_when_there_is_no_embedded_hash(tmp_path: Path) -> None:
    import numpy as np

    st = tmp_path / "plain.safetensors"
    save_safetensors({"w": np.arange(8, dtype=np.float32)}, str(st), {"note": "no hash here"})
    ck = tmp_path / "plain.ckpt"
    save_zip({"w": np.arange(8, dtype=np.float32)}, str(ck))
    r = CliRunner().invoke(cli, ["hash", "--check", str(st), str(ck)])
    assert r.exit_code == 0, r.output
    assert r.stdout.count("check   no embedded hash to check") == 2
    r = CliRunner().invoke(cli, ["hash", "--check", "--json", str(st), str(ck)])
    assert r.exit_code == 0
    files = json.loads(r.stdout)["files"]
    assert [(f["checks"], f["check_note"]) for f in files] == [([], "no embedded hash to check")] * 2
    assert {"path", "size", "hashes", "checks", "cached"} <= set(files[0])
    r = CliRunner().invoke(cli, ["hash", "--json", str(st)])  # without --check: no note
    assert "check_note" not in json.loads(r.stdout)["files"][0]


@pytest.fixture
def ema_ckpt(tmp_path: Path) -> Path:
    """A tiny SD 1.x checkpoint whose EMA copies differ from the model weights."""
    path = tmp_path / "sd.ckpt"
    tensors = sd1_tensors(tiny_sd1_layout(ema=True), seed=3)
    assert ema_name(UNET_W) in tensors
    save_zip(tensors, str(path))
    return path


def test_verify_passes_for_prune_ema_only(ema_ckpt: Path) -> None:
    res = modelkit.prune(str(ema_ckpt), ema="only")
    v = verify(ema_ckpt, res.output)
    assert v.ok, v.mismatches[:3]
    assert v.ema == res.ema_swapped > 0 and not v.hint
    assert not any(k.startswith("model.diffusion_model.") for k in v.only_in_source)
    r = CliRunner().invoke(cli, ["verify", str(ema_ckpt), res.output])
    assert r.exit_code == 0 and f"{v.ema} from their EMA copy" in r.stdout
    # with a cast too: the EMA copy is cast as the output asks
    res16 = modelkit.prune(str(ema_ckpt), ema="only", dtype="bf16", out=str(ema_ckpt.with_name("sd16.safetensors")))
    assert verify(ema_ckpt, res16.output).ok


def test_verify_hints_at_ema_only_when_the_provenance_is_gone(ema_ckpt: Path, tmp_path: Path) -> None:
    from modelkit.reading import open_model

    res = modelkit.prune(str(ema_ckpt), ema="only")
    bare = tmp_path / "bare.safetensors"
    with open_model(res.output) as mf:  # the same tensors without modelkit's metadata
        save_safetensors({k: mf[k].read("numpy") for k in mf}, str(bare))
    v = verify(ema_ckpt, bare)
    assert not v.ok and v.ema == 0
    assert v.hint.startswith("bare.safetensors was written with prune --ema only: its UNet weights are the EMA")
    r = CliRunner().invoke(cli, ["verify", str(ema_ckpt), str(bare)])
    assert r.exit_code == 1 and "hint: bare.safetensors was written with prune --ema only" in r.output
    # a plain mismatch gets no hint
    other = tmp_path / "other.ckpt"
    save_zip(sd1_tensors(tiny_sd1_layout(ema=True), seed=4), str(other))
    assert verify(other, bare).hint == ""


@pytest.mark.skipif(sys.platform in ("darwin", "win32"),
                    reason="macOS and Windows file systems refuse names that are not valid UTF-8")
def test_convert_and_prune_a_file_named_with_invalid_utf8(ema_ckpt: Path, tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path)
    src = os.fsdecode(os.path.join(folder, b"\xffmodel\xfe.ckpt"))
    try:
        os.replace(ema_ckpt, src)
    except (OSError, UnicodeError) as exc:  # a file system that enforces UTF-8 names (ZFS utf8only, ...)
        pytest.skip(f"this file system refuses a name that is not valid UTF-8: {exc}")
    for res in (modelkit.convert(src), modelkit.prune(src, ema="only")):
        assert res.status == "written"
        assert os.fsencode(os.path.basename(res.output)).startswith(b"\xffmodel\xfe.")  # the name as it was
        assert os.path.exists(res.output)
        assert res.metadata["modelkit.source"] == "\ufffdmodel\ufffd.ckpt"
        assert res.metadata["modelspec.title"].startswith("\ufffdmodel\ufffd")
        assert verify(src, res.output).ok
    r = CliRunner().invoke(cli, ["convert", src, "--output", os.fsdecode(os.path.join(folder, b"\xfe2.safetensors"))])
    assert r.exit_code == 0, r.output
