"""modelkit: scan, inspect, convert and load Stable Diffusion model files safely."""

from __future__ import annotations

from .errors import FormatError, ModelkitError, UnsafeFileError
from .formats import open_model
from .model import ModelFile, TensorRef

__version__ = "0.1.0"

__all__ = ["FormatError", "ModelFile", "ModelkitError", "TensorRef", "UnsafeFileError", "__version__", "open_model"]
