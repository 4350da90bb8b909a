"""Safetensors files that are also pickles from byte 0 (issue 13, section 3), as a family.

``torch.load`` unpickles any file that is not a zip archive, whatever its name (since torch 2.6 it
hands a path ending in ``.safetensors`` to the safetensors library, but not the same bytes named
``.ckpt``, nor a file object). A safetensors file starts with its header length, 8 bytes
little-endian, then the JSON header; with the length ``0x56 + 256 * k`` (``V`` then bytes that a
UNICODE line swallows), or one opcode and then ``V``, the JSON ending in ``\\n}`` (JSON allows the
whitespace) ends the line and pushes an empty dict, and the pickle goes on into the first tensor's
bytes, which hold the payload. The safetensors library reads the same file as tensors.

The family varies the opcodes before the line, the protocol of the payload, how many tensors
follow it and what the payload calls. Each file is proven a valid safetensors file (the
safetensors library reads it), proven live in ``pickle.loads`` and in ``torch.load`` of a copy
named ``.ckpt`` (both in a child), then must scan unsafe (rule MK-S002, the payload's global
reported) and be refused by the safetensors reader itself and by ``open_model``.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import modelkit
from modelkit.errors import UnsafeFileError
from modelkit.formats import open_model as open_raw
from modelkit.formats.safetensors_file import pickle_polyglot
from modelkit.model import MemorySource
from tests.security.test_bypasses import (
    MARK,
    POP,
    REDUCE,
    STOP,
    TUPLE,
    TorchOracle,
    _describe,
    assert_live,
    assert_refused,
    code_for,
    frame,
    glob,
    line_unicode,
    proto,
    sglob,
    shell_for,
    su,
    u,
    write,
)

#: Opcodes before the UNICODE line: each is the low byte of the header length, ``V`` the next.
PREFIXES = {"V-at-0": b"", "MARK": b"(", "NONE": b"N", "EMPTY_LIST": b"]", "EMPTY_TUPLE": b")", "NEWTRUE": b"\x88",
            "PROTO-2": proto(2)}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchOracle]:
    child = TorchOracle(tmp_path_factory.mktemp("st-oracle"))
    yield child
    child.close()


def payload(marker: str, protocol: int, target: str) -> bytes:
    """The bytes of the first tensor: a call that creates the marker, then STOP."""
    if target == "exec":
        func, arg = ("builtins", "exec"), code_for(marker)
    else:
        func, arg = ("os", "system"), shell_for(marker)
    if protocol == 0:
        return glob(*func) + MARK + line_unicode(arg) + TUPLE + REDUCE + STOP
    if protocol == 2:
        return glob(*func) + MARK + u(arg) + TUPLE + REDUCE + STOP
    body = sglob(*func) + MARK + su(arg) + TUPLE + REDUCE + STOP
    return proto(4) + frame(len(body)) + body


def polyglot(prefix: bytes, first: bytes, after: int = 0, seed: int = 0) -> bytes:
    """A valid safetensors file whose bytes from 0 are ``prefix``, a UNICODE line through the
    header, EMPTY_DICT, and then ``first`` (the first tensor, U8); ``after`` F16 tensors follow."""
    rng = np.random.default_rng(seed)
    tensors = [("first", "U8", [len(first)], first)]
    for i in range(after):
        data = rng.standard_normal(6).astype(np.float16).tobytes()
        tensors.append((f"w{i}", "F16", [2, 3], data))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()[:-1]  # without its closing brace
    head = prefix + b"V"
    assert len(head) <= 3
    low = int.from_bytes(head, "little")
    step = 1 << (8 * len(head))
    n = low + step * -(-(len(text) + 2 - low) // step)  # the smallest length >= len(text) + 2 that starts so
    body = text + b" " * (n - len(text) - 2) + b"\n}"
    out = struct.pack("<Q", n) + body + b"".join(t[3] for t in tensors)
    assert out.startswith(head)
    return out


def _family() -> list[tuple[str, int, str, int]]:
    out = []
    for i, name in enumerate(PREFIXES):
        for protocol in (0, 2, 4):
            out.append((name, protocol, ("exec", "system")[(i + protocol) % 2], (i + protocol) % 3))
    return out


@pytest.mark.parametrize(("prefix", "protocol", "target", "after"), _family(),
                         ids=[f"{p}-p{pr}-{t}-{a}" for p, pr, t, a in _family()])
def test_safetensors_that_is_also_a_pickle(tmp_path: Path, marker: str, oracle: TorchOracle, prefix: str,
                                           protocol: int, target: str, after: int) -> None:
    data = polyglot(PREFIXES[prefix], payload(marker, protocol, target), after)
    path = write(tmp_path, "model.safetensors", data)
    tensors = safetensors.numpy.load_file(str(path))  # a valid safetensors file (no pickle involved)
    assert sorted(tensors) == sorted(["first"] + [f"w{i}" for i in range(after)])
    assert_live(data, tmp_path, marker)  # pickle.loads, in a child
    assert_live(None, tmp_path, marker, "torch", path=write(tmp_path, "model.ckpt", data), oracle=oracle)
    report = assert_refused(path, marker, global_name="builtins.exec" if target == "exec" else "os.system")
    assert any(f.rule == "MK-S002" for f in report.findings), _describe(report)
    with pytest.raises(UnsafeFileError, match="also a pickle"):
        open_raw(path)  # the safetensors reader itself, not only the scan in front of open_model


def test_a_pickle_that_reaches_only_allowed_globals_is_still_a_polyglot(tmp_path: Path) -> None:
    """Any global counts, allowed or not: no ordinary header spells one."""
    first = glob("collections", "OrderedDict") + MARK + TUPLE + REDUCE + STOP
    path = write(tmp_path, "model.safetensors", polyglot(b"(", first))
    report = modelkit.scan(path).files[0]
    assert report.verdict == "unsafe" and any(f.rule == "MK-S002" for f in report.findings), _describe(report)
    with pytest.raises(UnsafeFileError):
        open_raw(path)


@pytest.mark.parametrize("first", [b"K\x07" + POP + STOP, b"N" + STOP], ids=["int", "none"])
def test_constant_pickles_are_not_reported(tmp_path: Path, first: bytes) -> None:
    """A pickle that only yields a constant runs nothing in any loader (torch.load then fails its
    magic-number check), and ordinary headers spell one by chance, so it is not a finding."""
    path = write(tmp_path, "model.safetensors", polyglot(b"", first))
    report = modelkit.scan(path).files[0]
    assert report.verdict == "safe", _describe(report)
    with open_raw(path) as mf:
        assert list(mf) == ["first"]


def test_ordinary_headers_are_not_polyglots() -> None:
    """Headers like real ones (dotted tensor names, any length) over float16 data: none is reported,
    although about one in 550 of them spells a pickle that runs to a STOP."""
    rng = random.Random(7)
    header = {"__metadata__": {"format": "pt"}}
    for i in range(40):
        header[f"model.diffusion_model.input_blocks.{i}.0.weight"] = {"dtype": "F16", "shape": [2],
                                                                      "data_offsets": [4 * i, 4 * i + 4]}
    text = json.dumps(header, separators=(",", ":")).encode()
    data = np.random.default_rng(7).normal(0, 0.05, 4096).astype(np.float16).tobytes()
    for _ in range(3000):
        n = rng.randint(len(text), 300_000)
        at = rng.randrange(0, len(data) - 200)
        src = MemorySource(struct.pack("<Q", n) + text + b" " * (n - len(text)) + data[at : at + 160], "x")
        assert pickle_polyglot(src) is None, n
