"""CPython's own unpickler as an oracle: what would a real load call?

A child process (cwd: an empty scratch folder) loads each file with the real C unpickler, under an
``Unpickler`` subclass whose ``find_class`` records every global. A global outside modelkit's
allow-list resolves to a *recording stand-in*: a class whose instantiation, call, ``__new__``,
``__setstate__``, item assignment and methods append to a log instead of doing anything. So the
log shows each call CPython makes on something that is not allowed, including the calls no
opcode names (BUILD finding ``__setstate__`` in an instance dict, torch's state rebuilders).
Allowed globals resolve to the real objects, except ``torch.storage._load_from_bytes``: its
wrapper logs whether its argument is a constant of the stream (bytes spelled in it, or
``_codecs.encode(<str>, <codec>)``) or bytes built at run time (what ``builtins.bytes``,
``bytearray`` or a one-argument ``_codecs.encode`` returned, or anything not found in the stream),
then runs torch's own loader on it with the same tracing pickle module, so nested streams are
traced the way torch reads them.

Each file is read in the ways a victim reads it:

* ``loads``: ``pickle.loads`` (in-memory input; a file object that hands over all bytes at the
  first read gives the C unpickler exactly that input, with our ``find_class``);
* ``bytesio``: a loop of ``pickle.load`` on ``io.BytesIO`` (how torch reads zip members and the
  streams of ``_load_from_bytes``: frames are read from the file, their unread rest dropped);
* ``buffered``: a loop of ``pickle.load`` on ``open(path, 'rb')`` (a file that can ``peek``,
  which is what torch's legacy loader gets);
* ``torch``: ``torch.load(path, weights_only=False, pickle_module=<tracing>)`` (only where torch
  is installed: the project's venv).

Events: ``[kind, qualname, detail]`` with kind ``global`` (detail ``allowed``/``refused``),
``call`` (a stand-in was called: a violation), ``runtime-bytes`` (``_load_from_bytes`` on bytes
built at run time: a violation), ``nested`` (``_load_from_bytes`` on a constant), ``crash``/
``hang`` (the child died or stopped answering on this input; not a violation).

A name outside the allow-list becomes a stand-in only if CPython could resolve it: a module this
child has imported must have the attribute, any other module must exist (its top-level package is
looked up, never imported); otherwise the child raises what CPython raises. Payloads never run:
every name that could run one is a stand-in. Used by
``tests/security/test_differential.py`` and ``bench/fuzz_vm.py``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import select
import struct
import subprocess
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

MODES_WITH_TORCH = ("loads", "bytesio", "buffered", "torch")
MODES = ("loads", "bytesio", "buffered")
DANGEROUS = (("torch.storage", "_load_from_bytes"),)
VIOLATIONS = ("call", "runtime-bytes")

CHILD = r'''
import _codecs, importlib.util, io, json, os, pickle, sys, types, warnings, zipfile
warnings.simplefilter("ignore")
out, sys.stdout = sys.stdout, sys.stderr
sys.setrecursionlimit(3000)
cfg = json.loads(sys.stdin.readline())
ALLOWED = {tuple(x) for x in cfg["allowed"]}
DANGEROUS = {tuple(x) for x in cfg["dangerous"]}
try:
    import torch
except ImportError:
    torch = None
try:
    import numpy
except ImportError:
    numpy = None
try:
    import resource
    limit = cfg["memory_limit"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
except (ImportError, ValueError, OSError):
    pass
MAGIC = 0x1950A86A20F9469CFC6C

LOG = []
RAWS = []
CONST = {}
BUILT = {}
DEPTH = [0]


def ev(kind, qual, detail=""):
    if len(LOG) < 500:
        LOG.append([kind, qual, str(detail)[:160]])


class _Meta(type):
    def __call__(cls, *args, **kwargs):
        ev("call", cls._qual, "call")
        return object.__new__(cls)


class _StandIn(metaclass=_Meta):
    _qual = "?"

    def __new__(cls, *args, **kwargs):
        ev("call", cls._qual, "__new__")
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        ev("call", type(self)._qual, "__init__")

    def __call__(self, *args, **kwargs):
        ev("call", type(self)._qual + "()", "call")
        return _standin(type(self)._qual + "()")()

    def __setstate__(self, state):
        ev("call", type(self)._qual, "__setstate__")

    def __setitem__(self, key, value):
        ev("call", type(self)._qual, "__setitem__")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Method(type(self)._qual + "." + name)


class _Method:
    def __init__(self, qual):
        self.qual = qual

    def __call__(self, *args, **kwargs):
        ev("call", self.qual, "call")
        return None


_STANDINS = {}


def _standin(qual):
    if qual not in _STANDINS:
        _STANDINS[qual] = _Meta("StandIn", (_StandIn,), {"_qual": qual})
    return _STANDINS[qual]


class _AllowedMeta(type):
    def __call__(cls, *args, **kwargs):
        return object.__new__(cls)


class _AllowedObj(metaclass=_AllowedMeta):
    """What an allowed global that this interpreter cannot import (no torch, no numpy) returns."""


class _TensorStub(metaclass=_AllowedMeta):
    def __setstate__(self, state):  # torch.Tensor has its own __setstate__
        pass


def _set_obj_state(obj, state):  # torch._utils._set_obj_state
    if isinstance(state, tuple):
        dict_state, slots_state = state
    else:
        dict_state, slots_state = state, None
    for part in (dict_state, slots_state):
        if part:
            for k, v in part.items():
                setattr(obj, k, v)
    return obj


def _stub(module, name):
    qual = module + "." + name
    if qual in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v3",
                "torch._utils._rebuild_parameter"):
        return lambda *a: _TensorStub()
    if qual == "torch._utils._rebuild_parameter_with_state":
        return lambda data, rg, hooks, state: _set_obj_state(_TensorStub(), state)
    if qual == "torch._tensor._rebuild_from_type_v2":
        def rebuild(func, new_type, args, state):
            ret = func(*args)
            return _set_obj_state(ret, state)
        return rebuild
    return type(name, (_AllowedObj,), {})


def _is_const(b):
    if type(b) is not bytes or id(b) in BUILT:
        return False
    return id(b) in CONST or any(b in raw for raw in RAWS)


def _encode(obj, *args):
    result = _codecs.encode(obj, *args)
    if args and isinstance(obj, str) and type(result) is bytes:
        CONST[id(result)] = result  # a constant text in a named codec (protocol 2 spells bytes so)
    else:
        BUILT[id(result)] = result  # one argument: UTF-8, whatever a scanner assumes
    return result


def _builder(real):
    def build(*args, **kwargs):
        result = real(*args, **kwargs)
        BUILT[id(result)] = result
        return result
    return build


def _load_from_bytes(b):
    const = _is_const(b)
    if const:
        ev("nested", "torch.storage._load_from_bytes", "constant")
    else:
        ev("runtime-bytes", "torch.storage._load_from_bytes", "built at run time: " + type(b).__name__)
    if DEPTH[0] >= 6:
        raise RuntimeError("nested too deep")
    DEPTH[0] += 1
    RAWS.append(bytes(b) if isinstance(b, (bytes, bytearray)) else b"")
    try:
        return _nested_load(b)
    finally:
        RAWS.pop()
        DEPTH[0] -= 1


def _resolvable(module, name):
    """Raise what CPython's find_class raises for a name that does not exist, without importing it.

    A module already imported here is looked into; otherwise only its top-level package is looked
    up (importing it could run its code). Names that pass resolve to a stand-in.
    """
    if not isinstance(module, str) or not isinstance(name, str):
        raise TypeError("module and name must be str")
    if module in sys.modules:
        obj = sys.modules[module]
        for part in name.split("."):
            obj = getattr(obj, part)  # AttributeError, as in CPython
        return
    top = module.split(".")[0]
    if not top or (top not in sys.modules and importlib.util.find_spec(top) is None):
        raise ModuleNotFoundError("No module named " + repr(module))


class Tracer(pickle.Unpickler):
    def find_class(self, module, name):
        key = (module, name)
        qual = str(module) + "." + str(name)
        if key not in ALLOWED:
            ev("global", qual, "refused")
            _resolvable(module, name)  # raises as CPython would where the name cannot be found
            return _standin(qual)
        ev("global", qual, "allowed")
        if key in DANGEROUS:
            return _load_from_bytes
        if key == ("_codecs", "encode"):
            return _encode
        if name in ("bytes", "bytearray") and module in ("builtins", "__builtin__"):
            return _builder(bytes if name == "bytes" else bytearray)
        try:
            return super().find_class(module, name)
        except Exception:
            return _stub(module, name)


TRACE = types.ModuleType("tracepickle")
TRACE.Unpickler = Tracer
TRACE.load = lambda f, **kw: Tracer(f, **kw).load()
TRACE.loads = lambda b, **kw: Tracer(io.BytesIO(b), **kw).load()
TRACE.__getattr__ = lambda name: getattr(pickle, name)


def _pid(saved_id):
    return _TensorStub()


def _nested_load(b):
    if torch is not None:
        return torch.load(io.BytesIO(b), weights_only=False, pickle_module=TRACE)
    f = io.BytesIO(b)
    if bytes(b[:4]) == b"PK\x03\x04":
        with zipfile.ZipFile(f) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if names:
                t = Tracer(io.BytesIO(z.read(names[0])))
                t.persistent_load = _pid
                return t.load()
        return None
    if Tracer(f).load() != MAGIC:
        raise RuntimeError("Invalid magic number; corrupt file?")
    Tracer(f).load()
    Tracer(f).load()
    t = Tracer(f)
    t.persistent_load = _pid
    return t.load()


class Greedy:
    """A file object that hands over every remaining byte at the first read: pickle.loads semantics."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, n=-1):
        r = self.data[self.pos:]
        self.pos = len(self.data)
        return r

    def readline(self, size=-1):
        i = self.data.find(b"\n", self.pos)
        end = len(self.data) if i < 0 else i + 1
        r = self.data[self.pos:end]
        self.pos = end
        return r

    def readinto(self, buf):
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def _loop(f):
    for _ in range(32):
        Tracer(f).load()


def run(mode, path, data):
    if mode == "loads":
        Tracer(Greedy(data)).load()
    elif mode == "bytesio":
        _loop(io.BytesIO(data))
    elif mode == "buffered":
        with open(path, "rb") as f:
            _loop(f)
    elif mode == "torch":
        torch.load(path, weights_only=False, pickle_module=TRACE)


for line in sys.stdin:
    req = json.loads(line)
    with open(req["path"], "rb") as f:
        data = f.read()
    logs = {}
    for mode in req["modes"]:
        LOG.clear()
        CONST.clear()
        BUILT.clear()
        RAWS[:] = [data]
        DEPTH[0] = 0
        error = ""
        try:
            run(mode, req["path"], data)
        except BaseException as exc:
            error = type(exc).__name__
        logs[mode] = {"events": list(LOG), "error": error}
    out.write(json.dumps(logs) + "\n")
    out.flush()
'''


def wait_readable(stream: IO[Any], timeout: float) -> bool:
    """Whether a child's output pipe has something to read within ``timeout`` seconds: data, or its
    end (the child died: ``readline`` then returns ""). ``select`` where it takes pipes (POSIX);
    on Windows, where it takes only sockets, ``PeekNamedPipe`` polled every 10 ms."""
    if os.name != "nt":
        ready, _, _ = select.select([stream], [], [], timeout)
        return bool(ready)
    import ctypes
    import msvcrt
    from ctypes import wintypes

    peek = ctypes.WinDLL("kernel32").PeekNamedPipe
    peek.argtypes = [wintypes.HANDLE, ctypes.c_void_p, wintypes.DWORD, ctypes.c_void_p,
                     ctypes.POINTER(wintypes.DWORD), ctypes.c_void_p]
    peek.restype = wintypes.BOOL
    handle = msvcrt.get_osfhandle(stream.fileno())  # type: ignore[attr-defined]
    available = wintypes.DWORD()
    deadline = time.monotonic() + timeout
    while True:
        if not peek(handle, None, 0, None, ctypes.byref(available), None) or available.value:
            return True  # bytes to read, or a broken pipe (the write end is closed)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


class TraceOracle:
    """One long-lived child (``python``) that traces loads on request; restarted if it dies or hangs."""

    def __init__(self, python: str, cwd: Path, allowed: Iterable[tuple[str, str]], *, timeout: float = 60.0,
                 memory_limit: int = 6 << 30) -> None:
        self.python = python
        self.cwd = cwd
        self.config = json.dumps({"allowed": sorted(allowed), "dangerous": list(DANGEROUS),
                                  "memory_limit": memory_limit})
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.has_torch = subprocess.run([python, "-I", "-c", "import torch"], capture_output=True).returncode == 0
        self.modes = MODES_WITH_TORCH if self.has_torch else MODES

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None:
            self.proc = subprocess.Popen([self.python, "-I", "-c", CHILD], cwd=self.cwd, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert self.proc.stdin is not None
            self.proc.stdin.write(self.config + "\n")
            self.proc.stdin.flush()
        return self.proc

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self.proc = None

    def trace(self, path: Path, modes: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """{mode: {"events": [...], "error": exception name or ""}} for one file."""
        modes = [m for m in (modes or self.modes) if m in self.modes]
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"path": str(path), "modes": modes}) + "\n")
            proc.stdin.flush()
            ready = wait_readable(proc.stdout, self.timeout)
            line = proc.stdout.readline() if ready else ""
        except BrokenPipeError:
            line = ""
            ready = True
        if not line:
            self._kill()
            kind = "crash" if ready else "hang"
            return {m: {"events": [[kind, "", ""]], "error": kind} for m in modes}
        result: dict[str, dict[str, Any]] = json.loads(line)
        return result

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


def violations(events: list[list[str]]) -> list[list[str]]:
    """The calls CPython made that modelkit must call unsafe."""
    return [e for e in events if e[0] in VIOLATIONS]


def refused_globals(events: list[list[str]]) -> list[str]:
    return [e[1] for e in events if e[0] == "global" and e[2] == "refused"]


def judge(verdict: str, logs: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with ``verdict`` given what CPython did; an empty list when consistent.

    * a call of a non-allowed callable, or ``_load_from_bytes`` on bytes built at run time, in any
      reading: the scan must say ``unsafe``;
    * a global outside the allow-list resolved in any reading: the scan must not say ``safe``;
    * so a ``safe`` scan means no reading resolved or called anything outside the allow-list.
    """
    problems = []
    for mode, log in logs.items():
        bad = violations(log["events"])
        if bad and verdict != "unsafe":
            problems.append(f"{mode}: CPython calls {bad[0][1]} ({bad[0][2]}) but the scan says {verdict}")
        refused = refused_globals(log["events"])
        if refused and verdict == "safe":
            problems.append(f"{mode}: CPython resolves {refused[0]}, outside the allow-list, but the scan says safe")
    return problems


# -- inputs: seeds, mutations and small random programs ------------------------------------------


#: The marker of fuzz inputs: a path that cannot be created, and the same every run, so that the
#: seeded inputs are the same bytes every run (no payload runs in the oracle anyway).
FUZZ_MARKER = "/nonexistent/modelkit-fuzz/PWNED"


def seed_pickles(marker: str = FUZZ_MARKER) -> list[bytes]:
    """Real pickles to mutate: plain data in every protocol, tensors, torch files, hostile fixtures.

    Tensors and torch files are built the way torch writes them but with fixed storage names and
    zip dates, so that a seed gives the same inputs every run.
    """
    from fixtures import corpus, hostile
    from tests.security import corpus_gen as cg

    values: list[Any] = [None, True, 7, -(2**70), 1.5, "text", b"raw", [1, [2, (3,)]], {"a": {1, 2}},
                         frozenset({"x"}), bytearray(b"ab"), {"nested": {"deeper": ["v", 2.0]}}, "x" * 300]
    seeds = [pickle.dumps(v, protocol=p) for v in values for p in range(6)]
    seeds += [cg.pkl(cg.pdict((cg.s("w", p), cg.tensor(p))), p) for p in (2, 3, 4)]
    seeds.append(cg.legit_storage_stream())  # a legacy torch.save stream
    persid = (cg.MARK + cg.u("storage") + cg.glob("torch", "FloatStorage") + cg.u("0") + cg.u("cpu") + cg.binint(2)
              + cg.TUPLE + b"Q")
    zipped = cg.pkl(cg.pdict((cg.u("w"), cg.call(cg.glob("torch._utils", "_rebuild_tensor_v2"), persid, cg.binint(0),
                                                 cg.tup(cg.binint(2)), cg.tup(cg.binint(1)), cg.NEWFALSE,
                                                 cg.od_empty(2)))))
    seeds.append(cg.torch_zip(zipped, {"data/0": b"\x00" * 8}))
    seeds += [make(marker) for make in hostile.PAYLOADS.values()]
    seeds += [hostile.nested_load_from_bytes(marker), hostile.after_error(marker), hostile.concatenated(marker)]
    seeds += list(corpus.hostile_payloads(marker).values())
    samples = cg.generate(marker)
    seeds += [s.data for s in samples[::9] if len(s.data) < 20_000]
    return seeds


_WEIRD_INTS = (b"0\x00", b" 0", b"+0", b"0_0", b"00", b"-0", b"1", b"1_0", b" 1 ", b"2\x00x")


def _opcode_starts(data: bytes) -> list[int]:
    import pickletools

    starts = []
    try:
        for _op, _arg, pos in pickletools.genops(data):
            starts.append(pos)
    except Exception:  # noqa: BLE001 - a broken stream still has the positions read so far
        pass
    return starts or [0]


def mutate(rng: random.Random, data: bytes, seeds: Sequence[bytes]) -> bytes:
    """A few byte-level and opcode-level mutations of ``data``."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["flip", "insert", "delete", "truncate", "splice", "opcode", "frame", "frame", "text-memo",
                         "concat", "dup"])
        i = rng.randrange(len(out) + 1)
        if op == "flip" and out:
            out[min(i, len(out) - 1)] = rng.randrange(256)
        elif op == "insert":
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        elif op == "delete":
            del out[i:i + rng.randint(1, 8)]
        elif op == "truncate" and len(out) > 2:
            del out[max(i, 2):]
        elif op == "splice":
            other = rng.choice(seeds)
            j = rng.randrange(len(other) + 1)
            out[i:i] = other[j:j + rng.randint(1, 40)]
        elif op == "opcode":
            out[i:i] = bytes([rng.choice(b"(.0123abcdeghijlopqrstu}])NRKMJGXBCT\x80\x81\x85\x86\x87\x88\x89\x8a"
                                         b"\x8c\x8d\x8e\x92\x93\x94\x95\x96")])
        elif op == "frame":  # a FRAME at an opcode boundary, often ending inside a later opcode
            starts = _opcode_starts(bytes(out))
            at = rng.choice(starts)
            size = rng.randint(1, max(1, len(out) - at))
            out[at:at] = b"\x95" + struct.pack("<Q", size)
        elif op == "text-memo":
            at = rng.choice(_opcode_starts(bytes(out)))
            out[at:at] = b"N" + rng.choice([b"p", b"g"]) + rng.choice(_WEIRD_INTS) + b"\n" + b"0"
        elif op == "concat":
            out += rng.choice(seeds)
        elif op == "dup" and out:
            j = rng.randrange(len(out))
            out[i:i] = out[j:j + rng.randint(1, 30)]
    return bytes(out[:200_000])


#: Globals the random programs use: allowed ones (some dangerous when misused) and a few that are not.
PROGRAM_GLOBALS = (
    ("argparse", "Namespace"), ("collections", "OrderedDict"), ("torch.storage", "_load_from_bytes"),
    ("builtins", "bytes"), ("builtins", "bytearray"), ("_codecs", "encode"), ("copyreg", "_reconstructor"),
    ("builtins", "object"), ("builtins", "set"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("torch.torch_version", "TorchVersion"), ("torch.nn.modules.container", "ParameterDict"),
    ("builtins", "exec"), ("os", "system"), ("builtins", "getattr"),
)
PROGRAM_KEYS = ("lr", "step", "__setstate__", "__reduce__", "__reduce_ex__", "__class__", "__dict__", "__getattr__",
                "_backward_hooks", "data", "requires_grad")


class _Program:
    """A random, stack-balanced protocol-4 program: every expression pushes exactly one value."""

    def __init__(self, rng: random.Random, marker: str) -> None:
        from tests.security import corpus_gen as cg

        self.rng = rng
        self.memo = 0
        self.blobs = (cg.hostile_stream(marker, "legacy-ascii"), cg.legit_storage_stream(), b"", b"\x80\x02N.")
        self.code = cg.code_for(marker)

    def const(self) -> bytes:
        r = self.rng.randrange(6)
        if r == 0:
            return _s(self.rng.choice(PROGRAM_KEYS + (self.code, "latin1", "utf-8", "f8", "cpu")))
        if r == 1:
            return b"K" + bytes([self.rng.randrange(4)])
        if r == 2:
            blob = self.rng.choice(self.blobs)
            return b"B" + struct.pack("<I", len(blob)) + blob
        return self.rng.choice([b"N", b"\x88", b"\x89", b")", b"}", b"]"])

    def glob(self) -> bytes:
        module, name = self.rng.choice(PROGRAM_GLOBALS)
        return _s(module) + _s(name) + b"\x93"

    def expr(self, depth: int = 0) -> bytes:
        if depth > 3:
            return self.const() if self.rng.random() < 0.7 else self.glob()
        r = self.rng.randrange(12)
        if r < 2:
            return self.const()
        if r < 4:
            return self.glob()
        if r < 6:  # a call: REDUCE, NEWOBJ, NEWOBJ_EX or OBJ
            func = self.glob() if self.rng.random() < 0.8 else self.expr(depth + 1)
            args = b"".join(self.expr(depth + 1) for _ in range(self.rng.randrange(4)))
            how = self.rng.randrange(4)
            if how == 0:
                return func + b"(" + args + b"t\x81"
            if how == 1:
                return func + b"(" + args + b"t}\x92"
            if how == 2:
                return b"(" + func + args + b"o"
            return func + b"(" + args + b"tR"
        if r < 8:  # BUILD with a state: a dict, (dict, slots) or anything
            state = self.state(depth + 1)
            return self.expr(depth + 1) + state + b"b"
        if r == 8:
            n = self.rng.randrange(3)
            return b"(" + b"".join(self.expr(depth + 1) for _ in range(n)) + self.rng.choice([b"t", b"l"])
        if r == 9:
            return self.dict(depth + 1)
        if r == 10 and self.memo:  # fetch a memoized value
            return b"h" + bytes([self.rng.randrange(self.memo)])
        value = self.expr(depth + 1)  # memoize and keep
        self.memo += 1
        return value + b"\x94"

    def dict(self, depth: int) -> bytes:
        pairs = b"".join(_s(self.rng.choice(PROGRAM_KEYS)) + self.expr(depth + 1)
                         for _ in range(self.rng.randrange(1, 3)))
        return b"}(" + pairs + b"u"

    def state(self, depth: int) -> bytes:
        r = self.rng.randrange(4)
        if r == 0:
            return self.dict(depth)
        if r == 1:
            return b"N" + self.dict(depth) + b"\x86"
        if r == 2:
            return self.dict(depth) + self.dict(depth) + b"\x86"
        return self.expr(depth)


def _s(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + struct.pack("<I", len(raw)) + raw


def random_program(rng: random.Random, marker: str) -> bytes:
    """A random program over allowed objects, ``_load_from_bytes``, a few disallowed callables, dunder
    and plain keys, nested streams, BUILD in every state form and every call opcode, with the memo.

    Programs are stack-balanced, so CPython runs many of them to the end; a share build calls no
    opcode names (``__setstate__`` planted by one BUILD, called by the next).
    """
    prog = _Program(rng, marker)
    body = b"".join(prog.expr() + b"0" for _ in range(rng.randint(1, 4)))
    return b"\x80\x04" + body + prog.expr() + b"."


def fuzz_inputs(rng: random.Random, n: int, seeds: Sequence[bytes], marker: str = FUZZ_MARKER) -> list[bytes]:
    """``n`` inputs: mutated seeds, random programs and raw random bytes, in proportions 6:3:1."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            out.append(mutate(rng, rng.choice(seeds), seeds))
        elif r < 0.9:
            out.append(random_program(rng, marker))
        else:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))))
    return out


def nested_in_zip(data: bytes) -> bytes:
    """``data`` as the data.pkl of a torch zip (for a torch.load reading of a fuzz input)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()
