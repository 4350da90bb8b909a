"""A bounded pickle virtual machine, shared by the safe reader and the static scanner.

It decodes and executes pickle opcodes the way CPython's C unpickler does (a real stack with
marks, a memo, FRAME as a prefetch hint, INT parsed like ``strtol(s, 0)``), but it never imports
a module or calls a Python callable named by the file. Every global goes through a ``Policy``:

* the loader's policy returns our own implementations of the few allowed callables (tensor
  rebuilds, OrderedDict, ...) and inert placeholders, and raises for anything else;
* the scanner's policy records a finding for every global outside the allow-list and returns a
  ``Symbolic`` stand-in, so the walk goes on and keeps all the evidence.

Resources are bounded (opcodes, stack, memo, objects, sizes), so a hostile pickle ends in a
``PickleError`` rather than a hang or a huge allocation.
"""

from __future__ import annotations

import codecs
import functools
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class PickleError(Exception):
    """The stream is not a valid pickle, or breaks a resource bound.

    Attributes:
        offset: absolute byte offset (in the file) of the opcode that failed.
        kind: ``"format"``, ``"truncated"`` or ``"limit"``.
    """

    def __init__(self, message: str, offset: int, kind: str = "format", needed: int | None = None):
        super().__init__(message)
        self.offset = offset
        self.kind = kind
        #: for a truncation: the absolute offset the stream would have had to reach
        self.needed = needed


@dataclass(frozen=True)
class Limits:
    """Resource bounds for one pickle stream."""

    # Real checkpoints, optimizer state included, stay far below these: an SDXL data.pkl runs
    # about 100k opcodes. The bounds keep a hostile stream to seconds and a few hundred MB.
    max_ops: int = 5_000_000
    max_stack: int = 1_000_000
    max_marks: int = 100_000
    max_memo: int = 2_000_000
    max_objects: int = 5_000_000
    max_long_bytes: int = 64 * 1024
    max_container_items: int = 10_000_000
    #: How deep tuples and frozensets may nest. Hashing one (as a dict key or set item) recurses
    #: in C without a depth check, so a deeper one would crash the process, not raise.
    max_nesting: int = 500


class FileBytes(bytes):
    """A ``bytes`` value that remembers where its payload sits in the file."""

    offset: int


class BigInt(int):
    """An integer too long to print in decimal (Python refuses past 4300 digits)."""

    def __repr__(self) -> str:
        return f"<a {(self.bit_length() + 7) // 8}-byte integer>"

    __str__ = __repr__


class Symbolic:
    """A value the VM could not (or must not) compute: the result of an unknown callable."""

    __slots__ = ("desc",)

    def __init__(self, desc: str):
        self.desc = desc

    def __repr__(self) -> str:
        return f"<{self.desc}>"


class VMCallable:
    """Base of every callable a Policy hands to the VM (never a real Python callable)."""

    qualname: str = "?"

    def call(self, vm: PickleVM, args: tuple[Any, ...]) -> Any:
        raise vm.error(f"{self.qualname} cannot be called")

    def new(self, vm: PickleVM, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # NEWOBJ / NEWOBJ_EX / OBJ / INST: instantiate a class.
        if kwargs:
            raise vm.error(f"{self.qualname} cannot be instantiated with keyword arguments")
        return self.call(vm, args)


class VMObject:
    """Base of objects built by VMCallables that accept BUILD / APPEND / SETITEM."""

    def build(self, vm: PickleVM, state: Any) -> None:
        raise vm.error(f"BUILD is not allowed on {type(self).__name__}")


@dataclass
class Policy:
    """What the VM does with globals and persistent ids.

    Args:
        find_global: (module, name, offset) -> a VMCallable, a constant, or a Symbolic.
        persistent_load: pid -> object; ``None`` means the stream may not use persistent ids.
        extension: EXT code -> object; ``None`` treats EXT opcodes as errors.
        on_unsafe: (message, offset, kind) -> a stand-in value, for a call or state that CPython
            would run and that is unsafe although every global involved is allowed (a
            ``__setstate__`` planted by a BUILD, run-time bytes handed to a nested load, a frame
            that two readers decode differently). ``None`` raises ``PickleError`` of kind
            ``"unsafe"`` (the loader); the scanner records a finding and goes on.
    """

    find_global: Callable[[str, str, int], Any]
    persistent_load: Callable[[Any], Any] | None = None
    extension: Callable[[int, int], Any] | None = None
    on_unsafe: Callable[[str, int, str], Any] | None = None


#: The module name the VM reports for a STACK_GLOBAL whose operands are not constant strings.
COMPUTED = "<computed>"


_SPACE = " \t\n\v\f\r"


def _cstr(text: str) -> str:
    """What C sees of a line: everything up to the first NUL."""
    nul = text.find("\x00")
    return text if nul < 0 else text[:nul]


def _strtol0(text: str) -> tuple[int, int]:
    """C ``strtol(s, &end, 0)``: (value, index of the first unparsed character).

    Overflow is not clamped here; the caller checks the C ``long`` range.
    """
    i, n = 0, len(text)
    while i < n and text[i] in _SPACE:
        i += 1
    sign = 1
    if i < n and text[i] in "+-":
        sign = -1 if text[i] == "-" else 1
        i += 1
    base = 10
    if text[i : i + 2].lower() == "0x" and i + 2 < n and text[i + 2] in "0123456789abcdefABCDEF":
        base, i = 16, i + 2
    elif text[i : i + 1] == "0":
        base = 8
    digits = "0123456789abcdefABCDEF"[: base if base <= 10 else 22]
    start = i
    while i < n and text[i] in digits:
        i += 1
    if i == start:
        return 0, 0  # no conversion: end points at the start
    return sign * int(text[start:i], base), i


def c_int(text: str, base: int) -> int:
    """``PyLong_FromString(s, NULL, base)`` on the C string of ``text``: what CPython's C
    unpickler does with the argument of INT (its fallback), LONG, PUT and GET.

    The C string ends at the first NUL. ASCII spaces may lead and trail, ``_`` may separate
    digits, a sign may lead, and base 0 takes ``0x``/``0o``/``0b``. Unlike Python's ``int()``,
    non-ASCII digits and the separators ``\x1c``..``\x1f`` are not accepted.

    Raises:
        ValueError: where CPython raises.
    """
    s = _cstr(text)
    if not s.isascii() or any(c in s for c in "\x1c\x1d\x1e\x1f"):
        raise ValueError("invalid literal")
    return int(s, base)


def parse_int_line(line: str) -> int | bool:
    """The protocol-0 INT opcode exactly as CPython's C unpickler reads it (``load_int``).

    ``strtol(s, &end, 0)``; if it overflows or stops before the end of the C string, the line is
    re-read with ``PyLong_FromString(s, NULL, 0)`` (underscores, ``0o``/``0b``, spaces); a
    three-byte line (with its newline) holding 0 or 1 is a bool.
    """
    s = _cstr(line)
    value, end = _strtol0(s)
    overflow = not (-(2**63) <= value < 2**63)
    if overflow or end < len(s):
        return c_int(s, 0)  # raises ValueError where CPython raises
    if len(line) + 1 == 3 and value in (0, 1):
        return bool(value)
    return value


class PickleVM:
    """Run one pickle stream.

    Args:
        data: the bytes to run (the stream may be followed by other data).
        policy: what to do with globals and persistent ids.
        base_offset: where ``data[0]`` sits in the file (for FileBytes offsets and errors).
        limits: resource bounds.
    """

    def __init__(self, data: Any, policy: Policy, *, base_offset: int = 0, limits: Limits | None = None,
                 drop_frames: bool = False):
        # ``data`` is ``bytes`` or an ``mmap``: both index to ints, slice to bytes and have find().
        self.data = data
        self.policy = policy
        self.base = base_offset
        self.limits = limits or Limits()
        self.pos = 0
        self.op_pos = 0
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0
        self.ops = 0
        self.objects = 0
        self.items = 0
        self.globals_seen: list[tuple[str, str, int]] = []
        #: When a list, byte constants that look like a pickle or a zip are kept here (scanner).
        self.blobs: list[bytes] | None = None
        #: Byte values handed to ``torch.storage._load_from_bytes``: torch.load runs each one as a
        #: whole file (zip, tar or legacy stream), so the scanner scans each as a file.
        self.nested_loads: list[bytes] = []
        #: The reading of FRAMEs. CPython's C unpickler over ``bytes`` (``pickle.loads``) or a file
        #: with ``peek`` reads the stream contiguously; over a file without ``peek``
        #: (``io.BytesIO``, as torch reads zip members and nested streams, or an unbuffered file,
        #: as its tar loader does) a read that runs past the end of a frame's buffer drops the
        #: rest of that buffer and reads on after the frame. ``drop_frames`` selects the latter.
        self.drop_frames = drop_frames
        #: End of the current frame's buffer (relative), while one is being read.
        self.frame_end: int | None = None
        #: Offsets (absolute) where the two readings of the frames part.
        self.frame_anomalies: list[int] = []
        #: Nesting depth of tuples and frozensets deeper than 1, by id (the object is kept alive).
        self._depth: dict[int, tuple[int, int, Any]] = {}
        #: Values visited by state checks (bounded like objects).
        self.state_walk = 0

    @property
    def scanning(self) -> bool:
        """The scanner's VM: findings are recorded and the walk goes on."""
        return self.policy.on_unsafe is not None

    # -- errors and raw reads -------------------------------------------------------------
    def error(self, message: str, kind: str = "format") -> PickleError:
        return PickleError(message, self.base + self.op_pos, kind)

    def unsafe(self, message: str, kind: str = "call") -> Any:
        """A call or state that CPython would run and that is unsafe: the loader stops, the
        scanner records it and goes on with a stand-in."""
        if self.policy.on_unsafe is None:
            raise PickleError(message, self.base + self.op_pos, "unsafe")
        return self.policy.on_unsafe(message, self.base + self.op_pos, kind)

    def _frame_anomaly(self, what: str) -> None:
        self.frame_anomalies.append(self.base + self.op_pos)
        if not self.drop_frames or not self.scanning:  # the scanner reports it once, in the contiguous reading
            self.unsafe(f"{what}: CPython decodes these bytes one way from a file or io.BytesIO (as torch reads "
                        "them) and another way from bytes in memory", "frame")

    def _read(self, n: int, into: bool = False) -> bytes:
        """Read ``n`` bytes. ``into``: as ``_Unpickler_ReadInto`` does for BINBYTES and
        BYTEARRAY8 payloads, which take the rest of the buffer and go on in the file (no drop)."""
        pos = self.pos
        end = pos + n
        fe = self.frame_end
        if fe is not None and end > fe:
            if pos >= fe:
                self.frame_end = None  # the frame was read to its end
            elif n >= 0:
                self._frame_anomaly("an opcode's argument runs past the end of its FRAME")
                self.frame_end = None
                if self.drop_frames and not into:
                    pos, end = fe, fe + n
        if n < 0 or end > len(self.data):
            err = self.error("pickle data was truncated", "truncated")
            err.needed = self.base + end if n >= 0 else None
            raise err
        chunk = self.data[pos:end]
        self.pos = end
        return bytes(chunk)

    def _readline(self) -> str:
        start = self.pos
        fe = self.frame_end
        if fe is not None:
            if start >= fe:
                self.frame_end = None
            else:
                nl = self.data.find(b"\n", start, fe)
                if nl < 0:
                    self._frame_anomaly("a text line runs past the end of its FRAME")
                    self.frame_end = None
                    if self.drop_frames:
                        start = fe
        end = self.data.find(b"\n", start, len(self.data))
        if end < 0:
            raise self.error("pickle data was truncated (no end of line)", "truncated")
        self.pos = end + 1
        return bytes(self.data[start:end]).decode("utf-8", "surrogateescape")

    @property
    def end_pos(self) -> int:
        """Where the next reader of the same file starts: after STOP, or, in the dropping
        reading, after the rest of the frame buffer that STOP was read from."""
        if self.drop_frames and self.frame_end is not None and self.frame_end > self.pos:
            return self.frame_end
        return self.pos

    def _u(self, fmt: str, n: int) -> int:
        return int(struct.unpack(fmt, self._read(n))[0])

    def note_blob(self, value: bytes) -> None:
        if self.blobs is not None and len(value) >= 4 and looks_nested(value[:16]):
            self.blobs.append(value)

    # -- stack helpers --------------------------------------------------------------------
    def _fence(self) -> int:
        return self.marks[-1] if self.marks else 0

    def push(self, value: Any) -> None:
        if len(self.stack) >= self.limits.max_stack:
            raise self.error("pickle stack exceeds the limit", "limit")
        self.stack.append(value)

    def pop(self) -> Any:
        if len(self.stack) <= self._fence():
            raise self.error("unpickling stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if len(self.stack) <= self._fence():
            raise self.error("unpickling stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.error("could not find MARK")
        mark = self.marks.pop()
        items = self.stack[mark:]
        del self.stack[mark:]
        return items

    def _count(self, n: int = 1) -> None:
        self.objects += n
        if self.objects > self.limits.max_objects:
            raise self.error("pickle builds too many objects", "limit")

    def _grow(self, n: int) -> None:
        self.items += n
        if self.items > self.limits.max_container_items:
            raise self.error("pickle containers grow past the limit", "limit")

    def nested(self, value: tuple[Any, ...] | frozenset[Any], items: Any) -> Any:
        """Record how deep a new tuple or frozenset nests; refuse one too deep to hash safely."""
        depth, size = 1, 1
        for x in items:
            if type(x) is tuple or type(x) is frozenset:
                d = self._depth.get(id(x))
                if d is not None and d[2] is x:
                    depth, size = max(depth, 1 + d[0]), size + d[1]
                else:
                    depth, size = max(depth, 2), size + 1
            else:
                size += 1
        if depth > 1:
            if depth > self.limits.max_nesting:
                raise self.error(f"tuples nest deeper than {self.limits.max_nesting} levels", "limit")
            # Hashing or comparing a tuple visits every shared item again: (t, t) of (t, t) ...
            # doubles per level. Bound the expanded size, as CPython's hash would walk it.
            if size > self.limits.max_objects:
                raise self.error("tuples share items so deeply that hashing them would not end", "limit")
            self._depth[id(value)] = (depth, size, value)
        return value

    # -- globals, calls -------------------------------------------------------------------
    def find_global(self, module: Any, name: Any) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            # A name computed at run time: no allow-list entry can match it.
            return self.policy.find_global(COMPUTED, f"{module!r}.{name!r}"[:200], self.base + self.op_pos)
        self.globals_seen.append((module, name, self.base + self.op_pos))
        return self.policy.find_global(module, name, self.base + self.op_pos)

    def call(self, func: Any, args: Any) -> Any:
        self._count()
        if isinstance(func, Symbolic):
            return Symbolic(f"result of {func.desc}")
        if not isinstance(args, tuple):
            raise self.error("REDUCE arguments must be a tuple")
        if any(isinstance(a, Symbolic) for a in args):
            return Symbolic(f"result of {getattr(func, 'qualname', '?')} on an unknown value")
        if isinstance(func, VMCallable):
            return func.call(self, args)
        raise self.error(f"{type(func).__name__} object is not callable")

    def instantiate(self, cls: Any, args: Any, kwargs: Any) -> Any:
        self._count()
        if isinstance(cls, Symbolic):
            return Symbolic(f"instance of {cls.desc}")
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise self.error("class arguments must be a tuple (and a dict)")
        if any(isinstance(a, Symbolic) for a in args):
            return Symbolic(f"instance of {getattr(cls, 'qualname', '?')} from an unknown value")
        if isinstance(cls, VMCallable):
            return cls.new(self, args, kwargs)
        raise self.error(f"{type(cls).__name__} object is not a class")

    # -- the run loop ---------------------------------------------------------------------
    def run(self) -> Any:
        """Execute up to STOP; returns the unpickled value. ``self.pos`` is then just past STOP."""
        dispatch = _DISPATCH
        data = self.data
        n = len(data)
        max_ops = self.limits.max_ops
        while True:
            if self.pos >= n:
                self.op_pos = self.pos
                raise self.error("pickle data was truncated (no STOP opcode)", "truncated")
            self.op_pos = self.pos
            code = data[self.pos]
            self.pos += 1
            self.ops += 1
            if self.ops > max_ops:
                raise self.error("pickle has too many opcodes", "limit")
            handler = dispatch.get(code)
            if handler is None:
                raise self.error(f"unknown pickle opcode 0x{code:02x}")
            if handler is _op_stop:
                value = self.pop()
                if self.frame_end is not None and self.frame_end > self.pos:
                    self._frame_anomaly("the pickle stops before the end of its FRAME")
                return value
            handler(self)


# -- opcode handlers (module-level functions keep dispatch cheap) ---------------------------


def _op_stop(vm: PickleVM) -> None:  # handled in run()
    pass


def _op_mark(vm: PickleVM) -> None:
    if len(vm.marks) >= vm.limits.max_marks:
        raise vm.error("too many MARKs", "limit")
    vm.marks.append(len(vm.stack))


def _op_pop(vm: PickleVM) -> None:
    if vm.marks and vm.marks[-1] == len(vm.stack):
        vm.marks.pop()
    else:
        vm.pop()


def _op_pop_mark(vm: PickleVM) -> None:
    vm.pop_mark()


def _op_dup(vm: PickleVM) -> None:
    vm.push(vm.top())


def _op_proto(vm: PickleVM) -> None:
    proto = vm._read(1)[0]
    if proto > 5:
        raise vm.error(f"unsupported pickle protocol: {proto}")
    vm.proto = proto


def _op_frame(vm: PickleVM) -> None:
    size = vm._u("<Q", 8)
    fe = vm.frame_end
    if fe is not None and vm.pos < fe:
        # The C unpickler reads on in the current buffer; Python's own unpickler refuses.
        vm._frame_anomaly("a FRAME begins before the previous one ends")
        if vm.pos + size <= fe:
            return  # the new frame lies inside the current buffer: C just reads on
    vm._read(size)  # the C unpickler reads the whole frame (a straddle drops the old buffer) ...
    vm.pos -= size  # ... and rewinds to its start
    vm.frame_end = vm.pos + size


def _op_int(vm: PickleVM) -> None:
    line = vm._readline()
    if not line:
        raise vm.error("pickle data was truncated (empty INT line)")
    try:
        vm.push(parse_int_line(line))
    except ValueError:
        raise vm.error(f"invalid literal for INT: {line[:40]!r}") from None


def _op_long(vm: PickleVM) -> None:
    line = vm._readline()
    if not line:
        raise vm.error("pickle data was truncated (empty LONG line)")
    if line.endswith("L"):
        line = line[:-1]
    try:
        vm.push(c_int(line, 0))
    except ValueError:
        raise vm.error(f"invalid literal for LONG: {line[:40]!r}") from None


def _op_binint(vm: PickleVM) -> None:
    vm.push(vm._u("<i", 4))


def _op_binint1(vm: PickleVM) -> None:
    vm.push(vm._read(1)[0])


def _op_binint2(vm: PickleVM) -> None:
    vm.push(vm._u("<H", 2))


def _long_bytes(vm: PickleVM, size: int) -> None:
    if size < 0:
        raise vm.error("LONG pickle has negative byte count")
    value = int.from_bytes(vm._read(size), "little", signed=True)
    # CPython builds it; so do we (linear time), but a huge one is never rendered as digits.
    vm.push(BigInt(value) if size > vm.limits.max_long_bytes else value)


def _op_long1(vm: PickleVM) -> None:
    _long_bytes(vm, vm._read(1)[0])


def _op_long4(vm: PickleVM) -> None:
    _long_bytes(vm, vm._u("<i", 4))


def _op_none(vm: PickleVM) -> None:
    vm.push(None)


def _op_true(vm: PickleVM) -> None:
    vm.push(True)


def _op_false(vm: PickleVM) -> None:
    vm.push(False)


def _op_float(vm: PickleVM) -> None:
    line = _cstr(vm._readline())
    # PyOS_string_to_double takes ASCII only, no surrounding spaces and no underscores, unlike
    # float(); and an overflow (1e999) raises OverflowError where float() gives inf.
    if not line or not line.isascii() or line[0] in _SPACE or line[-1] in _SPACE or "_" in line \
            or any(c in line for c in "\x1c\x1d\x1e\x1f"):
        raise vm.error(f"invalid literal for FLOAT: {line[:40]!r}")
    try:
        value = float(line)
    except ValueError:
        raise vm.error(f"invalid literal for FLOAT: {line[:40]!r}") from None
    if value in (float("inf"), float("-inf")) and "inf" not in line.lower():
        raise vm.error(f"FLOAT literal overflows: {line[:40]!r}")
    vm.push(value)


def _op_binfloat(vm: PickleVM) -> None:
    vm.push(struct.unpack(">d", vm._read(8))[0])


def _decode_str(vm: PickleVM, raw: bytes) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise vm.error("invalid UTF-8 in a string") from None


def _push_bytes(vm: PickleVM, size: int) -> None:
    if size < 0:
        raise vm.error("negative byte count")
    start = vm.pos
    value = FileBytes(vm._read(size, into=True))
    value.offset = vm.base + start
    vm.note_blob(value)
    vm.push(value)


def _op_binbytes(vm: PickleVM) -> None:
    _push_bytes(vm, vm._u("<I", 4))


def _op_short_binbytes(vm: PickleVM) -> None:
    _push_bytes(vm, vm._read(1)[0])


def _op_binbytes8(vm: PickleVM) -> None:
    _push_bytes(vm, vm._u("<Q", 8))


def _op_bytearray8(vm: PickleVM) -> None:
    value = vm._read(vm._u("<Q", 8), into=True)
    vm.note_blob(value)
    vm.push(bytearray(value))


def _op_binunicode(vm: PickleVM) -> None:
    vm.push(_decode_str(vm, vm._read(vm._u("<I", 4))))


def _op_short_binunicode(vm: PickleVM) -> None:
    vm.push(_decode_str(vm, vm._read(vm._read(1)[0])))


def _op_binunicode8(vm: PickleVM) -> None:
    vm.push(_decode_str(vm, vm._read(vm._u("<Q", 8))))


def _py2_string(vm: PickleVM, raw: bytes) -> Any:
    # Python 2 str: torch and numpy loaders decode with latin1 / utf-8; we keep text.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin1")


def _op_string(vm: PickleVM) -> None:
    line = vm._readline()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "'\"":
        body = line[1:-1]
    else:
        raise vm.error("the STRING opcode argument must be quoted")
    try:
        raw = codecs.escape_decode(body.encode("utf-8", "surrogateescape"))[0]
    except ValueError:
        raise vm.error("invalid escape in STRING") from None
    vm.push(_py2_string(vm, raw))


def _op_binstring(vm: PickleVM) -> None:
    size = vm._u("<i", 4)
    if size < 0:
        raise vm.error("BINSTRING pickle has negative byte count")
    vm.push(_py2_string(vm, vm._read(size)))


def _op_short_binstring(vm: PickleVM) -> None:
    vm.push(_py2_string(vm, vm._read(vm._read(1)[0])))


def _op_unicode(vm: PickleVM) -> None:
    line = vm._readline()
    try:
        vm.push(line.encode("utf-8", "surrogateescape").decode("raw-unicode-escape"))
    except UnicodeDecodeError:
        raise vm.error("invalid UNICODE literal") from None


def _op_empty_tuple(vm: PickleVM) -> None:
    vm.push(())


def _op_tuple(vm: PickleVM) -> None:
    items = vm.pop_mark()
    vm._count()
    vm.push(vm.nested(tuple(items), items))


def _make_tupleN(n: int) -> Callable[[PickleVM], None]:
    def op(vm: PickleVM) -> None:
        if len(vm.stack) - vm._fence() < n:
            raise vm.error("unpickling stack underflow")
        items = tuple(vm.stack[-n:])
        del vm.stack[-n:]
        vm._count()
        vm.push(vm.nested(items, items))

    return op


def _op_empty_list(vm: PickleVM) -> None:
    vm._count()
    vm.push([])


def _op_list(vm: PickleVM) -> None:
    items = vm.pop_mark()
    vm._count()
    vm._grow(len(items))
    vm.push(list(items))


def _op_empty_dict(vm: PickleVM) -> None:
    vm._count()
    vm.push({})


def _set_items(vm: PickleVM, target: Any, pairs: list[Any]) -> None:
    if len(pairs) % 2:
        raise vm.error("odd number of items for SETITEMS")
    vm._grow(len(pairs) // 2)
    if isinstance(target, Symbolic):
        return
    if isinstance(target, (VMObject, VMCallable)):
        _foreign_container_call(vm, target, "__setitem__")
        return
    if not isinstance(target, dict):
        raise vm.error(f"SETITEM on a {type(target).__name__} is not allowed")
    try:
        for i in range(0, len(pairs), 2):
            target[pairs[i]] = pairs[i + 1]
    except TypeError:
        raise vm.error("unhashable dictionary key") from None


def _foreign_container_call(vm: PickleVM, target: Any, method: str) -> None:
    # On anything but a real dict/list/set, CPython looks the method up on the object (the
    # instance dict included) and calls it: nn.ParameterDict.__setitem__ setattr()s its key.
    what = getattr(target, "qualname", type(target).__name__)
    vm.unsafe(f"SETITEM/APPEND/ADDITEMS on {what}: CPython calls its {method} with the pickle's values", "call")


def _op_dict(vm: PickleVM) -> None:
    items = vm.pop_mark()
    d: dict[Any, Any] = {}
    vm._count()
    _set_items(vm, d, items)
    vm.push(d)


def _op_setitem(vm: PickleVM) -> None:
    value = vm.pop()
    key = vm.pop()
    _set_items(vm, vm.top(), [key, value])


def _op_setitems(vm: PickleVM) -> None:
    items = vm.pop_mark()
    _set_items(vm, vm.top(), items)


def _append(vm: PickleVM, target: Any, items: list[Any]) -> None:
    vm._grow(len(items))
    if isinstance(target, Symbolic):
        return
    if isinstance(target, (VMObject, VMCallable)):
        _foreign_container_call(vm, target, "append/extend")
        return
    if isinstance(target, bytearray):
        # CPython calls the object's own append/extend: a bytearray takes ints 0..255
        if not all(type(x) is int and 0 <= x < 256 for x in items):
            raise vm.error("APPEND of a value that is not a byte to a bytearray")
        target.extend(items)
        return
    if not isinstance(target, list):
        raise vm.error(f"APPEND on a {type(target).__name__} is not allowed")
    target.extend(items)


def _op_append(vm: PickleVM) -> None:
    value = vm.pop()
    _append(vm, vm.top(), [value])


def _op_appends(vm: PickleVM) -> None:
    items = vm.pop_mark()
    _append(vm, vm.top(), items)


def _op_empty_set(vm: PickleVM) -> None:
    vm._count()
    vm.push(set())


def _op_additems(vm: PickleVM) -> None:
    items = vm.pop_mark()
    target = vm.top()
    vm._grow(len(items))
    if isinstance(target, Symbolic):
        return
    if isinstance(target, (VMObject, VMCallable)):
        _foreign_container_call(vm, target, "add")
        return
    if not isinstance(target, set):
        raise vm.error(f"ADDITEMS on a {type(target).__name__} is not allowed")
    try:
        target.update(items)
    except TypeError:
        raise vm.error("unhashable set item") from None


def _op_frozenset(vm: PickleVM) -> None:
    items = vm.pop_mark()
    vm._count()
    try:
        vm.push(vm.nested(frozenset(items), items))
    except TypeError:
        raise vm.error("unhashable set item") from None


# memo ------------------------------------------------------------------------------------


def _memo_put(vm: PickleVM, index: int) -> None:
    if index < 0:
        raise vm.error("negative PUT argument")
    if index not in vm.memo and len(vm.memo) >= vm.limits.max_memo:
        raise vm.error("pickle memo exceeds the limit", "limit")
    vm.memo[index] = vm.top()


def _memo_get(vm: PickleVM, index: int) -> None:
    try:
        vm.push(vm.memo[index])
    except KeyError:
        raise vm.error(f"memo key {index} is not defined") from None


def _op_put(vm: PickleVM) -> None:
    line = vm._readline()
    if not line:
        raise vm.error("pickle data was truncated (empty PUT line)")
    try:
        index = c_int(line, 10)
    except ValueError:
        raise vm.error("invalid PUT argument") from None
    _memo_put(vm, index)


def _op_binput(vm: PickleVM) -> None:
    _memo_put(vm, vm._read(1)[0])


def _op_long_binput(vm: PickleVM) -> None:
    _memo_put(vm, vm._u("<I", 4))


def _op_memoize(vm: PickleVM) -> None:
    _memo_put(vm, len(vm.memo))


def _op_get(vm: PickleVM) -> None:
    line = vm._readline()
    if not line:
        raise vm.error("pickle data was truncated (empty GET line)")
    try:
        index = c_int(line, 10)
    except ValueError:
        raise vm.error("invalid GET argument") from None
    _memo_get(vm, index)


def _op_binget(vm: PickleVM) -> None:
    _memo_get(vm, vm._read(1)[0])


def _op_long_binget(vm: PickleVM) -> None:
    _memo_get(vm, vm._u("<I", 4))


# globals and object construction -----------------------------------------------------------


def _op_global(vm: PickleVM) -> None:
    module = vm._readline()
    name = vm._readline()
    vm.push(vm.find_global(module, name))


def _op_stack_global(vm: PickleVM) -> None:
    name = vm.pop()
    module = vm.pop()
    if not isinstance(module, str) or not isinstance(name, str):
        vm.push(vm.find_global(module, name))  # the policy sees a non-constant name
        return
    vm.push(vm.find_global(module, name))


def _op_ext(size: int) -> Callable[[PickleVM], None]:
    fmt = {1: "<B", 2: "<H", 4: "<i"}[size]

    def op(vm: PickleVM) -> None:
        code = vm._u(fmt, size)
        if code <= 0:
            raise vm.error("EXT specifies code <= 0")
        if vm.policy.extension is None:
            raise vm.error(f"unregistered extension code {code}")
        vm.push(vm.policy.extension(code, vm.base + vm.op_pos))

    return op


def _op_reduce(vm: PickleVM) -> None:
    args = vm.pop()
    func = vm.pop()
    vm.push(vm.call(func, args))


def _op_newobj(vm: PickleVM) -> None:
    args = vm.pop()
    cls = vm.pop()
    vm.push(vm.instantiate(cls, args, {}))


def _op_newobj_ex(vm: PickleVM) -> None:
    kwargs = vm.pop()
    args = vm.pop()
    cls = vm.pop()
    vm.push(vm.instantiate(cls, args, kwargs))


def _instantiate_old(vm: PickleVM, cls: Any, args: tuple[Any, ...]) -> Any:
    # OBJ/INST (_pickle.c instantiate): with no arguments a class is only __new__'d; with
    # arguments it is called, __init__ and all (and a function is simply called).
    return vm.call(cls, args) if args else vm.instantiate(cls, args, {})


def _op_obj(vm: PickleVM) -> None:
    items = vm.pop_mark()
    if not items:
        raise vm.error("OBJ without a class")
    vm.push(_instantiate_old(vm, items[0], tuple(items[1:])))


def _op_inst(vm: PickleVM) -> None:
    module = vm._readline()
    name = vm._readline()
    items = vm.pop_mark()
    cls = vm.find_global(module, name)
    vm.push(_instantiate_old(vm, cls, tuple(items)))


def is_dunder(key: Any) -> bool:
    """A state key that could reach Python's object protocol (``__setstate__``, ``__class__``...)."""
    return isinstance(key, str) and (key.startswith("__") or key.endswith("__"))


def check_state(vm: PickleVM, state: Any, target: str, *, slots: bool = True, data_only: bool = True) -> bool:
    """Check state that CPython or torch would apply to ``target`` (BUILD, ``_set_obj_state``).

    CPython's BUILD calls ``inst.__setstate__(state)`` when ``getattr`` finds one, which searches
    the instance dict as well, which an earlier BUILD can fill; without one it writes the dict
    state into ``__dict__`` and ``setattr``s each slot state item, which reaches descriptors.
    torch's ``_set_obj_state`` ``setattr``s both. So a state is accepted only as ``None``, a dict
    of ordinary string keys, or (with ``slots``) a pair of those; a dunder key, or (with
    ``data_only``) a callable anywhere in the values, is unsafe.

    Returns:
        True when the state is plain; False when it was reported unsafe (scanner) -- the loader
        raises instead.
    """
    parts = list(state) if slots and isinstance(state, tuple) and len(state) == 2 else [state]
    for part in parts:
        if part is None or isinstance(part, Symbolic):
            continue
        if not isinstance(part, dict):
            vm.unsafe(f"state of type {type(part).__name__} applied to {target} (only a dict of plain data is safe)",
                      "state")
            return False
        for key in part:
            if not isinstance(key, str) or is_dunder(key):
                vm.unsafe(f"state key {str(key)[:60]!r} applied to {target}: CPython would set it as an attribute "
                          "(a planted __setstate__ or __reduce__ runs on the next BUILD)", "state")
                return False
        if data_only:
            bad = _first_callable(vm, part)
            if bad is not None:
                vm.unsafe(f"state applied to {target} holds {bad}, a callable (only plain data is safe)", "state")
                return False
    return True


def _first_callable(vm: PickleVM, root: Any) -> str | None:
    """The qualname of the first callable reachable from ``root``, or None (bounded walk)."""
    todo = [root]
    seen: set[int] = set()
    while todo:
        node = todo.pop()
        vm.state_walk += 1
        if vm.state_walk > vm.limits.max_objects:
            raise vm.error("object states are too large to check", "limit")
        if isinstance(node, VMCallable):
            return node.qualname
        if id(node) in seen:
            continue
        if isinstance(node, dict):
            seen.add(id(node))
            todo.extend(node.keys())
            todo.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            seen.add(id(node))
            todo.extend(node)
    return None


def _op_build(vm: PickleVM) -> None:
    state = vm.pop()
    inst = vm.top()
    if isinstance(inst, Symbolic):
        return
    if isinstance(inst, VMObject):
        inst.build(vm, state)
        return
    if isinstance(inst, VMCallable):
        # A function or class: BUILD sets attributes on it, for the whole process.
        vm.unsafe(f"BUILD on {inst.qualname} changes that function or class for the whole process", "state")
        return
    if isinstance(inst, OrderedDict):
        # torch state dicts carry ``_metadata`` this way; never setattr dunders.
        if check_state(vm, state, "an OrderedDict"):
            for part in (state if isinstance(state, tuple) and len(state) == 2 else (state,)):
                if isinstance(part, dict):
                    inst.__dict__.update(part)
        return
    # A str, int, dict, list ... has neither __setstate__ nor __dict__: CPython's BUILD does
    # nothing with a None state and raises for any other.
    if state is None:
        return
    raise vm.error(f"BUILD is not allowed on a {type(inst).__name__}")


def _persistent(vm: PickleVM, pid: Any) -> None:
    if vm.policy.persistent_load is None:
        raise vm.error("a persistent id was found, but this container does not use them")
    vm._count()
    try:
        value = vm.policy.persistent_load(pid)
    except ValueError as exc:  # the container's loader rejects the id
        raise vm.error(str(exc)) from None
    vm.push(value)


def _op_persid(vm: PickleVM) -> None:
    _persistent(vm, vm._readline())


def _op_binpersid(vm: PickleVM) -> None:
    _persistent(vm, vm.pop())


def _op_next_buffer(vm: PickleVM) -> None:
    raise vm.error("NEXT_BUFFER needs out-of-band buffers, which model files never have")


def _op_readonly_buffer(vm: PickleVM) -> None:
    # CPython makes a memoryview of the top: anything without the buffer protocol raises.
    top = vm.top()
    if not isinstance(top, (bytes, bytearray, VMObject, Symbolic)):
        raise vm.error(f"READONLY_BUFFER on a {type(top).__name__}, which is not a buffer")


_DISPATCH: dict[int, Callable[[PickleVM], None]] = {
    ord("("): _op_mark,
    ord("."): _op_stop,
    ord("0"): _op_pop,
    ord("1"): _op_pop_mark,
    ord("2"): _op_dup,
    ord("F"): _op_float,
    ord("I"): _op_int,
    ord("J"): _op_binint,
    ord("K"): _op_binint1,
    ord("L"): _op_long,
    ord("M"): _op_binint2,
    ord("N"): _op_none,
    ord("P"): _op_persid,
    ord("Q"): _op_binpersid,
    ord("R"): _op_reduce,
    ord("S"): _op_string,
    ord("T"): _op_binstring,
    ord("U"): _op_short_binstring,
    ord("V"): _op_unicode,
    ord("X"): _op_binunicode,
    ord("a"): _op_append,
    ord("b"): _op_build,
    ord("c"): _op_global,
    ord("d"): _op_dict,
    ord("}"): _op_empty_dict,
    ord("e"): _op_appends,
    ord("g"): _op_get,
    ord("h"): _op_binget,
    ord("i"): _op_inst,
    ord("j"): _op_long_binget,
    ord("l"): _op_list,
    ord("]"): _op_empty_list,
    ord("o"): _op_obj,
    ord("p"): _op_put,
    ord("q"): _op_binput,
    ord("r"): _op_long_binput,
    ord("s"): _op_setitem,
    ord("t"): _op_tuple,
    ord(")"): _op_empty_tuple,
    ord("u"): _op_setitems,
    ord("G"): _op_binfloat,
    0x80: _op_proto,
    0x81: _op_newobj,
    0x82: _op_ext(1),
    0x83: _op_ext(2),
    0x84: _op_ext(4),
    0x85: _make_tupleN(1),
    0x86: _make_tupleN(2),
    0x87: _make_tupleN(3),
    0x88: _op_true,
    0x89: _op_false,
    0x8A: _op_long1,
    0x8B: _op_long4,
    ord("B"): _op_binbytes,
    ord("C"): _op_short_binbytes,
    0x8C: _op_short_binunicode,
    0x8D: _op_binunicode8,
    0x8E: _op_binbytes8,
    0x8F: _op_empty_set,
    0x90: _op_additems,
    0x91: _op_frozenset,
    0x92: _op_newobj_ex,
    0x93: _op_stack_global,
    0x94: _op_memoize,
    0x95: _op_frame,
    0x96: _op_bytearray8,
    0x97: _op_next_buffer,
    0x98: _op_readonly_buffer,
}

PICKLE_OPCODES = frozenset(_DISPATCH)


def looks_like_pickle(head: bytes) -> bool:
    """A cheap content test: a PROTO opcode (2..5) or a protocol-0/1 opening opcode."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    return bool(head) and head[0] in b"(}]cN)KJ" and len(head) > 1


def looks_nested(head: bytes) -> bool:
    """A byte constant worth scanning as a nested file: a pickle with a PROTO header, or a zip."""
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"


@functools.cache
def _opcode_names() -> dict[int, str]:
    import pickletools  # opcode metadata only; imported on first use (a clean scan never names an opcode)

    return {ord(op.code): op.name for op in pickletools.opcodes}


def opcode_name(code: int) -> str | None:
    """The name of the pickle opcode ``code`` (``"REDUCE"``), or None for a byte that is none."""
    return _opcode_names().get(code)
