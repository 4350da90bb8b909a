"""Flatten an unpickled structure into dotted tensor names, reversibly.

The rules (documented in the README):

* a dict key or a list/tuple index becomes one name segment: strings as they are, ints (and
  bools) in decimal, anything else by its ``repr``; segments are joined with ``.``;
* a top-level ``state_dict`` holding tensors is a *wrapper*: its segment is dropped from names
  and recorded in ``ModelFile.wrappers``;
* a placeholder object (an allowed harmless class) contributes its BUILD state as children;
* every tensor's original key path is kept in ``ModelFile.key_paths``, so the flattening is
  reversed exactly even when a key itself contains a dot;
* non-tensor leaves become ``extras``: a list or tuple of plain values stays one value.

Two tensors that flatten to the same name are an error, never a silent overwrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, ResourceLimitError
from ..model import ModelFile
from .pickle_vm import Symbolic
from .unpickler import DTypeConst, NumpyArray, Placeholder, PlaceholderObject, StorageRef, TensorSpec

MAX_NODES = 20_000_000
WRAPPERS = ("state_dict",)


@dataclass
class Flat:
    tensors: dict[str, tuple[tuple[Any, ...], TensorSpec]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    placeholders: list[str] = field(default_factory=list)
    wrappers: list[str] = field(default_factory=list)


def segment(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (bool, int)):
        return str(int(key))
    return repr(key)


def _is_plain(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, bytes, bytearray))


def plain(v: Any) -> Any:
    """A JSON-safe rendering of a non-tensor leaf."""
    if v is None or isinstance(v, (str, int, float, bool)):
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**63:
            return str(v)
        return v
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple, set, frozenset)):
        return [plain(x) for x in v]
    if isinstance(v, (Placeholder, PlaceholderObject)):
        return f"<placeholder {v.qualname}>"
    if isinstance(v, DTypeConst):
        return repr(v)
    if isinstance(v, StorageRef):
        return f"<storage {v.key}>"
    if isinstance(v, Symbolic):
        return repr(v)
    return f"<{type(v).__name__}>"


def _has_tensor(node: Any, budget: list[int]) -> bool:
    stack = [node]
    seen: set[int] = set()
    while stack:
        n = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            return False
        if isinstance(n, (TensorSpec, NumpyArray)):
            return True
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, dict):
            stack.extend(n.values())
        elif isinstance(n, (list, tuple)):
            stack.extend(n)
    return False


def flatten(path: str, root: Any) -> Flat:
    """Walk ``root`` and collect tensors, extras and placeholders."""
    flat = Flat()
    budget = [MAX_NODES]
    on_path: set[int] = set()

    def add_tensor(keypath: tuple[Any, ...], name_parts: tuple[str, ...], spec: TensorSpec) -> None:
        name = ".".join(name_parts)
        if name in flat.tensors:
            raise FormatError(path, f"two tensors flatten to the same name {name!r}")
        flat.tensors[name] = (keypath, spec)

    def walk(node: Any, keypath: tuple[Any, ...], parts: tuple[str, ...]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ResourceLimitError(path, "the pickled structure is too large to walk")
        if isinstance(node, TensorSpec):
            add_tensor(keypath, parts, node)
            return
        if isinstance(node, NumpyArray):
            if node.spec is None:
                raise FormatError(path, f"numpy array {'.'.join(parts)!r} has no data")
            add_tensor(keypath, parts, node.spec)
            return
        if isinstance(node, Placeholder):
            _note_placeholder(node.qualname)
            flat.extras[".".join(parts)] = plain(node)
            return
        if isinstance(node, PlaceholderObject):
            _note_placeholder(node.qualname)
            flat.extras[".".join(parts)] = plain(node)
            if isinstance(node.state, dict):
                walk(node.state, keypath, parts)
            return
        if id(node) in on_path:
            flat.extras[".".join(parts)] = "<cycle>"
            return
        if isinstance(node, dict):
            on_path.add(id(node))
            for k, v in node.items():
                walk(v, keypath + (k,), parts + (segment(k),))
            on_path.discard(id(node))
            return
        if isinstance(node, (list, tuple)):
            if all(_is_plain(x) for x in node):
                flat.extras[".".join(parts)] = plain(node)
                return
            on_path.add(id(node))
            for i, v in enumerate(node):
                walk(v, keypath + (i,), parts + (str(i),))
            on_path.discard(id(node))
            return
        flat.extras[".".join(parts)] = plain(node)

    def _note_placeholder(q: str) -> None:
        if q not in flat.placeholders:
            flat.placeholders.append(q)

    if isinstance(root, dict):
        for k, v in root.items():
            if k in WRAPPERS and isinstance(v, dict) and _has_tensor(v, [1_000_000]):
                flat.wrappers.append(k)
                walk(v, (k,), ())
            else:
                walk(v, (k,), (segment(k),))
    else:
        walk(root, (), ())
    if "" in flat.tensors:
        # A bare tensor pickled on its own.
        keypath, spec = flat.tensors.pop("")
        flat.tensors["tensor"] = (keypath, spec)
    return flat


def assemble(
    path: str,
    container: str,
    source: Any,
    flat: Flat,
    locate: Any,
    info: dict[str, Any] | None = None,
) -> ModelFile:
    """Turn flattened tensor specs into a ModelFile.

    Args:
        locate: ``StorageRef -> (absolute start, nbytes, compressed or None)``; raises FormatError.
    """
    from ..model import TensorRef

    tensors: dict[str, TensorRef] = {}
    key_paths: dict[str, tuple[Any, ...]] = {}
    located: dict[int, tuple[int, int, Any]] = {}
    for name, (keypath, spec) in flat.tensors.items():
        st = spec.storage
        where = located.get(id(st))
        if where is None:
            where = located[id(st)] = locate(st)
        start, nbytes, compressed = where
        inline = st.inline
        item = spec.dtype.itemsize
        numel = 1
        for s in spec.shape:
            numel *= s
        span = 0 if numel == 0 else 1 + sum((s - 1) * t for s, t in zip(spec.shape, spec.stride))
        if numel and (spec.offset + span) * item > nbytes:
            raise FormatError(
                path,
                f"tensor {name!r} needs {(spec.offset + span) * item} bytes of storage {st.key!r}, which has {nbytes}",
            )
        tensors[name] = TensorRef(
            name=name, dtype=spec.dtype, shape=spec.shape, strides=spec.stride, storage_offset=spec.offset,
            storage_start=start, storage_nbytes=nbytes, storage_key=st.key, byteorder=st.byteorder,
            compressed=compressed, inline=inline, source=source,
        )
        key_paths[name] = keypath
    return ModelFile(
        path=path, container=container, size=source.size, tensors=tensors, extras=flat.extras,
        placeholders=flat.placeholders, wrappers=flat.wrappers, key_paths=key_paths, info=info or {}, source=source,
    )
