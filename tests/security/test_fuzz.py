"""Property tests: hostile or broken input never crashes, never hangs, and is never called safe.

Three surfaces see attacker bytes first: the pickle VM, the zip central-directory parser and the
scanner that drives both. For random and mutated inputs:

* the VM ends in a value or a ``PickleError`` (nothing else), within small resource bounds;
* the zip parser ends in a directory or a ``ModelkitError``, and so do member reads and the
  anomaly check;
* ``modelkit.scan`` never answers ``safe`` for a stream the VM cannot run to its end.

Mutations start from real pickles (plain data in every protocol, tensors, torch legacy streams)
and from the hostile fixtures, so they reach deep into the opcode handlers. Nothing here
unpickles with the real ``pickle`` module.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelkit
from fixtures import hostile
from modelkit.errors import ModelkitError
from modelkit.formats.pickle_vm import PICKLE_OPCODES, Limits, PickleError, PickleVM
from modelkit.formats.unpickler import collect, make_policy
from modelkit.formats.zipdir import anomalies, read_directory, read_member
from modelkit.model import Source

#: Bounds small enough that no example can run long, large enough for every seed to parse.
SMALL = Limits(max_ops=20_000, max_stack=5_000, max_marks=1_000, max_memo=5_000, max_objects=50_000,
               max_long_bytes=1_024, max_container_items=50_000)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MARKER = "/nonexistent/modelkit-fuzz-marker"  # hostile seeds are only parsed, never run


def _seed_pickles() -> list[bytes]:
    values: list[Any] = [None, True, 7, -(2**70), 1.5, "text", b"raw", [1, [2, (3,)]], {"a": {1, 2}},
                         frozenset({"x"}), bytearray(b"ab"), {"nested": {"deeper": ["v", 2.0]}}]
    seeds = [pickle.dumps(v, protocol=p) for v in values for p in range(6)]
    seeds += [pickle.dumps(torch.arange(6, dtype=torch.float32).reshape(2, 3), protocol=p) for p in (2, 4)]
    seeds += [pickle.dumps({"w": torch.ones(2, dtype=torch.float16)}, protocol=2)]
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    seeds.append(legacy.getvalue())
    seeds += [make(MARKER) for make in hostile.PAYLOADS.values()]
    seeds += [hostile.nested_load_from_bytes(MARKER), hostile.after_error(MARKER), hostile.concatenated(MARKER)]
    return seeds


SEEDS = _seed_pickles()


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few byte-level mutations: flips, inserts, deletions, truncation, splices."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if not data:
            break
        i = draw(st.integers(min_value=0, max_value=len(data) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice", "opcode"]))
        if op == "flip":
            data[i] = draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(min_value=1, max_value=8))]
        elif op == "truncate":
            del data[i:]
        elif op == "splice":
            j = draw(st.integers(min_value=0, max_value=len(data) - 1))
            data[i:i] = data[j : j + draw(st.integers(min_value=1, max_value=16))]
        else:
            data[i:i] = bytes([draw(st.sampled_from(sorted(PICKLE_OPCODES)))])
    return bytes(data)


#: Opcode soup: a PROTO header, then valid opcodes interleaved with random argument bytes.
opcode_soup = st.builds(
    lambda proto, parts: bytes([0x80, proto]) + b"".join(parts),
    st.integers(min_value=0, max_value=5),
    st.lists(st.one_of(st.sampled_from(sorted(PICKLE_OPCODES)).map(lambda c: bytes([c])), st.binary(max_size=6)),
             max_size=60),
)

any_stream = st.one_of(st.binary(max_size=300), mutated(SEEDS), opcode_soup)


def run_vm(data: bytes, limits: Limits | None = SMALL) -> tuple[bool, list[tuple[str, str, int]]]:
    """Run the scanner-mode VM; returns (ran to STOP, refused globals). Only PickleError may escape.

    ``limits=None`` uses the scanner's own bounds (the inputs here are small, so still quick).
    """
    found: list[tuple[str, str, int]] = []
    vm = PickleVM(data, make_policy(collect(found), None), limits=limits)
    try:
        vm.run()
        ok = True
    except PickleError as exc:
        assert exc.kind in ("format", "truncated", "limit", "unsafe"), exc.kind
        assert isinstance(exc.offset, int)
        ok = False
    # bounded work, not seconds (timed asserts flake on loaded machines): the op budget held
    assert vm.ops <= (limits or Limits()).max_ops + 1
    return ok, found


@FUZZ
@given(data=any_stream)
def test_vm_ends_in_a_value_or_a_pickle_error(data: bytes) -> None:
    """Random, mutated and opcode-soup streams: the VM returns or raises PickleError, quickly."""
    run_vm(data)


@FUZZ
@given(payload=st.sampled_from(sorted(hostile.PAYLOADS)), cut=st.integers(min_value=1, max_value=2),
       tail=st.binary(max_size=100))
def test_garbage_after_a_payload_never_hides_it(workdir: Path, payload: str, cut: int, tail: bytes) -> None:
    """Broken pickles (nullifAI, Hide-and-Seek EOP): whatever follows a payload, the scan says unsafe."""
    whole = hostile.PAYLOADS[payload](MARKER)
    if payload == "inst":
        cut = 1  # INST names its global in its own argument lines, right before STOP
    data = whole[: len(whole) - cut] + tail  # drop STOP (and maybe the call), append anything
    ok, found = run_vm(data, None)
    assert found, "the VM lost the payload's global"
    assert _scan_bytes(workdir, data) == "unsafe"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _scan_bytes(workdir: Path, data: bytes, name: str = "fuzz.pkl") -> str:
    path = workdir / name
    path.write_bytes(data)
    report = modelkit.scan(path).files[0]
    assert report.verdict in ("safe", "suspicious", "unsafe", "error")
    return report.verdict


@FUZZ
@given(data=any_stream)
def test_scan_never_calls_an_unparseable_stream_safe(workdir: Path, data: bytes) -> None:
    """If the VM cannot run the stream to STOP, or meets a refused global, the scan is not 'safe'."""
    if not data:
        return
    ok, found = run_vm(data, None)
    verdict = _scan_bytes(workdir, data)
    if not ok:
        assert verdict != "safe", "an unparseable stream was called safe"
    if found:
        assert verdict != "safe", f"refused globals {found[:3]} but the scan said safe"


@FUZZ
@given(data=any_stream)
def test_safe_reader_raises_only_modelkit_errors(workdir: Path, data: bytes) -> None:
    """open_model on junk raises a ModelkitError (one line for the CLI), never a raw exception."""
    if not data:
        return
    path = workdir / "open.bin"
    path.write_bytes(data)
    try:
        with modelkit.open_model(path) as mf:
            for ref in list(mf.tensors.values())[:4]:
                ref.read_raw()
    except ModelkitError:
        pass


# -- the zip parser --------------------------------------------------------------------------------


@st.composite
def zip_archives(draw: st.DrawFn) -> bytes:
    """A small zip written by zipfile: torch-like members, stored or deflated, optional comment."""
    names = draw(st.lists(st.sampled_from(["archive/data.pkl", "archive/version", "archive/byteorder",
                                           "archive/data/0", "archive/data/1", "other/x.npy", "w.npy"]),
                          min_size=1, max_size=5, unique=True))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in names:
            method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
            payload = pickle.dumps({"k": 1}, protocol=2) if name.endswith(".pkl") else draw(st.binary(max_size=64))
            z.writestr(zipfile.ZipInfo(name), payload, compress_type=method)
        z.comment = draw(st.binary(max_size=8))
    return buf.getvalue()


@st.composite
def mutated_zips(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(zip_archives()))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if len(data) < 2:
            break
        i = draw(st.integers(min_value=0, max_value=len(data) - 1))
        op = draw(st.sampled_from(["flip", "flip", "insert", "delete", "truncate", "field"]))
        if op == "flip":
            data[i] = draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(min_value=1, max_value=8))]
        elif op == "truncate":
            del data[max(i, 1):]
        else:  # overwrite a 4-byte field with an extreme value (sizes, offsets, counts)
            data[i : i + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\x00\x00"]))
    return bytes(data)


@FUZZ
@given(data=mutated_zips())
def test_zip_parser_ends_in_a_directory_or_a_modelkit_error(workdir: Path, data: bytes) -> None:
    """read_directory / read_member / anomalies on mutated zips: only ModelkitError, never a hang."""
    path = workdir / "fuzz.zip"
    path.write_bytes(data)
    src = Source(path)
    try:
        zd = read_directory(str(path), src)
        anomalies(zd, "archive/")
        anomalies(zd, None, allow_compressed=True)
        for entry in zd.entries[:8]:
            try:
                read_member(str(path), src, entry, limit=1 << 20)
            except ModelkitError:
                pass
    except ModelkitError:
        pass
    finally:
        src.close()


@FUZZ
@given(data=mutated_zips())
def test_scan_never_calls_an_unreadable_zip_safe(workdir: Path, data: bytes) -> None:
    """If our own zip parser rejects the archive, the scan cannot say 'safe'."""
    path = workdir / "scan.zip"
    path.write_bytes(data)
    src = Source(path)
    try:
        read_directory(str(path), src)
        readable = True
    except ModelkitError:
        readable = False
    finally:
        src.close()
    verdict = _scan_bytes(workdir, data, "scan.zip")
    if not readable:
        assert verdict != "safe"
