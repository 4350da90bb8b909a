"""Content-based detection of model type and base model (``modelkit.detect``).

Detection is an ordered table of rules (``engine.RULES``) over key tables stored as data
(``tables``): key names, shapes, metadata and at most a few tiny tensors decide, never a file or
folder name. The answer is ``unknown`` whenever the evidence is missing or ambiguous.
"""

from __future__ import annotations

from .engine import RULES, Rule, detect, detect_modelfile, detect_view
from .folder import detect_folder
from .result import BASES, KINDS, Detection
from .view import KeyView

__all__ = ["BASES", "KINDS", "RULES", "Detection", "KeyView", "Rule", "detect", "detect_folder",
           "detect_modelfile", "detect_view"]
