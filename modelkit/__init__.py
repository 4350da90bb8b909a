"""modelkit: scan, inspect, convert and load Stable Diffusion model files safely.

Public API::

    modelkit.open_model(path)  -> ModelFile   (lazy tensor map, a context manager)
    modelkit.inspect(path)     -> InspectResult
    modelkit.scan(path_or_paths) -> ScanReport
    modelkit.load(path, device=..., dtype=..., keys=...) -> dict[str, torch.Tensor]
    modelkit.load_into(module, path)
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

# Functions named like their own module are bound now: importing the module later (as other
# modules do) would otherwise leave the module where the function should be.
from .detect import Detection, detect
from .load import load, load_into

if TYPE_CHECKING:
    from . import scan  # the package is callable: modelkit.scan(paths)
    from .errors import FormatError, ModelkitError, UnsafeFileError
    from .formats import open_model
    from .model import ModelFile, TensorRef
    from .ops.convert import ConvertResult, convert
    from .ops.hashes import hash_file
    from .ops.inspect import InspectResult, inspect
    from .ops.lora.bake import MergeLoraResult, merge_lora
    from .ops.lora.extract import LoraOutResult, extract_lora
    from .ops.merge import MergeModelsResult, merge_models
    from .ops.prune import PruneResult, prune
    from .ops.verify import diff, verify

# The public names are imported when first used (PEP 562), so ``import modelkit`` stays cheap
# and a convert starts hashing its source sooner.
_HOME = {
    "FormatError": ".errors", "ModelkitError": ".errors", "UnsafeFileError": ".errors",
    "open_model": ".formats",
    "ModelFile": ".model", "TensorRef": ".model",
    "ConvertResult": ".ops.convert", "convert": ".ops.convert",
    "hash_file": ".ops.hashes",
    "InspectResult": ".ops.inspect", "inspect": ".ops.inspect",
    "MergeLoraResult": ".ops.lora.bake", "merge_lora": ".ops.lora.bake",
    "LoraOutResult": ".ops.lora.extract", "extract_lora": ".ops.lora.extract",
    "MergeModelsResult": ".ops.merge", "merge_models": ".ops.merge",
    "PruneResult": ".ops.prune", "prune": ".ops.prune",
    "diff": ".ops.verify", "verify": ".ops.verify",
}


def __getattr__(name: str) -> Any:
    if name == "scan":
        return importlib.import_module(".scan", __name__)
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'modelkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ConvertResult",
    "Detection",
    "FormatError",
    "InspectResult",
    "LoraOutResult",
    "MergeLoraResult",
    "MergeModelsResult",
    "ModelFile",
    "ModelkitError",
    "PruneResult",
    "TensorRef",
    "UnsafeFileError",
    "__version__",
    "convert",
    "detect",
    "extract_lora",
    "diff",
    "hash_file",
    "inspect",
    "load",
    "load_into",
    "merge_lora",
    "merge_models",
    "open_model",
    "prune",
    "scan",
    "verify",
]
