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

Shared objects are walked once, by identity. A pickle's memo lets a tiny stream reference one
container from many places (a list of two references to a list of two references ... has 2**n
paths for n levels), so a container met a second time is not walked again. ``torch.load`` would
give the same objects under both paths, so the tensors found under its first path are named
again under the new one, from a record of the first walk (a shared layer dict of a hypernetwork
keeps all its names); what else it holds is the extra ``"<alias of NAME>"`` (``"<cycle>"`` for a
reference back to a container being walked). ``MAX_NODES`` bounds the work, which grows with the
structure and with the names torch would give, never with the paths through shared containers
that hold no tensor; a DAG over a tensor, whose names torch would give 2**n times, ends in
``ResourceLimitError``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, ResourceLimitError
from ..model import ModelFile
from .pickle_vm import Symbolic
from .unpickler import DTypeConst, NumpyArray, Placeholder, PlaceholderObject, StorageRef, TensorSpec

#: Work the flattener does at most (a few seconds, a few hundred MB): per container item walked
#: and per tensor name given, one plus its depth (the length of its key path and name), plus the
#: items of each plain-value leaf rendered. An SDXL checkpoint with its EMA and optimizer state
#: takes about 10**5.
MAX_NODES = 5_000_000
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


def plain(v: Any, charge: Callable[[int], None] | None = None) -> Any:
    """A JSON-safe rendering of a non-tensor leaf.

    Args:
        charge: called with the number of items rendered, to bound the work (``flatten`` passes
            its step budget; nested sets of tuples can share items like any other container).
    """
    if v is None or isinstance(v, (str, int, float, bool)):
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**63:
            return str(v)
        return v
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple, set, frozenset)):
        if charge is not None:
            charge(len(v))
        return [plain(x, charge) for x in v]
    if isinstance(v, (Placeholder, PlaceholderObject)):
        return f"<placeholder {v.qualname}>"
    if isinstance(v, DTypeConst):
        return repr(v)
    if isinstance(v, StorageRef):
        return f"<storage {v.key}>"
    if isinstance(v, Symbolic):
        return repr(v)
    return f"<{type(v).__name__}>"


def _children(node: Any) -> Collection[Any]:
    if isinstance(node, dict):
        return node.values()
    if isinstance(node, (list, tuple)):
        return node
    return ()


def _has_tensor(node: Any, charge: Callable[[int], None]) -> bool:
    """Does ``node`` hold a tensor anywhere? Each container is looked into once."""
    stack = [node]
    seen = {id(node)}
    while stack:
        n = stack.pop()
        if isinstance(n, (TensorSpec, NumpyArray)):
            return True
        children = _children(n)
        charge(len(children))
        for c in children:
            if id(c) not in seen:
                seen.add(id(c))
                stack.append(c)
    return False


@dataclass
class _Walked:
    """A container already walked: where, and which tensors (``_Walk.added[start:end]``) and
    whether extras were found under it."""

    keypath: tuple[Any, ...]
    parts: tuple[str, ...]
    start: int
    end: int | None = None
    extras: bool = False


class _Walk:
    def __init__(self, path: str):
        self.path = path
        self.flat = Flat()
        self.budget = MAX_NODES
        self.walked: dict[int, _Walked] = {}
        self.rendered: dict[int, Any] = {}  # plain-value lists and tuples rendered so far (id -> rendering)
        self.on_path: set[int] = set()
        #: Every tensor name given, in order: (key path, name parts, spec).
        self.added: list[tuple[tuple[Any, ...], tuple[str, ...], TensorSpec]] = []
        self.extras_set = 0

    def charge(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise ResourceLimitError(self.path, f"the pickled structure is too large to walk (a bound of {MAX_NODES} "
                                                "steps of work)")

    def tensor(self, keypath: tuple[Any, ...], parts: tuple[str, ...], spec: TensorSpec) -> None:
        name = ".".join(parts)
        if name in self.flat.tensors:
            raise FormatError(self.path, f"two tensors flatten to the same name {name!r}")
        self.flat.tensors[name] = (keypath, spec)
        self.added.append((keypath, parts, spec))

    def extra(self, name: str, value: Any) -> None:
        self.flat.extras[name] = value
        self.extras_set += 1

    def placeholder(self, qualname: str) -> None:
        if qualname not in self.flat.placeholders:
            self.flat.placeholders.append(qualname)

    def walk(self, node: Any, keypath: tuple[Any, ...], parts: tuple[str, ...]) -> None:
        self.charge(1 + len(parts))  # the key path and name of a node are as long as it is deep
        name = ".".join(parts)
        if isinstance(node, TensorSpec):
            self.tensor(keypath, parts, node)
        elif isinstance(node, NumpyArray):
            if node.spec is None:
                raise FormatError(self.path, f"numpy array {name!r} has no data")
            self.tensor(keypath, parts, node.spec)
        elif isinstance(node, Placeholder):
            self.placeholder(node.qualname)
            self.extra(name, plain(node))
        elif isinstance(node, PlaceholderObject):
            self.placeholder(node.qualname)
            self.extra(name, plain(node))
            if isinstance(node.state, dict):
                self.walk(node.state, keypath, parts)
        elif not isinstance(node, (dict, list, tuple)):
            self.extra(name, plain(node, self.charge))
        elif not self.leaf(node, name):
            self.container(node, keypath, parts)

    def leaf(self, node: list[Any] | tuple[Any, ...] | dict[Any, Any], name: str) -> bool:
        """A list or tuple of plain values is one extra, rendered once and charged per reference."""
        if isinstance(node, dict):
            return False
        rendered = self.rendered.get(id(node))
        if rendered is None and id(node) not in self.walked and all(_is_plain(x) for x in node):
            rendered = self.rendered[id(node)] = plain(node)
        if rendered is None:
            return False
        self.charge(len(node))  # every reference is one more copy in the extras (and in their JSON)
        self.extra(name, rendered)
        return True

    def container(self, node: dict[Any, Any] | list[Any] | tuple[Any, ...], keypath: tuple[Any, ...],
                  parts: tuple[str, ...]) -> None:
        first = self.walked.get(id(node))
        if first is not None:
            self.again(node, first, keypath, parts)
            return
        record = self.walked[id(node)] = _Walked(keypath, parts, len(self.added))
        extras_before = self.extras_set
        self.on_path.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            self.walk(v, keypath + (k,), parts + (segment(k) if isinstance(node, dict) else str(k),))
        self.on_path.discard(id(node))
        record.end = len(self.added)
        record.extras = self.extras_set > extras_before

    def again(self, node: Any, first: _Walked, keypath: tuple[Any, ...], parts: tuple[str, ...]) -> None:
        """A container met before: its tensors get their names under this path too, from the record
        of the first walk; anything else it holds is an alias."""
        name = ".".join(parts)
        if id(node) in self.on_path or first.end is None:
            self.extra(name, "<cycle>")
            return
        nk, np_ = len(first.keypath), len(first.parts)
        for kp, pp, spec in self.added[first.start : first.end]:
            self.charge(1 + len(parts) + len(pp) - np_)
            self.tensor(keypath + kp[nk:], parts + pp[np_:], spec)
        if first.extras or first.start == first.end:
            self.extra(name, f"<alias of {'.'.join(map(segment, first.keypath)) or '<root>'}>")


def flatten(path: str, root: Any) -> Flat:
    """Walk ``root`` and collect tensors, extras and placeholders.

    Raises:
        FormatError: two tensors flatten to the same name, or a numpy array has no data.
        ResourceLimitError: the structure needs more work than ``MAX_NODES``.
    """
    w = _Walk(path)
    flat = w.flat
    if isinstance(root, dict):
        w.walked[id(root)] = _Walked((), (), 0)
        w.on_path.add(id(root))
        for k, v in root.items():
            if k in WRAPPERS and isinstance(v, dict) and _has_tensor(v, w.charge):
                flat.wrappers.append(k)
                w.walk(v, (k,), ())
            else:
                w.walk(v, (k,), (segment(k),))
    else:
        w.walk(root, (), ())
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
