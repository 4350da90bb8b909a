"""modelkit: scan, inspect, convert and load Stable Diffusion model files safely.

Public API::

    modelkit.open_model(path)  -> ModelFile   (lazy tensor map, a context manager)
    modelkit.inspect(path)     -> InspectResult
    modelkit.scan(path_or_paths) -> ScanReport
    modelkit.load(path, device=..., dtype=..., keys=...) -> dict[str, torch.Tensor]
    modelkit.load_into(module, path)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from . import scan  # the package is callable: modelkit.scan(paths)
    from .detect import Detection, detect
    from .errors import FormatError, ModelkitError, UnsafeFileError
    from .load import load, load_into
    from .model import ModelFile, TensorRef
    from .ops.convert import ConvertResult, convert
    from .ops.hashes import hash_file
    from .ops.inspect import InspectResult, inspect
    from .ops.layout_convert import LayoutResult, convert_layout
    from .ops.lora.bake import MergeLoraResult, merge_lora
    from .ops.lora.extract import LoraOutResult, extract_lora
    from .ops.merge import MergeModelsResult, merge_models
    from .ops.prune import PruneResult, prune
    from .ops.verify import diff, verify
    from .reading import open_model

#: Where each public name lives. Names are imported on first use (PEP 562), so ``import modelkit``,
#: ``modelkit --help`` and ``modelkit scan`` load only the modules they need.
_LAZY = {
    "scan": ".scan",
    "Detection": ".detect:Detection", "detect": ".detect:detect",
    "FormatError": ".errors:FormatError", "ModelkitError": ".errors:ModelkitError",
    "UnsafeFileError": ".errors:UnsafeFileError",
    "load": ".load:load", "load_into": ".load:load_into",
    "ModelFile": ".model:ModelFile", "TensorRef": ".model:TensorRef",
    "ConvertResult": ".ops.convert:ConvertResult", "convert": ".ops.convert:convert",
    "hash_file": ".ops.hashes:hash_file",
    "InspectResult": ".ops.inspect:InspectResult", "inspect": ".ops.inspect:inspect",
    "LayoutResult": ".ops.layout_convert:LayoutResult", "convert_layout": ".ops.layout_convert:convert_layout",
    "MergeLoraResult": ".ops.lora.bake:MergeLoraResult", "merge_lora": ".ops.lora.bake:merge_lora",
    "LoraOutResult": ".ops.lora.extract:LoraOutResult", "extract_lora": ".ops.lora.extract:extract_lora",
    "MergeModelsResult": ".ops.merge:MergeModelsResult", "merge_models": ".ops.merge:merge_models",
    "PruneResult": ".ops.prune:PruneResult", "prune": ".ops.prune:prune",
    "diff": ".ops.verify:diff", "verify": ".ops.verify:verify",
    "open_model": ".reading:open_model",
}

__all__ = [
    "ConvertResult",
    "Detection",
    "FormatError",
    "InspectResult",
    "LayoutResult",
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
    "convert_layout",
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


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = importlib.import_module(module, __name__)
    if attr:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Module(types.ModuleType):
    """``modelkit.load`` and ``modelkit.detect`` are functions that share a name with a submodule.
    Importing that submodule binds it on its parent package; this keeps the function instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and ":" in _LAZY.get(name, ""):
            return  # __getattr__ resolves the function on first use
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Module
