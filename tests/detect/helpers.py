"""Write a layout in a real container and detect it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import modelkit
from fixtures import detect_layouts as L


def detect_layout(tmp_path: Path, layout: L.Layout, name: str = "m.safetensors", container: str = "safetensors",
                  **kw: Any) -> modelkit.Detection:
    path = tmp_path / name
    L.write(layout, str(path), container, **kw)
    return modelkit.detect(path)


def lora(tmp_path: Path, targets: list[L.Target], algo: str = "lora", style: str = "kohya",
         name: str = "l.safetensors", metadata: dict[str, str] | None = None, **kw: Any) -> modelkit.Detection:
    layout, values = L.lora_layout(targets, algo, style, **kw)
    container = "zip" if name.endswith((".bin", ".pt")) else "safetensors"
    return detect_layout(tmp_path, layout, name, container, values=values,
                         **({"metadata": metadata} if metadata else {}))


def assert_json_ready(det: modelkit.Detection) -> None:
    import json

    json.dumps(det.to_dict())
