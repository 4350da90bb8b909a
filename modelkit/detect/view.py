"""What detection may look at: names, shapes, metadata, extras and at most a few tiny tensors."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..model import ModelFile, TensorRef

#: The most tensors a single detection reads (each a scalar or a few bytes).
MAX_PROBES = 4
#: Scalars read for LoRA alphas (reported in details; never used to decide).
MAX_ALPHA_READS = 4096


@functools.lru_cache(maxsize=1024)
def rx(pattern: str) -> re.Pattern[str]:
    """The compiled form of a table pattern (cached)."""
    return re.compile(pattern)


class _Quantized:
    """A quantized GGUF tensor as detection sees it: its logical shape; its values are not read."""

    def __init__(self, ref: TensorRef, shape: tuple[int, ...]):
        self.ref = ref
        self.shape = shape
        self.dtype = ref.dtype
        self.name = ref.name
        self.numel = math.prod(shape)

    def read(self, framework: str | None = None) -> Any:
        raise ValueError(f"{self.name} is quantized; detection does not read it")


class KeyView:
    """A read-only view of one model file for the detectors.

    Args:
        tensors: name -> TensorRef (or anything with ``shape``, ``dtype`` and ``read``).
        metadata: safetensors string metadata.
        extras: non-tensor values, flattened (``ModelFile.extras``).
        key_paths: each tensor's original key path (``ModelFile.key_paths``).
        wrappers: stripped container wrappers (``ModelFile.wrappers``).
        path: the file, used only to report it and to find a ``.yaml`` beside it.
    """

    def __init__(self, tensors: Mapping[str, TensorRef], metadata: Mapping[str, str] | None = None,
                 extras: Mapping[str, Any] | None = None, key_paths: Mapping[str, tuple[Any, ...]] | None = None,
                 wrappers: Iterable[str] = (), path: str | None = None) -> None:
        self.tensors = tensors
        self.names: tuple[str, ...] = tuple(tensors)
        self.nameset = frozenset(self.names)
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.extras: dict[str, Any] = dict(extras or {})
        self.key_paths: dict[str, tuple[Any, ...]] = dict(key_paths or {})
        self.wrappers = tuple(wrappers)
        self.path = path
        self.probes = 0

    @classmethod
    def of(cls, mf: ModelFile) -> KeyView:
        """The view of an open ModelFile (a GGUF file's quantized tensors with their logical shapes)."""
        tensors: Mapping[str, Any] = mf.tensors
        shapes = (mf.info.get("gguf") or {}).get("shapes") if mf.container == "gguf" else None
        if shapes:
            tensors = {k: _Quantized(v, tuple(shapes[k])) if k in shapes else v for k, v in mf.tensors.items()}
        return cls(tensors, mf.metadata, mf.extras, mf.key_paths, mf.wrappers, mf.path)

    def __len__(self) -> int:
        return len(self.names)

    def has(self, name: str) -> bool:
        return name in self.nameset

    def shape(self, name: str | None) -> tuple[int, ...] | None:
        """The shape of ``name``, or None when absent."""
        if name is None or name not in self.nameset:
            return None
        return tuple(self.tensors[name].shape)

    def find(self, pattern: str) -> str | None:
        """The first name (in file order) in which ``pattern`` is found."""
        p = rx(pattern)
        return next((n for n in self.names if p.search(n)), None)

    def find_all(self, pattern: str) -> list[str]:
        p = rx(pattern)
        return [n for n in self.names if p.search(n)]

    def count(self, pattern: str) -> int:
        return len(self.find_all(pattern))

    def any_prefix(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self.names)

    def count_prefix(self, prefix: str) -> int:
        return sum(1 for n in self.names if n.startswith(prefix))

    def indices(self, pattern: str) -> list[int]:
        """Sorted distinct integers captured by group 1 of ``pattern``."""
        p = rx(pattern)
        out = {int(m.group(1)) for n in self.names if (m := p.search(n))}
        return sorted(out)

    def scalar(self, name: str, budget: bool = True) -> float | None:
        """Read one single-element tensor as a float (a cheap probe).

        Args:
            name: the tensor.
            budget: count it against ``MAX_PROBES`` (detection decisions); alphas pass False.

        Returns:
            The value, or None when the tensor is absent, not one element, of a type numpy cannot
            give, or the probe budget is spent.
        """
        if name not in self.nameset:
            return None
        ref = self.tensors[name]
        if ref.numel != 1 or (budget and self.probes >= MAX_PROBES):
            return None
        if budget:
            self.probes += 1
        dtype = ref.dtype.name
        if dtype not in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                         "uint8", "bool"):
            return None
        import numpy as np

        value = ref.read("numpy")
        if dtype == "bfloat16":
            bits = np.asarray(value, dtype=np.uint32).reshape(-1)[:1] << np.uint32(16)
            return float(bits.view(np.float32)[0])
        return float(np.asarray(value).reshape(-1)[0])

    def std(self, name: str, max_numel: int = 4096) -> float | None:
        """Population standard deviation of a small float tensor (a weight-statistics probe).

        Counts against ``MAX_PROBES``; None when absent, too big, not float, or over budget.
        """
        if name not in self.nameset:
            return None
        ref = self.tensors[name]
        if ref.numel == 0 or ref.numel > max_numel or self.probes >= MAX_PROBES:
            return None
        if ref.dtype.name not in ("float64", "float32", "float16", "bfloat16"):
            return None
        self.probes += 1
        import numpy as np

        value = np.asarray(ref.read("numpy")).reshape(-1)
        if ref.dtype.name == "bfloat16":
            value = (value.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return float(value.astype(np.float64).std())
