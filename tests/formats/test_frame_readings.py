"""The VM's two readings of FRAMEs, checked against CPython's C unpickler on generated streams.

CPython reads a pickle contiguously from ``bytes`` (``pickle.loads``) but, from a file object
without ``peek`` (``io.BytesIO``: how torch reads zip members and nested ``_load_from_bytes``
streams), a read that runs past the end of a frame's buffer drops the rest of that buffer and
reads on after the frame. ``PickleVM(drop_frames=False)`` must decode every stream as
``pickle.loads`` does and ``PickleVM(drop_frames=True)`` as ``pickle.load(io.BytesIO(...))`` does:
same value or both an error, and the same end position.

The streams hold data opcodes only (no GLOBAL, no REDUCE), and CPython still runs in a child
process, as everywhere in this suite: under every CPython 3.10–3.13 on the machine
(``tests/cpythons.py``), since ``_pickle.c`` changes between releases.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from typing import Any

import pytest

from modelkit.formats.pickle_vm import PickleError, PickleVM, Policy
from tests.cpythons import interpreters

CHILD = r"""
import io, json, pickle, sys
try:  # misread lengths make CPython allocate gigabytes (memo, buffers): fail those fast instead
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
except (ImportError, ValueError, OSError):
    pass


class Refuse(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError("no globals here")


out = []
for hexdata in json.load(sys.stdin):
    data = bytes.fromhex(hexdata)
    row = []
    for mode in ("loads", "bytesio"):
        try:
            if mode == "loads":  # a buffer that peek() shows whole: pickle.loads' contiguous reading
                value, end = Refuse(io.BufferedReader(io.BytesIO(data), 1 << 20)).load(), None
            else:
                f = io.BytesIO(data)
                value = Refuse(f).load()
                end = f.tell()
            row.append(["ok", repr(value), end])
        except Exception as exc:
            row.append(["error", type(exc).__name__, None])
    out.append(row)
json.dump(out, sys.stdout)
"""


def _no_globals(module: str, name: str, offset: int) -> Any:
    # a misaligned reading can decode a GLOBAL from data bytes; the child refuses globals too
    raise PickleError("no globals here", offset)


def _ours(data: bytes, drop: bool) -> list[Any]:
    vm = PickleVM(data, Policy(find_global=_no_globals, on_unsafe=lambda m, o, k: None), drop_frames=drop)
    try:
        value = vm.run()
    except PickleError:
        return ["error", None, None]
    return ["ok", repr(value), vm.end_pos]


def _op(rng: random.Random) -> bytes:
    """One data opcode with its argument."""
    kind = rng.randrange(8)
    if kind == 0:
        raw = rng.choice([b"", b"a", b"hello", b"x" * rng.randrange(1, 40), b"q.\n0"])
        return b"X" + struct.pack("<I", len(raw)) + raw
    if kind == 1:
        raw = bytes(rng.randrange(97, 123) for _ in range(rng.randrange(0, 12)))
        return b"\x8c" + bytes([len(raw)]) + raw
    if kind == 2:
        return b"K" + bytes([rng.randrange(256)])
    if kind == 3:
        return b"J" + struct.pack("<i", rng.randrange(-(2**31), 2**31))
    if kind == 4:
        return b"I" + str(rng.randrange(-999, 999)).encode() + b"\n"
    if kind == 5:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 10)))
        return b"C" + bytes([len(raw)]) + raw
    if kind == 6:
        return b"N"
    return b"V" + "".join(rng.choice("abc") for _ in range(rng.randrange(0, 6))).encode() + b"\n"


def _stream(rng: random.Random) -> bytes:
    """A list of data opcodes with FRAMEs of random (often lying) lengths between them."""
    ops = [_op(rng) for _ in range(rng.randrange(1, 12))]
    body = b""
    for op in ops:
        if rng.random() < 0.35:
            rest = sum(len(o) for o in ops)
            body += b"\x95" + struct.pack("<Q", rng.randrange(0, rest + 4))
        body += op
    tail = b"" if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
    return b"\x80\x04(" + body + b"l." + tail


def test_interpreters_include_this_one() -> None:
    assert interpreters()[0][0] == "{}.{}".format(*sys.version_info[:2])


@pytest.mark.parametrize("version,exe", interpreters(), ids=[v for v, _ in interpreters()])
def test_both_frame_readings_match_cpython(version: str, exe: str) -> None:
    rng = random.Random(1303)
    streams = [_stream(rng) for _ in range(3000)]
    proc = subprocess.run([exe, "-I", "-c", CHILD], input=json.dumps([s.hex() for s in streams]),
                          capture_output=True, text=True, timeout=300, check=True)
    cpython = json.loads(proc.stdout)
    differ = 0
    kinds = {"loads": 0, "bytesio": 0}
    compared = 0
    for data, (loads, bytesio) in zip(streams, cpython):
        if "MemoryError" in (loads[1], bytesio[1]):
            continue  # CPython ran out of the child's 1 GiB; the VM models no allocator
        compared += 1
        mine_c, mine_d = _ours(data, False), _ours(data, True)
        if loads[0] != bytesio[0] or loads[1] != bytesio[1]:
            differ += 1  # the two CPython readings part: the case this test is about
        for (status, value, end), expected, mode in ((mine_c, loads, "loads"), (mine_d, bytesio, "bytesio")):
            assert status == expected[0], f"{mode}: CPython {expected} vs ours {status} on {data.hex()}"
            if status == "ok":
                assert value == expected[1], f"{mode}: CPython {expected[1]} vs ours {value} on {data.hex()}"
                if mode == "bytesio":
                    assert end == expected[2], f"end: CPython {expected[2]} vs ours {end} on {data.hex()}"
            kinds[mode] += status == "ok"
    # the generator reaches the interesting cases: readings that part, and enough that decode
    assert compared >= 2800, compared
    assert differ >= 200, differ
    assert kinds["loads"] >= 600 and kinds["bytesio"] >= 600, kinds


def _literal(rng: random.Random) -> bytes:
    alphabet = "0123456789" * 3 + " \t_+-xXoObBlLeE.\x00\x0b\x1c" + "\u0661"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 8)))
    return text.encode("utf-8")


def _text_ops(rng: random.Random) -> bytes:
    """INT, LONG, FLOAT, PUT and GET with random literals, as CPython's C string parsers see them."""
    kind = rng.randrange(4)
    lit = _literal(rng)
    if kind == 0:
        body = b"I" + lit + b"\n"
    elif kind == 1:
        body = b"L" + lit + rng.choice([b"", b"L"]) + b"\n"
    elif kind == 2:
        body = b"F" + lit + b"\n"
    else:  # PUT with one literal, GET with another: equal only where both parse to one index
        body = b"N" + b"p" + lit + b"\n" + b"0" + b"g" + _literal(rng) + b"\n"
    return b"(" + body + b"l."


@pytest.mark.parametrize("version,exe", interpreters(), ids=[v for v, _ in interpreters()])
def test_text_arguments_parse_as_cpython(version: str, exe: str) -> None:
    """INT/LONG/FLOAT/PUT/GET literals: NUL ends the C string, spaces and ``_`` and prefixes as
    PyLong_FromString takes them, non-ASCII digits refused; the same values or errors."""
    rng = random.Random(1313)
    streams = [_text_ops(rng) for _ in range(4000)]
    proc = subprocess.run([exe, "-I", "-c", CHILD], input=json.dumps([s.hex() for s in streams]),
                          capture_output=True, text=True, timeout=300, check=True)
    ok = 0
    for data, (loads, _bytesio) in zip(streams, json.loads(proc.stdout)):
        status, value, _end = _ours(data, False)
        assert status == loads[0], f"CPython {loads} vs ours {status} on {data!r}"
        if status == "ok":
            assert value == loads[1], f"CPython {loads[1]} vs ours {value} on {data!r}"
            ok += 1
    assert ok >= 500, ok  # enough literals parse for the comparison to mean something
