"""A generated corpus of hostile model files: hundreds of variants per class of issue 13.

Each class of attack is a *family*: one technique written as a small grammar, expanded over the
opcodes that build an object, pickle protocols 2-5, memo use, nesting, the ways bytes can be
spelled, and the containers torch reads (plain pickle, legacy ``torch.save`` stream, torch zip
archive, a stream nested in ``torch.storage._load_from_bytes``). ``generate(marker)`` returns one
``Sample`` per variant: a name, the file's bytes, and how the real loader reads it.

Every payload only creates the file ``marker`` (``open(marker, 'w').close()`` or ``touch``).
Nothing here unpickles anything; the tests run real loaders in child processes only.

Families (the classes of the issue, sections 1 and 2):

* ``setstate-build`` - an allowed placeholder (``argparse.Namespace`` built by REDUCE, NEWOBJ,
  NEWOBJ_EX, INST, OBJ or ``copyreg._reconstructor``) or an ``OrderedDict`` gets
  ``torch.storage._load_from_bytes`` as its ``__setstate__`` through a BUILD with a dict state, a
  ``(None, slots)`` state or a ``(dict, slots)`` state; a second BUILD hands it attacker bytes (a
  nested torch stream whose pickle runs the payload). No opcode names that call.
* ``setstate-torch`` - the same through torch's own state application:
  ``_rebuild_parameter_with_state`` and ``_rebuild_from_type_v2`` (``torch._utils._set_obj_state``).
* ``instance-state`` - states no real file has, applied to a placeholder or an allowed object: a
  dunder key (``__reduce__``, ``__class__``, ``__dict__``...) in a dict or slot state, or a
  placeholder state that is not a dict of plain data. Live members replace the instance
  ``__dict__`` through slot state to plant ``_load_from_bytes``; the others are unsafe by rule.
* ``runtime-bytes`` - ``_load_from_bytes`` called by REDUCE on bytes built at run time
  (``builtins.bytes(list)``, ``bytearray``, ``bytearray.extend`` through APPENDS, one-argument
  ``_codecs.encode`` which encodes as UTF-8). Unsafe even when the bytes are a legitimate storage
  (those variants are ``live=False``: unsafe by rule, nothing runs).
* ``stop-gadget`` - an allowed construct that CPython runs without complaint (``torch.Tensor()``,
  ``bytearray.extend`` through APPENDS, ``numpy.dtype('O8')``, ``set((1, 2))``...), then the payload
  in plain sight: a scanner that refuses the construct as malformed and stops misses the payload.
* ``int-parse`` - PUT/GET/INT/LONG text arguments that CPython parses with ``PyLong_FromString``
  or ``strtol`` (a NUL ends the number, spaces, ``_``, signs, ``0x``/``0o``/``0b``, octal ``017``),
  before or around the payload.
* ``frame-straddle`` - an opcode whose argument straddles the end of a FRAME. The C unpickler
  reading a file object (``io.BytesIO``: torch zip members and ``_load_from_bytes`` streams)
  drops the unread rest of the frame and reads the argument afresh; ``pickle.loads`` reads on.
  One reading runs the payload, the other stops or fails.
* ``frame-tail`` - a FRAME that goes on after STOP: the next ``pickle.load`` on ``io.BytesIO``
  starts after the frame, a reader of the bytes right after STOP sees a decoy.
* ``numpy-magic`` - the legacy magic number spelled as a numpy float scalar, which compares equal
  to the int in torch's ``!=`` check.
* ``magic-padding`` - a legacy stream whose first pickles are padded with more than 10,000 opcodes.
* ``numpy-dtype-flags`` - a numpy dtype BUILD state with object flags (``NPY_ITEM_HASOBJECT``,
  ``NPY_LIST_PICKLE``, ...) or object fields; numpy takes the state. Variants with a payload after
  the dtype are live (numpy accepted the state and the load went on); the others are unsafe by rule.

Run ``python -m tests.security.corpus_gen --out DIR`` to write the corpus, ``--check-live`` to run
every live sample through its real loader (in a child) and list any that do not fire.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.security.pickle_oracle import wait_readable

# -- opcodes: the suite's one set of names (tests/security/test_bypasses.py) -----------------------
from tests.security.test_bypasses import (  # noqa: E402
    APPEND,
    APPENDS,
    BUILD,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    MARK,
    MEMOIZE,
    NEWFALSE,
    NEWOBJ,
    NEWOBJ_EX,
    NEWTRUE,
    NONE,
    OBJ,
    POP,
    POP_MARK,
    REDUCE,
    SETITEM,
    SETITEMS,
    STACK_GLOBAL,
    STOP,
    TUPLE,
    TUPLE1,
    TUPLE2,
    TUPLE3,
    shell_for,
)

FRAME = b"\x95"

#: torch's legacy magic number (torch/serialization.py MAGIC_NUMBER) and protocol version.
MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def proto(n: int) -> bytes:
    return b"\x80" + bytes([n])


def frame(size: int) -> bytes:
    return FRAME + struct.pack("<Q", size)


def u(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def su(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def s(text: str, protocol: int) -> bytes:
    """A string the way the protocol's own pickler writes it."""
    return su(text) if protocol >= 4 and len(text.encode()) < 256 else u(text)


def line_unicode(text: str) -> bytes:
    """Protocol-0 UNICODE (raw-unicode-escape, newline-terminated)."""
    return b"V" + text.encode("raw_unicode_escape") + b"\n"


def glob(module: str, name: str, protocol: int = 2) -> bytes:
    """GLOBAL for protocols 0-3, STACK_GLOBAL with constant operands for 4 and 5."""
    if protocol >= 4:
        return su(module) + su(name) + STACK_GLOBAL
    return b"c" + f"{module}\n{name}\n".encode()


def binint(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    return b"J" + struct.pack("<i", n)


def tup(*items: bytes) -> bytes:
    if not items:
        return EMPTY_TUPLE
    if len(items) <= 3:
        return b"".join(items) + {1: TUPLE1, 2: TUPLE2, 3: TUPLE3}[len(items)]
    return MARK + b"".join(items) + TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    """func(*args): MARK args TUPLE REDUCE."""
    return func + MARK + b"".join(args) + TUPLE + REDUCE


def pdict(*pairs: tuple[bytes, bytes]) -> bytes:
    """A dict from (key, value) opcode pairs."""
    if not pairs:
        return EMPTY_DICT
    return EMPTY_DICT + MARK + b"".join(k + v for k, v in pairs) + SETITEMS


def binbytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def short_binbytes(data: bytes) -> bytes:
    if len(data) >= 256:
        raise ValueError(f"SHORT_BINBYTES holds at most 255 bytes, not {len(data)}")
    return b"C" + bytes([len(data)]) + data


def binbytes8(data: bytes) -> bytes:
    return b"\x8e" + struct.pack("<Q", len(data)) + data


def bytearray8(data: bytes) -> bytes:
    return b"\x96" + struct.pack("<Q", len(data)) + data


def int_list(data: bytes) -> bytes:
    """A list of the byte values: EMPTY_LIST MARK BININT1... APPENDS."""
    return EMPTY_LIST + MARK + b"".join(b"K" + bytes([c]) for c in data) + APPENDS


def pkl(body: bytes, protocol: int = 2, framed: bool = False) -> bytes:
    """PROTO + body + STOP; protocol 4+ may put the body in one exact FRAME (as the pickler does)."""
    if framed and protocol >= 4:
        return proto(protocol) + frame(len(body) + 1) + body + STOP
    return proto(protocol) + body + STOP


# -- payloads: each only creates the marker file --------------------------------------------------


def check_marker(marker: str) -> None:
    """Payloads put the marker in protocol-0 text lines and in short strings: keep it plain."""
    if not marker.isascii() or any(c in marker for c in "\n\r\\'\"") or len(marker) > 120:
        raise ValueError(f"marker path must be plain ASCII of at most 120 characters: {marker!r}")


def code_for(marker: str) -> str:
    return f"open({marker!r}, 'w').close()"


def payload_call(marker: str, protocol: int = 2, style: str = "exec") -> bytes:
    """The payload call, without PROTO or STOP: ``exec(<create marker>)`` or ``os.system('touch m')``
    (``test_bypasses.shell_for``: on Windows a cmd.exe command)."""
    if style == "exec":
        return call(glob("builtins", "exec", protocol), s(code_for(marker), protocol))
    return call(glob("os", "system", protocol), s(shell_for(marker), protocol))


def payload_text(marker: str, style: str = "exec") -> bytes:
    """The payload call in protocol-0 opcodes only (every byte ASCII, no FRAME-sensitive reads)."""
    if style == "exec":
        return b"cbuiltins\nexec\n" + MARK + line_unicode(code_for(marker)) + TUPLE + REDUCE
    return b"cos\nsystem\n" + MARK + line_unicode(shell_for(marker)) + TUPLE + REDUCE


def payload_pickle(marker: str, protocol: int = 2, style: str = "exec") -> bytes:
    return pkl(payload_call(marker, protocol, style), protocol)


# -- containers ---------------------------------------------------------------------------------


def legacy_stream(obj_pickle: bytes, *, magic: bytes | None = None, version: bytes | None = None,
                  sys_info: bytes | None = None, tail: bytes | None = None) -> bytes:
    """A legacy ``torch.save`` stream (torch/serialization.py ``_legacy_save``) around ``obj_pickle``."""
    import pickle

    return b"".join([
        pickle.dumps(MAGIC, protocol=2) if magic is None else magic,
        pickle.dumps(LEGACY_PROTOCOL, protocol=2) if version is None else version,
        pickle.dumps({"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                      "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2) if sys_info is None else sys_info,
        obj_pickle,
        pickle.dumps([], protocol=2) if tail is None else tail,
    ])


def legacy_ascii(obj_pickle: bytes) -> bytes:
    """A legacy stream in protocol-0 opcodes (every byte ASCII, so also valid UTF-8)."""
    return legacy_stream(obj_pickle, magic=b"I%d\n." % MAGIC, version=b"I%d\n." % LEGACY_PROTOCOL, sys_info=b"}.",
                         tail=b"(l.")


def torch_zip(data_pkl: bytes, extra: dict[str, bytes] | None = None, prefix: str = "archive") -> bytes:
    """A torch zip archive (stored members) whose ``data.pkl`` is ``data_pkl``."""
    buf = io.BytesIO()
    members = {"data.pkl": data_pkl, **(extra or {}), "version": b"3\n", "byteorder": b"little"}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():  # a fixed date, so the same call gives the same bytes
            z.writestr(zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def nested(stream: bytes, protocol: int = 2) -> bytes:
    """A plain pickle whose only object is ``torch.storage._load_from_bytes(<stream>)``."""
    spelled = latin1_bytes(stream, protocol) if protocol == 2 else binbytes(stream)
    return pkl(call(glob("torch.storage", "_load_from_bytes", protocol), spelled), protocol)


def latin1_bytes(data: bytes, protocol: int = 2, encoding: str = "latin1") -> bytes:
    """``_codecs.encode(<text>, 'latin1')``: how protocol 2 spells bytes."""
    return call(glob("_codecs", "encode", protocol), s(data.decode("latin1"), protocol), s(encoding, protocol))


#: (container, loader): where a hostile object pickle is put, and what reads the resulting file.
CONTAINERS = ("pickle", "legacy", "zip", "nested-legacy", "nested-zip", "concat")
LOADER = {"pickle": "pickle", "legacy": "torch", "zip": "torch", "nested-legacy": "pickle", "nested-zip": "pickle",
          "zip-nested-legacy": "torch", "concat": "stream"}
#: A harmless pickle that a "concat" file opens with: a loop of pickle.load reads on past its STOP.
BENIGN_FIRST = b"\x80\x02}q\x00X\x06\x00\x00\x00weightq\x01K\x01s."


def contain(obj_pickle: bytes, container: str, protocol: int = 2) -> bytes:
    """Put a pickle where a loader meets it: the object pickle of a file, a stream or a member."""
    if container == "pickle":
        return obj_pickle
    if container == "legacy":
        return legacy_stream(obj_pickle)
    if container == "zip":
        return torch_zip(obj_pickle)
    if container == "nested-legacy":
        return nested(legacy_stream(obj_pickle), protocol)
    if container == "nested-zip":
        return nested(torch_zip(obj_pickle), protocol)
    if container == "zip-nested-legacy":
        return torch_zip(nested(legacy_stream(obj_pickle), protocol))
    if container == "concat":
        return BENIGN_FIRST + obj_pickle
    raise ValueError(container)


# -- a legitimate storage, as torch pickles a tensor ------------------------------------------


@functools.cache
def legit_storage_stream() -> bytes:
    """What ``pickle.dumps(tensor)`` hands ``_load_from_bytes``: a legacy stream of one float storage."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, but it is what tensors pickle
        func, args = torch.zeros(2).storage().__reduce__()
    assert func is torch.storage._load_from_bytes
    raw = bytes(args[0])
    # torch names the storage by its address; name it "0" so that the bytes are the same every run
    keys = set(re.findall(rb"X[\x00-\xff]\x00\x00\x00(\d{6,20})q", raw))
    assert len(keys) == 1, keys
    (key,) = keys
    return raw.replace(b"X" + struct.pack("<I", len(key)) + key, b"X\x01\x00\x00\x000")


def legit_ascii_storage_stream() -> bytes:
    """A legacy stream of one 2-float storage written in protocol-0 opcodes (all bytes ASCII)."""
    obj = MARK + line_unicode("storage") + b"ctorch\nFloatStorage\n" + line_unicode("0") + line_unicode("cpu") \
        + b"I2\n" + NONE + TUPLE + b"Q" + STOP
    return legacy_stream(obj, magic=b"I%d\n." % MAGIC, version=b"I%d\n." % LEGACY_PROTOCOL, sys_info=b"}.",
                         tail=b"(lV0\na.") + struct.pack("<q", 2) + b"\x00" * 8


def od_empty(protocol: int) -> bytes:
    return glob("collections", "OrderedDict", protocol) + EMPTY_TUPLE + REDUCE


def tensor(protocol: int) -> bytes:
    """``_rebuild_tensor_v2(_load_from_bytes(<legit storage>), 0, (2,), (1,), False, OrderedDict())``."""
    raw = legit_storage_stream()
    spelled = binbytes(raw) if protocol >= 3 else latin1_bytes(raw, protocol)
    storage = call(glob("torch.storage", "_load_from_bytes", protocol), spelled)
    return call(glob("torch._utils", "_rebuild_tensor_v2", protocol), storage, binint(0), tup(binint(2)),
                tup(binint(1)), NEWFALSE, od_empty(protocol))


def tensor_args(protocol: int) -> bytes:
    raw = legit_storage_stream()
    spelled = binbytes(raw) if protocol >= 3 else latin1_bytes(raw, protocol)
    storage = call(glob("torch.storage", "_load_from_bytes", protocol), spelled)
    return tup(storage, binint(0), tup(binint(2)), tup(binint(1)), NEWFALSE, od_empty(protocol))


# -- the corpus record ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One generated file: ``loader`` is ``pickle`` (``pickle.loads`` of the bytes), ``stream`` (a loop of
    ``pickle.load`` on the open file) or ``torch`` (``torch.load(path, weights_only=False)``); ``live``
    says the loader runs the marker payload."""

    family: str
    name: str
    data: bytes
    loader: str
    live: bool = True

    @property
    def filename(self) -> str:
        return f"{self.name}.{'pt' if self.loader == 'torch' else 'pkl'}"


FAMILIES = ("setstate-build", "setstate-torch", "instance-state", "runtime-bytes", "stop-gadget", "int-parse",
            "frame-straddle", "frame-tail", "numpy-magic", "magic-padding", "numpy-dtype-flags")


def _pick(rng: random.Random, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.randrange(len(options))]


# =================================================================================================
# 1. Calls the opcodes do not show: __setstate__ planted in instance state, then a BUILD.
# =================================================================================================

NESTED_KINDS = ("legacy", "legacy-ascii", "zip")


def hostile_stream(marker: str, kind: str, style: str = "exec") -> bytes:
    """The attacker bytes handed to ``_load_from_bytes``: a whole torch file that runs the payload."""
    if kind == "legacy":
        return legacy_stream(payload_pickle(marker, 2, style))
    if kind == "legacy-ascii":
        return legacy_ascii(payload_text(marker, style) + STOP)
    if kind == "zip":
        return torch_zip(payload_pickle(marker, 2, style))
    raise ValueError(kind)


#: How the trigger's bytes are spelled: name -> (builder, nested kinds it can carry).
def _spell(data: bytes, how: str, protocol: int) -> bytes:
    if how == "binbytes":
        return binbytes(data)
    if how == "short-binbytes":
        return short_binbytes(data)
    if how == "binbytes8":
        return binbytes8(data)
    if how == "bytearray8":
        return bytearray8(data)
    if how == "codecs-latin1":
        return latin1_bytes(data, protocol)
    if how == "codecs-latin-1":
        return latin1_bytes(data, protocol, "latin-1")
    if how == "codecs-iso8859-1":
        return latin1_bytes(data, protocol, "iso-8859-1")
    if how == "codecs-utf8-1arg":
        return call(glob("_codecs", "encode", protocol), s(data.decode("utf-8"), protocol))
    if how == "codecs-utf8":
        return call(glob("_codecs", "encode", protocol), s(data.decode("utf-8"), protocol), s("utf-8", protocol))
    if how == "bytes-list":
        return call(glob("builtins", "bytes", protocol), int_list(data))
    if how == "bytearray-list":
        return call(glob("builtins", "bytearray", protocol), int_list(data))
    if how == "bytearray-const":
        return call(glob("builtins", "bytearray", protocol), binbytes(data))
    if how == "bytes-const":
        return call(glob("builtins", "bytes", protocol), binbytes(data))
    if how == "bytearray-appends":
        return bytearray8(b"") + MARK + b"".join(b"K" + bytes([c]) for c in data) + APPENDS
    if how == "bytearray-append":
        return call(glob("builtins", "bytearray", protocol)) + b"".join(b"K" + bytes([c]) + APPEND for c in data)
    if how == "py2-bytearray-latin1":
        return call(glob("__builtin__", "bytearray", protocol), s(data.decode("latin1"), protocol),
                    s("latin-1", protocol))
    raise ValueError(how)


TRIGGER_SPELLINGS = ("binbytes", "short-binbytes", "binbytes8", "bytearray8", "codecs-latin1", "codecs-utf8-1arg",
                     "bytes-list", "bytearray-list", "bytearray-const")
ASCII_ONLY = {"short-binbytes", "codecs-utf8-1arg", "codecs-utf8"}

#: Allowed placeholders / objects that take a BUILD: name -> builder(protocol).
BUILD_TARGETS: dict[str, Callable[[int], bytes]] = {
    "namespace-reduce": lambda p: glob("argparse", "Namespace", p) + EMPTY_TUPLE + REDUCE,
    "namespace-newobj": lambda p: glob("argparse", "Namespace", p) + EMPTY_TUPLE + NEWOBJ,
    "namespace-newobj-ex": lambda p: glob("argparse", "Namespace", p) + EMPTY_TUPLE + EMPTY_DICT + NEWOBJ_EX,
    "namespace-inst": lambda p: MARK + b"iargparse\nNamespace\n",
    "namespace-obj": lambda p: MARK + glob("argparse", "Namespace", p) + OBJ,
    "namespace-reconstructor": lambda p: call(glob("copyreg", "_reconstructor", p), glob("argparse", "Namespace", p),
                                              glob("builtins", "object", p), NONE),
    "namespace-copy-reg": lambda p: call(glob("copy_reg", "_reconstructor", 2), glob("argparse", "Namespace", 2),
                                         glob("__builtin__", "object", 2), NONE),
    "ordereddict-reduce": lambda p: od_empty(p),
    "ordereddict-newobj": lambda p: glob("collections", "OrderedDict", p) + EMPTY_TUPLE + NEWOBJ,
    # the rinongal embeddings' nn.ParameterDict: nn.Module.__setstate__ does __dict__.update(state)
    "parameterdict-reduce": lambda p: glob("torch.nn.modules.container", "ParameterDict", p) + EMPTY_TUPLE + REDUCE,
}
#: How the state plants the callable: a dict state, (None, slots), (dict, slots), slots that replace
#: __dict__ wholesale, and (ParameterDict only) SETITEMS, which ParameterDict turns into setattr.
BUILD_ROUTES = ("dict", "slots", "dict+slots", "slots-dunder-dict", "setitems")
ROUTES_FOR = {"parameterdict-reduce": ("dict", "setitems")}
TORCH_ROUTES = ("param-with-state:dict", "param-with-state:slots", "param-with-state:dict-none",
                "type-v2:tensor:dict", "type-v2:tensor:slots", "type-v2:param:dict", "type-v2:param:slots")
MEMO_STYLES = ("none", "binput", "memoize", "text")
NESTINGS = ("top", "dict", "list", "tuple", "ordereddict")
#: How the '__setstate__' key is spelled: every string opcode gives CPython the same str.
KEY_SPELLINGS = ("binunicode", "short-binunicode", "unicode-line", "string", "binstring", "short-binstring")
#: How the state dict is built: CPython takes any dict (subclass) as a BUILD state.
DICT_SPELLINGS = ("setitems", "setitem", "dict-opcode", "ordereddict-pairs", "ordereddict-setitems")


def key(text: str, how: str, protocol: int) -> bytes:
    """A str constant spelled by one of the string opcodes."""
    if how == "binunicode":
        return u(text)
    if how == "short-binunicode":
        return su(text)
    if how == "unicode-line":
        return line_unicode(text)
    if how == "string":
        return b"S'" + text.encode() + b"'\n"
    if how == "binstring":
        return b"T" + struct.pack("<i", len(text)) + text.encode()
    if how == "short-binstring":
        return b"U" + bytes([len(text)]) + text.encode()
    raise ValueError(how)


def sdict(pairs: list[tuple[bytes, bytes]], how: str, protocol: int) -> bytes:
    """A dict (or OrderedDict) of opcode pairs, built the ``how`` way."""
    if how == "setitems":
        return pdict(*pairs)
    if how == "setitem":
        return EMPTY_DICT + b"".join(k + v + SETITEM for k, v in pairs)
    if how == "dict-opcode":
        return MARK + b"".join(k + v for k, v in pairs) + b"d"
    if how == "ordereddict-pairs":
        return call(glob("collections", "OrderedDict", protocol), MARK + b"".join(tup(k, v) for k, v in pairs) + b"l")
    if how == "ordereddict-setitems":
        return od_empty(protocol) + MARK + b"".join(k + v for k, v in pairs) + SETITEMS
    raise ValueError(how)


class _Memo:
    """Memo indices handed out in order; ``put`` stores the top of the stack the chosen way."""

    def __init__(self, style: str, protocol: int) -> None:
        self.style = "binput" if style == "memoize" and protocol < 4 else style
        self.next = 0

    def put(self) -> tuple[bytes, int]:
        i = self.next
        self.next += 1
        if self.style == "memoize":
            return MEMOIZE, i
        if self.style == "text":
            return b"p%d\n" % i, i
        return b"q" + bytes([i]), i

    def get(self, i: int) -> bytes:
        if self.style == "text":
            return b"g%d\n" % i
        return b"h" + bytes([i])


def _nest(obj: bytes, nesting: str, protocol: int) -> bytes:
    if nesting == "dict":
        return pdict((s("state_dict", protocol), obj), (s("global_step", protocol), binint(7)))
    if nesting == "list":
        return EMPTY_LIST + obj + APPEND
    if nesting == "tuple":
        return tup(binint(1), obj)
    if nesting == "ordereddict":
        return od_empty(protocol) + MARK + s("model", protocol) + obj + SETITEMS
    return obj


def _state_with(f: bytes, route: str, protocol: int, keyhow: str = "binunicode", dicthow: str = "setitems") -> bytes:
    """The state that plants ``f`` as ``__setstate__``: a dict, (None, slots) or (dict, slots)."""
    setstate = key("__setstate__", keyhow, protocol)
    planted = sdict([(setstate, f)], dicthow, protocol)
    plain = sdict([(s("lr", protocol), binint(1))], dicthow, protocol)
    if route in ("dict", "param-with-state:dict", "type-v2:tensor:dict", "type-v2:param:dict"):
        return sdict([(s("lr", protocol), binint(1)), (setstate, f)], dicthow, protocol)
    if route in ("slots", "param-with-state:slots", "type-v2:tensor:slots", "type-v2:param:slots"):
        return tup(NONE, planted)
    if route == "dict+slots":
        return tup(plain, planted)
    if route == "param-with-state:dict-none":
        return tup(planted, NONE)
    if route == "slots-dunder-dict":
        return tup(NONE, sdict([(key("__dict__", keyhow, protocol), planted)], dicthow, protocol))
    raise ValueError(route)


def _setstate_object(target: str, route: str, trigger: bytes, protocol: int, memo: _Memo,
                     keyhow: str = "binunicode", dicthow: str = "setitems") -> bytes:
    """The object: built, given ``_load_from_bytes`` as ``__setstate__``, then BUILD with ``trigger``."""
    lfb = glob("torch.storage", "_load_from_bytes", protocol)
    prelude = b""
    if memo.style != "none":  # park the callable in the memo first, fetch it into the state later
        op, i = memo.put()
        prelude = lfb + op + POP
        lfb = memo.get(i)
    if route == "setitems":  # ParameterDict.__setitem__ setattr()s: no BUILD plants it, SETITEMS does
        obj = BUILD_TARGETS[target](protocol) + MARK + key("__setstate__", keyhow, protocol) + lfb + SETITEMS
    elif route.startswith("param-with-state"):
        obj = call(glob("torch._utils", "_rebuild_parameter_with_state", protocol), tensor(protocol), NEWFALSE,
                   od_empty(protocol), _state_with(lfb, route, protocol, keyhow, dicthow))
    elif route.startswith("type-v2"):
        cls = glob("torch", "Tensor", protocol) if ":tensor:" in route else glob("torch.nn.parameter", "Parameter",
                                                                                  protocol)
        obj = call(glob("torch._tensor", "_rebuild_from_type_v2", protocol),
                   glob("torch._utils", "_rebuild_tensor_v2", protocol), cls, tensor_args(protocol),
                   _state_with(lfb, route, protocol, keyhow, dicthow))
    else:
        obj = BUILD_TARGETS[target](protocol) + _state_with(lfb, route, protocol, keyhow, dicthow) + BUILD
    if memo.style != "none":  # the object goes to the memo and comes back for the second BUILD
        op, i = memo.put()
        obj += op + POP + memo.get(i)
    return prelude + obj + trigger + BUILD


def gen_setstate(marker: str) -> Iterator[Sample]:
    combos = [(t, r) for t in BUILD_TARGETS for r in ROUTES_FOR.get(t, BUILD_ROUTES[:-1])]
    combos += [("torch", r) for r in TORCH_ROUTES]
    for ci, (target, route) in enumerate(combos):
        rng = random.Random(f"setstate/{target}/{route}")
        family = "setstate-torch" if target == "torch" else "setstate-build"
        for si, how in enumerate(TRIGGER_SPELLINGS):
            container = CONTAINERS[(ci + si) % len(CONTAINERS)]
            protocols = [2] if target == "namespace-copy-reg" else [2, 3, 4, 5]
            protocol = protocols[(ci * 3 + si) % len(protocols)]
            kinds = ["legacy-ascii"] if how in ASCII_ONLY else list(NESTED_KINDS)
            kind = kinds[(ci + si * 2) % len(kinds)]
            memo = _Memo(_pick(rng, MEMO_STYLES), protocol)
            nesting = _pick(rng, NESTINGS)
            style = _pick(rng, ("exec", "system"))
            keyhow = KEY_SPELLINGS[(ci + si * 5) % len(KEY_SPELLINGS)]
            dicthow = DICT_SPELLINGS[(ci * 2 + si) % len(DICT_SPELLINGS)]
            trigger = _spell(hostile_stream(marker, kind, style), how, protocol)
            body = _nest(_setstate_object(target, route, trigger, protocol, memo, keyhow, dicthow), nesting, protocol)
            obj_pickle = pkl(body, protocol, framed=rng.random() < 0.5)
            name = (f"{family}-{target}-{route.replace(':', '-')}-{how}-{kind}-p{protocol}-{memo.style}-{nesting}"
                    f"-{keyhow}-{dicthow}-{container}")
            yield Sample(family, name, contain(obj_pickle, container, protocol), LOADER[container])


#: Dunder names that no real file's state has: any of them in a state applied to an object is unsafe.
DUNDERS = ("__reduce__", "__reduce_ex__", "__class__", "__getattr__", "__getattribute__", "__init__", "__call__",
           "__dict__", "__module__", "__slots__", "__len__", "__getstate__", "__setattr__", "__del__")


def gen_instance_state(marker: str) -> Iterator[Sample]:
    """States that a placeholder or allowed object must refuse: dunder keys, non-plain data.

    Live members plant ``_load_from_bytes`` by replacing the instance ``__dict__`` through slot state
    (or a dict state of a ParameterDict), and a second BUILD calls it; the rest are unsafe by rule:
    a dunder key in any state, or a placeholder state that is not a dict of plain data.
    """
    i = 0
    targets = ("namespace-reduce", "ordereddict-reduce", "parameterdict-reduce", "namespace-newobj")
    for target in targets:
        for dunder in DUNDERS:
            for route in ("dict", "slots"):
                protocol = (2, 3, 4, 5)[i % 4]
                container = CONTAINERS[i % len(CONTAINERS)]
                keyhow = KEY_SPELLINGS[i % len(KEY_SPELLINGS)]
                dicthow = DICT_SPELLINGS[i % len(DICT_SPELLINGS)]
                i += 1
                planted = sdict([(key(dunder, keyhow, protocol), binint(0) if dunder != "__dict__" else EMPTY_DICT)],
                                dicthow, protocol)
                state = planted if route == "dict" else tup(NONE, planted)
                body = pdict((s("args", protocol), BUILD_TARGETS[target](protocol) + state + BUILD))
                name = f"instance-state-{target}-{dunder.strip('_')}-{route}-{keyhow}-{dicthow}-p{protocol}-{container}"
                yield Sample("instance-state", name, contain(pkl(body, protocol), container, protocol),
                             LOADER[container], live=False)
    # placeholders take a plain data dict of ordinary string keys, and nothing else
    odd_states = {
        "list": lambda p: EMPTY_LIST, "int": lambda p: binint(3), "bytes": lambda p: binbytes(b"x"),
        "int-key": lambda p: pdict((binint(1), binint(2))), "bytes-key": lambda p: pdict((binbytes(b"lr"), binint(2))),
        "callable-value": lambda p: pdict((s("lr", p), glob("torch.storage", "_load_from_bytes", p))),
        "class-value": lambda p: pdict((s("lr", p), glob("argparse", "Namespace", p))),
        "tuple-pair": lambda p: tup(pdict((s("lr", p), binint(1))), pdict((s("lr", p), binint(1)))),
    }
    for target in ("namespace-reduce", "namespace-obj", "namespace-reconstructor"):
        for odd, make in odd_states.items():
            protocol = (2, 4)[i % 2]
            container = CONTAINERS[i % len(CONTAINERS)]
            i += 1
            body = pdict((s("args", protocol), BUILD_TARGETS[target](protocol) + make(protocol) + BUILD))
            yield Sample("instance-state", f"instance-state-{target}-{odd}-p{protocol}-{container}",
                         contain(pkl(body, protocol), container, protocol), LOADER[container], live=False)
    # live: the instance __dict__ replaced through slot state, then a BUILD calls the planted callable
    for target in ("namespace-reduce", "namespace-inst", "namespace-reconstructor", "ordereddict-reduce"):
        for how in ("binbytes", "codecs-latin1", "bytes-list"):
            protocol = (2, 3, 4, 5)[i % 4]
            container = CONTAINERS[i % len(CONTAINERS)]
            i += 1
            trigger = _spell(hostile_stream(marker, "legacy"), how, protocol)
            obj = _setstate_object(target, "slots-dunder-dict", trigger, protocol, _Memo("none", protocol),
                                   KEY_SPELLINGS[i % len(KEY_SPELLINGS)], DICT_SPELLINGS[i % len(DICT_SPELLINGS)])
            yield Sample("instance-state", f"instance-state-{target}-dict-replaced-{how}-p{protocol}-{container}",
                         contain(pkl(obj, protocol), container, protocol), LOADER[container])


# =================================================================================================
# 1b. _load_from_bytes on bytes built at run time.
# =================================================================================================

RUNTIME_BUILDERS = ("bytes-list", "bytearray-list", "bytearray-const", "bytes-const", "bytearray-appends",
                    "bytearray-append", "codecs-utf8-1arg", "codecs-utf8", "py2-bytearray-latin1")
RUNTIME_CONTENTS = ("hostile-legacy", "hostile-ascii", "hostile-zip", "legit", "legit-ascii", "utf8-divergent")


def utf8_divergent_stream(marker: str) -> bytes:
    """A pickle whose UTF-8 spelling runs the payload and whose latin-1 spelling is a harmless STOP.

    ``_codecs.encode(text)`` with one argument encodes as UTF-8. The text opens with BINBYTES of
    12 bytes: six 'é' are 12 bytes in UTF-8, six in latin-1, so the latin-1 reading swallows six
    bytes more and lands on a STOP that the UTF-8 reading steps over inside a text line.
    """
    tail = b"0Vaaaa.\n0" + payload_text(marker) + STOP
    text = "B\x0c\x00\x00\x00" + "é" * 6 + tail.decode("ascii")
    assert text.encode("latin1")[5 + 6 + 6:][:1] == STOP
    return text.encode("utf-8")


def runtime_content(marker: str, content: str, how: str) -> bytes:
    if content == "hostile-legacy":
        return hostile_stream(marker, "legacy")
    if content == "hostile-ascii":
        return hostile_stream(marker, "legacy-ascii", "system")
    if content == "hostile-zip":
        return hostile_stream(marker, "zip")
    if content == "legit":
        return legit_storage_stream()
    if content == "legit-ascii":
        return legit_ascii_storage_stream()
    if content == "utf8-divergent":
        return utf8_divergent_stream(marker)
    raise ValueError(content)


def gen_runtime_bytes(marker: str) -> Iterator[Sample]:
    i = 0
    for how in RUNTIME_BUILDERS:
        utf8 = how.startswith("codecs-utf8")
        # one-argument encode is UTF-8 whatever the text: unsafe even for a legitimate storage; an
        # explicit codec of a constant text is a constant, so only hostile content for that one
        contents = ("hostile-ascii", "legit-ascii", "utf8-divergent") if how == "codecs-utf8-1arg" else (
            "hostile-ascii", "utf8-divergent") if utf8 else (
            "hostile-legacy", "hostile-ascii", "hostile-zip", "legit", "legit-ascii")
        for content in contents:
            for container in ("pickle", "legacy", "zip", "nested-legacy", "concat"):
                protocol = 2 if how.startswith("py2") else (2, 3, 4, 5)[i % 4]
                i += 1
                raw = runtime_content(marker, content, how)
                storage = call(glob("torch.storage", "_load_from_bytes", protocol), _spell(raw, how, protocol))
                live = content.startswith("hostile") or content == "utf8-divergent"
                if live:
                    body = pdict((s("w", protocol), storage))
                else:  # a tensor like any other, but its storage bytes are built at run time
                    body = pdict((s("w", protocol), call(glob("torch._utils", "_rebuild_tensor_v2", protocol), storage,
                                                         binint(0), tup(binint(2)), tup(binint(1)), NEWFALSE,
                                                         od_empty(protocol))))
                name = f"runtime-bytes-{how}-{content}-p{protocol}-{container}"
                data = contain(pkl(body, protocol), container, protocol)
                yield Sample("runtime-bytes", name, data, LOADER[container], live=live)


# =================================================================================================
# 2a. Integer arguments parsed the way CPython's C unpickler parses them.
# =================================================================================================

#: INT: strtol(s, 0) first, then PyLong_FromString(s, 0) (_pickle.c load_int).
INT_FORMS = (b"1_000", b" 7", b"7 ", b"\t5\t", b"0o17", b"0b11", b"0x1F", b"017", b"1\x00junk", b"+5", b"-5",
             b"123456789012345678901234567890", b"0_0", b"00", b"01", b" 1", b"1\x00", b"9\x00\xff\xfe")
#: LONG: PyLong_FromString(s, 0) after dropping a trailing L (_pickle.c load_long).
LONG_FORMS = (b"5L", b"5\x00junk", b" 5 ", b"1_0L", b"0x1fL", b"+7", b"0o7L", b"5\x00L", b"-0L", b"\t12\t")
#: PUT/GET: PyLong_FromString(s, 10) (_pickle.c load_put / load_get); every form here means 0.
MEMO_FORMS = (b"0\x00", b" 0", b"0 ", b"+0", b"-0", b"0_0", b"00", b"0\x00junk", b"\t0", b"000_0 ")


def _int_parse_bodies(marker: str, protocol: int) -> Iterator[tuple[str, bytes]]:
    pay = payload_call(marker, protocol)
    for form in INT_FORMS:
        yield f"int-{form.hex()}", b"I" + form + b"\n" + POP + pay
    for form in LONG_FORMS:
        yield f"long-{form.hex()}", b"L" + form + b"\n" + POP + pay
    for form in MEMO_FORMS:
        # PUT with an odd spelling of 0 carries the module name of the payload's global
        put_names = (line_unicode("builtins") + b"p" + form + b"\n" + POP + line_unicode("exec") + b"p1\n" + POP
                     + b"g0\ng1\n" + STACK_GLOBAL + MARK + line_unicode(code_for(marker)) + TUPLE + REDUCE)
        yield f"put-{form.hex()}", put_names
        # GET with an odd spelling of 0 fetches it back
        get_names = (line_unicode("builtins") + b"p0\n" + POP + line_unicode("exec") + b"p1\n" + POP
                     + b"g" + form + b"\n" + b"g1\n" + STACK_GLOBAL + MARK + line_unicode(code_for(marker)) + TUPLE
                     + REDUCE)
        yield f"get-{form.hex()}", get_names
        # the odd PUT comes first and the payload after it, by itself
        yield f"put-then-payload-{form.hex()}", NONE + b"p" + form + b"\n" + POP + pay


def gen_int_parse(marker: str) -> Iterator[Sample]:
    for ci, container in enumerate(("pickle", "legacy", "zip", "nested-legacy")):
        protocol = (2, 4)[ci % 2]
        for key, body in _int_parse_bodies(marker, protocol):
            name = f"int-parse-{key}-p{protocol}-{container}"
            yield Sample("int-parse", name, contain(pkl(body, protocol), container, protocol), LOADER[container])


#: Allowed constructs that CPython (with torch and numpy installed) runs without complaint; a scanner
#: that refuses one of them as malformed and stops there never reaches the payload after it.
STOP_GADGETS: dict[str, Callable[[int], bytes]] = {
    "tensor-call": lambda p: call(glob("torch", "Tensor", p)),
    "parameter-call": lambda p: call(glob("torch.nn.parameter", "Parameter", p)),
    "object-call": lambda p: call(glob("builtins", "object", p)),
    "bytearray-appends": lambda p: bytearray8(b"") + MARK + binint(1) + binint(2) + APPENDS,
    "bytearray-append": lambda p: call(glob("builtins", "bytearray", p)) + binint(1) + APPEND,
    "bytearray-str-latin1": lambda p: call(glob("builtins", "bytearray", p), s("ab", p), s("latin-1", p)),
    "bytes-str-utf8": lambda p: call(glob("builtins", "bytes", p), s("ab", p), s("utf-8", p)),
    "dtype-O8": lambda p: call(glob("numpy", "dtype", p), s("O8", p), NEWFALSE, NEWTRUE),
    "dtype-V8": lambda p: call(glob("numpy", "dtype", p), s("V8", p), NEWFALSE, NEWTRUE),
    "dtype-U4": lambda p: call(glob("numpy", "dtype", p), s("<U4", p)),
    "dtype-M8": lambda p: call(glob("numpy", "dtype", p), s("<M8[s]", p)),
    "dtype-structured": lambda p: call(glob("numpy", "dtype", p), EMPTY_LIST + MARK + tup(s("a", p), s("<f4", p))
                                       + APPENDS),
    "set-of-tuple": lambda p: call(glob("builtins", "set", p), tup(binint(1), binint(2))),
    "set-of-str": lambda p: call(glob("builtins", "set", p), s("ab", p)),
    "frozenset-of-tuple": lambda p: call(glob("builtins", "frozenset", p), tup(binint(1))),
    "ordereddict-of-dict": lambda p: call(glob("collections", "OrderedDict", p), pdict((s("k", p), binint(1)))),
    "ordereddict-of-lists": lambda p: call(glob("collections", "OrderedDict", p),
                                           EMPTY_LIST + MARK + EMPTY_LIST + MARK + s("k", p) + binint(1) + APPENDS
                                           + APPENDS),
    "size-of-list": lambda p: call(glob("torch", "Size", p), EMPTY_LIST + MARK + binint(2) + APPENDS),
    "device-with-index": lambda p: call(glob("torch", "device", p), s("cpu", p), binint(0)),
    "codecs-hex": lambda p: call(glob("_codecs", "encode", p), binbytes(b"x"), s("hex", p)),
    "codecs-rot13": lambda p: call(glob("_codecs", "encode", p), s("x", p), s("rot13", p)),
    "reconstructor-parameterdict": lambda p: call(glob("copyreg", "_reconstructor", p),
                                                  glob("torch.nn.modules.container", "ParameterDict", p),
                                                  glob("builtins", "object", p), NONE),
    "namespace-newobj-ex-kwargs": lambda p: glob("argparse", "Namespace", p) + EMPTY_TUPLE
    + pdict((s("lr", p), binint(1))) + NEWOBJ_EX,
    "ordereddict-build-none": lambda p: od_empty(p) + NONE + BUILD,
    "list-build-none": lambda p: EMPTY_LIST + NONE + BUILD,
}


def gen_stop_gadgets(marker: str) -> Iterator[Sample]:
    """An allowed construct that CPython accepts, then the payload in plain sight."""
    i = 0
    for gadget, make in STOP_GADGETS.items():
        for container in CONTAINERS:
            protocol = (2, 4)[i % 2]
            style = ("exec", "system")[(i // 2) % 2]
            i += 1
            body = make(protocol) + POP + payload_call(marker, protocol, style)
            yield Sample("stop-gadget", f"stop-gadget-{gadget}-p{protocol}-{container}",
                         contain(pkl(body, protocol), container, protocol), LOADER[container])


# =================================================================================================
# 2b. FRAME straddling: file-object reading (io.BytesIO) against in-memory reading (pickle.loads).
# =================================================================================================
#
# The straddled opcode's argument is w bytes; s of them are inside the frame. Read from memory, the
# argument is the s bytes plus w-s bytes after the frame, and the next opcode follows at after[w-s].
# Read from a file object, the C unpickler drops the s bytes and reads w fresh bytes: the next
# opcode follows at after[w]. Which reading lands on the payload is the ``direction``.

#: fixed-width arguments whose value does not matter: name -> (opcode bytes, width)
FIXED = {"binint2": (b"M", 2), "binint": (b"J", 4), "binfloat": (b"G", 8)}
for _n in (2, 3, 5, 8):
    FIXED[f"long1-data{_n}"] = (b"\x8a" + bytes([_n]), _n)
    FIXED[f"short-binunicode-data{_n}"] = (b"\x8c" + bytes([_n]), _n)
    FIXED[f"binunicode-data{_n}"] = (b"X" + struct.pack("<I", _n), _n)
    FIXED[f"binstring-data{_n}"] = (b"T" + struct.pack("<i", _n), _n)
FIXED["binunicode8-data4"] = (b"\x8d" + struct.pack("<Q", 4), 4)
#: length fields: name -> (opcode, width of the length)
COUNTED = {"binunicode-len": (b"X", 4), "binbytes-len": (b"B", 4), "binstring-len": (b"T", 4),
           "long4-len": (b"\x8b", 4), "binunicode8-len": (b"\x8d", 8), "binbytes8-len": (b"\x8e", 8),
           "bytearray8-len": (b"\x96", 8)}


def _le(value: int, width: int) -> bytes:
    return value.to_bytes(width, "little")


def straddle(kind: str, split: int, direction: str, body: bytes, prefix: bytes = b"") -> bytes:
    """A protocol-4 pickle whose ``kind`` opcode straddles a frame end after ``split`` argument bytes.

    ``direction`` "file": a file-object read (torch's io.BytesIO) runs ``body``; ``pickle.loads``
    stops before it. "memory": ``pickle.loads`` runs it; a file-object read stops or fails.
    ``body`` is the payload call in protocol-0 opcodes (ASCII), without STOP.
    """
    w: int
    if kind in FIXED:
        op, w = FIXED[kind]
        if direction == "file":
            after = b"\x00" * (w - split) + STOP + b"\x00" * (split - 1) + POP + body + STOP
        else:
            after = b"\x00" * (w - split) + b"V" + b"." * split + b"\n" + POP + body + STOP
        head = b"\x00" * split
    elif kind in COUNTED:
        op, w = COUNTED[kind]
        if direction == "file":  # file: length 0, then the payload; memory: a length that swallows it
            path = POP + body + STOP
            swallow = split + len(path)
            if swallow >= 256 ** split:
                raise ValueError("payload too long for this split")
            head = _le(swallow, w)[:split]
            after = b"\x00" * w + path + STOP
        else:  # memory: length 0, then the payload; file: a length far past the end
            head = b"\x00" * split
            after = b"\x00" * (w - split) + POP + body + STOP
    elif kind == "frame-len":
        op, w = FRAME, 8
        head = b"\x00" * split
        if direction == "file":  # memory lands on an invalid opcode (0x00); the file reads FRAME(0)
            after = b"\x00" * 8 + body + STOP
        else:
            after = b"\x00" * (8 - split) + body + STOP
    else:
        raise ValueError(kind)
    if not 0 < split < w:
        raise ValueError("split must leave bytes on both sides of the frame end")
    content = prefix + op + head
    return proto(4) + frame(len(content)) + content + after


def memo_line_straddle(direction: str, hostile_stream_bytes: bytes, op: bytes = b"g") -> bytes:
    """A text GET (or PUT) whose index line straddles a frame end: '1' + '0' in memory, '0' from a file.

    Memo 0 and memo 10 hold two allowed globals, ``builtins.bytes`` and ``torch.storage._load_from_bytes``;
    the reading that the direction names gets ``_load_from_bytes`` and calls it on a nested stream.
    """
    lfb = glob("torch.storage", "_load_from_bytes", 2)
    harmless = glob("builtins", "bytes", 2)
    first, second = (lfb, harmless) if direction == "file" else (harmless, lfb)  # memo 0, memo 10
    if op == b"g":
        setup = first + b"p0\n" + POP + second + b"p10\n" + POP
        content = b"g1"
        after = b"0\n" + binbytes(hostile_stream_bytes) + TUPLE1 + REDUCE + STOP
    else:  # PUT: the memory reading stores the second global at 10, the file reading at 0
        setup = harmless + b"p0\n" + POP + lfb
        if direction == "memory":
            setup = lfb + b"p0\n" + POP + harmless
        content = b"p1"
        after = b"0\n" + POP + b"g0\n" + binbytes(hostile_stream_bytes) + TUPLE1 + REDUCE + STOP
    return proto(4) + setup + frame(len(content)) + content + after


def gen_frame_straddle(marker: str) -> Iterator[Sample]:
    kinds: list[tuple[str, int]] = []
    for kind, (_op, w) in FIXED.items():
        kinds += [(kind, sp) for sp in range(1, w)]
    for kind, (_op, w) in COUNTED.items():
        kinds += [(kind, sp) for sp in range(1, w)]
    kinds += [("frame-len", sp) for sp in range(1, 8)]
    file_containers = ("zip", "nested-legacy", "nested-zip", "zip-nested-legacy")
    for i, (kind, split) in enumerate(kinds):
        rng = random.Random(f"straddle/{kind}/{split}")
        style = _pick(rng, ("exec", "system"))
        prefix = _pick(rng, (b"", NONE + POP, EMPTY_DICT + POP, b"K\x07" + POP))
        for direction in ("file", "memory"):
            try:
                data = straddle(kind, split, direction, payload_text(marker, style), prefix)
            except ValueError:
                continue
            container = file_containers[i % len(file_containers)] if direction == "file" else "pickle"
            name = f"frame-straddle-{kind}-s{split}-{direction}-{container}"
            yield Sample("frame-straddle", name, contain(data, container, 2), LOADER[container])
    for op in (b"g", b"p"):
        for direction in ("file", "memory"):
            containers = file_containers if direction == "file" else ("pickle",)
            for container in containers:
                kind_name = "get-line" if op == b"g" else "put-line"
                data = memo_line_straddle(direction, hostile_stream(marker, "legacy"), op)
                yield Sample("frame-straddle", f"frame-straddle-{kind_name}-{direction}-{container}",
                             contain(data, container, 2), LOADER[container])


def frame_tail_stream(marker: str, direction: str, magic_op: bytes) -> bytes:
    """A legacy stream whose magic pickle is one FRAME that goes on after its STOP.

    Read through io.BytesIO (a ``_load_from_bytes`` stream), the next pickle starts after the frame;
    read in place (``pickle.loads``-like, or a buffered file with ``peek``), right after STOP.
    ``direction`` names the reading that meets the payload; the other meets a complete decoy legacy
    stream whose storage bytes cover the rest of the file.
    """
    import pickle

    version = pickle.dumps(LEGACY_PROTOCOL, protocol=2)
    info = pickle.dumps({"protocol_version": LEGACY_PROTOCOL, "little_endian": True}, protocol=2)
    hostile = version + info + payload_pickle(marker) + pickle.dumps([], protocol=2)
    benign_obj = (proto(2) + MARK + u("storage") + glob("torch", "ByteStorage") + u("0") + u("cpu") + binint(0)
                  + NONE + TUPLE + b"Q" + STOP)
    inside_first, outside = (hostile, None) if direction == "memory" else (None, hostile)
    if direction == "file":
        rest = outside
        assert rest is not None
        decoy = version + info + benign_obj + pickle.dumps(["0"], protocol=2) + struct.pack("<q", len(rest))
        inside = decoy
    else:
        assert inside_first is not None
        inside = inside_first
        rest = version + info + pickle.dumps({"w": 1}, protocol=2) + pickle.dumps([], protocol=2)
    content = magic_op + STOP + inside
    return proto(4) + frame(len(content)) + content + rest


def gen_frame_tail(marker: str) -> Iterator[Sample]:
    magic_ops = {"long1": b"\x8a\x0a" + MAGIC.to_bytes(10, "little"), "text-int": b"I%d\n" % MAGIC,
                 "binunicode-pop": u("pad") + POP + b"\x8a\x0a" + MAGIC.to_bytes(10, "little")}
    for name, op in magic_ops.items():
        for direction in ("file", "memory"):
            stream = frame_tail_stream(marker, direction, op)
            if direction == "file":  # torch reads _load_from_bytes streams through io.BytesIO
                for container in ("nested", "zip-nested"):
                    data = nested(stream, 3) if container == "nested" else torch_zip(nested(stream, 3))
                    yield Sample("frame-tail", f"frame-tail-{name}-{direction}-{container}", data,
                                 "pickle" if container == "nested" else "torch")
            else:  # a legacy file is read through a buffered file that peeks: in place
                yield Sample("frame-tail", f"frame-tail-{name}-{direction}-legacy-file", stream, "torch")


# =================================================================================================
# 2c. The legacy magic number as a numpy scalar; long magic pickles; numpy dtype flags.
# =================================================================================================

NUMPY_FLOATS = ("f2", "f4", "f8", "c8", "c16")


def numpy_dtype(code: str, protocol: int, state: bytes | None = None) -> bytes:
    """``numpy.dtype(code, False, True)`` with a BUILD state (numpy's own pickles carry one)."""
    if state is None:
        order = "|" if code in ("u1", "i1", "b1") else "<"
        state = tup(binint(3), s(order, protocol), NONE, NONE, NONE, b"J\xff\xff\xff\xff", b"J\xff\xff\xff\xff",
                    binint(0))
    return call(glob("numpy", "dtype", protocol), s(code, protocol), NEWFALSE, NEWTRUE) + state + BUILD


def numpy_scalar(code: str, value: complex, protocol: int, module: str, spelling: str,
                 dtype: bytes | None = None) -> bytes:
    import numpy as np

    with np.errstate(over="ignore"):
        raw = np.array([float(value.real)]).astype(code).tobytes()
    return call(glob(module, "scalar", protocol), dtype if dtype is not None else numpy_dtype(code, protocol),
                _spell(raw, spelling, protocol))


def gen_numpy_magic(marker: str) -> Iterator[Sample]:
    i = 0
    for code in NUMPY_FLOATS:
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            for spelling in ("codecs-latin1", "binbytes", "short-binbytes"):
                for container in ("legacy", "nested-legacy"):
                    protocol = (2, 3, 4)[i % 3]
                    if spelling == "short-binbytes" and protocol == 2:
                        protocol = 3
                    i += 1
                    with_np = protocol == 4 or i % 5 == 0  # the protocol version as a numpy scalar too
                    magic = pkl(numpy_scalar(code, MAGIC, protocol, module, spelling), protocol)
                    version = pkl(numpy_scalar("f8", LEGACY_PROTOCOL, protocol, module, spelling), protocol) \
                        if with_np else None
                    stream = legacy_stream(payload_pickle(marker, 2, ("exec", "system")[i % 2]), magic=magic,
                                           version=version)
                    data = stream if container == "legacy" else nested(stream, 3)
                    name = f"numpy-magic-{code}-{module.replace('.', '_')}-{spelling}-p{protocol}" \
                           f"{'-npversion' if with_np else ''}-{container}"
                    yield Sample("numpy-magic", name, data, LOADER[container])


PADDINGS = {"none-pop": NONE + POP, "mark-popmark": MARK + POP_MARK, "list-pop": EMPTY_LIST + POP,
            "int-pop": b"K\x01" + POP, "true-pop": NEWTRUE + POP, "dict-pop": EMPTY_DICT + POP,
            "mark-none-popmark": MARK + NONE + NONE + POP_MARK}


def gen_magic_padding(marker: str) -> Iterator[Sample]:
    import pickle

    i = 0
    for pad_name, unit in PADDINGS.items():
        for place in ("before-magic", "after-magic", "version", "sys-info"):
            for container in ("legacy", "nested-legacy"):
                count = (10_001, 12_000, 20_000, 40_000)[i % 4]
                i += 1
                padding = unit * count
                magic_body = b"\x8a\x0a" + MAGIC.to_bytes(10, "little")
                magic = version = info = None
                if place == "before-magic":
                    magic = proto(2) + padding + magic_body + STOP
                elif place == "after-magic":
                    magic = proto(2) + magic_body + padding + STOP
                elif place == "version":
                    version = proto(2) + padding + b"M" + struct.pack("<H", LEGACY_PROTOCOL) + STOP
                else:
                    info = proto(2) + padding + pickle.dumps({"little_endian": True}, protocol=2)[2:]
                stream = legacy_stream(payload_pickle(marker, 2, ("exec", "system")[i % 2]), magic=magic,
                                       version=version, sys_info=info)
                data = stream if container == "legacy" else nested(stream, 3)
                yield Sample("magic-padding", f"magic-padding-{pad_name}-{place}-{count}-{container}", data,
                             LOADER[container])


#: numpy dtype flag values: NPY_ITEM_HASOBJECT 0x01, NPY_LIST_PICKLE 0x02, NPY_ITEM_IS_POINTER 0x04,
#: NPY_NEEDS_INIT 0x08, NPY_NEEDS_PYAPI 0x10, NPY_USE_GETITEM 0x20, NPY_USE_SETITEM 0x40; 0x1b and
#: 0x3f are what numpy writes for a structured dtype with an object field and for dtype('O').
DTYPE_FLAGS = (0x01, 0x02, 0x04, 0x08, 0x10, 0x1B, 0x3F, 0x40)


def _flag_state(protocol: int, flags: int, fields: bool) -> bytes:
    minus1 = b"J\xff\xff\xff\xff"
    if fields:  # names ('a',) and fields {'a': (dtype('O8'), 0)}: a structured dtype with an object field
        obj_dtype = call(glob("numpy", "dtype", protocol), s("O8", protocol), NEWFALSE, NEWTRUE) + tup(
            binint(3), s("|", protocol), NONE, NONE, NONE, minus1, minus1, binint(0x3F)) + BUILD
        return tup(binint(3), s("|", protocol), NONE, tup(s("a", protocol)),
                   pdict((s("a", protocol), tup(obj_dtype, binint(0)))), binint(8), binint(1), binint(flags))
    return tup(binint(3), s("<", protocol), NONE, NONE, NONE, minus1, minus1, binint(flags))


def gen_numpy_dtype_flags(marker: str) -> Iterator[Sample]:
    i = 0
    for code in ("f8", "f4", "i8", "u1"):
        for flags in DTYPE_FLAGS:
            for usage in ("magic-scalar", "array", "scalar"):
                protocol = (2, 3, 4)[i % 3]
                fields = i % 5 == 4
                i += 1
                dtype = numpy_dtype(code, protocol, _flag_state(protocol, flags, fields))
                module = ("numpy.core.multiarray", "numpy._core.multiarray")[i % 2]
                if usage == "magic-scalar":  # accepted by numpy: the load goes on to the payload
                    magic = pkl(numpy_scalar("f8", MAGIC, protocol, module, "binbytes", dtype=dtype), protocol)
                    data = legacy_stream(payload_pickle(marker), magic=magic)
                    container = ("legacy", "nested-legacy", "concat")[i % 3]
                    if container == "nested-legacy":
                        data = nested(data, 3)
                    elif container == "concat":
                        data = BENIGN_FIRST + data
                    # NPY_LIST_PICKLE makes numpy.scalar want an array, NPY_ITEM_IS_POINTER a pointer:
                    # the magic fails and torch stops; with the other flags numpy goes on
                    live = code == "f8" and not flags & 0x06
                elif usage == "array":  # an ndarray with the flagged dtype: unsafe by rule
                    arr = call(glob(module, "_reconstruct", protocol), glob("numpy", "ndarray", protocol),
                               tup(binint(0)), binbytes(b"b")) + tup(binint(1), tup(binint(1)), dtype, NEWFALSE,
                                                                      binbytes(b"\x00" * 8)) + BUILD
                    container = ("pickle", "legacy", "zip")[i % 3]
                    data = contain(pkl(pdict((s("w", protocol), arr)), protocol), container, protocol)
                    live = False
                else:
                    container = ("pickle", "legacy", "zip")[i % 3]
                    scalar = call(glob(module, "scalar", protocol), dtype, binbytes(b"\x00" * 8))
                    data = contain(pkl(pdict((s("step", protocol), scalar)), protocol), container, protocol)
                    live = False
                name = (f"numpy-dtype-flags-{code}-{flags:#04x}{'-fields' if fields else ''}-{usage}-p{protocol}"
                        f"-{container}")
                yield Sample("numpy-dtype-flags", name, data, LOADER.get(container, "torch"), live=live)


# -- benign twins: the same building blocks without the hostile part must scan safe ---------------


def benign_twins() -> list[Sample]:
    """Files built from the generator's own parts, minus anything hostile; every one must scan ``safe``.

    They show that a hostile variant is flagged for its hostile part, not for how the generator
    spells tensors, placeholders, keys, dicts, protocols, memo use or containers: tensors whose
    storage is a constant nested stream, placeholders and OrderedDicts given a plain data dict
    (``_metadata`` as torch's state dicts have it) in every key and dict spelling, in the plain, legacy
    and zip containers (a pickle after a pickle is ``suspicious`` by design; a nested whole file is
    not a storage).
    """
    out = []
    i = 0
    targets = [t for t in BUILD_TARGETS if t != "parameterdict-reduce"]
    for target in targets:
        for dicthow in DICT_SPELLINGS:
            protocol = 2 if target == "namespace-copy-reg" else (2, 3, 4, 5)[i % 4]
            keyhow = KEY_SPELLINGS[i % len(KEY_SPELLINGS)]
            container = ("pickle", "legacy", "zip")[i % 3]
            memo = _Memo(MEMO_STYLES[i % len(MEMO_STYLES)], protocol)
            nesting = NESTINGS[i % len(NESTINGS)]
            i += 1
            name = "_metadata" if target.startswith("ordereddict") else "lr"
            state = sdict([(key(name, keyhow, protocol), sdict([(s("version", protocol), binint(1))], "setitems",
                                                                protocol))], dicthow, protocol)
            obj = BUILD_TARGETS[target](protocol) + state + BUILD
            if memo.style != "none":
                op, j = memo.put()
                obj += op + POP + memo.get(j)
            body = _nest(pdict((s("w", protocol), tensor(protocol)), (s("args", protocol), obj)), nesting, protocol)
            data = contain(pkl(body, protocol, framed=i % 2 == 0), container, protocol)
            out.append(Sample("benign", f"benign-{target}-{dicthow}-{keyhow}-p{protocol}-{memo.style}-{nesting}"
                                        f"-{container}", data, LOADER[container], live=False))
    return out


# -- the whole corpus -------------------------------------------------------------------------------

GENERATORS: tuple[Callable[[str], Iterator[Sample]], ...] = (
    gen_setstate, gen_instance_state, gen_runtime_bytes, gen_stop_gadgets, gen_int_parse, gen_frame_straddle,
    gen_frame_tail, gen_numpy_magic, gen_magic_padding, gen_numpy_dtype_flags)


def generate(marker: str) -> list[Sample]:
    """Every variant of every family, for payloads that create ``marker``. Deterministic."""
    check_marker(marker)
    out: list[Sample] = []
    for gen in GENERATORS:
        out.extend(gen(marker))
    names = [x.name for x in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise AssertionError(f"duplicate sample names: {dup[:5]}")
    return out


def write_corpus(folder: str, marker: str) -> list[tuple[Sample, str]]:
    """Write every sample under ``folder``; returns (sample, path) pairs."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for sample in generate(marker):
        path = os.path.join(folder, sample.filename)
        with open(path, "wb") as f:
            f.write(sample.data)
        out.append((sample, path))
    return out


#: The child that proves liveness: one torch import, then real loaders on request (cwd: a scratch dir).
LIVE_CHILD = (
    "import os, pickle, sys, time, warnings, torch\n"
    "warnings.simplefilter('ignore')\n"
    "out, sys.stdout = sys.stdout, sys.stderr\n"
    "for line in sys.stdin:\n"
    "    loader, marker, path = line.rstrip('\\n').split('\\t')\n"
    "    try:\n"
    "        if loader == 'torch':\n"
    "            torch.load(path, weights_only=False)\n"
    "        elif loader == 'stream':\n"
    "            with open(path, 'rb') as f:\n"
    "                while True:\n"
    "                    pickle.load(f)\n"
    "        else:\n"
    "            pickle.loads(open(path, 'rb').read())\n"
    "    except BaseException:\n"
    "        pass\n"
    "    fired = os.path.exists(marker)\n"
    "    if fired:\n"
    "        os.unlink(marker)\n"
    "    out.write(('fired' if fired else 'quiet') + '\\n')\n"
    "    out.flush()\n"
)


def check_live(samples: list[Sample], workdir: str, timeout: float = 120.0) -> list[str]:
    """Run each live sample through its real loader in one child; the names of those that did not fire.

    Payloads that run a shell (``os.system``) finish before the loader returns, so one check right
    after the load is enough.
    """
    marker = Path(workdir, "PWNED").as_posix()  # plain: no backslash on Windows either (check_marker)
    dead = []
    proc = subprocess.Popen([sys.executable, "-c", LIVE_CHILD], cwd=workdir, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for sample in samples:
            path = os.path.join(workdir, sample.filename)
            with open(path, "wb") as f:
                f.write(sample.data)
            proc.stdin.write(f"{sample.loader}\t{marker}\t{path}\n")
            proc.stdin.flush()
            ready = wait_readable(proc.stdout, timeout)
            answer = proc.stdout.readline().strip() if ready else "hung"
            if answer == "quiet":
                dead.append(sample.name)
            elif answer != "fired":
                dead.append(f"{sample.name} (the loader child {answer or 'died'})")
            os.unlink(path)
            if answer not in ("quiet", "fired"):
                break
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return dead


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the corpus to this folder")
    parser.add_argument("--marker", help="the path payloads create (default: <out>/PWNED)")
    parser.add_argument("--check-live", action="store_true", help="run every live sample through its real loader")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        folder = args.out or tmp
        marker = args.marker or Path(os.path.abspath(folder), "PWNED").as_posix()
        samples = generate(marker)
        counts: dict[str, list[int]] = {}
        for x in samples:
            c = counts.setdefault(x.family, [0, 0])
            c[0] += 1
            c[1] += x.live
        for fam in FAMILIES:
            total, live = counts.get(fam, [0, 0])
            print(f"{fam:20} {total:5} samples, {live:5} live")
        print(f"{'total':20} {len(samples):5}")
        if args.out:
            write_corpus(folder, marker)
        if args.check_live:
            live_dir = os.path.join(tmp, "live")
            os.makedirs(live_dir)
            live = [x for x in generate(Path(live_dir, "PWNED").as_posix()) if x.live]
            dead = check_live(live, live_dir)
            for name in dead:
                print("NOT LIVE:", name)
            print(f"{len(live) - len(dead)}/{len(live)} live samples fired")
            return 1 if dead else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
