"""Published bypasses of pickle scanners, replayed against modelkit's scanner and safe reader.

Each test rebuilds one technique from an advisory or write-up (picklescan, modelscan and fickling
GHSAs, JFrog / Sonatype / ReversingLabs research, the Hide-and-Seek paper), opcode by opcode or
byte by byte. Every payload is harmless: it only creates the ``marker`` file (or removes a folder
made for the purpose). Where practical the payload is first proven live: the real loader it
targets (``pickle.loads``, ``torch.load``, ...) runs it in a child process and the marker appears.
Then ``modelkit.scan`` must call the file ``unsafe``, ``modelkit.open_model`` must refuse it, and
the marker must never appear in this process.

Nothing here calls ``pickle.loads`` on hostile data in the test process.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import marshal
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import modelkit
from fixtures import hostile
from modelkit.errors import FormatError, ModelkitError, UnsafeFileError
from modelkit.scan.report import FileReport
from tests.security.pickle_oracle import wait_readable

# -- opcodes -------------------------------------------------------------------------------------

MARK = b"("
STOP = b"."
POP = b"0"
POP_MARK = b"1"
DUP = b"2"
TUPLE = b"t"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
TUPLE3 = b"\x87"
EMPTY_TUPLE = b")"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
LIST = b"l"
DICT = b"d"
APPEND = b"a"
APPENDS = b"e"
SETITEM = b"s"
SETITEMS = b"u"
REDUCE = b"R"
BUILD = b"b"
NEWOBJ = b"\x81"
NEWOBJ_EX = b"\x92"
OBJ = b"o"
NONE = b"N"
NEWTRUE = b"\x88"
NEWFALSE = b"\x89"
STACK_GLOBAL = b"\x93"
MEMOIZE = b"\x94"


def proto(n: int) -> bytes:
    """PROTO n."""
    return b"\x80" + bytes([n])


def frame(size: int) -> bytes:
    """FRAME with a declared length (which may lie)."""
    return b"\x95" + struct.pack("<Q", size)


def u(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def su(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    raw = text.encode()
    assert len(raw) < 256
    return b"\x8c" + bytes([len(raw)]) + raw


def line_unicode(text: str) -> bytes:
    """Protocol-0 UNICODE (raw-unicode-escape, newline-terminated). A backslash is written as
    ``\\u005c``, as pickle's own writer does: one before ``u``/``U`` would start an escape (Windows
    paths: ``C:\\Users``)."""
    return b"V" + text.replace("\\", "\\u005c").encode("raw_unicode_escape") + b"\n"


def binbytes(data: bytes) -> bytes:
    """BINBYTES (protocol 3)."""
    return b"B" + struct.pack("<I", len(data)) + data


def binint1(n: int) -> bytes:
    """BININT1."""
    return b"K" + bytes([n])


def put(i: int) -> bytes:
    """BINPUT i."""
    return b"q" + bytes([i])


def get(i: int) -> bytes:
    """BINGET i."""
    return b"h" + bytes([i])


def glob(module: str, name: str) -> bytes:
    """GLOBAL (protocols 0-3)."""
    return b"c" + f"{module}\n{name}\n".encode()


def sglob(module: str, name: str) -> bytes:
    """STACK_GLOBAL with constant operands (protocol 4)."""
    return su(module) + su(name) + STACK_GLOBAL


def call(func: bytes, *args: bytes) -> bytes:
    """func(*args): MARK args TUPLE REDUCE."""
    return func + MARK + b"".join(args) + TUPLE + REDUCE


def strlist(*items: str) -> bytes:
    """A list of strings: MARK BINUNICODE... LIST."""
    return MARK + b"".join(u(i) for i in items) + LIST


def pkl(*parts: bytes, protocol: int = 2) -> bytes:
    """PROTO + parts + STOP."""
    return proto(protocol) + b"".join(parts) + STOP


def code_for(marker: str) -> str:
    """Python source that only creates the marker file."""
    return f"open({marker!r}, 'w').close()"


def shell_for(marker: str) -> str:
    """A shell command that only creates the marker file: ``touch`` for sh, ``type nul >`` for
    cmd.exe (what ``os.system`` and ``shell=True`` run on Windows, which has no touch)."""
    if sys.platform == "win32":
        return f'type nul > "{marker}"'
    return f"touch '{marker}'"


def touch_argv(marker: str) -> list[str]:
    """A program and its arguments that only create the marker file: ``touch``, or on Windows
    (no touch there) this Python running ``code_for``."""
    if sys.platform == "win32":
        return [sys.executable, "-c", code_for(marker)]
    return ["touch", marker]


def posix_only(why: str) -> pytest.MarkDecorator:
    """Skip on Windows a test whose payload runs on POSIX only, so cannot be shown live there (the
    scan that refuses it reads bytes, the same on every system)."""
    return pytest.mark.skipif(sys.platform == "win32", reason=f"{why}: the payload cannot be shown live on Windows")


def exec_call(marker: str) -> bytes:
    """``builtins.exec(<create marker>)``: the classic payload body, without PROTO or STOP."""
    return call(glob("builtins", "exec"), u(code_for(marker)))


def system_call(marker: str) -> bytes:
    """``os.system("touch marker")`` without PROTO or STOP."""
    return call(glob("os", "system"), u(shell_for(marker)))


# -- zip building (stored members, every field under control) -------------------------------------


@dataclass
class Member:
    """One stored zip member; every header field that the tests bend is explicit."""

    name: str
    data: bytes
    local_name: str | None = None
    flags: int = 0
    method: int = 0
    local_method: int | None = None
    crc: int | None = None


def zip_parts(members: list[Member], base: int = 0) -> tuple[bytes, bytes]:
    """Local records and central directory for ``members``, the first local record at ``base``."""
    local = b""
    central = b""
    for m in members:
        name = m.name.encode()
        lname = (m.local_name if m.local_name is not None else m.name).encode()
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        lmethod = m.method if m.local_method is None else m.local_method
        offset = base + len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, m.flags, lmethod, 0, 0x21, crc, len(m.data),
                             len(m.data), len(lname), 0) + lname + m.data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, m.flags, m.method, 0, 0x21, crc,
                               len(m.data), len(m.data), len(name), 0, 0, 0, 0, 0, offset) + name
    return local, central


def eocd(count: int, cd_size: int, cd_offset: int, comment: bytes = b"", comment_len: int | None = None) -> bytes:
    """An end-of-central-directory record; ``comment_len`` may lie about the comment."""
    n = len(comment) if comment_len is None else comment_len
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_offset, n) + comment


def build_zip(members: list[Member]) -> bytes:
    """A complete stored zip archive of ``members``."""
    local, central = zip_parts(members)
    return local + central + eocd(len(members), len(central), len(local))


def torch_members(data_pkl: bytes, prefix: str = "archive") -> list[Member]:
    """The members of a minimal torch zip archive (no storages)."""
    return [Member(f"{prefix}/data.pkl", data_pkl), Member(f"{prefix}/version", b"3\n"),
            Member(f"{prefix}/byteorder", b"little")]


BENIGN_PKL = pickle.dumps({"weight": 1}, protocol=2)  # a benign structure, pickled by the real writer


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive written by the tarfile module (torch < 0.4 checkpoints were tar files)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def legacy_stream(obj_pickle: bytes, magic_pickle: bytes | None = None) -> bytes:
    """A legacy torch.save stream whose object pickle is ``obj_pickle``."""
    buf = io.BytesIO()
    if magic_pickle is None:
        pickle.dump(0x1950A86A20F9469CFC6C, buf, protocol=2)
    else:
        buf.write(magic_pickle)
    pickle.dump(1001, buf, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, buf, protocol=2)
    buf.write(obj_pickle)
    pickle.dump([], buf, protocol=2)
    return buf.getvalue()


# -- liveness: run the real loader in a child process ---------------------------------------------

LOADERS = {
    "pickle": "import pickle, sys\n{setup}\npickle.loads(open(sys.argv[1], 'rb').read())\n",
    # torch legacy streams, and any loop of pickle.load over one file, read pickle after pickle
    "stream": "import pickle, sys\nf = open(sys.argv[1], 'rb')\nwhile True:\n    pickle.load(f)\n",
    "numpy": "import sys, numpy\nnumpy.load(sys.argv[1], allow_pickle=True)\n",
    "gzip": "import gzip, pickle, sys\npickle.load(gzip.open(sys.argv[1]))\n",
    "bz2": "import bz2, pickle, sys\npickle.load(bz2.open(sys.argv[1]))\n",
    "xz": "import lzma, pickle, sys\npickle.load(lzma.open(sys.argv[1]))\n",
}


def run_loader(path: Path, loader: str, setup: str = "") -> subprocess.CompletedProcess[str]:
    """Run a real loader on ``path`` in a child process (cwd = the file's folder); errors are ignored."""
    code = LOADERS[loader].format(setup=setup)
    return subprocess.run([sys.executable, "-c", code, str(path)], cwd=path.parent, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def _wait_for(path: str, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return os.path.exists(path)


class TorchOracle:
    """One long-lived child process that imports torch once and runs real loaders on request.

    Payloads run there, never in the test process; they only create per-test marker files, so
    sharing the child between tests is safe and saves a torch import per test.
    """

    SCRIPT = (
        "import pickle, sys, torch\n"
        "out, sys.stdout = sys.stdout, sys.stderr\n"
        "for line in sys.stdin:\n"
        "    mode, path = line.rstrip('\\n').split(' ', 1)\n"
        "    try:\n"
        "        if mode == 'torch':\n"
        "            torch.load(path, weights_only=False)\n"
        "        else:\n"
        "            pickle.loads(open(path, 'rb').read())\n"
        "    except BaseException:\n"
        "        pass\n"
        "    out.write('done\\n')\n"
        "    out.flush()\n"
    )

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], cwd=cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def run(self, mode: str, path: Path) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{mode} {path}\n")
        self.proc.stdin.flush()
        assert wait_readable(self.proc.stdout, 120), "the loader child did not answer"
        assert self.proc.stdout.readline() == "done\n", "the loader child died"

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def torch_oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchOracle]:
    pytest.importorskip("torch", reason="proving the payload runs in torch.load needs torch (the core install has none)")
    oracle = TorchOracle(tmp_path_factory.mktemp("oracle"))
    yield oracle
    oracle.close()


def assert_live(data: bytes | None, tmp_path: Path, marker: str, loader: str = "pickle", *, path: Path | None = None,
                setup: str = "", oracle: TorchOracle | None = None) -> None:
    """The payload really runs in the loader it targets: the marker appears; then it is removed.

    ``loader`` "torch" (torch.load, weights_only=False) needs ``oracle``; so does "pickle" when the
    payload imports torch (then pass ``oracle`` and it runs in the oracle's process).
    """
    if path is None:
        assert data is not None
        path = tmp_path / "live-copy.bin"
        path.write_bytes(data)
    detail = ""
    if oracle is not None:
        assert not setup and loader in ("torch", "pickle")
        oracle.run(loader, path)
    else:
        assert loader != "torch", "torch.load runs in the oracle"
        detail = run_loader(path, loader, setup).stderr[-800:]
    # payloads that start a program (asyncio, spawnv, imaplib) finish a moment after the loader
    assert _wait_for(marker), f"fixture payload is not live under {loader}: {detail}"
    time.sleep(0.05)
    os.unlink(marker)


# -- the modelkit side -------------------------------------------------------------------------------


def _describe(report: FileReport) -> str:
    """The findings of a report, one phrase each, for assertion messages."""
    return "; ".join(f"{f.rule} {f.message}" for f in report.findings) or "no findings"


def assert_refused(path: Path, marker: str | None = None, *, verdicts: tuple[str, ...] = ("unsafe",),
                   global_name: str | None = None) -> FileReport:
    """The scanner calls the file unsafe, the safe reader refuses it, and nothing ran."""
    report = modelkit.scan(path).files[0]
    assert report.verdict in verdicts, f"scan said {report.verdict!r}: {_describe(report)}"
    if global_name is not None:
        named = {f.global_name for f in report.findings} | set(report.globals_seen)
        assert global_name in named, f"{global_name} not reported: {_describe(report)}"
    try:
        model = modelkit.open_model(path)
    except ModelkitError as exc:
        assert isinstance(exc, (UnsafeFileError, FormatError)), repr(exc)
    else:
        model.close()
        pytest.fail(f"open_model read a hostile file without an error ({len(model)} tensors)")
    if marker is not None:
        assert not os.path.exists(marker), "a hostile payload was executed by modelkit"
    return report


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``tmp_path/name``."""
    path = tmp_path / name
    path.write_bytes(data)
    return path


def check_pickle(tmp_path: Path, marker: str, data: bytes, *, name: str = "evil.pkl", loader: str = "pickle",
                 setup: str = "", global_name: str | None = None, oracle: TorchOracle | None = None) -> FileReport:
    """Prove a plain-pickle payload live, then check that modelkit refuses it."""
    assert_live(data, tmp_path, marker, loader, setup=setup, oracle=oracle)
    return assert_refused(write(tmp_path, name, data), marker, global_name=global_name)


# =================================================================================================
# 1. Parser differentials: the scanner must read the stream exactly as CPython's C unpickler does
#    (https://github.com/python/cpython/blob/3.11/Modules/_pickle.c), or it misses what follows.
# =================================================================================================


@pytest.mark.parametrize("literal", [b"1_000", b"7 ", b"1\x00junk", b"0o17", b"0b11", b"\t5\t"],
                         ids=["underscore", "trailing-space", "embedded-nul", "octal-0o", "binary-0b", "tabs"])
def test_cpython_load_int_fallback_differential(tmp_path: Path, marker: str, literal: bytes) -> None:
    """INT literal that strtol rejects but PyLong_FromString accepts hides the payload after it (_pickle.c load_int)."""
    data = proto(2) + b"I" + literal + b"\n" + POP + exec_call(marker) + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_cpython_load_long_nul_differential(tmp_path: Path, marker: str) -> None:
    """LONG literal cut by a NUL byte (C string semantics) is valid for CPython; the payload follows (_pickle.c load_long)."""
    data = proto(2) + b"L5\x00junk\n" + POP + exec_call(marker) + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_cpython_load_float_nul_differential(tmp_path: Path, marker: str) -> None:
    """FLOAT literal cut by a NUL byte is valid for CPython's PyOS_string_to_double; the payload follows (_pickle.c load_float)."""
    data = proto(2) + b"F1.5\x00junk\n" + POP + exec_call(marker) + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_overlong_text_line_differential(tmp_path: Path, marker: str) -> None:
    """A protocol-0 text line longer than 1 MiB is fine for CPython's readline; the payload follows (_pickle.c _Unpickler_Readline)."""
    data = proto(2) + b"V" + b"a" * ((1 << 20) + 64) + b"\n" + POP + exec_call(marker) + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_oversized_long4_differential(tmp_path: Path, marker: str) -> None:
    """A 70 kB LONG4 integer is legal for CPython; a scanner bound on integer size must not end the scan before the payload."""
    data = proto(2) + b"\x8b" + struct.pack("<i", 70_000) + b"\x01" * 70_000 + POP + exec_call(marker) + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


@pytest.mark.parametrize("lie", ["zero", "short", "nested", "in-protocol-2"])
def test_frame_misuse(tmp_path: Path, marker: str, lie: str) -> None:
    """FRAME is only a prefetch hint for the C unpickler: lying, nested or protocol-2 frames still run the payload (PEP 3154)."""
    body = exec_call(marker)
    if lie == "zero":
        data = proto(4) + frame(0) + body + STOP
    elif lie == "short":
        data = proto(4) + frame(3) + body + STOP
    elif lie == "nested":
        data = proto(4) + frame(len(body) + 10) + frame(2) + body + STOP
    else:
        data = proto(2) + frame(len(body) + 1) + body + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_proto_opcode_in_the_middle(tmp_path: Path, marker: str) -> None:
    """PROTO may appear anywhere; a protocol-2 stream switches to 4 and uses STACK_GLOBAL (fickling test_pickle proto tricks)."""
    data = proto(2) + u("padding") + POP + proto(4) + sglob("builtins", "exec") + u(code_for(marker)) + TUPLE1 + REDUCE + proto(3) + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_picklescan_malicious6_second_pickle_after_stop(tmp_path: Path, marker: str) -> None:
    """A clean pickle, STOP, then a second pickle with the payload, read by any pickle.load loop (picklescan tests malicious6.pkl)."""
    data = pickle.dumps(["a", "b", "c"], protocol=4) + pkl(exec_call(marker), protocol=4)
    check_pickle(tmp_path, marker, data, loader="stream", global_name="builtins.exec")


@pytest.mark.parametrize("second", ["proto-1", "no-proto"])
def test_second_pickle_after_stop_with_unusual_opening(tmp_path: Path, marker: str, second: str) -> None:
    """The pickle after STOP opens with PROTO 1 or no PROTO at all; a loop of pickle.load still runs it (picklescan malicious6.pkl variant)."""
    tail = (proto(1) + exec_call(marker) + STOP) if second == "proto-1" else (
        sglob("builtins", "exec") + u(code_for(marker)) + TUPLE1 + REDUCE + STOP)
    data = pickle.dumps({"weight": 1}, protocol=2) + tail
    check_pickle(tmp_path, marker, data, loader="stream", global_name="builtins.exec")


def _ctf_issue22(marker: str) -> bytes:
    # https://github.com/mmaitre314/picklescan/issues/22 (ImaginaryCTF "Safe Pickle"), verbatim but for the command
    return b"".join([
        b"Vos\n", b"p2\n", POP, b"Vsystem\n", b"p3\n", POP, b"Vtorch\n", b"p0\n", POP, b"VLongStorage\n", b"p1\n", POP,
        b"g2\n", b"g3\n", STACK_GLOBAL, MARK, line_unicode(shell_for(marker)), TUPLE, REDUCE, STOP,
    ])


def _ghsa_9gvj(marker: str) -> bytes:
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-9gvj-pp9x-gcfr, verbatim but for the command
    command = shell_for(marker).encode().replace(b"\\", b"\\\\")  # STRING escapes as repr() does: Windows paths
    return b"S'os'\n" + b"S'system'\n" + STACK_GLOBAL + b'S"' + command + b'"\n' + TUPLE1 + REDUCE + STOP


NO_PROTO_OPENINGS: dict[str, Callable[[str], bytes]] = {
    "picklescan-issue-22": _ctf_issue22,
    "ghsa-9gvj-pp9x-gcfr": _ghsa_9gvj,
    "frame-first": lambda m: frame(len(exec_call(m)) + 1) + exec_call(m) + STOP,
    "short-binunicode-first": lambda m: sglob("builtins", "exec") + u(code_for(m)) + TUPLE1 + REDUCE + STOP,
    "proto-1": lambda m: proto(1) + exec_call(m) + STOP,
    "proto-0": lambda m: proto(0) + exec_call(m) + STOP,
}


@pytest.mark.parametrize("opening", sorted(NO_PROTO_OPENINGS))
def test_pickle_without_a_protocol_2_header_is_still_scanned(tmp_path: Path, marker: str, opening: str) -> None:
    """Published payloads (picklescan issue #22, GHSA-9gvj-pp9x-gcfr) start without PROTO 2+; pickle.loads runs them anyway."""
    data = NO_PROTO_OPENINGS[opening](marker)
    check_pickle(tmp_path, marker, data)


def test_ghsa_9gvj_pp9x_gcfr_string_operands_for_stack_global(tmp_path: Path, marker: str) -> None:
    """STACK_GLOBAL whose operands come from protocol-0 STRING opcodes (GHSA-9gvj-pp9x-gcfr), with a PROTO header."""
    data = proto(4) + _ghsa_9gvj(marker)
    check_pickle(tmp_path, marker, data, global_name="os.system")


# -- memo and MARK tricks ------------------------------------------------------------------------------


def test_picklescan_issue22_memo_decoy(tmp_path: Path, marker: str) -> None:
    """Names parked in the memo with PUT, harmless decoys pushed last, STACK_GLOBAL fed by GET (picklescan issue #22)."""
    check_pickle(tmp_path, marker, proto(4) + _ctf_issue22(marker), global_name="os.system")


def test_agent_bom_3326_memo_after_decoy_strings(tmp_path: Path, marker: str) -> None:
    """The STACK_GLOBAL operands come from memo GETs, not the last two string opcodes (msaad00/agent-bom#3326 memo evasion)."""
    data = (proto(4) + su("builtins") + MEMOIZE + POP + su("exec") + MEMOIZE + POP
            + su("torch") + su("FloatStorage") + POP + POP + get(0) + get(1) + STACK_GLOBAL
            + u(code_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_picklescan_keyerror_exploit(tmp_path: Path, marker: str) -> None:
    """The payload runs, then STACK_GLOBAL reads an undefined memo key and the stream fails (picklescan tests keyerror-exploit.pkl)."""
    data = (proto(4) + glob("os", "system") + line_unicode(shell_for(marker)) + TUPLE1 + REDUCE + POP
            + b"\x8c\x02os" + MEMOIZE + b"h\x03" + b"h\x00" + STACK_GLOBAL + binint1(0x42) + STOP)
    check_pickle(tmp_path, marker, data, global_name="os.system")


def test_picklescan_type_confusion_exploit(tmp_path: Path, marker: str) -> None:
    """The payload runs, then STACK_GLOBAL gets an int as module name (picklescan tests type-confusion-exploit.pkl)."""
    data = (proto(4) + glob("os", "system") + line_unicode(shell_for(marker)) + TUPLE1 + REDUCE + POP
            + b"J\x2a\x00\x00\x00" + MEMOIZE + b"\x8c\x02os" + MEMOIZE + get(0) + get(1) + STACK_GLOBAL
            + binint1(0x42) + STOP)
    check_pickle(tmp_path, marker, data, global_name="os.system")


def test_memo_slot_overwritten_between_put_and_get(tmp_path: Path, marker: str) -> None:
    """Memo slot 0 first holds an allowed module name, then is overwritten with the real one (memo shadowing)."""
    data = (proto(4) + su("torch") + put(0) + POP + su("Size") + put(1) + POP
            + su("builtins") + put(0) + POP + su("exec") + put(1) + POP
            + get(0) + get(1) + STACK_GLOBAL + u(code_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_memoize_index_follows_memo_size(tmp_path: Path, marker: str) -> None:
    """MEMOIZE stores at len(memo), not at a count of MEMOIZE opcodes; a mixed BINPUT shifts the index."""
    data = (proto(4) + su("decoy") + put(7) + POP + su("builtins") + MEMOIZE + POP + su("exec") + MEMOIZE + POP
            + get(1) + get(2) + STACK_GLOBAL + u(code_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_pop_consumes_a_mark(tmp_path: Path, marker: str) -> None:
    """POP on an empty MARK frame pops the mark itself (_pickle.c load_pop), which a stack-naive parser gets wrong."""
    data = proto(4) + su("builtins") + MARK + POP + su("exec") + STACK_GLOBAL + u(code_for(marker)) + TUPLE1 + REDUCE + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_pop_mark_discards_decoys(tmp_path: Path, marker: str) -> None:
    """MARK + allowed-looking decoys + POP_MARK, then the real global: the decoys never reach a call."""
    data = (proto(4) + MARK + glob("collections", "OrderedDict") + glob("argparse", "Namespace") + POP_MARK
            + exec_call(marker) + STOP)
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_nested_marks_and_obj(tmp_path: Path, marker: str) -> None:
    """OBJ under two open MARKs, closed by TUPLE afterwards (fickling GHSA-r7v6-mfhq-g3m2 style OBJ call)."""
    data = proto(2) + MARK + MARK + glob("builtins", "exec") + u(code_for(marker)) + OBJ + TUPLE + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_fickling_pop_hides_the_call_result(tmp_path: Path, marker: str) -> None:
    """The call result is POPped, so an AST-based analysis drops the call (promptfoo/modelaudit report on fickling)."""
    data = proto(2) + system_call(marker) + POP + EMPTY_DICT + STOP
    check_pickle(tmp_path, marker, data, global_name="os.system")


# =================================================================================================
# 2. Denylist gaps and indirection: an allow-list must refuse every one of these globals.
# =================================================================================================


def test_cve_2025_1716_pip_main(tmp_path: Path, marker: str) -> None:
    """pip.main as the REDUCE callable (CVE-2025-1716, Sonatype); harmless: `pip list` only writes its --log file."""
    data = pkl(call(glob("pip", "main"), strlist("--log", marker, "list")))
    check_pickle(tmp_path, marker, data, global_name="pip.main")


def test_cve_2025_1716_pip_internal_main(tmp_path: Path, marker: str) -> None:
    """pip._internal.main, the same entry point one module down (CVE-2025-1716 follow-up, promptfoo/modelaudit#598)."""
    data = pkl(call(glob("pip._internal", "main"), strlist("--log", marker, "list")))
    check_pickle(tmp_path, marker, data, global_name="pip._internal.main")


def test_ghsa_xp4f_hrf8_rxw7_ensurepip_run_pip(tmp_path: Path, marker: str) -> None:
    """ensurepip._run_pip runs pip in a subprocess (GHSA-xp4f-hrf8-rxw7); harmless: pip writes only its --log file."""
    data = pkl(call(glob("ensurepip", "_run_pip"), strlist("--log", marker, "list")))
    check_pickle(tmp_path, marker, data, global_name="ensurepip._run_pip")


def test_fickling_ghsa_q5qq_mvfm_j35x_importlib_getattr_chain(tmp_path: Path, marker: str) -> None:
    """getattr(importlib.import_module('os'), 'system')(cmd) (fickling GHSA-q5qq-mvfm-j35x, picklescan#66)."""
    data = (proto(5) + sglob("builtins", "getattr") + MEMOIZE + sglob("importlib", "import_module") + MEMOIZE
            + su("os") + TUPLE1 + REDUCE + su("system") + TUPLE2 + REDUCE + u(shell_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="importlib.import_module")


def test_modelscan_issue331_importlib_builds_module_name(tmp_path: Path, marker: str) -> None:
    """import_module('builtins') then getattr(str, 'join') assembles 'os' at load time (protectai/modelscan#331)."""
    data = (proto(4) + sglob("importlib", "import_module") + put(0) + su("builtins") + TUPLE1 + REDUCE + put(1)
            + sglob("builtins", "getattr") + put(2)
            # getattr(getattr(builtins, 'str'), 'join')('', ['o', 's']) -> 'os'
            + get(2) + get(2) + get(1) + su("str") + TUPLE2 + REDUCE + su("join") + TUPLE2 + REDUCE
            + su("") + EMPTY_LIST + MARK + su("o") + su("s") + APPENDS + TUPLE2 + REDUCE + put(3) + POP
            # getattr(import_module(<'os'>), 'system')(cmd)
            + get(2) + get(0) + get(3) + TUPLE1 + REDUCE + su("system") + TUPLE2 + REDUCE
            + u(shell_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="importlib.import_module")


def test_builtins_getattr_on_builtins_module(tmp_path: Path, marker: str) -> None:
    """getattr(__import__('builtins'), 'exec'): the dangerous name is a string, not a GLOBAL (Sour Pickles, BlackHat 2011)."""
    data = (proto(4) + sglob("builtins", "getattr") + sglob("builtins", "__import__") + su("builtins") + TUPLE1 + REDUCE
            + su("exec") + TUPLE2 + REDUCE + u(code_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="builtins.getattr")


def test_ghsa_46h3_79wf_xr6c_operator_attrgetter(tmp_path: Path, marker: str) -> None:
    """_operator.attrgetter('system')(__import__('os'))(cmd) (picklescan GHSA-46h3-79wf-xr6c)."""
    data = pkl(
        call(glob("builtins", "__import__"), u("os")) + put(0) + POP
        + call(call(glob("_operator", "attrgetter"), u("system")), get(0)) + u(shell_for(marker)) + TUPLE1 + REDUCE)
    check_pickle(tmp_path, marker, data, global_name="_operator.attrgetter")


def test_ghsa_955r_x9j8_7rhh_operator_methodcaller(tmp_path: Path, marker: str) -> None:
    """_operator.methodcaller('system', cmd)(__import__('os')) (picklescan GHSA-955r-x9j8-7rhh)."""
    data = pkl(call(glob("builtins", "__import__"), u("os")) + put(0) + POP
               + call(call(glob("_operator", "methodcaller"), u("system"), u(shell_for(marker))), get(0)))
    check_pickle(tmp_path, marker, data, global_name="_operator.methodcaller")


def test_operator_module_methodcaller(tmp_path: Path, marker: str) -> None:
    """The pure-Python operator.methodcaller twin of the _operator gadget (picklescan test malicious12 comment)."""
    data = pkl(call(call(glob("operator", "methodcaller"), u("system"), u(shell_for(marker))),
                    call(glob("importlib", "import_module"), u("os"))))
    check_pickle(tmp_path, marker, data, global_name="operator.methodcaller")


def test_picklescan_malicious19_functools_partial(tmp_path: Path, marker: str) -> None:
    """functools.partial(os.system, cmd)() hides the dangerous call behind a wrapper (picklescan GHSA-655q-fx9r-782v, malicious19)."""
    data = pkl(call(call(glob("functools", "partial"), glob("os", "system"), u(shell_for(marker)))))
    check_pickle(tmp_path, marker, data, global_name="functools.partial")


def test_functools_reduce_drives_exec(tmp_path: Path, marker: str) -> None:
    """functools.reduce(exec, [{}], code) calls exec(code, {}) (fickling#210 'functools wrapper bypass')."""
    data = pkl(call(glob("functools", "reduce"), glob("builtins", "exec"), MARK + EMPTY_DICT + LIST, u(code_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="functools.reduce")


def test_ghsa_5hvc_6wx8_mvv4_pydoc_locate(tmp_path: Path, marker: str) -> None:
    """pydoc.locate('os.system') resolves a dotted name at load time (fickling GHSA-5hvc-6wx8-mvv4)."""
    data = pkl(call(call(glob("pydoc", "locate"), u("os.system")), u(shell_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="pydoc.locate")


def test_ghsa_84r2_jw7c_4r5q_pydoc_locate_methodcaller(tmp_path: Path, marker: str) -> None:
    """methodcaller('system', cmd)(pydoc.locate('os')) (picklescan GHSA-84r2-jw7c-4r5q)."""
    data = pkl(call(call(glob("operator", "methodcaller"), u("system"), u(shell_for(marker))),
                    call(glob("pydoc", "locate"), u("os"))))
    check_pickle(tmp_path, marker, data, global_name="pydoc.locate")


def test_ghsa_vvpj_8cmc_gx39_pkgutil_resolve_name(tmp_path: Path, marker: str) -> None:
    """pkgutil.resolve_name('os:system'), a universal bypass of denylists (picklescan GHSA-vvpj-8cmc-gx39)."""
    data = pkl(call(call(glob("pkgutil", "resolve_name"), u("os:system")), u(shell_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="pkgutil.resolve_name")


def test_ghsa_v7x6_rv5q_mhwc_timeit(tmp_path: Path, marker: str) -> None:
    """timeit.timeit('', setup=code) executes the setup string (picklescan GHSA-v7x6-rv5q-mhwc)."""
    data = pkl(call(glob("timeit", "timeit"), u(""), u(code_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="timeit.timeit")


def test_ghsa_49gj_c84q_6qm9_cprofile_run(tmp_path: Path, marker: str) -> None:
    """cProfile.run(code) executes it (picklescan GHSA-49gj-c84q-6qm9, fickling GHSA-p523-jq9w-64x9)."""
    data = pkl(call(glob("cProfile", "run"), u(code_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="cProfile.run")


def test_ghsa_9w88_8rmg_7g2p_cprofile_runctx(tmp_path: Path, marker: str) -> None:
    """cProfile.runctx(code, None, None) (picklescan GHSA-9w88-8rmg-7g2p)."""
    data = pkl(call(glob("cProfile", "runctx"), u(code_for(marker)), NONE, NONE))
    check_pickle(tmp_path, marker, data, global_name="cProfile.runctx")


def test_ghsa_7wx9_6375_f5wh_profile_run(tmp_path: Path, marker: str) -> None:
    """profile.run(code), the pure-Python profiler (picklescan GHSA-7wx9-6375-f5wh)."""
    data = pkl(call(glob("profile", "run"), u(code_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="profile.run")


def test_ghsa_g38g_8gr9_h9xp_uuid_get_command_stdout(tmp_path: Path, marker: str) -> None:
    """uuid._get_command_stdout('touch', marker) runs a program (picklescan GHSA-g38g-8gr9-h9xp)."""
    data = pkl(call(glob("uuid", "_get_command_stdout"), *(u(arg) for arg in touch_argv(marker))))
    check_pickle(tmp_path, marker, data, global_name="uuid._get_command_stdout")


def test_ghsa_g38g_8gr9_h9xp_imaplib_imap4_stream(tmp_path: Path, marker: str) -> None:
    """imaplib.IMAP4_stream(command) starts a shell command (picklescan GHSA-g38g-8gr9-h9xp)."""
    data = pkl(call(glob("imaplib", "IMAP4_stream"), u(shell_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="imaplib.IMAP4_stream")


@posix_only("_osx_support._read_output appends sh redirections (2>/dev/null >'file') to the command")
def test_ghsa_g38g_8gr9_h9xp_osx_support_read_output(tmp_path: Path, marker: str) -> None:
    """_osx_support._read_output(command) calls os.system, on any platform (picklescan GHSA-g38g-8gr9-h9xp)."""
    data = pkl(call(glob("_osx_support", "_read_output"), u(shell_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="_osx_support._read_output")


def test_picklescan_malicious14_runpy_run_code(tmp_path: Path, marker: str) -> None:
    """runpy._run_code(code, {}) execs a string (picklescan tests malicious14.pkl)."""
    data = pkl(call(glob("runpy", "_run_code"), u(code_for(marker)), EMPTY_DICT))
    check_pickle(tmp_path, marker, data, global_name="runpy._run_code")


def test_fickling_ghsa_wfq2_52f7_7qvj_runpy_run_path(tmp_path: Path, marker: str) -> None:
    """runpy.run_path(script) runs a file the attacker dropped earlier (fickling GHSA-wfq2-52f7-7qvj)."""
    script = tmp_path / "dropped.py"
    script.write_text(code_for(marker) + "\n")
    data = pkl(call(glob("runpy", "run_path"), u(str(script))))
    check_pickle(tmp_path, marker, data, global_name="runpy.run_path")


def test_ghsa_cj3c_v495_4xqh_interactive_interpreter(tmp_path: Path, marker: str) -> None:
    """code.InteractiveInterpreter().runsource(code), reached through a dotted STACK_GLOBAL (picklescan GHSA-cj3c-v495-4xqh)."""
    data = (proto(4) + sglob("code", "InteractiveInterpreter") + EMPTY_TUPLE + REDUCE + put(0) + POP
            + sglob("code", "InteractiveInterpreter.runsource") + get(0) + u(code_for(marker)) + TUPLE2 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="code.InteractiveInterpreter")


def test_fickling_ghsa_q5qq_mvfm_j35x_code_getattr_chain(tmp_path: Path, marker: str) -> None:
    """getattr(code.InteractiveInterpreter(), 'runsource')(code) (fickling GHSA-q5qq-mvfm-j35x test_missing_code)."""
    data = (proto(5) + sglob("builtins", "getattr") + sglob("code", "InteractiveInterpreter") + EMPTY_TUPLE + REDUCE
            + su("runsource") + TUPLE2 + REDUCE + u(code_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="code.InteractiveInterpreter")


@posix_only("the pty module does not exist on Windows")
def test_ghsa_vqmv_47xg_9wpr_pty_spawn(tmp_path: Path, marker: str) -> None:
    """pty.spawn(argv) runs a program on a pseudo-terminal (picklescan GHSA-vqmv-47xg-9wpr, fickling GHSA-r7v6-mfhq-g3m2)."""
    data = pkl(call(glob("pty", "spawn"), strlist("touch", marker)))
    check_pickle(tmp_path, marker, data, global_name="pty.spawn")


def test_webbrowser_open(tmp_path: Path, marker: str) -> None:
    """webbrowser.open(url) launches a program (picklescan denylist); never run here, the URL is harmless anyway."""
    data = pkl(call(glob("webbrowser", "open"), u("about:blank")))
    assert_refused(write(tmp_path, "evil.pkl", data), marker, global_name="webbrowser.open")


def test_shutil_rmtree_on_a_scratch_folder(tmp_path: Path, marker: str) -> None:
    """shutil.rmtree(folder) deletes files (picklescan denylist); the target is a scratch folder made for the test."""
    victim = tmp_path / "victim"
    victim.mkdir()
    data = pkl(call(glob("shutil", "rmtree"), u(str(victim))))
    path = write(tmp_path, "live.pkl", data)
    run_loader(path, "pickle")
    assert not victim.exists(), "fixture payload is not live"
    victim.mkdir()
    (victim / "keep").write_text("x")
    assert_refused(write(tmp_path, "evil.pkl", data), marker, global_name="shutil.rmtree")
    assert (victim / "keep").exists(), "modelkit deleted the folder"


@posix_only("Python on Windows has no socket.AF_UNIX")
def test_socket_bind_creates_the_marker(tmp_path: Path, marker: str) -> None:
    """socket.socket(AF_UNIX).bind(path): network primitives reach the file system (picklescan malicious7, socket denylist)."""
    # sun_path holds 104 bytes on macOS, whose temp folders are long: then the name relative to
    # the loader's cwd (tmp_path)
    target = marker if len(os.fsencode(marker)) < 100 else os.path.relpath(marker, tmp_path)
    data = (proto(4) + sglob("socket", "socket") + MARK + binint1(1) + TUPLE + REDUCE + put(0) + POP
            + sglob("socket", "socket.bind") + get(0) + u(target) + TUPLE2 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="socket.socket")


def test_socket_create_connection(tmp_path: Path, marker: str) -> None:
    """socket.create_connection(addr) (picklescan tests malicious7.pkl); never run, the address is the local discard port."""
    data = pkl(call(glob("socket", "create_connection"), MARK + u("127.0.0.1") + binint1(9) + TUPLE))
    assert_refused(write(tmp_path, "evil.pkl", data), marker, global_name="socket.create_connection")


@posix_only("asyncio.unix_events does not exist on Windows")
def test_jfrog_cve_2025_10157_asyncio_subprocess_transport(tmp_path: Path, marker: str) -> None:
    """asyncio.unix_events._UnixSubprocessTransport._start: a submodule of a denied package (CVE-2025-10157, GHSA-q77w-mwjj-7mqx)."""
    data = (proto(4) + sglob("asyncio.unix_events", "_UnixSubprocessTransport._start")
            + MARK + EMPTY_DICT + u(shell_for(marker)) + NEWTRUE + NONE + NONE + NONE + binint1(0) + TUPLE + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="asyncio.unix_events._UnixSubprocessTransport._start")


def test_fickling_ghsa_565g_hwwr_4pp3_marshal_function_type(tmp_path: Path, marker: str) -> None:
    """types.FunctionType(marshal.loads(code), {})() runs attacker bytecode (fickling GHSA-565g-hwwr-4pp3)."""
    code_obj = marshal.dumps(compile(code_for(marker), "<payload>", "exec"))
    data = (proto(4) + sglob("marshal", "loads") + binbytes(code_obj) + TUPLE1 + REDUCE + put(0) + POP
            + sglob("types", "FunctionType") + get(0) + EMPTY_DICT + TUPLE2 + REDUCE + EMPTY_TUPLE + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="marshal.loads")


@posix_only("multiprocessing.util.spawnv_passfds needs fork and exec (_posixsubprocess)")
def test_fickling_multiprocessing_spawnv_passfds(tmp_path: Path, marker: str) -> None:
    """multiprocessing.util.spawnv_passfds(path, argv, ()) forks a program (fickling GHSA-q5qq-mvfm-j35x)."""
    touch = shutil.which("touch")
    assert touch is not None
    data = pkl(call(glob("multiprocessing.util", "spawnv_passfds"), binbytes(touch.encode()),
                    MARK + binbytes(b"touch") + binbytes(marker.encode()) + LIST, EMPTY_TUPLE))
    check_pickle(tmp_path, marker, data, global_name="multiprocessing.util.spawnv_passfds")


@posix_only("ctypes.CDLL(None) (the process's C library) is POSIX only")
def test_ghsa_4675_36f9_wf6r_ctypes(tmp_path: Path, marker: str) -> None:
    """getattr(ctypes.CDLL(None), 'system')(cmd) calls libc directly (picklescan GHSA-4675-36f9-wf6r, fickling test_missing_ctypes)."""
    data = (proto(5) + sglob("builtins", "getattr") + sglob("ctypes", "CDLL") + NONE + TUPLE1 + REDUCE
            + su("system") + TUPLE2 + REDUCE + binbytes(shell_for(marker).encode()) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="ctypes.CDLL")


def test_ghsa_m273_6v24_x4m4_distutils_write_file(tmp_path: Path, marker: str) -> None:
    """distutils.file_util.write_file(path, lines) writes any file (picklescan GHSA-m273-6v24-x4m4)."""
    pytest.importorskip("distutils", reason="Python 3.12+ has distutils only through setuptools, which this venv "
                        "lacks: the payload cannot be shown live")
    data = pkl(call(glob("distutils.file_util", "write_file"), u(marker), strlist("harmless")))
    check_pickle(tmp_path, marker, data, global_name="distutils.file_util.write_file")


def test_picklescan_io_fileio_creates_file(tmp_path: Path, marker: str) -> None:
    """_io.FileIO(path, 'w') creates a file (picklescan tests io_FileIO.pkl)."""
    data = pkl(call(glob("_io", "FileIO"), u(marker), u("w")))
    check_pickle(tmp_path, marker, data, global_name="_io.FileIO")


def test_logging_filehandler_creates_file(tmp_path: Path, marker: str) -> None:
    """logging.FileHandler(path) creates a file on the loading host (picklescan logging_FileHandler.pkl, CVE-2026-56304)."""
    data = pkl(call(glob("logging", "FileHandler"), u(marker)))
    check_pickle(tmp_path, marker, data, global_name="logging.FileHandler")


def test_picklescan_malicious18_pydoc_pipepager(tmp_path: Path, marker: str) -> None:
    """pydoc.pipepager(text, cmd) runs cmd in a shell (picklescan GHSA-655q-fx9r-782v, malicious18.pkl)."""
    data = pkl(call(glob("pydoc", "pipepager"), u(""), u(shell_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="pydoc.pipepager")


def test_picklescan_malicious22_numpy_runstring(tmp_path: Path, marker: str) -> None:
    """numpy.testing._private.utils.runstring(code, {}) execs code from a numpy module (picklescan malicious22.pkl)."""
    data = pkl(call(glob("numpy.testing._private.utils", "runstring"), u(code_for(marker)), EMPTY_DICT))
    check_pickle(tmp_path, marker, data, global_name="numpy.testing._private.utils.runstring")


def test_ghsa_r8g5_cgf2_4m4m_numpy_f2py_getlincoef(tmp_path: Path, marker: str) -> None:
    """numpy.f2py.crackfortran.getlincoef evals its first argument (picklescan GHSA-r8g5-cgf2-4m4m)."""
    data = pkl(call(glob("numpy.f2py.crackfortran", "getlincoef"), u(code_for(marker)), EMPTY_LIST))
    check_pickle(tmp_path, marker, data, global_name="numpy.f2py.crackfortran.getlincoef")


def test_modelscan_issue330_numpy_builtins_dict(tmp_path: Path, marker: str) -> None:
    """dict.get(numpy.__builtins__, 'eval')(code): builtins reached through an ML module (protectai/modelscan#330)."""
    data = (proto(4) + sglob("builtins", "dict.get") + sglob("numpy", "__builtins__") + su("eval") + TUPLE2 + REDUCE
            + u(code_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="numpy.__builtins__")


def test_modelscan_issue85_build_sets_attributes_then_dotted_global(tmp_path: Path, marker: str) -> None:
    """BUILD slot state writes numpy.prod.a/.b, then dotted GLOBALs read them as STACK_GLOBAL operands (protectai/modelscan#85)."""
    data = (proto(5) + glob("numpy", "prod")
            + NONE + MARK + line_unicode("a") + line_unicode("builtins") + DICT + TUPLE2 + BUILD
            + NONE + MARK + line_unicode("b") + line_unicode("exec") + DICT + TUPLE2 + BUILD + POP
            + glob("numpy", "prod.a") + b"p0\n" + glob("numpy", "prod.b") + b"p1\n" + POP + POP
            + b"g0\n" + b"g1\n" + STACK_GLOBAL + line_unicode(code_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="numpy.prod")


def test_ghsa_f745_w6jp_hpxx_torch_collect_env_run(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """torch.utils.collect_env.run(cmd): a torch global is not safe for being under torch (picklescan GHSA-f745-w6jp-hpxx)."""
    data = pkl(call(glob("torch.utils.collect_env", "run"), u(shell_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="torch.utils.collect_env.run", oracle=torch_oracle)


def test_picklescan_malicious19_torch_load_nested_with_kwargs(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """partial(torch.serialization.load) given weights_only=False by BUILD, then called (picklescan malicious19.pkl)."""
    inner = write(tmp_path, "inner.bin", pkl(exec_call(marker)))
    data = pkl(call(glob("functools", "partial"), glob("torch.serialization", "load"))
               + MARK + glob("torch.serialization", "load") + MARK + u(str(inner)) + TUPLE
               + MARK + u("weights_only") + NEWFALSE + DICT + NONE + TUPLE + BUILD + EMPTY_TUPLE + REDUCE)
    check_pickle(tmp_path, marker, data, global_name="torch.serialization.load", oracle=torch_oracle)


def test_torch_hub_load_local_hubconf(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """torch.hub.load(dir, entry, source='local') imports dir/hubconf.py (picklescan denylist torch.hub)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(code_for(marker) + "\ndef entry():\n    return None\n")
    data = pkl(call(glob("functools", "partial"), glob("torch.hub", "load"))
               + MARK + glob("torch.hub", "load") + MARK + u(str(hub)) + u("entry") + TUPLE
               + MARK + u("source") + u("local") + u("trust_repo") + NEWTRUE + DICT + NONE + TUPLE + BUILD
               + EMPTY_TUPLE + REDUCE)
    check_pickle(tmp_path, marker, data, global_name="torch.hub.load", oracle=torch_oracle)


def test_modelscan_issue267_nested_pickle_loads(tmp_path: Path, marker: str) -> None:
    """pickle.loads(inner) unpickles a second, unrestricted payload (protectai/modelscan#267, picklescan malicious13)."""
    data = pkl(call(glob("pickle", "loads"), binbytes(pkl(exec_call(marker)))), protocol=3)
    report = check_pickle(tmp_path, marker, data, global_name="pickle.loads")
    assert "builtins.exec" in report.globals_seen or any(f.global_name == "builtins.exec" for f in report.findings)


def test_nested_load_from_bytes_legacy_stream(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """torch.storage._load_from_bytes is allowed, but its legacy stream hides a payload (fixtures.hostile.nested_load_from_bytes)."""
    data = hostile.nested_load_from_bytes(marker)
    check_pickle(tmp_path, marker, data, global_name="builtins.exec", oracle=torch_oracle)


def test_nested_load_from_bytes_zip_archive(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """_load_from_bytes is torch.load(BytesIO(b), weights_only=False): a nested *zip* archive runs its data.pkl."""
    inner = build_zip(torch_members(pkl(exec_call(marker))))
    data = pkl(call(glob("torch.storage", "_load_from_bytes"), binbytes(inner)), protocol=3)
    check_pickle(tmp_path, marker, data, global_name="builtins.exec", oracle=torch_oracle)


def test_nested_load_from_bytes_zip_spelled_as_latin1_text(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """Protocol 2 spells bytes as _codecs.encode(text, 'latin1'): the nested zip must still be found and scanned."""
    inner = build_zip(torch_members(pkl(exec_call(marker))))
    as_bytes = call(glob("_codecs", "encode"), u(inner.decode("latin1")), u("latin1"))
    data = pkl(call(glob("torch.storage", "_load_from_bytes"), as_bytes))
    check_pickle(tmp_path, marker, data, global_name="builtins.exec", oracle=torch_oracle)


def test_picklescan_sys_module_override_sploit(tmp_path: Path, marker: str) -> None:
    """sys.modules['innocent'] = os via SETITEM, then GLOBAL innocent.system (picklescan sys_module_override_sploit.pkl)."""
    data = (proto(4) + sglob("sys", "modules") + su("innocent_module") + call(glob("importlib", "import_module"), su("os"))
            + SETITEM + POP + sglob("innocent_module", "system") + u(shell_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="sys.modules")


def test_sys_modules_get_lookup(tmp_path: Path, marker: str) -> None:
    """sys.modules.get('os') reached by a dotted STACK_GLOBAL, then getattr (protocol 4 dotted names, PEP 3154)."""
    data = (proto(4) + sglob("builtins", "getattr") + sglob("sys", "modules.get") + su("os") + TUPLE1 + REDUCE
            + su("system") + TUPLE2 + REDUCE + u(shell_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="sys.modules.get")


def test_python2_import_mapping_commands_getoutput(tmp_path: Path, marker: str) -> None:
    """Protocol < 3 maps Python 2 names: commands.getoutput becomes subprocess.getoutput (Lib/_compat_pickle.py)."""
    data = pkl(call(glob("commands", "getoutput"), u(shell_for(marker))))
    check_pickle(tmp_path, marker, data, global_name="commands.getoutput")


def test_python2_builtin_alias_eval(tmp_path: Path, marker: str) -> None:
    """__builtin__.eval, the protocol-2 spelling of builtins.eval (picklescan malicious1_v0.pkl)."""
    data = pkl(call(glob("__builtin__", "eval"), u(f"__import__('os').system({shell_for(marker)!r})")))
    check_pickle(tmp_path, marker, data, global_name="__builtin__.eval")


@pytest.mark.parametrize("opcode,code", [(b"\x82", 0xF0), (b"\x83", 0x1234), (b"\x84", 0x12345678)],
                         ids=["EXT1", "EXT2", "EXT4"])
def test_extension_registry_opcodes(tmp_path: Path, marker: str, opcode: bytes, code: int) -> None:
    """EXT1/EXT2/EXT4 fetch a global from copyreg's extension registry, which a loading process may have filled (PEP 307)."""
    fmt = {b"\x82": "<B", b"\x83": "<H", b"\x84": "<i"}[opcode]
    data = pkl(opcode + struct.pack(fmt, code) + MARK + u(shell_for(marker)) + TUPLE + REDUCE)
    assert_live(data, tmp_path, marker, setup=f"import copyreg\ncopyreg.add_extension('os', 'system', {code})")
    report = assert_refused(write(tmp_path, "evil.pkl", data), marker)
    assert any(f.rule == "MK-P005" for f in report.findings), _describe(report)


# =================================================================================================
# 3. BUILD / __setstate__ and the object-building opcodes.
# =================================================================================================


def test_build_state_of_a_placeholder_runs_a_call(tmp_path: Path, marker: str) -> None:
    """An allowed class (argparse.Namespace) whose BUILD state holds a REDUCE: the state is evaluated first."""
    data = pkl(call(glob("argparse", "Namespace")) + MARK + u("lr") + system_call(marker) + DICT + BUILD)
    check_pickle(tmp_path, marker, data, global_name="os.system")


def test_build_setstate_of_functools_partial(tmp_path: Path, marker: str) -> None:
    """BUILD calls partial.__setstate__, which swaps in os.system and its argument (picklescan malicious19 technique)."""
    data = pkl(call(glob("functools", "partial"), glob("builtins", "len"))
               + MARK + glob("os", "system") + MARK + u(shell_for(marker)) + TUPLE + EMPTY_DICT + NONE + TUPLE + BUILD
               + EMPTY_TUPLE + REDUCE)
    check_pickle(tmp_path, marker, data, global_name="functools.partial")


def test_copyreg_reconstructor_with_dangerous_base(tmp_path: Path, marker: str) -> None:
    """copyreg._reconstructor(cls, base, state) calls base.__init__(obj, state): base = subprocess.Popen (Lib/copyreg.py)."""
    data = pkl(call(glob("copyreg", "_reconstructor"), glob("subprocess", "Popen"), glob("subprocess", "Popen"),
                    strlist(*touch_argv(marker))))
    check_pickle(tmp_path, marker, data, global_name="subprocess.Popen")


def test_copyreg_reconstructor_with_dangerous_class(tmp_path: Path, marker: str) -> None:
    """copyreg._reconstructor is allowed for placeholders only; a dangerous class with BUILD state is refused (never run)."""
    data = pkl(call(glob("copy_reg", "_reconstructor"), glob("subprocess", "Popen"), glob("__builtin__", "object"), NONE)
               + MARK + u("args") + strlist("touch", marker) + DICT + BUILD)
    assert_refused(write(tmp_path, "evil.pkl", data), marker, global_name="subprocess.Popen")


def test_newobj_then_unbound_method_on_dangerous_class(tmp_path: Path, marker: str) -> None:
    """NEWOBJ bdb.Bdb + BUILD state + bdb.Bdb.run(obj, code) (picklescan malicious15, Bdb.run)."""
    data = (proto(4) + sglob("bdb", "Bdb") + EMPTY_TUPLE + NEWOBJ
            + MARK + su("skip") + NONE + su("breaks") + EMPTY_DICT + su("fncache") + EMPTY_DICT
            + su("frame_returning") + NONE + su("trace_opcodes") + NEWFALSE  # Bdb reads it from 3.13 on
            + DICT + BUILD + put(0) + POP
            + sglob("bdb", "Bdb.run") + get(0) + u(code_for(marker)) + TUPLE2 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="bdb.Bdb")


def test_newobj_ex_then_init_on_dangerous_class(tmp_path: Path, marker: str) -> None:
    """NEWOBJ_EX subprocess.Popen (no __init__ yet), then subprocess.Popen.__init__(obj, argv) by a dotted global."""
    data = (proto(4) + sglob("subprocess", "Popen") + EMPTY_TUPLE + EMPTY_DICT + NEWOBJ_EX + put(0) + POP
            + sglob("subprocess", "Popen.__init__") + get(0) + strlist(*touch_argv(marker)) + TUPLE2 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="subprocess.Popen")


def test_obj_opcode_on_dangerous_class(tmp_path: Path, marker: str) -> None:
    """OBJ: MARK cls args OBJ calls subprocess.Popen(argv) (fickling test_missing_pty_unsafe_imports_pr style)."""
    data = pkl(MARK + glob("subprocess", "Popen") + strlist(*touch_argv(marker)) + OBJ)
    check_pickle(tmp_path, marker, data, global_name="subprocess.Popen")


def test_inst_opcode_calls_a_function(tmp_path: Path, marker: str) -> None:
    """INST: protocol-0 instantiation calls os.system directly (picklescan tests malicious10.pkl)."""
    data = MARK + line_unicode(shell_for(marker)) + b"ios\nsystem\n" + STOP
    check_pickle(tmp_path, marker, proto(2) + data, global_name="os.system")


def test_bdb_run_via_reduce_on_instance_from_reduce(tmp_path: Path, marker: str) -> None:
    """bdb.Bdb() built by REDUCE, then Bdb.run via getattr (picklescan malicious15b.pkl)."""
    data = (proto(4) + sglob("builtins", "getattr") + sglob("bdb", "Bdb") + EMPTY_TUPLE + REDUCE + su("run") + TUPLE2
            + REDUCE + u(code_for(marker)) + TUPLE1 + REDUCE + STOP)
    check_pickle(tmp_path, marker, data, global_name="bdb.Bdb")


# =================================================================================================
# 4. Broken pickles: the loader has run the payload before the stream fails.
# =================================================================================================


def test_nullifai_payload_then_garbage(tmp_path: Path, marker: str) -> None:
    """The payload sits at the start; the stream then breaks (ReversingLabs nullifAI, Feb 2025)."""
    data = proto(2) + exec_call(marker) + b"X\xff\xff\xff\x7f" + b"\x00garbage"
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_truncated_right_after_reduce(tmp_path: Path, marker: str) -> None:
    """No STOP: the file ends right after REDUCE (Hide-and-Seek EOP, arXiv 2508.19774)."""
    data = proto(2) + exec_call(marker)
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_unknown_opcode_after_payload(tmp_path: Path, marker: str) -> None:
    """An invalid opcode (0xff) right after the payload (picklescan broken_model.pkl)."""
    data = proto(2) + exec_call(marker) + b"\xff" + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_hide_and_seek_exception_after_payload(tmp_path: Path, marker: str) -> None:
    """Exception-Oriented Programming: the payload runs, then a REDUCE on an int raises (arXiv 2508.19774)."""
    data = proto(2) + exec_call(marker) + POP + binint1(0) + EMPTY_TUPLE + REDUCE + STOP
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_broken_pickle_inside_torch_zip(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """nullifAI's broken data.pkl inside a torch archive: torch.load runs the payload, then fails."""
    path = write(tmp_path, "evil.pt", build_zip(torch_members(proto(2) + exec_call(marker) + b"\xff")))
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


# =================================================================================================
# 5. Container confusion: zip, tar, legacy stream, wrappers, polyglots.
# =================================================================================================


def test_cve_2025_1944_zip_local_central_name_mismatch(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """The local header names data.pkl differently from the central directory (CVE-2025-1944, GHSA-7q5r-7gvp-wc82)."""
    members = torch_members(pkl(exec_call(marker)))
    members[0].local_name = "archive/datap.kl"
    path = write(tmp_path, "evil.pt", build_zip(members))
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    report = assert_refused(path, marker)
    assert any(f.rule == "MK-Z001" for f in report.findings), _describe(report)


def test_zip_local_name_points_a_second_entry_at_data_pkl(tmp_path: Path, marker: str) -> None:
    """A second central entry whose local header calls itself data.pkl (CVE-2025-1944 variant, Sonatype write-up)."""
    members = [Member("archive/data.pkl", BENIGN_PKL), Member("archive/extra.bin", pkl(exec_call(marker)),
                                                               local_name="archive/data.pkl"),
               Member("archive/version", b"3\n")]
    path = write(tmp_path, "evil.pt", build_zip(members))
    assert_live(pkl(exec_call(marker)), tmp_path, marker)
    report = assert_refused(path, marker)
    assert any(f.rule == "MK-Z001" for f in report.findings), _describe(report)


def test_zip_duplicate_member_names(tmp_path: Path, marker: str) -> None:
    """Two members named archive/data.pkl; loaders disagree on which one wins (zip confusion, picklescan#26 discussion)."""
    members = [Member("archive/data.pkl", BENIGN_PKL), Member("archive/data.pkl", pkl(exec_call(marker))),
               Member("archive/version", b"3\n")]
    path = write(tmp_path, "evil.pt", build_zip(members))
    assert_live(pkl(exec_call(marker)), tmp_path, marker)
    report = assert_refused(path, marker)
    assert any(f.rule == "MK-Z001" for f in report.findings), _describe(report)


@pytest.mark.parametrize("flags", [0x1, 0x20, 0x40], ids=["encrypted-0x1", "patched-0x20", "strong-enc-0x40"])
def test_cve_2025_1945_zip_flag_bits(tmp_path: Path, marker: str, flags: int) -> None:
    """General-purpose flag bits that crash zipfile-based scanners but not every loader (CVE-2025-1945, GHSA-w8jq-xcqf-f792)."""
    members = torch_members(pkl(exec_call(marker)))
    members[0].flags = flags
    assert_live(pkl(exec_call(marker)), tmp_path, marker)
    assert_refused(write(tmp_path, "evil.pt", build_zip(members)), marker)


def test_jfrog_cve_2025_10156_zip_crc_mismatch(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """A wrong CRC makes zipfile raise, but torch's reader ignores it (CVE-2025-10156, JFrog)."""
    members = torch_members(pkl(exec_call(marker)))
    members[0].crc = 0xDEADBEEF
    path = write(tmp_path, "evil.pt", build_zip(members))
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def test_jfrog_cve_2025_10155_pickle_with_model_extension(tmp_path: Path, marker: str) -> None:
    """A plain pickle named pytorch_model.bin: content decides, never the extension (CVE-2025-10155, CVE-2025-1889)."""
    data = pkl(exec_call(marker))
    assert_live(data, tmp_path, marker)
    assert_refused(write(tmp_path, "pytorch_model.bin", data), marker, global_name="builtins.exec")


def test_pickle_named_safetensors(tmp_path: Path, marker: str) -> None:
    """A pickle renamed model.safetensors is still a pickle (CVE-2025-1889 extension trust)."""
    data = pkl(exec_call(marker))
    assert_live(data, tmp_path, marker)
    assert_refused(write(tmp_path, "model.safetensors", data), marker, global_name="builtins.exec")


def test_pickle_whose_ninth_byte_opens_a_safetensors_header(tmp_path: Path, marker: str) -> None:
    """A pickle whose byte 8 is '{' looks like a safetensors header to a magic sniffer; torch.load/pickle still run it."""
    data = proto(2) + b"X\x02\x00\x00\x00a{" + POP + exec_call(marker) + STOP
    assert data[8:9] == b"{"
    check_pickle(tmp_path, marker, data, name="model.safetensors", global_name="builtins.exec")


def test_fickling_polyglot_pickle_that_sniffs_as_tar(tmp_path: Path, marker: str) -> None:
    """A pickle with 'ustar' at byte 257 looks like a tar to a magic sniffer; pickle.loads runs it (fickling polyglot.py)."""
    body = proto(2) + exec_call(marker) + POP
    text = b"V" + b"a" * (257 - len(body) - 1) + b"ustar" + b"\n"
    data = body + text + STOP
    assert data[257:262] == b"ustar"
    check_pickle(tmp_path, marker, data, global_name="builtins.exec")


def test_payload_in_a_storage_member(tmp_path: Path, marker: str) -> None:
    """A pickle hidden in archive/data/0, where storage bytes live (picklescan malicious1_wrong_ext.zip)."""
    members = torch_members(BENIGN_PKL) + [Member("archive/data/0", pkl(exec_call(marker)))]
    assert_live(pkl(exec_call(marker)), tmp_path, marker)
    report = assert_refused(write(tmp_path, "evil.pt", build_zip(members)), marker, global_name="builtins.exec")
    assert any(f.member and f.member.endswith("archive/data/0") for f in report.findings), _describe(report)


def test_payload_in_a_non_data_pkl_member(tmp_path: Path, marker: str) -> None:
    """A second .pkl member next to a clean data.pkl (picklescan malicious1.zip, member data.pkl outside a folder)."""
    members = torch_members(BENIGN_PKL) + [Member("archive/extra.pkl", pkl(exec_call(marker)))]
    assert_live(pkl(exec_call(marker)), tmp_path, marker)
    assert_refused(write(tmp_path, "evil.pt", build_zip(members)), marker, global_name="builtins.exec")


def test_zip_deflated_data_pkl(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """data.pkl deflated: torch never writes that, but its reader inflates it (picklescan compressed member tests)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl(exec_call(marker)))
        z.writestr("archive/version", "3\n")
    path = write(tmp_path, "evil.pt", buf.getvalue())
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def test_zip_local_header_claims_deflate(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """Local header says deflate, central says stored ('Zombie Zip', CVE-2026-0866): readers disagree on the bytes."""
    members = torch_members(pkl(exec_call(marker)))
    members[0].local_method = 8
    path = write(tmp_path, "evil.pt", build_zip(members))
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    report = assert_refused(path, marker)
    assert any(f.rule == "MK-Z001" for f in report.findings), _describe(report)


def test_zip_member_outside_top_folder(tmp_path: Path, marker: str) -> None:
    """A pickle member outside the archive's top folder (torch: 'file in archive is not in a subdirectory')."""
    members = torch_members(BENIGN_PKL) + [Member("other/evil.pkl", pkl(exec_call(marker)))]
    assert_live(pkl(exec_call(marker)), tmp_path, marker)
    report = assert_refused(write(tmp_path, "evil.pt", build_zip(members)), marker)
    assert any(f.rule == "MK-Z001" for f in report.findings), _describe(report)


def test_zip_two_data_pkl(tmp_path: Path, marker: str) -> None:
    """Two top folders with a data.pkl each: which one a loader reads is ambiguous (picklescan zip confusion tests)."""
    members = torch_members(pkl(exec_call(marker)), prefix="evil") + torch_members(BENIGN_PKL)
    assert_live(pkl(exec_call(marker)), tmp_path, marker)
    assert_refused(write(tmp_path, "evil.pt", build_zip(members)), marker, global_name="builtins.exec")


def test_zip_data_pkl_name_case_differs(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """torch's miniz looks names up case-insensitively: archive/DATA.PKL is read as data.pkl (miniz mz_zip_reader_locate_file)."""
    members = torch_members(proto(1) + exec_call(marker) + STOP)
    members[0].name = "archive/DATA.PKL"
    path = write(tmp_path, "evil.pt", build_zip(members))
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def test_zip_end_record_hidden_in_the_comment(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """A second EOCD record hidden in the real one's comment: torch's miniz takes the last one (miniz mz_zip_reader_locate_header_sig)."""
    evil_local, evil_cd = zip_parts(torch_members(pkl(exec_call(marker))), 0)
    good_local, good_cd = zip_parts(torch_members(BENIGN_PKL), len(evil_local))
    evil_cd_at = len(evil_local) + len(good_local)
    good_cd_at = evil_cd_at + len(evil_cd)
    evil_end = eocd(3, len(evil_cd), evil_cd_at, comment_len=5)  # its comment length does not match the file
    good_end = eocd(3, len(good_cd), good_cd_at, comment=evil_end)
    path = write(tmp_path, "evil.pt", evil_local + good_local + evil_cd + good_cd + good_end)
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker)


def test_pickle_zip_polyglot(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """A pickle at byte 0 and a valid torch zip after it: zip tools see the archive, torch.load runs the pickle (fickling polyglot)."""
    data = pkl(exec_call(marker)) + build_zip(torch_members(BENIGN_PKL))
    path = write(tmp_path, "evil.pt", data)
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def test_tar_legacy_checkpoint(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """torch < 0.4 tar checkpoints: torch.load unpickles the 'storages' member first (torch/serialization.py legacy_load)."""
    data = tar_bytes([("storages", pkl(exec_call(marker))), ("tensors", pickle.dumps(0, protocol=2)),
                      ("pickle", BENIGN_PKL)])
    path = write(tmp_path, "evil.tar", data)
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def test_tar_legacy_checkpoint_member_opens_with_proto_1(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """The tar's 'storages' member starts with PROTO 1, which a content sniffer may not call a pickle; torch.load runs it."""
    data = tar_bytes([("storages", proto(1) + exec_call(marker) + STOP), ("tensors", pickle.dumps(0, protocol=2)),
                      ("pickle", BENIGN_PKL)])
    path = write(tmp_path, "evil.tar", data)
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def _strip_ustar_magic(data: bytes) -> bytes:
    """Turn a ustar archive into a pre-POSIX (v7) one: no 'ustar' magic, checksums fixed."""
    out = bytearray(data)
    off = 0
    while off + 512 <= len(out) and any(out[off : off + 512]):
        header = out[off : off + 512]
        size = int(bytes(header[124:136]).rstrip(b"\0 ") or b"0", 8)
        header[257:265] = b"\0" * 8
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        out[off : off + 512] = header
        off += 512 + (size + 511) // 512 * 512
    return bytes(out)


def test_tar_legacy_checkpoint_v7_header(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """A v7 tar header carries no 'ustar' magic; tarfile (and so torch.load) still reads it."""
    data = _strip_ustar_magic(tar_bytes([("storages", pkl(exec_call(marker))), ("tensors", pickle.dumps(0, protocol=2)),
                                         ("pickle", BENIGN_PKL)]))
    path = write(tmp_path, "evil.tar", data)
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def test_legacy_stream_payload_in_the_object_pickle(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """The classic legacy torch.save stream with a payload in its object pickle (fixtures.hostile.hostile_legacy)."""
    path = tmp_path / "evil.pt"
    hostile.hostile_legacy(str(path), marker)
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def test_picklescan_pytorch_magic_bypass(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """The payload is the legacy stream's magic-number pickle itself (picklescan tests pytorch_magic_bypass.pt)."""
    magic = pkl(exec_call(marker) + POP + b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little"))
    path = write(tmp_path, "evil.pt", legacy_stream(BENIGN_PKL, magic_pickle=magic))
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


def test_legacy_stream_with_respelled_magic_number(tmp_path: Path, marker: str, torch_oracle: TorchOracle) -> None:
    """The magic number pickled with protocol 4 (torch.load only compares the value); the object pickle opens with PROTO 1."""
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=4)
    path = write(tmp_path, "evil.pt", legacy_stream(proto(1) + exec_call(marker) + STOP, magic_pickle=magic))
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=torch_oracle)
    assert_refused(path, marker, global_name="builtins.exec")


@pytest.mark.parametrize("wrapper", ["gzip", "bz2", "xz"])
def test_compressed_wrapper_around_a_pickle(tmp_path: Path, marker: str, wrapper: str) -> None:
    """joblib-style compressed pickles (gzip/bz2/xz wrapper); nullifAI hid its pickle in a 7z wrapper (ReversingLabs)."""
    raw = pkl(exec_call(marker))
    compress: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
    data = compress[wrapper](raw)
    path = write(tmp_path, f"evil.pkl.{wrapper}", data)
    assert_live(None, tmp_path, marker, wrapper, path=path)
    assert_refused(path, marker, verdicts=("unsafe", "error"))


def test_npy_structured_dtype_with_object_field(tmp_path: Path, marker: str) -> None:
    """An .npy whose structured dtype holds an object field is a pickle to numpy.load (picklescan dns_exfiltration.npy)."""
    header = "{'descr': [('a', '|O')], 'fortran_order': False, 'shape': (1,), }"
    pad = 64 - (10 + len(header) + 1) % 64
    head = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + pad + 1) + header.encode() + b" " * pad + b"\n"
    path = write(tmp_path, "evil.npy", head + pkl(exec_call(marker)))
    assert_live(None, tmp_path, marker, "numpy", path=path)
    assert_refused(path, marker, global_name="builtins.exec")


def test_npz_member_object_array(tmp_path: Path, marker: str) -> None:
    """An object array inside an .npz (picklescan object_arrays.npz); numpy.load runs it on access with allow_pickle."""
    npy = tmp_path / "w.npy"
    hostile.hostile_npy(str(npy), marker)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(npy, "w.npy")
    path = write(tmp_path, "evil.npz", buf.getvalue())
    assert_live(None, tmp_path, marker, "numpy", path=npy)
    assert_refused(path, marker, global_name="builtins.exec")
