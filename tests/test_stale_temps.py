"""Issue 16, item 3: a ``kill -9`` leaves a hidden temp file; modelkit knows it as abandoned, the
next write into its folder removes it and says so, ``scan``/``inspect`` name it, ``modelkit clean``
lists and removes it, and nothing else (a live writer's temp, a file that is not ours) is touched."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from modelkit import tempfiles
from modelkit.cli.main import cli
from modelkit.paths import NAME_MAX, atomic_output, temp_path, windows_name_problem

ROOT = Path(__file__).resolve().parents[1]
POSIX_KILL = pytest.mark.skipif(os.name != "posix", reason="kill -9 (SIGKILL) is POSIX; Windows has no signal "
                                "that ends a process without cleanup that a test can send to itself")
#: Old enough for a dead writer's temp to count as abandoned (DEAD_WRITER_AGE), short of an hour.
MINUTES_AGO = 300.0
HOURS_AGO = 2 * 3600.0


def _safetensors(path: Path, n: int = 4096) -> None:
    """A small valid safetensors file (one F32 tensor), written by hand: no torch needed."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * (4 * n))


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _dead_pid() -> int:
    """The pid of a process that ran and was reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp(folder: Path, token: str, size: int = 1000, name: str = "m.safetensors") -> Path:
    p = Path(temp_path(str(folder / name), token))
    p.write_bytes(b"\0" * size)
    return p


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(autouse=True)
def _fresh_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfiles, "_swept", set())
    monkeypatch.setattr(tempfiles, "_reporter", None)
    monkeypatch.setenv("MODELKIT_HASH_CACHE", "0")


@pytest.fixture
def killed(tmp_path: Path) -> tuple[Path, int]:
    """``modelkit convert`` killed by SIGKILL after its output's temp file is written, before the
    rename; returns the temp file (aged past DEAD_WRITER_AGE) and the dead writer's pid."""
    _safetensors(tmp_path / "in" / "m.safetensors")
    child = ("import os, signal, sys\n"
             "import modelkit.paths\n"
             "def die(*a, **k):\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "modelkit.paths._publish = die\n"
             "from modelkit.cli.main import main\n"
             "sys.argv = ['modelkit', 'convert', sys.argv[1], '--out-dir', sys.argv[2]]\n"
             "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "in" / "m.safetensors"),
                             str(tmp_path / "out")], cwd=ROOT, env={**os.environ, "MODELKIT_HASH_CACHE": "0"})
    assert proc.wait(timeout=120) == -signal.SIGKILL
    left = sorted((tmp_path / "out").iterdir())
    assert len(left) == 1 and left[0].name.endswith(".modelkit-tmp") and not (tmp_path / "out" / "m.safetensors").exists()
    assert tempfiles.writer_pid(left[0].name) == proc.pid
    assert not tempfiles.is_stale(left[0], now=left[0].stat().st_mtime)  # just written: not yet
    _age(left[0], MINUTES_AGO)
    return left[0], proc.pid


def test_temp_names_say_who_writes_them(tmp_path: Path) -> None:
    token = tempfiles.writer_token()
    tmp = temp_path(str(tmp_path / "m.safetensors"), token)
    name = os.path.basename(tmp)
    assert name.startswith(".m.safetensors.") and name.endswith(".modelkit-tmp")
    assert f"-p{os.getpid()}-h{tempfiles.host_tag()}." in name and windows_name_problem(name) is None
    assert tempfiles.is_temp_name(name) and tempfiles.writer_pid(name) == os.getpid()
    long_tmp = temp_path(str(tmp_path / ("x" * 300 + ".safetensors")), token)
    assert len(os.fsencode(os.path.basename(long_tmp))) <= NAME_MAX and tempfiles.writer_pid(os.path.basename(long_tmp))
    with atomic_output(tmp_path / "a.safetensors") as fd:
        os.write(fd, b"x")
        [inside] = [p.name for p in tmp_path.iterdir() if p.name != "m.safetensors"]
        assert tempfiles.writer_pid(inside) == os.getpid() and not tempfiles.is_stale(tmp_path / inside, now=time.time() + 1e6)


@POSIX_KILL
def test_kill_9_of_convert_leaves_an_abandoned_temp(killed: tuple[Path, int]) -> None:
    tmp, pid = killed
    assert tempfiles.process_alive(pid) is False
    assert tempfiles.is_stale(tmp)


def test_which_temps_are_stale(tmp_path: Path) -> None:
    host = tempfiles.host_tag()
    other = "0000" if host != "0000" else "ffff"
    dead = _temp(tmp_path, f"0a1b2c3d-p{_dead_pid()}-h{host}", name="dead.safetensors")
    mine = _temp(tmp_path, f"0a1b2c3d-p{os.getpid()}-h{host}", name="mine.safetensors")
    far = _temp(tmp_path, f"0a1b2c3d-p{os.getpid()}-h{other}", name="far.safetensors")
    old = _temp(tmp_path, "0a1b2c3d", name="old.safetensors")
    text = tmp_path / ".modelkit-ab_12xyz.tmp"
    text.write_text("{}")
    recent_dead = _temp(tmp_path, f"0a1b2c3d-p{_dead_pid()}-h{host}", name="recent.safetensors")
    for p in (dead, mine, far, old, text):
        _age(p, MINUTES_AGO)
    assert tempfiles.is_stale(dead) and not tempfiles.is_stale(recent_dead)
    assert not tempfiles.is_stale(mine) and not tempfiles.is_stale(far) and not tempfiles.is_stale(old)
    assert not tempfiles.is_stale(text)
    for p in (dead, mine, far, old, text):
        _age(p, HOURS_AGO)
    assert tempfiles.is_stale(far) and tempfiles.is_stale(old) and tempfiles.is_stale(text)
    assert not tempfiles.is_stale(mine), "a running writer's temp is never stale"


def _not_ours(folder: Path) -> list[Path]:
    """Files that look a little like modelkit temps but are not, all old."""
    files = [folder / n for n in (".m.safetensors.0a1b2c3d.modelkit-tmp.bak", ".m.safetensors.zzzz.modelkit-tmp",
                                  "notes.tmp", ".modelkit-tmp", "m.safetensors.0a1b2c3d.modelkit-tmp", "keep.safetensors")]
    for f in files:
        f.write_bytes(b"mine")
        _age(f, HOURS_AGO)
    return files


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_clean_command(tmp_path: Path) -> None:
    sub = tmp_path / "a" / "deep"
    sub.mkdir(parents=True)
    dead = _temp(sub, f"0a1b2c3d-p{_dead_pid()}-h{tempfiles.host_tag()}", size=3000)
    live = _temp(tmp_path / "a", f"0a1b2c3d-p{os.getpid()}-h{tempfiles.host_tag()}")
    for p in (dead, live):
        _age(p, HOURS_AGO)
    others = _not_ours(tmp_path / "a")
    outside = tmp_path / "outside"
    outside.mkdir()
    far = _temp(outside, "0a1b2c3d")
    _age(far, HOURS_AGO)
    try:
        os.symlink(outside, tmp_path / "a" / "link", target_is_directory=True)
    except OSError:
        pytest.skip("this system refuses symlinks")

    dry = _run("clean", str(tmp_path / "a"), "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.stdout and dead.name in dry.stdout and dead.exists()
    assert f"kept  {live}" in dry.stdout and f"pid {os.getpid()}" in dry.stdout and far.name not in dry.stdout

    js = _run("clean", str(tmp_path / "a"), "--json", "--dry-run")
    doc = json.loads(js.stdout)
    assert doc["schema"] == "modelkit.clean/1" and doc["dry_run"] is True
    assert [t["path"] for t in doc["removed"]] == [str(dead)] and doc["removed_bytes"] == 3000
    assert [t["path"] for t in doc["kept"]] == [str(live)] and dead.exists()

    done = _run("clean", str(tmp_path / "a"))
    assert done.exit_code == 0 and "removed 1 abandoned temp file (3.0 kB)" in done.stdout
    assert not dead.exists() and live.exists() and far.exists() and all(f.read_bytes() == b"mine" for f in others)
    again = _run("clean", str(tmp_path / "a"), "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["removed"] == []


def test_clean_refuses_a_missing_folder(tmp_path: Path) -> None:
    r = _run("clean", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "nope" in r.stderr


@POSIX_KILL
def test_scan_and_inspect_name_the_abandoned_temp(killed: tuple[Path, int]) -> None:
    tmp, _ = killed
    _safetensors(tmp.parent / "other.safetensors")
    for cmd in ("scan", "inspect"):
        r = _run(cmd, str(tmp.parent))
        assert r.exit_code == 0, r.output
        assert f"{tmp}: abandoned modelkit temp file (1" in r.stderr and "modelkit clean" in r.stderr
        assert tmp.name not in r.stdout and "other.safetensors" in r.stdout
    assert tmp.exists(), "scan and inspect never remove anything"


@POSIX_KILL
def test_next_convert_into_the_folder_removes_it(killed: tuple[Path, int], tmp_path: Path) -> None:
    tmp, _ = killed
    live = _temp(tmp.parent, f"0a1b2c3d-p{os.getpid()}-h{tempfiles.host_tag()}", name="busy.safetensors")
    _age(live, HOURS_AGO)
    others = _not_ours(tmp.parent)
    r = _run("convert", str(tmp_path / "in" / "m.safetensors"), "--out-dir", str(tmp.parent))
    assert r.exit_code == 0, r.output
    assert r.stderr.count("abandoned temp file") == 1, r.stderr
    assert f"modelkit: warning: {tmp.parent}: removed 1 abandoned temp file (" in r.stderr
    assert "left by an interrupted modelkit" in r.stderr
    assert not tmp.exists() and live.exists() and (tmp.parent / "m.safetensors").exists()
    assert all(f.read_bytes() == b"mine" for f in others)


def test_api_write_logs_the_sweep(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stale = [_temp(tmp_path, f"0a1b2c3d-p{_dead_pid()}-h{tempfiles.host_tag()}", size=n, name=f"{n}.safetensors")
             for n in (1000, 2000)]
    for p in stale:
        _age(p, MINUTES_AGO)
    with caplog.at_level(logging.WARNING, logger="modelkit"):
        with atomic_output(tmp_path / "x.safetensors") as fd:
            os.write(fd, b"x")
        with atomic_output(tmp_path / "y.safetensors") as fd:  # one sweep per folder and process
            os.write(fd, b"y")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: removed 2 abandoned temp files (3.0 kB) left by an interrupted modelkit"]
    assert not any(p.exists() for p in stale)


def _temp_folder(folder: Path, token: str, name: str = "model") -> Path:
    """A temp sibling of a folder output (a diffusers folder, PEFT adapters) left half written."""
    t = folder / f".{name}.{token}.modelkit-tmp"
    (t / "unet").mkdir(parents=True)
    (t / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 700)
    (t / "model_index.json").write_text("{}")
    return t


def _age_tree(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    for root, dirs, files in os.walk(path):
        for n in (*dirs, *files):
            p = Path(root) / n
            if p.is_symlink():
                if os.utime in os.supports_follow_symlinks:
                    os.utime(p, (t, t), follow_symlinks=False)
            else:
                _age(p, seconds)
    _age(path, seconds)


def test_abandoned_temp_folders_are_cleaned_and_live_ones_kept(tmp_path: Path) -> None:
    host = tempfiles.host_tag()
    dead = _temp_folder(tmp_path, f"0a1b2c3d-p{_dead_pid()}-h{host}", "dead")
    mine = _temp_folder(tmp_path, f"0a1b2c3d-p{os.getpid()}-h{host}", "mine")
    recent = _temp_folder(tmp_path, f"0a1b2c3d-p{_dead_pid()}-h{host}", "recent")
    outside = tmp_path / "keep.safetensors"
    outside.write_bytes(b"keep")
    if hasattr(os, "symlink") and os.utime in os.supports_follow_symlinks:  # (Windows: no symlink ages)
        os.symlink(outside, dead / "link-out")  # removal must not follow it
    for t in (dead, mine):
        _age_tree(t, HOURS_AGO)
    (recent / "unet" / "diffusion_pytorch_model.safetensors").touch()  # written just now, deep inside
    _age(recent, HOURS_AGO)
    found = {Path(t.path).name: t for t in tempfiles.find_temps([tmp_path])}
    assert found[dead.name].folder and found[dead.name].size == 702 and found[dead.name].stale
    assert not found[mine.name].stale, "a running writer's temp folder is never stale"
    assert not found[recent.name].stale, "the newest write inside decides the age"
    r = tempfiles.clean([tmp_path])
    assert [Path(t.path).name for t in r.removed] == [dead.name]
    assert not dead.exists() and mine.exists() and recent.exists() and outside.read_bytes() == b"keep"
    res = CliRunner().invoke(cli, ["clean", str(tmp_path), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["kept"][0]["folder"] is True


def test_the_next_write_sweeps_an_abandoned_temp_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = _temp_folder(tmp_path, f"0a1b2c3d-p{_dead_pid()}-h{tempfiles.host_tag()}")
    _age_tree(dead, HOURS_AGO)
    with caplog.at_level(logging.WARNING, logger="modelkit"), atomic_output(str(tmp_path / "new.safetensors")) as fd:
        os.write(fd, b"data")
    assert not dead.exists() and (tmp_path / "new.safetensors").read_bytes() == b"data"
