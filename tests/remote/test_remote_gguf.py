"""Remote GGUF files are scanned and inspected by ranges: the header, and as far as a pickle VM gets
from byte 0 (torch.load would unpickle a GGUF), never the whole file. Verdicts equal the local
scans of the same bytes, for valid files, every broken-header variant, and pickles that run from
byte 0 across the read windows' edges.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub  # noqa: F401 - the [remote] extra: a core install skips this module
import numpy as np
import pytest

import modelkit
import modelkit.remote as remote
from fixtures.http_server import Loopback, serve
from modelkit.remote.source import RemoteBytes, RemoteSource
from modelkit.scan.engine import scan_file
from tests.formats.test_gguf import _variants, build
from tests.remote.test_remote_scan import _comparable

MB = 1 << 20


def _pickle_from_byte0(pad: int, marker: str) -> bytes:
    """A GGUF magic (BINFLOAT and its 8 bytes), ``pad`` bytes of BINBYTES, a POP, then a call of
    os.system: the GLOBAL's lines land ``pad`` bytes on, across a read window's edge for some pads."""
    head = b"GGUF" + struct.pack("<I", 3) + b"\x00"
    call = b"cos\nsystem\n(S'touch " + marker.encode() + b"'\ntR."
    return head + b"B" + struct.pack("<I", pad) + b"\x07" * pad + b"0" + call + b"\0" * 4096


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gguf")
    out: dict[str, str] = {}
    # a valid GGUF with 24 MB of tensor data behind a small header
    big = root / "big.gguf"
    big.write_bytes(build([(f"blk.{i}.weight", [1024, 1024], 1, i * 2 * MB) for i in range(12)],
                          data=np.random.default_rng(0).integers(0, 255, 24 * MB, dtype=np.uint8).tobytes()))
    out["/big.gguf"] = str(big)
    for name, data in _variants().items():
        p = root / f"{name}.gguf"
        p.write_bytes(data)
        out[f"/v/{name}.gguf"] = str(p)
    # the BINBYTES ends 9 + 5 + pad bytes in; windows end at 128 KiB, then 384 KiB: straddle both
    for name, data in _long_reads().items():
        p = root / f"{name}.gguf"
        p.write_bytes(data)
        out[f"/long/{name}.gguf"] = str(p)
    for edge in (128 << 10, 384 << 10):
        for back in (-3, 0, 1, 2, 4, 5, 9, 14):
            pad = edge - 14 - back
            p = root / f"pickle-{edge}-{back}.gguf"
            p.write_bytes(_pickle_from_byte0(pad, str(root / "PWNED")))
            out[f"/p/{p.name}"] = str(p)
    return out


def _long_reads() -> dict[str, bytes]:
    """GGUF-looking files whose byte-0 pickle reads far (byte 9 is the attacker's, through the tensor count):
    a STOP then 8 MB of data, a text opcode with no end of line in 8 MB, and a BINBYTES8 of nearly the file."""
    head = b"GGUF" + struct.pack("<I", 3) + b"\x00"
    body = bytes(range(1, 256)).replace(b"\n", b"") * (8 * MB // 254)
    return {"stop-then-data": head + b"." + body,
            "text-without-newline": head + b"S'" + body,
            "binbytes8-of-the-file": head + b"\x8e" + struct.pack("<Q", len(body) - 16) + body}


@pytest.fixture(scope="module")
def server(files: dict[str, str]) -> Iterator[Loopback]:
    with serve(files) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(remote, "BASE_WAIT", 0.01)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


def test_remote_gguf_verdicts_equal_local_ones(server: Loopback, files: dict[str, str]) -> None:
    verdicts = set()
    for url_path, local in files.items():
        want = scan_file(local)
        server.reset_counts()
        got = scan_file(server.url + url_path)
        assert _comparable(got) == _comparable(want), url_path
        assert got.remote is not None and not got.remote["whole_file"], url_path
        if os.path.getsize(local) > MB and not url_path.startswith("/long/"):
            assert server.sent < os.path.getsize(local) // 2, url_path
        verdicts.add(want.verdict)
    assert verdicts == {"safe", "error", "unsafe"}


def test_a_big_gguf_is_scanned_and_inspected_from_its_header(server: Loopback, files: dict[str, str]) -> None:
    size = os.path.getsize(files["/big.gguf"])
    server.reset_counts()
    r = scan_file(server.url + "/big.gguf")
    assert (r.verdict, r.container) == ("safe", "gguf")
    assert r.remote is not None and r.remote["bytes"] == server.sent < size // 50, (server.sent, size)
    server.reset_counts()
    remote_info = modelkit.inspect(server.url + "/big.gguf").to_dict()
    local_info = modelkit.inspect(files["/big.gguf"]).to_dict()
    for key in ("path", "source", "file", "remote", "seconds"):
        remote_info.pop(key, None)
        local_info.pop(key, None)
    assert remote_info == local_info
    assert server.sent < size // 25


def test_remote_bytes_read_as_bytes_do(server: Loopback, files: dict[str, str]) -> None:
    """Index, slice and find agree with the local bytes at random places, including across windows."""
    local = Path(files["/p/pickle-131072-0.gguf"]).read_bytes()
    src = RemoteSource(server.url + "/p/pickle-131072-0.gguf")
    try:
        data = RemoteBytes(src)
        rng = np.random.default_rng(1)
        assert len(data) == len(local)
        for _ in range(200):
            a = int(rng.integers(0, len(local)))
            b = a + int(rng.integers(0, 300_000))
            assert data[a] == local[a] and data[-1 - a] == local[-1 - a]
            assert data[a:b] == local[a:b]
            for sub in (b"\n", b"cos", b"\x07\x07\x070", b"tR.", b"absent!"):
                assert data.find(sub, a, b) == local.find(sub, a, b), (sub, a, b)
        with pytest.raises(IndexError):
            data[len(local)]
    finally:
        src.close()


@pytest.mark.parametrize("name", sorted(_long_reads()))
def test_a_byte0_pickle_that_reads_on_stays_within_the_download_cap(server: Loopback, files: dict[str, str], name: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What the VM reads of a remote file counts against MODELKIT_REMOTE_MAX_DOWNLOAD: past it, the verdict is
    error (MK-R001, fail closed), never an unbounded download into memory; within it, the local verdict."""
    url_path = f"/long/{name}.gguf"
    local = scan_file(files[url_path])
    monkeypatch.setenv("MODELKIT_REMOTE_MAX_DOWNLOAD", str(2 * MB))
    server.reset_counts()
    got = scan_file(server.url + url_path)
    assert server.sent <= 3 * MB, server.sent  # the cap, the header's first fetch and one window at most
    if any(f.rule == "MK-R001" for f in got.findings):
        assert got.verdict == "error" and any("cap" in f.message for f in got.findings), got.findings
    else:
        assert _comparable(got) == _comparable(local)
    monkeypatch.delenv("MODELKIT_REMOTE_MAX_DOWNLOAD")
    assert _comparable(scan_file(server.url + url_path)) == _comparable(local)
