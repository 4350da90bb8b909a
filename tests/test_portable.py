"""The portable I/O layer (issue 14: Windows and macOS): every fallback gives the native path's
bytes, in this process (each implementation called directly) and end to end in a child process
run with ``MODELKIT_PORTABLE=1``; Windows' name rules, temp names and replace retries."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fixtures import torchfree
from modelkit import paths, portable
from modelkit.errors import OutputExistsError, OutputWriteError, UsageError
from modelkit.model import Source

ROOT = Path(__file__).resolve().parents[1]

#: Every read implementation this OS has, by name.
READS: dict[str, Callable[[int, memoryview, int], int]] = {"seek": portable.read_seek}
if hasattr(os, "pread"):
    READS["pread"] = portable.read_pread
if hasattr(os, "preadv"):
    READS["preadv"] = portable.read_preadv


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(14).randbytes(300_001)
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    return p, data


# -- positioned reads and writes -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(READS))
def test_each_read_gives_the_files_bytes(blob: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch,
                                         name: str) -> None:
    p, data = blob
    monkeypatch.setattr(portable, "read_once", READS[name])
    fd = portable.open_fd(str(p), os.O_RDONLY)
    try:
        for offset, size in [(0, 10), (12_345, 100_000), (len(data) - 7, 7), (len(data) - 3, 10), (len(data), 5)]:
            buf = bytearray(size)
            got = portable.read_into(fd, buf, offset)
            assert got == min(size, max(0, len(data) - offset)), (offset, size)
            assert bytes(buf[:got]) == data[offset : offset + got]
        assert READS[name](fd, memoryview(bytearray(4)), len(data) + 100) == 0  # past the end: 0, no error
    finally:
        os.close(fd)


def test_threads_reading_one_source_through_the_fallback(blob: tuple[Path, bytes],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Several threads read one Source (one fd, one file position) at random places at once."""
    p, data = blob
    monkeypatch.setattr(portable, "read_once", portable.read_seek)
    src = Source(p)
    wrong: list[tuple[int, int]] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(300):
            offset = rnd.randrange(len(data))
            size = rnd.randrange(1, min(5000, len(data) - offset) + 1)
            got = src.pread(size, offset)
            if got != data[offset : offset + size]:
                wrong.append((offset, size))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        src.close()
    assert wrong == []


def test_write_at_fallback_writes_in_place_and_keeps_the_position(tmp_path: Path) -> None:
    results = []
    ways = [portable.write_at_seek] + ([portable.write_at_pwrite] if hasattr(os, "pwrite") else [])
    for i, write_at in enumerate(ways):
        p = tmp_path / f"w{i}.bin"
        fd = portable.open_fd(str(p), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            portable.write_all(fd, b"0123456789")
            write_at(fd, b"abc", 2)
            assert os.lseek(fd, 0, os.SEEK_CUR) == 10
            portable.write_all(fd, b"!")
        finally:
            os.close(fd)
        results.append(p.read_bytes())
    assert set(results) == {b"01abc56789!"}


@pytest.mark.parametrize("kernel", [(), None], ids=["read+write", "native"])
@pytest.mark.parametrize("read", sorted(READS))
def test_range_copier_gives_the_same_bytes(blob: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           kernel: tuple[str, ...] | None, read: str) -> None:
    p, data = blob
    monkeypatch.setattr(portable, "read_once", READS[read])
    out = tmp_path / "out.bin"
    src = portable.open_fd(str(p), os.O_RDONLY)
    dst = portable.open_fd(str(out), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        copier = portable.RangeCopier(dst, chunk=4096)  # several chunks per range
        if kernel is not None:
            copier.kernel = list(kernel)
        assert copier.copy(src, 5, 100_000) == 100_000
        assert copier.copy(src, 0, 5) == 5
        assert copier.copy(src, len(data) - 10, 50) == 10  # the input ends first: a short count
    finally:
        os.close(src)
        os.close(dst)
    assert out.read_bytes() == data[5:100_005] + data[:5] + data[-10:]


def test_a_refused_kernel_copy_falls_back(blob: tuple[Path, bytes], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    p, data = blob

    def refuse(*a: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(portable.RangeCopier, "_kernel", lambda self, *a: refuse())
    out = tmp_path / "out.bin"
    with open(p, "rb") as src, open(out, "wb") as dst:
        copier = portable.RangeCopier(dst.fileno())
        copier.kernel = ["copy_file_range", "sendfile"]
        assert copier.copy(src.fileno(), 0, len(data)) == len(data)
        assert copier.kernel == []
    assert out.read_bytes() == data


def test_open_fd_adds_o_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = os.open

    def spy(path: str, flags: int, mode: int = 0o777) -> int:
        seen.append(flags)
        return real(path, flags, mode)

    monkeypatch.setattr(portable, "O_BINARY", 0x8000)  # Windows' value
    monkeypatch.setattr(os, "open", spy)
    (tmp_path / "f").write_bytes(b"x")
    os.close(portable.open_fd(str(tmp_path / "f"), os.O_RDONLY))
    assert seen and seen[0] & 0x8000


def test_os_specific_calls_live_in_portable_only() -> None:
    """The core calls no OS-specific function directly, and opens files only through open_fd."""
    pkg = ROOT / "modelkit"
    banned = re.compile(r"\bos\.(preadv|pread|pwrite|copy_file_range|sendfile|sched_getaffinity|cpu_count|"
                        r"process_cpu_count|posix_fadvise|readv)\(")
    found = []
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg)
        if rel.parts[0] == "train" or rel.name == "portable.py":
            continue
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if banned.search(line) or ("os.open(" in line and "O_DIRECTORY" not in line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert found == []


def test_usable_cpus_and_what_was_chosen() -> None:
    assert portable.usable_cpus() >= 1
    for fn in (portable._cpus, portable._affinity, portable._process_cpus):
        try:
            assert fn() >= 1
        except AttributeError:  # this OS (or Python) lacks it
            pass
    assert {"mode", "read", "write_at", "copy", "cpus", "link", "hash_child", "folder_fsync", "names"} <= set(
        portable.CHOSEN)
    assert portable.describe().startswith(portable.CHOSEN["mode"] + ": read=")


def test_the_setting_is_read_once_at_import() -> None:
    code = "import json; from modelkit import portable as p; print(json.dumps([p.PORTABLE, p.CHOSEN]))"
    for value, on in [("1", True), ("0", False), ("", False), ("yes", True)]:
        env = {**os.environ, portable.ENV: value}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=60, check=True).stdout
        flag, chosen = json.loads(out)
        assert flag is on, value
        if on:
            assert chosen["read"] == "lseek+readinto (locked)" and chosen["copy"] == "read+write"
            assert chosen["hash_child"] == "thread" and chosen["folder_fsync"] == "no" and chosen["names"] == "windows"


# -- end to end: the same answers with MODELKIT_PORTABLE=1 ----------------------------------------

#: scan, inspect (hashes), read every tensor, hash, convert, prune to fp16, convert again with
#: --force (a replace), with the source hash in a child process where the OS allows one.
CHILD = """
import hashlib, json, os, sys
import modelkit
from modelkit import portable
from modelkit.ops import metadata
from modelkit.reading import open_model

metadata.SourceHash.CHILD_MIN = 0
pt, st, out = sys.argv[1:4]
res = {"chosen": portable.CHOSEN}
res["scan"] = [f.to_dict() for f in modelkit.scan([pt, st]).files]
res["inspect"] = {p: modelkit.inspect(p, keys=True, hashes=True).to_dict() for p in (pt, st)}
res["hash"] = {p: modelkit.hash_file(p, ("sha256", "autov1", "autov2", "autov3", "crc32"), use_cache=False).hashes
               for p in (pt, st)}
with open_model(pt) as mf:
    res["tensors"] = {k: hashlib.sha256(bytes(r.read_raw())).hexdigest() for k, r in mf.items()}
outs = [modelkit.convert(pt, out_dir=out).output, modelkit.prune(st, out_dir=out, dtype="fp16").output,
        modelkit.convert(pt, out_dir=out, force=True).output]
res["outputs"] = [(os.path.basename(o), hashlib.sha256(open(o, "rb").read()).hexdigest()) for o in outs]
res["left"] = sorted(os.listdir(out))
print(json.dumps(res, sort_keys=True))
"""


def _run(tmp_path: Path, pt: Path, st: Path, mode: str) -> dict[str, object]:
    out = tmp_path / f"out-{mode}"
    out.mkdir()
    env = {**os.environ, "MODELKIT_HASH_CACHE": "0", "PYTHONPATH": str(ROOT)}
    env.pop(portable.ENV, None)
    if mode == "portable":
        env[portable.ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(pt), str(st), str(out)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res: dict[str, object] = json.loads(proc.stdout)
    return res


def test_portable_mode_gives_the_native_answers(tmp_path: Path) -> None:
    rnd = np.random.default_rng(14)
    tensors = {"model.w": rnd.standard_normal((256, 300)).astype(np.float32),
               "model.h": rnd.standard_normal((64, 7)).astype(np.float16),
               "model.i": np.arange(1000, dtype=np.int64)}
    pt, st = tmp_path / "m.ckpt", tmp_path / "s.safetensors"
    torchfree.save_zip(tensors, str(pt))
    torchfree.save_safetensors(tensors, str(st), metadata={"k": "v"})
    native, port = _run(tmp_path, pt, st, "native"), _run(tmp_path, pt, st, "portable")
    chosen = port.pop("chosen")
    assert isinstance(chosen, dict) and chosen["mode"] == "portable"
    assert native.pop("chosen") != chosen
    assert native == port
    assert port["left"] == ["m.safetensors", "s.pruned.safetensors"]  # no temp file left


# -- Windows' rules for output names, temp names and replaces -------------------------------------

@pytest.mark.parametrize("name", ["CON", "con.safetensors", "Nul.safetensors", "aux.x.safetensors", "COM1.safetensors",
                                  "lpt9.safetensors", "com\u00b9.safetensors", "PRN .safetensors", "conout$.txt"])
def test_device_names_are_refused(name: str) -> None:
    assert "device name" in (paths.windows_name_problem(name) or "")


@pytest.mark.parametrize(("name", "why"), [("m.safetensors.", "ends in a dot"), ("m.safetensors ", "space"),
                                           ("a:b.safetensors", "':'"), ("a?.safetensors", "'?'"),
                                           ("a\x01.safetensors", "'\\x01'")])
def test_names_windows_cannot_hold(name: str, why: str) -> None:
    assert why in (paths.windows_name_problem(name) or "")


@pytest.mark.parametrize("name", ["m.safetensors", "console.safetensors", "com10.safetensors", "lpt.safetensors",
                                  "nul_model.safetensors", "my con.safetensors", "\u00e9t\u00e9.safetensors"])
def test_ordinary_names_pass(name: str) -> None:
    assert paths.windows_name_problem(name) is None


def test_windows_names_are_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "NUL.safetensors"
    monkeypatch.setattr(portable, "WINDOWS_RULES", False)
    paths.check_output(target)  # a plain name on POSIX
    monkeypatch.setattr(portable, "WINDOWS_RULES", True)
    with pytest.raises(UsageError, match=r"NUL\.safetensors: is a device name on Windows \(NUL\)") as info:
        with paths.atomic_output(target):
            pass
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="device name"):
        paths.write_text_atomic(tmp_path / "aux.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_temp_names_stay_short_and_recognisable(tmp_path: Path) -> None:
    folder = str(tmp_path)
    short = paths.temp_path(os.path.join(folder, "m.safetensors"), "0a1b2c3d")
    assert short == os.path.join(folder, ".m.safetensors.0a1b2c3d.modelkit-tmp")
    long_name = "a-very-long-model-name-" * 12 + ".safetensors"  # 288 characters
    tmp = paths.temp_path(os.path.join(folder, long_name), "0a1b2c3d")
    leaf = os.path.basename(tmp)
    assert os.path.dirname(tmp) == folder  # the target's folder: one volume, so the rename is atomic
    assert leaf.startswith(".a-very-long-model-name-") and leaf.endswith("~.0a1b2c3d.modelkit-tmp")
    assert len(os.fsencode(leaf)) <= paths.NAME_MAX
    for n in (40, 200):
        target = os.path.join(folder, "x" * n + ".safetensors")
        tmp = paths.temp_path(target, "0a1b2c3d", max_path=paths.MAX_PATH)
        assert len(tmp) < paths.MAX_PATH and os.path.basename(tmp).startswith(".x")
    wide = paths.temp_path(os.path.join(folder, "\u6a21\u578b" * 100 + ".safetensors"), "0a1b2c3d")
    assert len(os.fsencode(os.path.basename(wide))) <= paths.NAME_MAX  # bytes, not characters
    assert ":" not in os.path.basename(paths.temp_path(os.path.join(folder, "a:b.safetensors"), "0a1b2c3d"))


def test_a_long_output_name_can_be_written(tmp_path: Path) -> None:
    target = tmp_path / ("n" * 240 + ".safetensors")  # 252 bytes: the old temp name would not fit
    with paths.atomic_output(target) as fd:
        os.write(fd, b"data")
    assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def _in_use(*a: object) -> None:
    exc = PermissionError(errno.EACCES, "The process cannot access the file because it is being used by another process")
    exc.winerror = 32  # type: ignore[attr-defined]
    raise exc


def test_replace_is_retried_while_the_target_is_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old")
    real, calls = os.replace, [0]

    def flaky(src: str, dst: str) -> None:
        calls[0] += 1
        if calls[0] <= 2:
            _in_use()
        real(src, dst)

    waits: list[float] = []
    monkeypatch.setattr(paths, "REPLACE_WAITS", (0.0, 0.0, 0.0))
    monkeypatch.setattr(paths.time, "sleep", waits.append)
    monkeypatch.setattr(os, "replace", flaky)
    with paths.atomic_output(target, force=True) as fd:
        os.write(fd, b"new")
    assert target.read_bytes() == b"new" and calls[0] == 3 and waits == [0.0, 0.0]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_target_held_open_gives_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old")
    monkeypatch.setattr(paths, "REPLACE_WAITS", (0.0, 0.0))
    monkeypatch.setattr(os, "replace", _in_use)
    with pytest.raises(OutputWriteError) as info:
        with paths.atomic_output(target, force=True) as fd:
            os.write(fd, b"new")
    msg = str(info.value)
    assert msg.startswith(f"{target}: is open in another program") and "Close the program" in msg and "\n" not in msg
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # the temp file is gone


def test_other_permission_errors_are_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]

    def denied(src: str, dst: str) -> None:
        calls[0] += 1
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(portable, "PORTABLE", False)
    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError):
        paths.replace_retrying("a", "b", waits=(0.0, 0.0))
    assert calls[0] == 1


@pytest.mark.parametrize("link", ["missing", "refused"])
def test_publishing_without_hard_links_never_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        link: str) -> None:
    if link == "missing":
        monkeypatch.setattr(portable, "HARD_LINKS", False)
    else:
        monkeypatch.setattr(portable, "HARD_LINKS", True)

        def no_link(src: str, dst: str) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")  # FAT, exFAT, some shares

        monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "m.safetensors"
    with paths.atomic_output(target) as fd:
        os.write(fd, b"first")
    assert target.read_bytes() == b"first"
    target.unlink()
    with pytest.raises(OutputExistsError, match="appeared while modelkit was writing it"):
        with paths.atomic_output(target) as fd:
            os.write(fd, b"second")
            target.write_bytes(b"someone else's")  # appears while modelkit writes
    assert target.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("sep", ["/", "\\"] if sys.platform == "win32" else ["/"])
def test_a_folder_named_with_a_trailing_separator_gets_its_output_beside_it(sep: str) -> None:
    """Tab completion types ``tuned/``: the default output is ``tuned.lora.safetensors`` beside the folder,
    not a hidden ``.lora.safetensors`` inside it."""
    from modelkit.paths import default_target

    assert default_target(os.path.join("a", "tuned") + sep, None, ".lora") == os.path.join("a", "tuned.lora.safetensors")
    assert default_target("tuned" + sep + sep, "out", ".pruned") == os.path.join("out", "tuned.pruned.safetensors")
    assert default_target("m.ckpt", None) == "m.safetensors"
