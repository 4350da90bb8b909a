"""Outputs are written atomically: a full disk, Ctrl-C or SIGTERM leave nothing behind; no silent overwrite."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modelkit
from fixtures import build
from fixtures.sd_layout import tiny_sd1_layout
from modelkit.errors import OutputExistsError, OutputWriteError
from modelkit.paths import atomic_output, output_name, plan_outputs


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    src = tmp_path / "sd.ckpt"
    build.sd_checkpoint(str(src), tiny_sd1_layout())
    return src


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _enospc(*a: object, **k: object) -> int:
    raise OSError(errno.ENOSPC, "No space left on device")


def _kernel_copies() -> tuple[str, ...]:
    """The in-kernel copies modelkit's writer uses here (``modelkit.portable.KERNEL_COPIES``)."""
    try:
        from modelkit import portable
    except ImportError:  # a modelkit without the portable module: what os has
        return tuple(k for k in ("copy_file_range", "sendfile") if hasattr(os, k))
    return tuple(portable.KERNEL_COPIES)


NO_COPY_FILE_RANGE = pytest.mark.skipif("copy_file_range" not in _kernel_copies(),
                                        reason="modelkit copies with os.copy_file_range on Linux only "
                                               "(not on macOS or Windows, not with MODELKIT_PORTABLE=1)")


@pytest.mark.parametrize("where", ["write", pytest.param("copy_file_range", marks=NO_COPY_FILE_RANGE),
                                   pytest.param("late", marks=NO_COPY_FILE_RANGE)])
def test_full_disk_leaves_nothing(ckpt: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    before = _digest(ckpt)
    if where == "late":  # the disk fills after a few tensors went through
        real, calls = os.copy_file_range, [0]

        def flaky(*a: object, **k: object) -> int:
            calls[0] += 1
            if calls[0] > 20:
                _enospc()
            return real(*a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "copy_file_range", flaky)
    else:
        monkeypatch.setattr(os, where, _enospc)
    with pytest.raises(OutputWriteError, match="No space left") as info:
        modelkit.convert(ckpt)
    assert isinstance(info.value, OSError)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["sd.ckpt"]
    assert _digest(ckpt) == before


def test_ctrl_c_mid_stream_leaves_nothing(ckpt: Path) -> None:
    before = _digest(ckpt)
    seen = []

    def progress(name: str, nbytes: int) -> None:
        seen.append(name)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        modelkit.prune(ckpt, dtype="fp16", progress=progress)
    assert len(seen) == 5
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["sd.ckpt"]
    assert _digest(ckpt) == before


@pytest.mark.skipif(sys.platform == "win32", reason="os.kill(pid, SIGTERM) is TerminateProcess on Windows: no handler runs")
def test_sigterm_mid_stream_leaves_nothing(ckpt: Path) -> None:
    code = (
        "import os, signal, sys, modelkit\n"
        "n = [0]\n"
        "def progress(name, nbytes):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "try:\n"
        f"    modelkit.convert({str(ckpt)!r}, progress=progress)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(7)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(Path(__file__).parents[2]))
    assert proc.returncode == 7
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["sd.ckpt"]


def test_existing_output_needs_force(ckpt: Path) -> None:
    target = ckpt.with_suffix(".safetensors")
    target.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="already exists"):
        modelkit.convert(ckpt)
    with pytest.raises(OutputExistsError):
        modelkit.convert(ckpt, dry_run=True)
    assert target.read_bytes() == b"keep me"
    r = modelkit.convert(ckpt, force=True)
    assert r.output == str(target) and target.read_bytes()[8:9] == b"{"
    with pytest.raises(OutputExistsError, match="is the input"):
        modelkit.convert(ckpt, ckpt, force=True)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["sd.ckpt", "sd.safetensors"]


def test_output_appearing_meanwhile_is_not_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    with pytest.raises(OutputExistsError, match="appeared"):
        with atomic_output(target) as fd:
            os.write(fd, b"new")
            target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits: Windows files have a read-only flag only")
def test_new_file_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "m.safetensors") as fd:
            os.write(fd, b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640


def test_output_naming(tmp_path: Path) -> None:
    assert output_name("a/x.vae.pt") == "x.vae.safetensors"
    assert output_name("m.ckpt", ".pruned") == "m.pruned.safetensors"
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for p in ("in/a.ckpt", "in/sub/b.pt"):
        build.save_torch({"w": torch.ones(1)}, str(tmp_path / p))
    (tmp_path / "in" / "notes.txt").write_text("not a model")
    pairs = plan_outputs([tmp_path / "in"], out_dir=tmp_path / "out")
    assert [(Path(a).relative_to(tmp_path).as_posix(), Path(b).relative_to(tmp_path).as_posix()) for a, b in pairs] == [
        ("in/a.ckpt", "out/a.safetensors"), ("in/sub/b.pt", "out/sub/b.safetensors")]
    beside = plan_outputs([tmp_path / "in"])
    assert [Path(b).relative_to(tmp_path).as_posix() for _, b in beside] == ["in/a.safetensors", "in/sub/b.safetensors"]
    with pytest.raises(modelkit.ModelkitError, match="one output name"):
        plan_outputs([tmp_path / "in/a.ckpt", tmp_path / "in/sub/b.pt"], out=tmp_path / "x.safetensors")


def test_too_little_free_space_fails_before_writing(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputWriteError, match="needs"):
        modelkit.convert(ckpt)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["sd.ckpt"]
