"""Bad input is normal input: one line naming the file and the problem, exit 2, no traceback."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import modelkit
from fixtures import build
from modelkit.cli.main import cli
from modelkit.errors import ModelkitError


def _inspect(path: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["inspect", str(path)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stderr


def _one_error_line(code: int, err: str, path: Path, words: str) -> None:
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("modelkit: error: ") and str(path) in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in err


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.ckpt"
    p.write_bytes(b"")
    _one_error_line(*_inspect(p), p, "empty")


def test_folder_where_a_file_was_expected(tmp_path: Path) -> None:
    with pytest.raises(ModelkitError, match="folder"):
        modelkit.open_model(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.safetensors"
    _one_error_line(*_inspect(p), p, "no such file")


def test_png_and_text(tmp_path: Path) -> None:
    png = tmp_path / "model.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    _one_error_line(*_inspect(png), png, "PNG")
    txt = tmp_path / "model.ckpt"
    txt.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265380512\n")
    _one_error_line(*_inspect(txt), txt, "text file")


def test_missing_storage_entry(tmp_path: Path) -> None:
    src = tmp_path / "ok.pt"
    torch.save({"a": torch.ones(3), "b": torch.zeros(2)}, src)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/1"):
                zout.writestr(info.filename, zin.read(info.filename))
    _one_error_line(*_inspect(bad), bad, "missing")


def test_safetensors_named_ckpt_and_the_reverse_are_read_by_content(tmp_path: Path) -> None:
    st = tmp_path / "really-safetensors.ckpt"
    build.write_safetensors(str(st), {"w": torch.ones(2)})
    ck = tmp_path / "really-torch.safetensors"
    torch.save({"w": torch.ones(2)}, ck)
    for p, container in ((st, "safetensors"), (ck, "torch-zip")):
        r = CliRunner().invoke(cli, ["inspect", str(p)])
        assert r.exit_code == 0
        assert container in r.stdout
        assert "but the content is" in r.stderr  # the mismatch is reported, never trusted


def _every_prefix(data: bytes) -> list[int]:
    n = len(data)
    cuts = set(range(0, min(n, 300))) | set(range(max(0, n - 300), n))
    cuts |= set(range(0, n, max(1, n // 200)))
    return sorted(cuts)


@pytest.mark.parametrize("mode", ["safetensors", "zip", "legacy", "pickle4", "npy"])
def test_every_truncation_gives_a_clean_error(tmp_path: Path, mode: str) -> None:
    """Cut a valid file at many points: each prefix is an error or a valid read, never a crash."""
    full = tmp_path / f"full.{mode}"
    state = {"a": torch.arange(40, dtype=torch.float32), "b": torch.ones(3, 3, dtype=torch.float16)}
    if mode == "safetensors":
        build.write_safetensors(str(full), state)
    elif mode == "npy":
        import numpy as np

        np.save(full, np.arange(40, dtype="<f4"))
    else:
        build.save_torch(state, str(full), mode)
    data = full.read_bytes()
    cut = tmp_path / "cut.bin"
    for n in _every_prefix(data):
        cut.write_bytes(data[:n])
        try:
            with modelkit.open_model(cut) as mf:
                for t in mf.values():
                    t.read()
        except ModelkitError as exc:
            assert str(cut) in str(exc)
    os.unlink(cut)


@pytest.mark.parametrize("mode", ["zip", "legacy", "safetensors"])
def test_corrupted_bytes_give_a_clean_error(tmp_path: Path, mode: str) -> None:
    import random

    full = tmp_path / "full.bin"
    state = {"a": torch.arange(40, dtype=torch.float32), "b": torch.ones(3, 3)}
    if mode == "safetensors":
        build.write_safetensors(str(full), state)
    else:
        build.save_torch(state, str(full), mode)
    data = full.read_bytes()
    rng = random.Random(1234)
    cut = tmp_path / "flip.bin"
    for _ in range(300):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        cut.write_bytes(bytes(buf))
        try:
            with modelkit.open_model(cut) as mf:
                for t in mf.values():
                    t.read()
        except ModelkitError:
            pass


def test_deflated_members_are_checked_against_their_crc(tmp_path: Path) -> None:
    """Raw deflate has no checksum: a damaged .npz member can inflate to other bytes. The size and
    CRC-32 the archive records catch it."""
    import numpy as np

    npz = tmp_path / "c.npz"
    np.savez_compressed(npz, w=np.arange(300, dtype="<f4"))
    with modelkit.open_model(npz) as mf:
        assert mf["w"].read().tolist() == list(range(300))
    data = bytearray(npz.read_bytes())
    with zipfile.ZipFile(npz) as z:
        (info,) = z.infolist()
    wrong = (info.CRC ^ 1).to_bytes(4, "little")
    data[info.header_offset + 14 : info.header_offset + 18] = wrong  # the local header's CRC-32
    central = data.index(b"PK\x01\x02")
    data[central + 16 : central + 20] = wrong  # the central directory's
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelkitError, match="do not match the size and CRC-32"), modelkit.open_model(bad) as mf:
        mf["w"].read()
    r = CliRunner().invoke(cli, ["convert", str(bad), "-o", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 2 and "CRC-32" in r.stderr and not (tmp_path / "out.safetensors").exists()
