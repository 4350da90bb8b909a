"""The JSON form of the operations' result dataclasses, in one place.

Every field is exported under its own name: tuples become lists, dicts are copied, nested records
(``WriteStats``, a LoRA's use ...) give their own ``to_dict()``, and ``seconds`` is rounded to the
millisecond. A result class says ``to_dict = result_dict`` and never lists its fields twice.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [v.to_dict() if hasattr(v, "to_dict") else v for v in value]
    if isinstance(value, dict):
        return dict(value)
    return value


def result_dict(result: Any) -> dict[str, Any]:
    """``result`` (a dataclass instance) as JSON-ready values."""
    out = {f.name: _plain(getattr(result, f.name)) for f in fields(result)}
    if isinstance(out.get("seconds"), float):
        out["seconds"] = round(out["seconds"], 3)
    return out
