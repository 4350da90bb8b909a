"""The allow-list: the only globals a model pickle may name, and our own inert implementations.

One table (``ALLOWED``) serves two consumers: the safe reader (anything outside the table raises
``UnsafeFileError``) and the static scanner (anything outside the table is a finding). So "scan
says safe" exactly when "safe load succeeds". A global is matched by its exact module and name,
never by prefix.

Nothing here imports or calls what the file names. Tensor rebuilds return ``TensorSpec`` records
that point into the file; storages are ``StorageRef`` records resolved later by the container
reader; harmless classes seen in real checkpoints (a Lightning callback, ``argparse.Namespace``)
become ``Placeholder`` objects that hold their state as plain data.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import dtypes
from ..dtypes import DType
from .pickle_vm import (
    FileBytes,
    Limits,
    PickleError,
    PickleVM,
    Policy,
    Symbolic,
    VMCallable,
    VMObject,
    check_state,
)

# ---------------------------------------------------------------------------------------------
# Records the allowed callables produce.


class StorageType(VMCallable):
    """A torch storage class global (``torch.FloatStorage``); only ever a persistent-id tag."""

    def __init__(self, qualname: str, dtype: DType | None):
        self.qualname = qualname
        self.dtype = dtype  # None for UntypedStorage (bytes)

    def call(self, vm: PickleVM, args: tuple[Any, ...]) -> Any:
        return vm.unsafe(f"{self.qualname} is called (it allocates or reads storage), which model files never do",
                         "call")


class DTypeConst:
    """A ``torch.float16``-style dtype global."""

    def __init__(self, dtype: DType):
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.dtype.name}"


@dataclass
class StorageRef:
    """One storage: a run of bytes in the file.

    ``key`` names it inside its container; ``file_offset`` is set once the reader has located
    it (streams such as plain pickles know it at once).
    """

    key: str
    dtype: DType
    numel: int
    location: str = "cpu"
    file_offset: int | None = None
    nbytes: int | None = None
    byteorder: str = "little"
    # Legacy streams can pickle a view of a bigger storage: (root key, element offset).
    view_of: tuple[str, int] | None = None
    # Bytes that are not verbatim in the file (protocol-2 pickles spell them as latin1 text).
    inline: bytes | None = None

    def __repr__(self) -> str:
        return f"<storage {self.key} {self.dtype} x{self.numel}>"


class TensorSpec(VMObject):
    """A tensor described by a rebuild call: a view into a storage."""

    def __init__(self, storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], dtype: DType):
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride
        self.dtype = dtype

    def build(self, vm: PickleVM, state: Any) -> None:
        # BUILD on a tensor calls Tensor.__setstate__ (unless an instance-dict one shadows it),
        # whose 3-tuple form sets requires_grad and _backward_hooks. torch never writes it; only
        # its harmless form (no hooks) passes.
        if isinstance(state, tuple) and len(state) == 3 and isinstance(state[0], bool) and _no_hooks(state[2]):
            return
        vm.unsafe("BUILD on a tensor runs Tensor.__setstate__ with state torch never writes (it can install hooks)",
                  "state")

    def __repr__(self) -> str:
        return f"<tensor {self.dtype} {list(self.shape)}>"


class NumpyDType(VMObject):
    """``numpy.dtype('<f4')`` for a non-object dtype."""

    def __init__(self, dtype: DType, byteorder: str = "<"):
        self.dtype = dtype
        self.byteorder = byteorder

    def build(self, vm: PickleVM, state: Any) -> None:
        # numpy.dtype.__setstate__: (version, byteorder, subarray, names, fields, elsize,
        # alignment, flags[, metadata]). Plain numeric dtypes have no subarray, names or fields,
        # elsize and alignment -1 and flags 0. Object flags (NPY_ITEM_HASOBJECT, NPY_LIST_PICKLE,
        # ...) make numpy keep Python objects in the array: numpy accepts them and then unpickles
        # objects, so any flag is unsafe.
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[1] not in ("<", ">", "|", "="):
            vm.unsafe("a numpy dtype state of a form numpy's own pickles never have", "state")
            return
        flags = state[7]
        if type(flags) is not int or flags != 0:
            vm.unsafe(f"a numpy dtype state with flags {flags!r} (object flags make numpy unpickle objects)", "state")
            return
        if state[2] is not None or state[3] is not None or state[4] is not None or state[5] != -1 or state[6] != -1 \
                or (len(state) == 9 and state[8] is not None):
            vm.unsafe("a structured, sub-array or sized numpy dtype state (only plain numeric dtypes are safe)", "state")
            return
        self.byteorder = state[1]

    def __repr__(self) -> str:
        return f"numpy.dtype({self.dtype.name})"


class NumpyArray(VMObject):
    """An ndarray pickled by ``numpy.core.multiarray._reconstruct`` + BUILD."""

    def __init__(self) -> None:
        self.spec: TensorSpec | None = None

    def build(self, vm: PickleVM, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise vm.error("unexpected ndarray state")
        _version, shape, dtype, fortran, raw = state
        if not isinstance(dtype, NumpyDType):
            raise vm.error("ndarray dtype is not an allowed numpy dtype")
        if not isinstance(raw, (bytes, bytearray)):
            raise vm.error("ndarray data is not raw bytes (object arrays are pickles, refused)")
        shape = _int_tuple(vm, shape, "ndarray shape")
        numel = _prod(shape)
        if numel * dtype.dtype.itemsize != len(raw):
            raise vm.error("ndarray data size does not match its shape")
        stride = _contiguous_strides(shape, fortran=bool(fortran))
        # Protocol 3+ keeps the bytes verbatim in the file; protocol 2 spells them as latin1 text.
        offset = raw.offset if isinstance(raw, FileBytes) else None
        in_file = offset is not None
        storage = StorageRef(
            key=f"@{offset}" if in_file else f"@inline{id(self)}", dtype=dtype.dtype, numel=numel,
            file_offset=offset if in_file else 0, nbytes=len(raw),
            byteorder="big" if dtype.byteorder == ">" else "little", inline=None if in_file else bytes(raw),
        )
        self.spec = TensorSpec(storage, 0, shape, stride, dtype.dtype)


class Placeholder(VMCallable):
    """A harmless class seen in real files; instantiating it yields an inert ``PlaceholderObject``."""

    def __init__(self, qualname: str):
        self.qualname = qualname

    def call(self, vm: PickleVM, args: tuple[Any, ...]) -> Any:
        # REDUCE (and OBJ/INST with arguments) runs the real class's __init__ on the arguments.
        # Files build these with no arguments (copyreg.__newobj__, _reconstructor) or, for
        # TorchVersion (a str), from one string; arguments handed to any other __init__ are not
        # plain data any more (ModelCheckpoint opens file systems, ParameterDict calls .keys()).
        if args and not self._text_ok(args):
            return vm.unsafe(f"{self.qualname} is called with arguments: its real __init__ would run on them", "call")
        return PlaceholderObject(self.qualname, args)

    def new(self, vm: PickleVM, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # NEWOBJ / NEWOBJ_EX / OBJ and INST without arguments: cls.__new__(cls, *args, **kwargs).
        if kwargs or (args and not self._text_ok(args)):
            return vm.unsafe(f"{self.qualname}.__new__ is given arguments no file of this kind has", "call")
        return PlaceholderObject(self.qualname, args)

    def _text_ok(self, args: tuple[Any, ...]) -> bool:
        return self.qualname == "torch.torch_version.TorchVersion" and len(args) == 1 and isinstance(args[0], str)

    def __repr__(self) -> str:
        return f"<placeholder {self.qualname}>"


class PlaceholderObject(VMObject):
    """An instance of a placeholder class: its constructor args and BUILD state, as plain data."""

    def __init__(self, qualname: str, args: tuple[Any, ...]):
        self.qualname = qualname
        self.args = args
        self.state: Any = None

    def build(self, vm: PickleVM, state: Any) -> None:
        # A placeholder stands for a class we do not run: it takes a plain data dict of ordinary
        # string keys and nothing else (no slot state, no dunders, no callables).
        if not check_state(vm, state, self.qualname, slots=False):
            return
        if isinstance(self.state, dict) and isinstance(state, dict):
            self.state.update(state)
        else:
            self.state = state

    def __repr__(self) -> str:
        return f"<placeholder {self.qualname}>"


# ---------------------------------------------------------------------------------------------
# Argument checking shared by the implementations.


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _contiguous_strides(shape: tuple[int, ...], fortran: bool = False) -> tuple[int, ...]:
    dims = list(reversed(shape)) if not fortran else list(shape)
    strides: list[int] = []
    acc = 1
    for s in dims:
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides)) if not fortran else tuple(strides)


def _int_tuple(vm: PickleVM, value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise vm.error(f"{what} must be a tuple of non-negative ints")
    if len(value) > 64:
        raise vm.error(f"{what} has too many dimensions")
    return value


def _tensor(vm: PickleVM, storage: Any, offset: Any, size: Any, stride: Any, dtype: DType | None) -> TensorSpec:
    if not isinstance(storage, StorageRef):
        raise vm.error("tensor rebuild without a storage")
    if type(offset) is not int or offset < 0:
        raise vm.error("tensor storage offset must be a non-negative int")
    shape = _int_tuple(vm, size, "tensor size")
    strides = _int_tuple(vm, stride, "tensor stride")
    if len(shape) != len(strides):
        raise vm.error("tensor size and stride differ in length")
    return TensorSpec(storage, offset, shape, strides, dtype or storage.dtype)


# ---------------------------------------------------------------------------------------------
# The allowed callables.


class _Fn(VMCallable):
    def __init__(self, qualname: str, fn: Callable[[PickleVM, tuple[Any, ...]], Any], arity: tuple[int, int]):
        self.qualname = qualname
        self.fn = fn
        self.arity = arity

    def call(self, vm: PickleVM, args: tuple[Any, ...]) -> Any:
        lo, hi = self.arity
        if not lo <= len(args) <= hi:
            raise vm.error(f"{self.qualname} takes {lo}..{hi} arguments, got {len(args)}")
        return self.fn(vm, args)

    def __repr__(self) -> str:
        return self.qualname


def _no_hooks(hooks: Any) -> bool:
    """Backward hooks as torch writes them: none (an empty OrderedDict, or None)."""
    return hooks is None or (isinstance(hooks, dict) and not hooks)


def _check_hooks(vm: PickleVM, hooks: Any, fn: str) -> None:
    # torch sets tensor._backward_hooks to this value; hooks are called during backward(). torch
    # never pickles hooks ("Don't serialize hooks"), so anything but an empty mapping is planted.
    if not _no_hooks(hooks) and not isinstance(hooks, Symbolic):
        vm.unsafe(f"{fn} installs backward hooks ({type(hooks).__name__}), which torch never saves", "call")


def _rebuild_v1(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    return _tensor(vm, a[0], a[1], a[2], a[3], None)


def _rebuild_v2(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    if len(a) > 5:
        _check_hooks(vm, a[5], "torch._utils._rebuild_tensor_v2")
    return _tensor(vm, a[0], a[1], a[2], a[3], None)


def _rebuild_v3(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    _check_hooks(vm, a[5], "torch._utils._rebuild_tensor_v3")
    if not isinstance(a[6], DTypeConst):
        raise vm.error("_rebuild_tensor_v3 needs a torch dtype")
    return _tensor(vm, a[0], a[1], a[2], a[3], a[6].dtype)


def _rebuild_parameter(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    # (data, requires_grad, backward_hooks); torch sets param._backward_hooks = backward_hooks.
    _check_hooks(vm, a[2], "torch._utils._rebuild_parameter")
    if not isinstance(a[0], TensorSpec):
        raise vm.error("_rebuild_parameter needs a tensor")
    return a[0]


def _rebuild_parameter_with_state(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    # (data, requires_grad, backward_hooks, state): the state goes through _set_obj_state, which
    # setattr()s every key of the dict state and of the slot state on the new Parameter.
    param = _rebuild_parameter(vm, a[:3])
    check_state(vm, a[3], "a Parameter (torch._utils._set_obj_state)")
    return param


def _rebuild_from_type_v2(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    # ret = func(*args); ret.as_subclass(new_type); then the state: through new_type.__setstate__
    # if it has its own, else torch._utils._set_obj_state (setattr of every key).
    func, new_type, args, state = a
    if not isinstance(func, _Fn) or not func.qualname.startswith("torch._utils._rebuild_"):
        raise vm.error("_rebuild_from_type_v2 may only wrap a tensor rebuild")
    if not (isinstance(new_type, _TypeConst) and new_type.qualname in _TENSOR_TYPES):
        raise vm.error("_rebuild_from_type_v2 may only build torch.Tensor or Parameter")
    if not isinstance(args, tuple):
        raise vm.error("_rebuild_from_type_v2 arguments must be a tuple")
    check_state(vm, state, f"a {new_type.qualname} (torch._utils._set_obj_state)")
    return vm.call(func, args)


def _ordered_dict(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    if a and not isinstance(a[0], (list, tuple, dict)):
        raise vm.error("OrderedDict argument must be pairs")
    try:
        return OrderedDict(*a)
    except (TypeError, ValueError):
        raise vm.error("bad OrderedDict argument") from None


def _set(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    # set(iterable): strings and bytes iterate too (set("ab") is {"a", "b"})
    if a and not isinstance(a[0], (list, tuple, set, frozenset, str, bytes, bytearray)):
        return vm.unsafe(f"set() of a {type(a[0]).__name__}: CPython iterates it, which runs its __iter__", "call")
    try:
        return set(*a)
    except TypeError:
        raise vm.error("unhashable set item") from None


def _frozenset(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    value = _set(vm, a)
    return frozenset(value) if isinstance(value, set) else value


def _bytearray(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    # bytearray() / (bytes-like) / (list of ints) / (int) / (str, encoding[, errors])
    if len(a) >= 2:
        if not isinstance(a[0], str):
            raise vm.error("bytearray with an encoding needs text")
        value = _encode(vm, a[0], a[1], a[2] if len(a) > 2 else "strict", "bytearray")
        return bytearray(value) if isinstance(value, bytes) else value
    if not a:
        return bytearray()
    arg = a[0]
    if isinstance(arg, (bytes, bytearray)):
        return bytearray(arg)
    if isinstance(arg, (list, tuple)):
        if not all(type(x) is int and 0 <= x < 256 for x in arg):
            raise vm.error("bytearray argument must be bytes")
        return bytearray(arg)
    if type(arg) is int and 0 <= arg <= 1 << 20:
        return bytearray(arg)
    return vm.unsafe(f"bytearray() of a {type(arg).__name__}, which modelkit does not model", "call")


def _bytes(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    value = _bytearray(vm, a)
    return bytes(value) if isinstance(value, bytearray) else value


class CodecBytes(bytes):
    """Bytes from ``_codecs.encode`` of a string constant: a constant too (how protocol 2 spells
    ``bytes``), unlike bytes built from lists or joins at run time."""


#: Encodings ``_codecs.encode`` is modelled for, by the name ``codecs.lookup`` normalises to.
_CODECS = {"latin_1": "latin1", "latin1": "latin1", "iso_8859_1": "latin1", "iso8859_1": "latin1", "8859": "latin1",
           "cp819": "latin1", "latin": "latin1", "l1": "latin1", "utf_8": "utf-8", "utf8": "utf-8", "u8": "utf-8",
           "utf": "utf-8", "utf8_ucs2": "utf-8", "utf8_ucs4": "utf-8"}


def _codec(name: str) -> str | None:
    """The encoding ``codecs.lookup`` would find for ``name``, among those modelled."""
    return _CODECS.get(name.strip().lower().replace("-", "_").replace(" ", "_"))


def _encode(vm: PickleVM, text: str, name: Any, errors: Any, fn: str) -> Any:
    """``text.encode(name, errors)`` for the encodings modelled; anything else is unsafe."""
    if not isinstance(name, str) or not isinstance(errors, str):
        raise vm.error(f"{fn} needs an encoding name")
    codec = _codec(name)
    if codec is None or errors != "strict":
        return vm.unsafe(f"{fn} with encoding {name[:40]!r} and errors {errors[:20]!r}, whose bytes "
                         "modelkit does not model", "call")
    try:
        return text.encode(codec)
    except UnicodeEncodeError:
        raise vm.error(f"{fn} text cannot be encoded as {codec}") from None


def _codecs_encode(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    # Protocol-2 pickles spell ``bytes`` as _codecs.encode(text, "latin1"). The signature is
    # encode(obj, encoding="utf-8", errors="strict"): with one argument the text is UTF-8 encoded.
    # Only the latin1 spelling is a constant: that is what pickle writes; anything else is bytes
    # computed at run time.
    if not isinstance(a[0], str):
        return vm.unsafe(f"_codecs.encode of a {type(a[0]).__name__} (a bytes-to-bytes codec), which modelkit "
                         "does not model", "call")
    name = a[1] if len(a) > 1 else "utf-8"
    value = _encode(vm, a[0], name, a[2] if len(a) > 2 else "strict", "_codecs.encode")
    if not isinstance(value, bytes):
        return value
    if len(a) == 2 and _codec(name) == "latin1":
        value = CodecBytes(value)
    vm.note_blob(value)
    return value


def _torch_size(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    return _int_tuple(vm, a[0] if a else (), "torch.Size")


def _torch_device(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    if not all(isinstance(x, (str, int)) for x in a):
        raise vm.error("torch.device arguments must be a string and an index")
    return ":".join(str(x) for x in a)


def _numpy_dtype(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    code = a[0]
    dt = (dtypes.BY_NUMPY.get(code) or dtypes.BY_NUMPY.get(code[1:])) if isinstance(code, str) else None
    if dt is None:
        # object, structured, string and datetime dtypes: numpy builds them, and object ones
        # make it unpickle Python objects
        return vm.unsafe(f"numpy dtype {str(code)[:40]!r} is not a plain numeric dtype (object and structured "
                         "dtypes carry Python objects)", "call")
    return NumpyDType(dt, code[0] if code[0] in "<>|=" else "<")


def _numpy_scalar(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    if not isinstance(a[0], NumpyDType):
        raise vm.error("numpy scalar needs an allowed numpy dtype")
    if len(a) < 2 or not isinstance(a[1], bytes) or len(a[1]) != a[0].dtype.itemsize:
        raise vm.error("numpy scalar data does not match its dtype")
    import numpy as np

    order = ">" if a[0].byteorder == ">" else "<"
    assert a[0].dtype.numpy is not None
    value = np.frombuffer(a[1], dtype=np.dtype(order + a[0].dtype.numpy[1:]))[0]
    return value.item()


def _numpy_reconstruct(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    if not (isinstance(a[0], _TypeConst) and a[0].qualname == "numpy.ndarray"):
        raise vm.error("numpy _reconstruct may only build numpy.ndarray")
    return NumpyArray()


def _copyreg_reconstructor(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    cls, base, state = a
    if not isinstance(cls, Placeholder) or not (isinstance(base, _TypeConst) and base.qualname == "builtins.object"):
        raise vm.error("copyreg._reconstructor may only rebuild an allowed placeholder class")
    return PlaceholderObject(cls.qualname, ())


def _load_from_bytes(vm: PickleVM, a: tuple[Any, ...]) -> Any:
    # A plain pickle of a tensor holds its storage as a nested legacy torch.save stream. torch
    # hands it to torch's unrestricted loader (weights_only off) as a file of its own: zip, tar or
    # legacy, unrestricted. Only a constant (bytes spelled in the stream, or _codecs.encode of a
    # string constant) can be scanned before it runs; bytes built at run time cannot.
    raw = a[0]
    if not isinstance(raw, (FileBytes, CodecBytes)):
        if isinstance(raw, Symbolic):
            return raw
        return vm.unsafe(f"torch.storage._load_from_bytes on a {type(raw).__name__} built at run time (it runs "
                         "torch.load on it; only a constant can be scanned)", "call")
    from .torch_legacy import storage_from_nested_stream

    if not vm.scanning:
        return storage_from_nested_stream(vm, raw)
    vm.nested_loads.append(raw)  # the scanner scans it as a whole file too
    try:
        return storage_from_nested_stream(vm, raw)
    except PickleError:
        # Not a legacy stream of one storage (a zip, a tar, something broken): its own scan says
        # what torch.load would run; this stream goes on with a stand-in.
        return StorageRef(key=f"@nested{len(vm.nested_loads)}", dtype=dtypes.UINT8, numel=0, inline=b"")


class _TypeConst(VMCallable):
    """A type named only as an argument (``numpy.ndarray``, ``builtins.object``, ``torch.Tensor``)."""

    def __init__(self, qualname: str):
        self.qualname = qualname

    def call(self, vm: PickleVM, args: tuple[Any, ...]) -> Any:
        # torch.Tensor(...), numpy.ndarray(...), object(): CPython builds them; files never do
        return vm.unsafe(f"{self.qualname} is called, which model files never do", "call")

    def new(self, vm: PickleVM, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.call(vm, args)

    def __repr__(self) -> str:
        return self.qualname


_TENSOR_TYPES = {"torch.Tensor", "torch.nn.parameter.Parameter"}


# ---------------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class Allowed:
    """One allowed global: what it is for (``role``) and the object the VM gets for it."""

    module: str
    name: str
    role: str  # tensor | storage | dtype | container | numpy | placeholder | type | codec
    value: Any

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def _build_table() -> dict[tuple[str, str], Allowed]:
    rows: list[Allowed] = []

    def fn(module: str, name: str, role: str, impl: Callable[[PickleVM, tuple[Any, ...]], Any], lo: int, hi: int) -> None:
        rows.append(Allowed(module, name, role, _Fn(f"{module}.{name}", impl, (lo, hi))))

    fn("torch._utils", "_rebuild_tensor", "tensor", _rebuild_v1, 4, 4)
    fn("torch._utils", "_rebuild_tensor_v2", "tensor", _rebuild_v2, 6, 7)
    fn("torch._utils", "_rebuild_tensor_v3", "tensor", _rebuild_v3, 7, 8)
    fn("torch._utils", "_rebuild_parameter", "tensor", _rebuild_parameter, 3, 3)
    fn("torch._utils", "_rebuild_parameter_with_state", "tensor", _rebuild_parameter_with_state, 4, 4)
    fn("torch._tensor", "_rebuild_from_type_v2", "tensor", _rebuild_from_type_v2, 4, 4)
    fn("torch.storage", "_load_from_bytes", "storage", _load_from_bytes, 1, 1)
    for dt in dtypes.BY_STORAGE.values():
        assert dt.storage is not None
        for module in ("torch", "torch.cuda"):
            rows.append(Allowed(module, dt.storage, "storage", StorageType(f"{module}.{dt.storage}", dt)))
    for module in ("torch", "torch.storage"):
        rows.append(Allowed(module, "UntypedStorage", "storage", StorageType(f"{module}.UntypedStorage", None)))
    for dt in dtypes.BY_NAME.values():
        rows.append(Allowed("torch", dt.name, "dtype", DTypeConst(dt)))
    fn("torch", "Size", "container", _torch_size, 0, 1)
    fn("torch", "device", "container", _torch_device, 1, 2)
    fn("collections", "OrderedDict", "container", _ordered_dict, 0, 1)
    for module in ("builtins", "__builtin__"):
        fn(module, "set", "container", _set, 0, 1)
        fn(module, "frozenset", "container", _frozenset, 0, 1)
        fn(module, "bytearray", "container", _bytearray, 0, 3)
        fn(module, "bytes", "container", _bytes, 0, 3)
        rows.append(Allowed(module, "object", "type", _TypeConst("builtins.object")))
    fn("_codecs", "encode", "codec", _codecs_encode, 1, 3)
    for module in ("copyreg", "copy_reg"):
        fn(module, "_reconstructor", "placeholder", _copyreg_reconstructor, 3, 3)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        fn(module, "scalar", "numpy", _numpy_scalar, 1, 2)
        fn(module, "_reconstruct", "numpy", _numpy_reconstruct, 3, 3)
    fn("numpy", "dtype", "numpy", _numpy_dtype, 1, 3)
    rows.append(Allowed("numpy", "ndarray", "type", _TypeConst("numpy.ndarray")))
    rows.append(Allowed("torch", "Tensor", "type", _TypeConst("torch.Tensor")))
    rows.append(Allowed("torch.nn.parameter", "Parameter", "type", _TypeConst("torch.nn.parameter.Parameter")))
    for module, name in PLACEHOLDERS:
        rows.append(Allowed(module, name, "placeholder", Placeholder(f"{module}.{name}")))
    return {(r.module, r.name): r for r in rows}


#: Harmless classes found in real SD files; they load as inert placeholders listed in ``extras``.
PLACEHOLDERS: tuple[tuple[str, str], ...] = (
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("pytorch_lightning.callbacks.early_stopping", "EarlyStopping"),
    ("argparse", "Namespace"),
    ("torch.torch_version", "TorchVersion"),
    # the original textual-inversion embeddings (rinongal/textual_inversion) pickle their
    # string_to_param as a whole nn.ParameterDict; AUTOMATIC1111 allows it too
    ("torch.nn.modules.container", "ParameterDict"),
)

ALLOWED: dict[tuple[str, str], Allowed] = _build_table()


def lookup(module: str, name: str) -> Allowed | None:
    """The table entry for an exact (module, name), or ``None``."""
    return ALLOWED.get((module, name))


# ---------------------------------------------------------------------------------------------
# Running a pickle under the table.

RefusedHook = Callable[[str, str, int], Any]


def make_policy(
    on_refused: RefusedHook,
    persistent_load: Callable[[Any], Any] | None,
    on_unsafe: Callable[[str, int, str], Any] | None = None,
) -> Policy:
    """A Policy over ``ALLOWED``; ``on_refused`` decides what a refused global becomes and
    ``on_unsafe`` what an unsafe call of allowed globals becomes (``None``: the VM raises)."""

    def find_global(module: str, name: str, offset: int) -> Any:
        entry = ALLOWED.get((module, name))
        if entry is None:
            return on_refused(module, name, offset)
        return entry.value

    def extension(code: int, offset: int) -> Any:
        return on_refused("copyreg.extension", str(code), offset)

    return Policy(find_global=find_global, persistent_load=persistent_load, extension=extension, on_unsafe=on_unsafe)


def refuse(path: str) -> RefusedHook:
    """The loader's hook: any global outside the table stops the load."""
    from ..errors import UnsafeFileError

    def hook(module: str, name: str, offset: int) -> Any:
        qual = f"{module}.{name}"
        raise UnsafeFileError(
            path,
            f"refused to load: the pickle at byte {offset} names {qual}, which is not on modelkit's allow-list",
            global_name=qual,
        )

    return hook


def collect(found: list[tuple[str, str, int]]) -> RefusedHook:
    """The scanner's hook: record the global and go on with a symbolic value."""

    def hook(module: str, name: str, offset: int) -> Any:
        found.append((module, name, offset))
        return Symbolic(f"{module}.{name}")

    return hook


def reader_error(path: str, exc: PickleError, what: str) -> Exception:
    """The user-facing error for a pickle the safe reader stopped at: unsafe, truncated or corrupt."""
    from ..errors import FormatError, ResourceLimitError, TruncatedFileError, UnsafeFileError

    if exc.kind == "unsafe":
        return UnsafeFileError(path, f"refused to load: {what} at byte {exc.offset}: {exc}")
    if exc.kind == "limit":
        return ResourceLimitError(path, f"{what} exceeds a resource bound at byte {exc.offset}: {exc}")
    cls = TruncatedFileError if exc.kind == "truncated" else FormatError
    return cls(path, f"{what} is corrupt at byte {exc.offset}: {exc}")


def run_pickle(
    data: Any,
    policy: Policy,
    *,
    base_offset: int = 0,
    limits: Limits | None = None,
) -> tuple[Any, int]:
    """Run one pickle stream; returns (value, end position relative to ``data``)."""
    vm = PickleVM(data, policy, base_offset=base_offset, limits=limits)
    value = vm.run()
    return value, vm.pos


__all__ = [
    "ALLOWED",
    "Allowed",
    "DTypeConst",
    "NumpyArray",
    "PickleError",
    "Placeholder",
    "PlaceholderObject",
    "StorageRef",
    "StorageType",
    "Symbolic",
    "TensorSpec",
    "collect",
    "lookup",
    "make_policy",
    "reader_error",
    "refuse",
    "run_pickle",
]
