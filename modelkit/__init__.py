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

from . import scan  # the package is callable: modelkit.scan(paths)
from .detect import Detection, detect
from .errors import FormatError, ModelkitError, UnsafeFileError
from .load import load, load_into
from .model import ModelFile, TensorRef
from .ops.convert import ConvertResult, convert
from .ops.hashes import hash_file
from .ops.inspect import InspectResult, inspect
from .ops.lora.bake import MergeLoraResult, merge_lora
from .ops.lora.extract import LoraOutResult, extract_lora
from .ops.merge import MergeModelsResult, merge_models
from .ops.prune import PruneResult, prune
from .ops.verify import diff, verify
from .reading import open_model

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
