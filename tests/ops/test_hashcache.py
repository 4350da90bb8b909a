"""The hash cache: a file's hashes are read once, and never reused once the file changed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import modelkit
from fixtures import build
from fixtures.sd_layout import tiny_sd1_layout
from modelkit.cli.main import cli
from modelkit.formats import open_model
from modelkit.ops import hashcache, hashes
from modelkit.ops.metadata import SourceHash


@pytest.fixture
def no_racy_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files made by a test are younger than a second; let them be cached (see ``RACY_NS``)."""
    monkeypatch.setattr(hashcache, "RACY_NS", 0)


class _NoRead:
    """Stands in for the hash lanes: any read of the file fails the test."""

    def __init__(self, *a: object) -> None:
        raise AssertionError("the file was read although its hashes were cached")


def _model(path: Path, n: int = 50_000, value: float = 1.0) -> bytes:
    build.write_safetensors(str(path), {"w": torch.full((n,), value)})
    return path.read_bytes()


def test_second_hash_comes_from_the_cache(tmp_path: Path, no_racy_margin: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "m.safetensors"
    data = _model(p)
    first = hashes.hash_file(p)
    assert not first.cached and first.hashes["sha256"] == hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(hashes, "_Lanes", _NoRead)
    second = hashes.hash_file(p)
    assert second.cached and second.hashes == first.hashes
    # a subset is served too; use_cache=False reads the file
    assert hashes.hash_file(p, ("autov2",)).hashes == {"autov2": first.hashes["autov2"]}
    with pytest.raises(AssertionError, match="was read"):
        hashes.hash_file(p, use_cache=False)


def test_a_changed_file_is_hashed_again(tmp_path: Path, no_racy_margin: None) -> None:
    p = tmp_path / "m.safetensors"
    _model(p)
    old = hashes.hash_file(p).hashes["sha256"]
    st = os.stat(p)
    data = _model(p, value=2.0)  # same size, other bytes
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    res = hashes.hash_file(p)
    assert not res.cached and res.hashes["sha256"] == hashlib.sha256(data).hexdigest() != old
    data = _model(p, n=60_000)  # another size
    res = hashes.hash_file(p)
    assert not res.cached and res.hashes["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_file_just_written_is_not_cached(tmp_path: Path) -> None:
    """A change in the same clock tick could leave mtime and ctime unchanged: fresh files wait."""
    p = tmp_path / "m.safetensors"
    _model(p)
    hashes.hash_file(p)
    assert hashcache.lookup(os.stat(p), ("sha256",)) is None
    assert not hashes.hash_file(p).cached


def test_a_file_that_changes_while_hashed_is_not_cached(tmp_path: Path, no_racy_margin: None) -> None:
    p = tmp_path / "m.safetensors"
    _model(p)
    before = os.stat(p)
    with open(p, "ab") as f:
        f.write(b"x")
    after = os.stat(p)
    assert not hashcache.store(str(p), before, after, 2**62, ("sha256",), {"sha256": "0" * 64})
    assert hashcache.lookup(before, ("sha256",)) is None


def test_the_sha256_of_a_convert_is_reused(tmp_path: Path, no_racy_margin: None) -> None:
    """convert's provenance hash fills the cache, and a later convert (or ``hash --algo sha256``)
    takes it from there; the recorded sha256 is the file's either way."""
    src = tmp_path / "m.ckpt"
    build.sd_checkpoint(str(src), tiny_sd1_layout())
    real = hashlib.sha256(src.read_bytes()).hexdigest()
    assert hashcache.lookup(os.stat(src), ("sha256",)) is None
    a = modelkit.convert(src, tmp_path / "a.safetensors")
    hit = SourceHash(str(src))
    assert hit.cached and hit.hexdigest() == real
    b = modelkit.convert(src, tmp_path / "b.safetensors")
    for r in (a, b):
        with open_model(r.output) as mf:
            assert mf.metadata["modelkit.source_sha256"] == real
    assert hashes.hash_file(src, ("sha256",)).cached
    assert not hashes.hash_file(src).cached  # the default set needs more than the sha256


def test_turned_off_corrupt_or_unwritable(tmp_path: Path, no_racy_margin: None, monkeypatch: pytest.MonkeyPatch,
                                          _own_hash_cache: Path) -> None:
    p = tmp_path / "m.safetensors"
    data = _model(p)
    want = hashlib.sha256(data).hexdigest()
    cache = _own_hash_cache / hashcache.FILE
    monkeypatch.setenv("MODELKIT_HASH_CACHE", "0")
    hashes.hash_file(p)
    off = SourceHash(str(p))
    assert off.hexdigest() == want and not off.cached  # (waited for: its thread must not outlive the switch)
    assert not cache.exists()
    monkeypatch.delenv("MODELKIT_HASH_CACHE")
    cache.write_text("{not json")
    assert not hashes.hash_file(p).cached  # a corrupt cache is a miss ...
    assert json.loads(cache.read_text())["version"] == hashcache.VERSION  # ... and is rewritten
    assert hashes.hash_file(p).cached
    key = f"{os.stat(p).st_dev}:{os.stat(p).st_ino}"
    ident = hashcache.identity(os.stat(p))
    for junk in ([], {"id": ident, "algos": [[1]], "hashes": {}}, {"id": ident, "algos": ["sha256", 1], "hashes": {}},
                 {"id": ident, "algos": ["sha256"], "hashes": {"sha256": 5}}):
        cache.write_text(json.dumps({"version": 1, "entries": {"x": 5, key: junk}}))
        res = hashes.hash_file(p, ("sha256",))
        assert not res.cached and res.hashes["sha256"] == want
        assert hashes.hash_file(p, ("sha256",)).cached  # stored again over the junk
    cache.write_text("[" * 200_000)  # too deep for the json module
    assert not hashes.hash_file(p).cached
    cache.write_text(json.dumps({"version": 1, "entries": {"x": {"used": 10**400}, "y": {"used": "z"}}}))
    assert not hashes.hash_file(p).cached and hashes.hash_file(p).cached
    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(p))  # a file where the folder should be
    res = hashes.hash_file(p)
    assert res.hashes["sha256"] == want and not res.cached
    assert SourceHash(str(p)).hexdigest() == want


def test_the_oldest_entries_go(tmp_path: Path, no_racy_margin: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashcache, "MAX_ENTRIES", 2)
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for i, f in enumerate(files):
        _model(f, n=1000 + i)
        hashes.hash_file(f, ("sha256",))
    assert [hashcache.lookup(os.stat(f), ("sha256",)) is not None for f in files] == [False, True, True]


def test_cli_says_cached_and_no_cache_reads(tmp_path: Path, no_racy_margin: None) -> None:
    p = tmp_path / "m.safetensors"
    _model(p)
    runner = CliRunner()
    docs = [json.loads(runner.invoke(cli, ["hash", str(p), "--json", *extra]).output)
            for extra in ([], [], ["--no-cache"])]
    assert [d["files"][0]["cached"] for d in docs] == [False, True, False]
    assert docs[0]["files"][0]["hashes"] == docs[1]["files"][0]["hashes"] == docs[2]["files"][0]["hashes"]
    text = runner.invoke(cli, ["hash", str(p)]).output
    assert "(hashes from the cache)" in text


# -- the source hash of convert/prune/merge: a child process over a mapping, for big files --------

def _child_hash() -> bool:
    """Whether modelkit hashes big files in a child process here: POSIX (pass_fds, SIGBUS), not
    MODELKIT_PORTABLE=1 (``modelkit.portable.CHILD_HASH``); elsewhere a thread reads the file."""
    try:
        from modelkit import portable
    except ImportError:  # a modelkit without the portable module: POSIX means a child
        return os.name == "posix"
    return bool(portable.CHILD_HASH)


POSIX_CHILD = pytest.mark.skipif(not _child_hash(), reason="modelkit hashes big files in a child process only on "
                                                           "POSIX (not Windows, not MODELKIT_PORTABLE=1)")

@pytest.fixture
def child_for_all(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every file goes to the child process; returns the argv of each child started."""
    from modelkit.ops import metadata as md

    monkeypatch.setattr(md.SourceHash, "CHILD_MIN", 0)
    started: list[list[str]] = []
    real = md.subprocess.Popen

    def popen(argv: list[str], **kw: object) -> object:
        started.append(argv)
        return real(argv, **kw)

    monkeypatch.setattr(md.subprocess, "Popen", popen)
    return started


@POSIX_CHILD
def test_big_files_are_hashed_in_a_child(tmp_path: Path, child_for_all: list[list[str]]) -> None:
    p = tmp_path / "m.safetensors"
    data = _model(p, n=3_000_000)  # 12 MB: a child maps it in 16 MB steps
    assert SourceHash(str(p)).hexdigest() == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert SourceHash(str(empty)).hexdigest() == hashlib.sha256(b"").hexdigest()
    assert len(child_for_all) == 2


@POSIX_CHILD
def test_a_child_that_fails_is_replaced_by_a_read(tmp_path: Path, child_for_all: list[list[str]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkit.ops import metadata as md

    monkeypatch.setattr(md, "_CHILD_CODE", "import sys; print('not a digest'); sys.exit(1)")
    p = tmp_path / "m.safetensors"
    data = _model(p)
    assert SourceHash(str(p)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert child_for_all


@POSIX_CHILD
def test_a_file_cut_short_under_the_child_is_a_clear_error(tmp_path: Path, child_for_all: list[list[str]],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is truncated after the child mapped it: the child's read faults (SIGBUS) and it
    dies; modelkit lives and says what happened, and convert leaves no output behind."""
    from modelkit.errors import FormatError
    from modelkit.ops import metadata as md

    src = tmp_path / "m.ckpt"
    build.sd_checkpoint(str(src), tiny_sd1_layout())
    cut = ("import mmap, os\n_map = mmap.mmap\n"
           f"def _cut(*a, **k):\n    m = _map(*a, **k)\n    os.truncate({str(src)!r}, 0)\n    return m\n"
           "mmap.mmap = _cut\n")
    monkeypatch.setattr(md, "_CHILD_CODE", cut + md._CHILD_CODE)
    with pytest.raises(FormatError, match="got shorter while it was being read"):
        SourceHash(str(src)).hexdigest()
    assert src.stat().st_size == 0
    build.sd_checkpoint(str(src), tiny_sd1_layout())
    res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "out.safetensors")])
    # the scan or the copy may see the cut first: whichever does, one line naming the file, exit 2
    assert res.exit_code == 2 and "m.ckpt" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.ckpt"]


@POSIX_CHILD
def test_a_file_that_changes_before_it_is_mapped_is_a_clear_error(tmp_path: Path, child_for_all: list[list[str]],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut before the child maps it: the child refuses, the read here sees the change."""
    from modelkit.errors import FormatError
    from modelkit.ops import metadata as md

    p = tmp_path / "m.safetensors"
    _model(p)
    real = md.subprocess.Popen

    def cut_then_start(argv: list[str], **kw: object) -> object:
        os.truncate(p, 1000)
        return real(argv, **kw)

    monkeypatch.setattr(md.subprocess, "Popen", cut_then_start)
    with pytest.raises(FormatError, match="changed while it was being read"):
        SourceHash(str(p)).hexdigest()


@POSIX_CHILD
def test_cancel_stops_the_child(tmp_path: Path, child_for_all: list[list[str]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkit.ops import metadata as md

    monkeypatch.setattr(md, "_CHILD_CODE", "import time; time.sleep(600)")
    p = tmp_path / "m.safetensors"
    _model(p)
    h = SourceHash(str(p))
    for _ in range(3000):  # the thread is starting the child
        if h._proc is not None:
            break
        h._thread.join(0.01)  # type: ignore[union-attr]
    assert h._proc is not None, "no child was started"
    h.cancel()
    assert h._proc.returncode is not None  # killed and reaped, not left running


def test_a_read_error_names_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from modelkit.errors import FormatError
    from modelkit.ops import metadata as md

    p = tmp_path / "m.safetensors"
    _model(p)

    def eio(*a: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    try:
        from modelkit import portable
    except ImportError:
        portable = None  # type: ignore[assignment]
    if portable is None or portable.CHOSEN.get("read") == "preadv":
        monkeypatch.setattr(md.os, "preadv", eio, raising=False)  # the call modelkit makes (Linux, macOS)
    else:
        monkeypatch.setattr(portable, "read_once", eio)  # its fallback read (Windows, MODELKIT_PORTABLE=1)
    with pytest.raises(FormatError, match=r"m\.safetensors.*could not be read \(Input/output error\)"):
        SourceHash(str(p)).hexdigest()


@POSIX_CHILD
def test_ctrl_c_does_not_stop_the_child_and_a_read_error_is_not_a_cut(tmp_path: Path, child_for_all: list[list[str]],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The child ignores SIGINT (modelkit handles Ctrl-C and cancels it); a SIGBUS while the file
    kept its size is a read error, not a cut: the read in modelkit then tells which."""

    from modelkit.ops import metadata as md

    p = tmp_path / "m.safetensors"
    data = _model(p)
    monkeypatch.setattr(md, "_CHILD_CODE", md._CHILD_CODE.replace(
        "h, off = hashlib.sha256(), 0", "h, off = hashlib.sha256(), 0\nos.kill(os.getpid(), signal.SIGINT)"))
    h = SourceHash(str(p))
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(md, "_CHILD_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGBUS)")
    reads: list[int] = []
    real = md.SourceHash._here

    def here(self: SourceHash, fd: int) -> str | None:
        reads.append(fd)
        return real(self, fd)

    monkeypatch.setattr(md.SourceHash, "_here", here)
    assert SourceHash(str(p)).hexdigest() == hashlib.sha256(data).hexdigest() and len(reads) == 1


def test_a_chmod_while_hashing_is_not_a_change(tmp_path: Path, child_for_all: list[list[str]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkit.ops import metadata as md

    p = tmp_path / "m.safetensors"
    data = _model(p)
    real = md.subprocess.Popen

    def chmod_then_start(argv: list[str], **kw: object) -> object:
        os.chmod(p, 0o600)
        return real(argv, **kw)

    monkeypatch.setattr(md.subprocess, "Popen", chmod_then_start)
    if not _child_hash():  # no child here: the chmod comes before the read in the thread
        read = md.SourceHash._here

        def chmod_then_read(self: SourceHash, fd: int) -> str | None:
            os.chmod(p, 0o600)
            return read(self, fd)

        monkeypatch.setattr(md.SourceHash, "_here", chmod_then_read)
    assert SourceHash(str(p)).hexdigest() == hashlib.sha256(data).hexdigest()


def test_no_child_where_the_executable_is_not_python(tmp_path: Path, child_for_all: list[list[str]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkit.ops import metadata as md

    monkeypatch.setattr(md.sys, "executable", "/usr/bin/uwsgi")
    p = tmp_path / "m.safetensors"
    data = _model(p)
    assert SourceHash(str(p)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert child_for_all == []
