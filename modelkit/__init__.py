"""modelkit: scan, inspect, convert and load Stable Diffusion model files safely.

Public API::

    modelkit.open_model(path)  -> ModelFile   (lazy tensor map, a context manager)
    modelkit.inspect(path)     -> InspectResult
    modelkit.scan(path_or_paths) -> ScanReport
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import scan  # the package is callable: modelkit.scan(paths)
from .errors import FormatError, ModelkitError, UnsafeFileError
from .formats import open_model
from .model import ModelFile, TensorRef
from .ops.inspect import InspectResult, inspect

__all__ = [
    "FormatError",
    "InspectResult",
    "ModelFile",
    "ModelkitError",
    "TensorRef",
    "UnsafeFileError",
    "__version__",
    "inspect",
    "open_model",
    "scan",
]
