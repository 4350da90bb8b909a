"""Dependencies point one way, and the light commands stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import modelkit

PKG = Path(modelkit.__file__).parent


def _imports(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(("." * node.level) + (node.module or ""))
    return out


def test_core_never_imports_training_stacks() -> None:
    heavy = ("diffusers", "peft", "transformers", "accelerate")
    for p in PKG.rglob("*.py"):
        if "train" in p.relative_to(PKG).parts:
            continue
        for mod in _imports(p):
            assert not mod.startswith(heavy), f"{p} imports {mod}"


def test_formats_and_scan_import_no_higher_layer() -> None:
    for layer in ("formats", "scan"):
        for p in (PKG / layer).rglob("*.py"):
            for mod in _imports(p):
                assert not mod.startswith(("..cli", "..ops", "..load", "..detect", "..train")), f"{p}: {mod}"


def test_scan_and_help_do_not_import_torch(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    code = (
        "import sys\nfrom modelkit.cli.main import cli\n"
        f"try:\n cli.main(['scan', {str(f)!r}], standalone_mode=False)\nexcept SystemExit:\n pass\n"
        "assert 'torch' not in sys.modules, 'scan imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_read_returns_numpy_without_torch(tmp_path: Path) -> None:
    """With torch unimportable, readers still work and read() gives numpy arrays."""
    from fixtures import build

    p = tmp_path / "m.pt"
    import torch

    build.save_torch({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                      "h": torch.ones(2, dtype=torch.bfloat16)}, str(p), "zip")
    code = (
        "import sys\nsys.modules['torch'] = None\nimport modelkit, numpy as np\n"
        f"mf = modelkit.open_model({str(p)!r})\n"
        "w = mf['w'].read()\nassert isinstance(w, np.ndarray) and w.tolist() == [[0,1,2],[3,4,5]]\n"
        "h = mf['h'].read()\nassert h.dtype == np.uint16 and h.tolist() == [0x3f80, 0x3f80]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
