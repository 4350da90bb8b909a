"""The CLI on a real terminal and under real signals (issue 16).

* Progress bars never share a line with a result: each command runs on a pseudo-terminal (stdout
  and stderr both on it, as in a shell) and what a terminal would show is rebuilt from the bytes.
* Ctrl-C (SIGINT) and SIGTERM: one line on stderr, exit 130 / 143, no traceback, no temp file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal (pty) and POSIX signals")

MiB = 1 << 20
_CSI = re.compile(rb"\x1b\[([0-9;?]*)([A-Za-z])")


def _sparse_safetensors(path: Path, tensors: int, each: int) -> Path:
    """A valid safetensors file of ``tensors`` F32 tensors of ``each`` bytes, all zeros, written
    sparse: big enough for a progress bar, costing no disk and no time to build."""
    header: dict[str, object] = {}
    for i in range(tensors):
        header[f"t{i:03d}"] = {"dtype": "F32", "shape": [each // 4], "data_offsets": [i * each, (i + 1) * each]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + tensors * each)
    return path


def _env() -> dict[str, str]:
    env = {**os.environ, "MODELKIT_HASH_CACHE": "0", "COLUMNS": "100", "LINES": "30", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    return env


def _on_pty(args: Sequence[str], cwd: Path, timeout: float = 120) -> tuple[int, bytes]:
    """Run ``python -m modelkit ARGS`` with stdin, stdout and stderr on one pseudo-terminal; its
    exit status and every byte it wrote there."""
    import fcntl
    import select
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "modelkit", *args], stdin=slave, stdout=slave, stderr=slave,
                            cwd=cwd, env=_env(), close_fds=True)
    os.close(slave)
    data = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the last holder of the terminal has closed it
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=30), bytes(data)


def _screen(raw: bytes) -> list[str]:
    """The lines a terminal shows for ``raw``: ``\\r`` goes back to column 0, text overwrites,
    ``ESC[K`` erases to the end of the line, ``ESC[nA`` moves up; other sequences are dropped."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    text = raw.decode("utf-8", "replace").encode("utf-8")  # keep offsets simple: work on bytes
    while i < len(text):
        m = _CSI.match(text, i)
        if m:
            n = int(m.group(1) or b"1") if m.group(1).isdigit() else 1
            if m.group(2) == b"K":
                del lines[row][col:]
            elif m.group(2) == b"A":
                row = max(0, row - n)
            i = m.end()
            continue
        ch = text[i:i + 1]
        if ch == b"\r":
            col = 0
        elif ch == b"\n":
            row += 1
            col = 0
            if row == len(lines):
                lines.append([])
        elif ch == b"\x1b":
            pass
        else:
            # a whole UTF-8 character
            j = i + 1
            while j < len(text) and 0x80 <= text[j] < 0xC0:
                j += 1
            c = text[i:j].decode("utf-8", "replace")
            line = lines[row]
            line.extend(" " * (col - len(line)))
            if col < len(line):
                line[col] = c
            else:
                line.append(c)
            col += 1
            i = j
            continue
        i += 1
    return ["".join(ln).rstrip() for ln in lines]


def _shows_each_result_on_its_own_line(raw: bytes, results: Sequence[str]) -> None:
    assert b"%|" in raw or b"it/s" in raw or b"B/s" in raw, f"no progress bar was drawn: {raw!r}"
    screen = _screen(raw)
    for res in results:
        assert any(line.startswith(res) for line in screen), f"{res!r} is not at the start of a line: {screen!r}"
    for line in screen:
        assert "%|" not in line and "it/s" not in line and "B/s" not in line, f"a bar was left on screen: {screen!r}"


def test_screen_model_sees_a_result_glued_to_a_bar() -> None:
    glued = b"scan:   0%|          | 0/15 [00:00<?, ?it/s]SAFE       a.safetensors\r\n"
    assert not any(line.startswith("SAFE") for line in _screen(glued))
    cleared = b"scan:   0%|          | 0/15 [00:00<?, ?it/s]\r" + b" " * 44 + b"\rSAFE       a.safetensors\r\n"
    assert _screen(cleared) == ["SAFE       a.safetensors", ""]
    assert _screen(b"bar 10%\r\x1b[Kok\n") == ["ok", ""]


# -- 1. bars and results -----------------------------------------------------------------------------


@posix_only
def test_scan_results_never_share_a_line_with_the_bar(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for i in range(15):
        _sparse_safetensors(models / f"lora{i:02d}.safetensors", 1, 64)
    code, raw = _on_pty(["scan", "models"], tmp_path)
    assert code == 0, raw
    _shows_each_result_on_its_own_line(
        raw, [f"SAFE       models/lora{i:02d}.safetensors" for i in range(15)] + ["15 files: 15 safe"])


@posix_only
def test_single_file_convert_bar_counts_bytes_and_leaves_the_result_line_alone(tmp_path: Path) -> None:
    _sparse_safetensors(tmp_path / "big.safetensors", 24, 4 * MiB)  # 96 MiB: over the bar's 64 MiB floor
    code, raw = _on_pty(["convert", "big.safetensors", "--out-dir", "out"], tmp_path)
    assert code == 0, raw
    _shows_each_result_on_its_own_line(raw, ["big.safetensors -> out/big.safetensors  (wrote"])
    assert re.search(rb"big\.safetensors: +\d+%\|", raw), raw  # a percentage: the bar has a total
    assert b"MB/s" in raw or b"GB/s" in raw or b"kB/s" in raw or b"B/s" in raw
    assert b"it/s" not in raw, "the bar counts bytes, not tensors"


@posix_only
def test_folder_convert_results_never_share_a_line_with_the_bar(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    for name in ("a", "b", "c"):
        _sparse_safetensors(big / f"{name}.safetensors", 8, 4 * MiB)
    code, raw = _on_pty(["convert", "big", "--out-dir", "out"], tmp_path)
    assert code == 0, raw
    _shows_each_result_on_its_own_line(raw, [f"big/{n}.safetensors -> out/{n}.safetensors  (wrote" for n in "abc"])
    assert b"3 files:" in raw and b"%|" in raw


@posix_only
def test_prune_result_never_shares_a_line_with_the_bar(tmp_path: Path) -> None:
    _sparse_safetensors(tmp_path / "model.safetensors", 24, 4 * MiB)
    code, raw = _on_pty(["prune", "model.safetensors"], tmp_path)
    assert code == 0, raw
    _shows_each_result_on_its_own_line(raw, ["model.safetensors -> model.pruned.safetensors  (wrote"])


@posix_only
def test_quiet_draws_no_bar_on_a_terminal(tmp_path: Path) -> None:
    _sparse_safetensors(tmp_path / "big.safetensors", 24, 4 * MiB)
    code, raw = _on_pty(["convert", "-q", "big.safetensors", "--out-dir", "out"], tmp_path)
    assert code == 0 and b"%|" not in raw and b"\r" not in raw.replace(b"\r\n", b""), raw


# -- 2. signals --------------------------------------------------------------------------------------


def _started(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before the signal: {proc.communicate()!r}"
        assert time.monotonic() < deadline, "the command never got going"
        time.sleep(0.05)


def _reads(proc: subprocess.Popen[bytes], path: Path) -> Callable[[], bool]:
    """Whether ``proc`` has ``path`` open (Linux: /proc), so its command is under way; elsewhere
    after a second."""
    fd_dir = f"/proc/{proc.pid}/fd"
    if not os.path.isdir(fd_dir):
        t0 = time.monotonic()
        return lambda: time.monotonic() - t0 > 1.5

    def ready() -> bool:
        try:
            return any(os.readlink(os.path.join(fd_dir, fd)) == str(path) for fd in os.listdir(fd_dir))
        except OSError:
            return False

    return ready


def _interrupt(args: Sequence[str], cwd: Path, sig: int, ready: Callable[[subprocess.Popen[bytes]], Callable[[], bool]]
               ) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "modelkit", *args], cwd=cwd, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _started(proc, ready(proc))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(getattr(signal, "SIGTERM", 15), 143, id="SIGTERM")]


@posix_only
@pytest.mark.parametrize(("sig", "code"), SIGNALS)
@pytest.mark.parametrize("command", ["hash", "verify", "diff"])
def test_read_only_commands_exit_128_plus_the_signal(tmp_path: Path, command: str, sig: int, code: int) -> None:
    a = _sparse_safetensors(tmp_path / "a.safetensors", 64, 32 * MiB)  # 2 GiB of zeros: seconds of work
    b = tmp_path / "b.safetensors"
    os.link(a, b) if hasattr(os, "link") else b.write_bytes(a.read_bytes())
    args = ["hash", "--no-cache", "a.safetensors"] if command == "hash" else [command, "a.safetensors", "b.safetensors"]
    rc, err = _interrupt(args, tmp_path, sig, lambda p: _reads(p, a))
    assert rc == code, err
    assert err == "modelkit: interrupted\n", err  # one line: no "Aborted!", no traceback


@posix_only
@pytest.mark.parametrize(("sig", "code"), SIGNALS)
def test_convert_interrupted_leaves_no_temp_file(tmp_path: Path, sig: int, code: int) -> None:
    _sparse_safetensors(tmp_path / "big.safetensors", 128, 16 * MiB)  # 2 GiB in 128 tensors
    out = tmp_path / "out"
    out.mkdir()
    rc, err = _interrupt(["convert", "big.safetensors", "--out-dir", "out"], tmp_path, sig,
                         lambda p: lambda: bool(os.listdir(out)))  # the temp file is there: writing
    assert rc == code, err
    assert err == "modelkit: interrupted; no partial output was left behind\n", err
    assert os.listdir(out) == []
