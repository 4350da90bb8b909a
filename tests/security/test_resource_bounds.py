"""Small inputs that make big work (issue 13, section 4): each bound is proven by counting work
or measuring memory, never by timing. A child's deadline only catches a hang.

* the flattener walks each object once: a pickle of under 200 bytes whose memo makes a DAG of
  2**24 paths takes a few dozen steps;
* a compressed wrapper inflates to ``unwrap_budget(size)`` bytes at most (64 times its size, at
  least 32 MiB, at most 256 MiB), in steps, so memory stays near the budget, and a payload at
  the start of a bomb is still found;
* a tar checkpoint is read as torch reads it: raw bytes are skipped, never probed, and its
  pickles share one budget (the 200 KB gzip of a tar whose member holds 10,000 PROTO marks and
  200 MiB of zeros, which a scan that probed from every mark ran on for more than 15 minutes);
* the safetensors reader probes byte 0 over 64 KiB, not the whole file.
"""

from __future__ import annotations

import bz2
import io
import json
import lzma
import subprocess
import sys
import tarfile
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import modelkit
from modelkit.errors import ResourceLimitError
from modelkit.formats import flatten as flatten_module
from modelkit.formats import open_model as open_raw
from modelkit.formats import safetensors_file
from modelkit.scan import engine, tarscan
from tests.security.test_bypasses import _describe, assert_live, assert_refused, exec_call, pkl, tar_bytes, write

MiB = 1024 * 1024

# -- the flattener --------------------------------------------------------------------------------


def memo_dag(levels: int) -> bytes:
    """L0 = []; L(i) = [L(i-1), L(i-1)] by memo references: 2**levels paths, 7 bytes a level."""
    body = b"\x80\x02]q\x00"
    for i in range(1, levels + 1):
        body += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i])
    return body + b"."


def test_memo_dag_pickle_is_walked_once_per_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's pickle of under 200 bytes whose memo makes a DAG of 2**24 paths: the reader
    walks its 25 lists once each, within a bound of 1,000 (a step costs one plus its depth; the
    2**25 paths would cost more than 2**25): every second reference to a list is an alias, but to
    the empty list L0, a plain value shown under both keys of L1."""
    data = memo_dag(24)
    assert len(data) < 200
    path = write(tmp_path, "dag.pkl", data)
    monkeypatch.setattr(flatten_module, "MAX_NODES", 1000)
    with open_raw(path) as mf:
        assert len(mf) == 0
        aliases = [v for v in mf.extras.values() if isinstance(v, str) and v.startswith("<alias of ")]
        assert len(aliases) == 23
    assert modelkit.scan(path).files[0].verdict == "safe"


def _torch_dag(tmp_path: Path, levels: int) -> Path:
    """``{"state_dict": D}``, D a DAG of ``levels`` dicts {"a": D', "b": D'} over {"w": tensor},
    written by torch.save (which memoizes shared objects): a file of a few KB."""
    import torch

    node: dict[str, Any] = {"w": torch.arange(6, dtype=torch.float32)}
    for _ in range(levels):
        node = {"a": node, "b": node}
    path = tmp_path / f"dag{levels}.pt"
    torch.save({"state_dict": node}, path)
    return path


def test_memo_dag_over_a_tensor_gives_the_names_torch_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.load gives the tensor under each of the 2**5 paths; so does the reader, each dict
    walked once and the tensor's names under a second reference given from the first walk: a
    bound of 300 covers the 6 dicts walked and the 32 names (each costs one plus its depth), and
    would not cover the 64 names of 6 levels."""
    monkeypatch.setattr(flatten_module, "MAX_NODES", 300)
    with modelkit.open_model(_torch_dag(tmp_path, 5)) as mf:
        assert len(mf) == 32 and mf.wrappers == ["state_dict"]
        assert {name.count(".") for name in mf} == {5}
        assert all(mf[name].read().tolist() == [0, 1, 2, 3, 4, 5] for name in ("a.a.a.a.a.w", "b.b.b.b.b.w"))


def test_memo_dag_over_a_tensor_with_2_to_the_24_names_stops_at_the_bound(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """24 levels: torch would give the tensor 2**24 names; the reader stops after MAX_NODES steps."""
    path = _torch_dag(tmp_path, 24)
    assert path.stat().st_size < 4096
    monkeypatch.setattr(flatten_module, "MAX_NODES", 10_000)
    with pytest.raises(ResourceLimitError, match="to walk"):
        open_raw(path)


def shared_list(refs: int) -> bytes:
    """A dict of ``refs`` keys, each a memo reference to one list of 1,000 ints."""
    pairs = b"".join(b"X\x05\x00\x00\x00k%04dh\x00" % i for i in range(refs))
    return b"\x80\x02(" + b"K\x01" * 1000 + b"lq\x00" + b"0}(" + pairs + b"u."


def test_a_shared_plain_list_is_charged_for_each_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of plain values is a leaf, shown under every key that references it, and each
    reference is charged its length (it is printed again): 99 references to a 1,000-item list
    cost about 10**5, past a bound of 5 * 10**4."""
    path = write(tmp_path, "shared.pkl", shared_list(99))
    with open_raw(path) as mf:
        assert len(mf.extras) == 99 and all(len(v) == 1000 for v in mf.extras.values())
    monkeypatch.setattr(flatten_module, "MAX_NODES", 50_000)
    with pytest.raises(ResourceLimitError):
        open_raw(path)


# -- compressed wrappers --------------------------------------------------------------------------

COMPRESSORS: dict[str, Callable[[], Any]] = {
    "gzip": lambda: zlib.compressobj(9, zlib.DEFLATED, 31),
    "bzip2": lambda: bz2.BZ2Compressor(9),
    "xz": lambda: lzma.LZMACompressor(preset=0),
}


def compress_stream(fmt: str, head: bytes, zeros: int) -> bytes:
    """``head`` then ``zeros`` zero bytes, compressed a MiB at a time (never all in memory)."""
    c = COMPRESSORS[fmt]()
    out = [c.compress(head)]
    block = bytes(MiB)
    for _ in range(zeros // MiB):
        out.append(c.compress(block))
    out.append(c.compress(bytes(zeros % MiB)))
    out.append(c.flush())
    return b"".join(out)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """64 MiB of zeros in each wrapper: past the 32 MiB floor and 64 times their size."""
    return {fmt: compress_stream(fmt, b"", 64 * MiB) for fmt in COMPRESSORS}


@pytest.mark.parametrize("fmt", list(COMPRESSORS))
def test_wrapper_bomb_inflates_to_the_budget_only(tmp_path: Path, bombs: dict[str, bytes], fmt: str) -> None:
    data = bombs[fmt]
    assert len(data) * engine.UNWRAP_RATIO < 64 * MiB
    path = write(tmp_path, f"bomb.{fmt}", data)
    budget = engine.unwrap_budget(len(data))
    assert budget == engine.UNWRAP_FLOOR
    tracemalloc.start()
    try:
        report = modelkit.scan(path).files[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.verdict == "error", _describe(report)
    limit = [f for f in report.findings if f.rule == "MK-P004"]
    assert limit and "exceeds a resource bound" in limit[0].message and f"first {budget} bytes" in limit[0].message
    assert peak < budget + 16 * MiB, f"peak {peak / MiB:.0f} MiB for a {budget / MiB:.0f} MiB budget"


@pytest.mark.parametrize("fmt", list(COMPRESSORS))
def test_a_payload_at_the_start_of_a_bomb_is_still_found(tmp_path: Path, marker: str, fmt: str) -> None:
    """``pickle.load(gzip.open(...))`` runs the first pickle and never reads the zeros after it."""
    data = compress_stream(fmt, pkl(exec_call(marker)), 48 * MiB)
    path = write(tmp_path, f"evil.pkl.{fmt}", data)
    assert_live(None, tmp_path, marker, {"gzip": "gzip", "bzip2": "bz2", "xz": "xz"}[fmt], path=path)
    report = assert_refused(path, marker, global_name="builtins.exec")
    assert any(f.rule == "MK-P004" for f in report.findings), _describe(report)


# -- tar checkpoints ------------------------------------------------------------------------------


def tar_of_marks_and_zeros(name: str, marks: int = 10_000, zeros: int = 200 * MiB) -> tuple[bytes, int]:
    """A tar archive of one member, 10,000 PROTO marks then 200 MiB of zeros: its first bytes (the
    header and the marks) and how many zero bytes follow them (the rest of the member, the block
    padding and the end-of-archive blocks)."""
    head = b"\x80\x02" * marks
    info = tarfile.TarInfo(name)
    info.size = len(head) + zeros
    return info.tobuf(tarfile.USTAR_FORMAT) + head, zeros + (-info.size) % 512 + 1024


SCAN_IN_CHILD = r"""
import json, sys
import modelkit

if sys.platform == "win32":  # no resource module: the peak working set, from GetProcessMemoryInfo
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (name, ctypes.c_size_t) for name in (
                "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]

    kernel32 = ctypes.WinDLL("kernel32")
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    kernel32.K32GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.POINTER(Counters), wintypes.DWORD]
    kernel32.K32GetProcessMemoryInfo.restype = wintypes.BOOL

    def peak_kib():
        c = Counters()
        c.cb = ctypes.sizeof(c)
        if not kernel32.K32GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(c), c.cb):
            raise ctypes.WinError()
        return c.PeakWorkingSetSize // 1024
else:
    import resource

    def peak_kib():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux

base = peak_kib()
r = modelkit.scan(sys.argv[1]).files[0]
peak = peak_kib()
print(json.dumps({'verdict': r.verdict, 'pickles': r.pickles_scanned, 'grown_kb': peak - base,
                  'findings': [[f.rule, f.message] for f in r.findings]}))
"""


def scan_in_child(path: Path) -> dict[str, Any]:
    """Scan in a child: its verdict, pickles run, and how much its peak RSS grew (KiB; the peak
    working set on Windows)."""
    out = subprocess.run([sys.executable, "-c", SCAN_IN_CHILD, str(path)], capture_output=True, text=True,
                         timeout=60, check=True, stdin=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_the_issues_gzip_tar_of_proto_marks_and_zeros(tmp_path: Path) -> None:
    """The issue's input: a gzip of about 200 KB holding a tar whose member holds 10,000 PROTO marks
    and 200 MiB of zeros. It inflates past its budget: an error in bounded memory, not a hang."""
    head, zeros = tar_of_marks_and_zeros("storages")
    data = compress_stream("gzip", head, zeros)
    header = tarfile.TarInfo.frombuf(zlib.decompressobj(31).decompress(data, 512), "utf-8", "strict")
    assert (header.name, header.size) == ("storages", 20_000 + 200 * MiB)
    assert len(data) < 400 * 1024
    result = scan_in_child(write(tmp_path, "marks.tar.gz", data))
    assert result["verdict"] == "error", result
    assert any(rule == "MK-P004" and "exceeds a resource bound" in msg for rule, msg in result["findings"]), result
    assert result["grown_kb"] < 200 * 1024, result


@pytest.mark.parametrize("name", ["storages", "junk"])
def test_tar_of_proto_marks_and_zeros_on_disk(tmp_path: Path, name: str) -> None:
    """The same tar, not compressed (200 MiB, sparse on disk): torch reads the member's first pickle
    only ('storages'; it stops at the first zero byte) or nothing ('junk'), and so does the scan:
    one pickle run, the zeros never read."""
    head, zeros = tar_of_marks_and_zeros(name)
    path = tmp_path / "marks.tar"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + zeros)  # the zeros: a hole in the file
    result = scan_in_child(path)
    assert result["verdict"] == ("error" if name == "storages" else "safe"), result
    assert result["pickles"] <= 1, result
    assert result["grown_kb"] < 100 * 1024, result


def _storages_of_many_pickles(n: int) -> bytes:
    count = b"\x80\x02J" + n.to_bytes(4, "little") + b"."
    # (1, 'cpu', torch.FloatStorage), then an element count of 0
    one = b"\x80\x02K\x01X\x03\x00\x00\x00cpuctorch\nFloatStorage\n\x87." + bytes(8)
    return count + one * n + b"\x80\x02]."


def test_tar_pickle_count_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tarscan, "MAX_PICKLES", 100)
    path = write(tmp_path, "many.tar", tar_bytes([("storages", _storages_of_many_pickles(1000))]))
    report = modelkit.scan(path).files[0]
    assert report.verdict == "error" and any(f.rule == "MK-P004" for f in report.findings), _describe(report)
    assert report.pickles_scanned <= 101


def test_tar_pickle_bytes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'pickle' member of 400 KB against a budget of 64 KiB: the VM never runs past the budget."""
    monkeypatch.setattr(tarscan, "PICKLE_BUDGET", 64 * 1024)
    big = b"\x80\x02(" + b"K\x01" * 200_000 + b"l."
    path = write(tmp_path, "big.tar", tar_bytes([("storages", _storages_of_many_pickles(1)),
                                                 ("tensors", b"\x80\x02K\x00."), ("pickle", big)]))
    report = modelkit.scan(path).files[0]
    assert report.verdict == "error" and any(f.rule == "MK-P004" for f in report.findings), _describe(report)


def test_tar_member_count_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tarscan, "MAX_MEMBERS", 100)
    path = write(tmp_path, "members.tar", tar_bytes([(f"m{i}", b"x") for i in range(150)]))
    report = modelkit.scan(path).files[0]
    assert any(f.rule == "MK-P004" and "exceeds a resource bound" in f.message for f in report.findings), \
        _describe(report)


def test_tar_header_records_are_read_within_a_bound(tmp_path: Path) -> None:
    """A PAX record of 2 MiB (tarfile reads a record whole) is not read into memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("storages")
        info.pax_headers = {"comment": "x" * (2 * MiB)}
        tf.addfile(info, io.BytesIO(b""))
    path = write(tmp_path, "pax.tar", buf.getvalue())
    report = modelkit.scan(path).files[0]
    assert any(f.rule == "MK-P004" and "header record" in f.message for f in report.findings), _describe(report)


# -- safetensors ----------------------------------------------------------------------------------


def test_safetensors_polyglot_probe_reads_the_head_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8 MiB safetensors file: the pickle probe of byte 0 sees 64 KiB of it, not the file."""
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "big.safetensors"
    save_file({"w": np.ones(2 * MiB, dtype=np.float32)}, str(path))
    seen: list[int] = []
    real = safetensors_file.probe

    def counting(data: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(safetensors_file, "probe", counting)
    with open_raw(path) as mf:
        assert list(mf) == ["w"]
    assert seen and max(seen) <= safetensors_file.POLYGLOT_HEAD


@pytest.fixture(autouse=True)
def _no_stray_tracemalloc() -> Iterator[None]:
    yield
    if tracemalloc.is_tracing():
        tracemalloc.stop()
