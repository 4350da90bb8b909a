"""Pre-0.4 tar checkpoints read another way than torch reads them (issue 13, section 3), as families.

``torch.load`` tries every file that is not a zip archive as a tar archive first
(``torch/serialization.py``: ``_legacy_load`` -> ``legacy_load``), and reads, from the last member
of each name: ``storages`` (a count pickle; per storage an args pickle ``(key, location, type)``,
an 8-byte element count and the raw bytes; then the ``storage_views`` pickle), ``tensors`` (a
count pickle; per tensor an args pickle, then ``ndim``, sizes, strides and an offset read with
struct) and ``pickle``. A scanner that reads each member as one pickle stream, or probes from
PROTO marks, misses the pickles that come after raw bytes (protocols 0 and 1 have no PROTO).

The families build such checkpoints opcode by opcode over protocols 0-4, number and types of
storages, member order, earlier members of the same name (torch reads the last), protocol-4
frames (torch reads ``storages`` unbuffered and skips the rest of a frame), and where the
payload sits. Every benign variant is loaded by torch in a child and must scan safe; every
hostile one is proven live in torch.load (weights_only=False) in a child, then must scan unsafe
with the payload found in the member torch reads, be refused by ``open_model``, and leave no
marker here. Nothing here unpickles hostile bytes in the test process.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

import modelkit
from tests.security.test_bypasses import (
    DICT,
    EMPTY_TUPLE,
    LIST,
    MARK,
    NONE,
    POP,
    REDUCE,
    STOP,
    TUPLE,
    TUPLE1,
    TUPLE2,
    TUPLE3,
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
    su,
    tar_bytes,
    u,
    write,
)

ROLES = ("storages", "tensors", "pickle")
NUMPY = {"FloatStorage": "<f4", "HalfStorage": "<f2", "ByteStorage": "|u1", "DoubleStorage": "<f8",
         "LongStorage": "<i8"}
POSITIONS = ("storages-count", "storage-args-first", "storage-args-last", "storage-views", "tensors-count",
             "tensor-args-last", "pickle")
ORDERS = (ROLES, ("pickle", "tensors", "storages"), ("tensors", "pickle", "storages"))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchOracle]:
    """One child process that runs torch.load (weights_only=False) on request."""
    pytest.importorskip("torch", reason="proving the payload runs in torch.load needs torch (the core install has none)")
    child = TorchOracle(tmp_path_factory.mktemp("tar-oracle"))
    yield child
    child.close()


# -- opcodes in each protocol -----------------------------------------------------------------------


def p_int(n: int, pr: int) -> bytes:
    """An int: INT (protocol 0) or BININT."""
    return b"I%d\n" % n if pr == 0 else b"J" + struct.pack("<i", n)


def p_str(s: str, pr: int) -> bytes:
    """A str: UNICODE (protocol 0), BINUNICODE, or SHORT_BINUNICODE (protocol 4)."""
    return line_unicode(s) if pr == 0 else (su(s) if pr >= 4 else u(s))


def p_global(module: str, name: str, pr: int) -> bytes:
    """GLOBAL, or STACK_GLOBAL from protocol 4."""
    return sglob(module, name) if pr >= 4 else glob(module, name)


def p_tuple(items: list[bytes], pr: int) -> bytes:
    """A tuple: TUPLE1-3 from protocol 2, else MARK ... TUPLE."""
    if pr >= 2 and len(items) <= 3:
        return b"".join(items) + (EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3)[len(items)]
    return MARK + b"".join(items) + TUPLE


def p_pickle(body: bytes, pr: int, frame_extra: bytes = b"") -> bytes:
    """A whole pickle: no PROTO below protocol 2; from protocol 4 in one FRAME, which may hold
    ``frame_extra`` bytes after STOP (a reader that drops the rest of a frame never sees them)."""
    if pr < 2:
        return body + STOP
    if pr < 4:
        return proto(pr) + body + STOP
    return proto(pr) + frame(len(body) + 1 + len(frame_extra)) + body + STOP + frame_extra


def payload(marker: str, pr: int) -> bytes:
    """``exec(<create marker>)``, its result popped: it runs before the pickle's own value."""
    return p_global("builtins", "exec", pr) + MARK + p_str(code_for(marker), pr) + TUPLE + REDUCE + POP


# -- checkpoints ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A tar checkpoint in torch's layout: one 6-element storage per type, one 2x3 tensor per
    storage, and a dict ``{t<i>: tensor}`` in the 'pickle' member."""

    protocol: int = 2
    types: tuple[str, ...] = ("FloatStorage",)
    payload_at: str | None = None
    marker: str = ""
    order: tuple[str, ...] = ROLES
    decoys: bool = False  # benign members of the same names before the real ones
    raw_junk: bool = False  # raw storage bytes that look like pickles (torch never unpickles them)
    junk_payload: bool = False  # ... one of them with the payload
    frame_extra: bytes = b""  # protocol 4: bytes after STOP inside the first storage's args frame
    storage_type: bytes | None = None  # the first storage's type, opcodes instead of torch.<Type>
    extra: tuple[tuple[str, bytes], ...] = field(default=())

    def pkl(self, body: bytes, where: str, frame_extra: bytes = b"") -> bytes:
        head = payload(self.marker, self.protocol) if where == self.payload_at else b""
        return p_pickle(head + body, self.protocol, frame_extra)

    def raw(self, i: int) -> bytes:
        """The storage's bytes: the tensor's 6 elements, then (``raw_junk``) bytes that look like
        pickles, a payload included, which torch never unpickles (the storage is longer than its tensor)."""
        data = (np.arange(6) + 10 * i).astype(NUMPY[self.types[i]]).tobytes()
        if self.raw_junk:
            body = payload(self.marker, 2) if self.junk_payload else glob("collections", "OrderedDict") + POP
            junk = b"\x80\x02" * 8 + p_pickle(body + NONE, 2) + b"(" * 100
            item = np.dtype(NUMPY[self.types[i]]).itemsize
            data += junk + b"\0" * (-len(junk) % item)
        return data

    def expected(self) -> dict[str, list[list[float]]]:
        return {f"t{i}": np.frombuffer(self.raw(i), NUMPY[t])[:6].reshape(2, 3).tolist()
                for i, t in enumerate(self.types)}

    def storages(self) -> bytes:
        pr, n = self.protocol, len(self.types)
        out = self.pkl(p_int(n, pr), "storages-count")
        for i, t in enumerate(self.types):
            where = "storage-args-first" if i == 0 else ("storage-args-last" if i == n - 1 else "")
            stype = self.storage_type if (i == 0 and self.storage_type is not None) else p_global("torch", t, pr)
            args = p_tuple([p_int(100 + i, pr), p_str("cpu", pr), stype], pr)
            out += self.pkl(args, where, self.frame_extra if i == 0 else b"")
            raw = self.raw(i)
            out += struct.pack("<q", len(raw) // np.dtype(NUMPY[t]).itemsize) + raw
        return out + self.pkl(MARK + LIST, "storage-views")

    def tensors(self) -> bytes:
        pr, n = self.protocol, len(self.types)
        out = self.pkl(p_int(n, pr), "tensors-count")
        for i in range(n):
            args = p_tuple([p_int(200 + i, pr), p_int(100 + i, pr), NONE], pr)
            out += self.pkl(args, "tensor-args-last" if i == n - 1 else "")
            out += struct.pack("<i", 2) + b"\0" * 4 + struct.pack("<2q", 2, 3) + struct.pack("<2q", 3, 1)
            out += struct.pack("<q", 0)
        return out

    def pickle(self) -> bytes:
        pr = self.protocol
        items = b""
        for i in range(len(self.types)):
            pid = b"P%d\n" % (200 + i) if pr == 0 else p_str(str(200 + i), pr) + b"Q"
            items += p_str(f"t{i}", pr) + pid
        return self.pkl(MARK + items + DICT, "pickle")

    def members(self) -> list[tuple[str, bytes]]:
        real = {"storages": self.storages(), "tensors": self.tensors(), "pickle": self.pickle()}
        out = list(self.extra)
        if self.decoys:
            benign = replace(self, payload_at=None, decoys=False, extra=(), frame_extra=b"", storage_type=None)
            out += [(name, getattr(benign, name)()) for name in self.order]
        return out + [(name, real[name]) for name in self.order]

    def tar(self) -> bytes:
        return tar_bytes(self.members())


def _loads_in_torch(paths: list[Path]) -> list[object]:
    """torch.load each benign file in one child; what it returned, as JSON (or the error's name)."""
    code = (
        "import json, sys, torch\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        r = torch.load(p, weights_only=False)\n"
        "        print(json.dumps({k: v.tolist() for k, v in r.items()}))\n"
        "    except Exception as exc:\n"
        "        print(json.dumps(type(exc).__name__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=120,
                         check=True, stdin=subprocess.DEVNULL)
    return [json.loads(line) for line in out.stdout.splitlines()]


#: The member torch < 0.4 wrote first (torch/serialization.py of that time); today's loader ignores it.
SYS_INFO = ("sys_info", pickle.dumps({"protocol_version": 1000, "little_endian": True,
                                      "type_sizes": {"short": 2, "int": 4, "long": 8}}, protocol=2))


def _benign_variants(marker: str) -> list[Checkpoint]:
    types = (("FloatStorage",), ("HalfStorage", "ByteStorage"), ("DoubleStorage", "FloatStorage", "LongStorage"))
    out = []
    for i, pr in enumerate((0, 1, 2, 3, 4)):
        out.append(Checkpoint(protocol=pr, types=types[i % 3], order=ORDERS[i % 3], decoys=i % 2 == 1,
                              raw_junk=i % 2 == 0, junk_payload=True, marker=marker, extra=(SYS_INFO,)))
    return out


def test_benign_checkpoints_load_in_torch_and_scan_safe(tmp_path: Path, marker: str) -> None:
    """The builder writes what torch's tar loader reads (values checked in a child), and the scanner
    follows it to the end: safe, with every pickle torch reads run. PROTO marks and a whole pickle
    with a payload in raw storage bytes are read by neither (torch leaves no marker)."""
    pytest.importorskip("torch", reason="the values are checked in torch (the core install has none)")
    variants = _benign_variants(marker)
    paths = [write(tmp_path, f"ok{i}.tar", c.tar()) for i, c in enumerate(variants)]
    loaded = _loads_in_torch(paths)
    for c, path, got in zip(variants, paths, loaded):
        assert got == c.expected(), f"{c}: torch read {got}"
        report = modelkit.scan(path).files[0]
        assert report.verdict == "safe", f"{c}: {_describe(report)}"
        assert report.pickles_scanned == 2 + 2 * len(c.types) + 2, f"{c}: {report.pickles_scanned} pickles"


def _hostile_family() -> list[tuple[str, int, int]]:
    return [(where, pr, i) for i, (where, pr) in enumerate((w, p) for w in POSITIONS for p in (0, 1, 2, 4))]


@pytest.mark.parametrize(("where", "protocol", "i"), _hostile_family(),
                         ids=[f"{w}-p{p}" for w, p, _ in _hostile_family()])
def test_payload_in_each_pickle_torch_reads(tmp_path: Path, marker: str, oracle: TorchOracle, where: str,
                                            protocol: int, i: int) -> None:
    """The payload in each pickle torch's tar loader reads, after raw bytes where it comes after them."""
    types = (("FloatStorage", "HalfStorage"), ("ByteStorage", "DoubleStorage", "FloatStorage"),
             ("LongStorage", "HalfStorage"))[i % 3]
    c = Checkpoint(protocol=protocol, types=types, payload_at=where, marker=marker, order=ORDERS[i % 3],
                   decoys=i % 2 == 1, raw_junk=i % 4 == 0)
    path = write(tmp_path, "evil.pt", c.tar())
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=oracle)
    report = assert_refused(path, marker, global_name="builtins.exec")
    role = {"storages": "storages", "storage": "storages", "tensors": "tensors", "tensor": "tensors"}.get(
        where.split("-")[0], "pickle")
    found = [f for f in report.findings if f.global_name == "builtins.exec"]
    assert any((f.member or "").endswith(f"tar:{role}") for f in found), _describe(report)


@pytest.mark.parametrize("where", ["storage-args-last", "storage-views", "tensors-count"])
def test_frame_rest_is_skipped_as_torch_reads_storages(tmp_path: Path, marker: str, oracle: TorchOracle,
                                                       where: str) -> None:
    """torch reads 'storages' from an unbuffered file: after a FRAME that runs past its STOP it
    reads on after the frame. The bytes in between look like an element count of 2**40 to a
    reader that goes on after STOP, which would then never find the payload."""
    c = Checkpoint(protocol=4, types=("FloatStorage", "FloatStorage"), payload_at=where, marker=marker,
                   frame_extra=struct.pack("<q", 1 << 40))
    path = write(tmp_path, "evil.pt", c.tar())
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=oracle)
    report = assert_refused(path, marker, global_name="builtins.exec")
    assert any(f.rule == "MK-P011" for f in report.findings), _describe(report)


def test_storage_type_with_an_unknown_element_size_fails_closed(tmp_path: Path, marker: str,
                                                                oracle: TorchOracle) -> None:
    """An allowed placeholder object given a ``_dtype`` by its BUILD state serves torch as a storage
    type; the element size, and so where torch reads next, is not the scanner's to guess."""
    namespace = p_global("argparse", "Namespace", 2) + EMPTY_TUPLE + b"\x81"  # NEWOBJ
    state = b"}" + p_str("_dtype", 2) + p_global("torch", "float32", 2) + b"sb"  # {"_dtype": torch.float32}, BUILD
    c = Checkpoint(types=("FloatStorage", "FloatStorage"), payload_at="storage-args-last", marker=marker,
                   storage_type=namespace + state)
    path = write(tmp_path, "evil.pt", c.tar())
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=oracle)
    report = assert_refused(path, marker)
    assert any(f.rule == "MK-A001" for f in report.findings), _describe(report)


def test_torch_stops_where_the_scan_stops(tmp_path: Path, marker: str, oracle: TorchOracle) -> None:
    """``torch.UntypedStorage`` has no ``_dtype``: torch raises before reading on, so a pickle after
    it never runs (proven in torch), and the scan, which follows torch, does not call it unsafe."""
    c = Checkpoint(types=("FloatStorage", "FloatStorage"), payload_at="storage-views", marker=marker,
                   storage_type=glob("torch", "UntypedStorage"))
    path = write(tmp_path, "odd.pt", c.tar())
    oracle.run("torch", path)
    assert not os.path.exists(marker), "torch ran a pickle after its tar loader failed"
    report = modelkit.scan(path).files[0]
    assert report.verdict == "safe", _describe(report)


def _link_tar(members: list[tuple[str, bytes]], link: tarfile.TarInfo, after: list[tuple[str, bytes]]) -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        tf.addfile(link)
        for name, data in after:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["symlink-outside", "hardlink"])
def test_storages_member_that_is_a_link(tmp_path: Path, marker: str, oracle: TorchOracle, kind: str) -> None:
    """'storages' as a link: torch extracts it and reads what it points to, a file outside the archive
    (a symlink, on Pythons whose tarfile extracts links as they are) or another member (a hard link)."""
    evil = Checkpoint(payload_at="storages-count", marker=marker)
    good = Checkpoint()
    link = tarfile.TarInfo("storages")
    if kind == "symlink-outside":
        if sys.platform == "win32" and not _can_symlink(tmp_path):
            pytest.skip("creating a symlink needs a privilege on Windows (admin or Developer Mode), which this "
                        "session lacks: torch cannot extract the link")
        outside = write(tmp_path, "elsewhere.bin", evil.storages())
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        data = _link_tar([], link, [("tensors", good.tensors()), ("pickle", good.pickle())])
    else:
        link.type, link.linkname = tarfile.LNKTYPE, "x"
        data = _link_tar([("x", evil.storages())], link, [("tensors", good.tensors()), ("pickle", good.pickle())])
    path = write(tmp_path, "evil.pt", data)
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=oracle)
    report = assert_refused(path, marker)
    assert any(f.rule == "MK-A001" for f in report.findings), _describe(report)


def _can_symlink(folder: Path) -> bool:
    try:
        os.symlink(folder / "target", folder / "probe-link")
    except OSError:
        return False
    os.unlink(folder / "probe-link")
    return True


def test_members_torch_never_reaches_still_get_read_up_to_the_failure(tmp_path: Path, marker: str,
                                                                       oracle: TorchOracle) -> None:
    """Only 'storages': torch runs its pickles, then fails to find 'tensors'."""
    c = Checkpoint(types=("FloatStorage", "ByteStorage"), payload_at="storage-views", marker=marker)
    path = write(tmp_path, "evil.pt", tar_bytes([("storages", c.storages())]))
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def test_tar_whose_first_member_name_is_a_pickle(tmp_path: Path, marker: str) -> None:
    """A tar archive is bytes from byte 0 too: a first member named with a protocol-0 pickle is a
    valid tar to tarfile and a payload to ``pickle.load`` (fickling's tar polyglot)."""
    def member_name(command: str) -> str:
        return (glob("os", "system") + MARK + line_unicode(command) + TUPLE + REDUCE + STOP).decode()

    name = member_name(f"touch {marker}")
    if sys.platform == "win32" or len(name) > 100:
        # a ustar name holds 100 bytes (temp folders are long on macOS), and cmd.exe has no touch:
        # then the marker's name relative to the loader's cwd (tmp_path)
        name = member_name("type nul > PWNED" if sys.platform == "win32" else "touch PWNED")
    assert len(name) <= 100
    good = Checkpoint()
    data = tar_bytes([(name, b"x")] + good.members())
    assert data.startswith(name.encode())
    path = write(tmp_path, "evil.tar", data)
    assert_live(None, tmp_path, marker, "pickle", path=path)
    assert_refused(path, marker, global_name="os.system")


def test_a_hostile_member_of_the_same_name_that_torch_skips_is_still_flagged(tmp_path: Path, marker: str) -> None:
    """Two 'storages' members: torch reads the last (benign); the first, hostile one, is what an
    extractor that keeps the first, or a scanner that reads the first, sees. Not safe."""
    evil = Checkpoint(payload_at="storages-count", marker=marker)
    good = Checkpoint()
    path = write(tmp_path, "evil.pt", tar_bytes([("storages", evil.storages())] + good.members()))
    report = modelkit.scan(path).files[0]
    assert report.verdict == "unsafe", _describe(report)


COMPRESS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize(("wrapper", "where"), [(w, p) for w in COMPRESS for p in ("storage-args-last", "pickle")])
def test_compressed_tar_checkpoint(tmp_path: Path, marker: str, oracle: TorchOracle, wrapper: str,
                                   where: str) -> None:
    """A tar checkpoint in a gzip/bzip2/xz wrapper (decompressed, it is the file torch.load runs)."""
    c = Checkpoint(protocol=1, types=("HalfStorage", "FloatStorage"), payload_at=where, marker=marker)
    raw = write(tmp_path, "evil.tar", c.tar())
    assert_live(None, tmp_path, marker, "torch", path=raw, oracle=oracle)
    assert_refused(write(tmp_path, f"evil.tar.{wrapper}", COMPRESS[wrapper](c.tar())), marker,
                   global_name="builtins.exec")
