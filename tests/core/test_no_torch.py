"""The core install has no torch: every core module imports, and every core command works, with
torch and the other extras' packages made unimportable (as in ``pip install modelkit``). This
runs in every install; the core venv of .ci/run runs the whole core suite without torch too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fixtures import hostile, torchfree
from tests.conftest import EXTRA_PACKAGES

ROOT = Path(__file__).resolve().parents[2]

#: Runs the modelkit CLI (or code) in a child where the extras' packages cannot be imported.
BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the core install)", name=name)
        return None
sys.meta_path.insert(0, Block())
mode, rest = sys.argv[2], sys.argv[3:]
if mode == "cli":
    sys.argv = ["modelkit", *rest]
    from modelkit.cli.main import main
    main()
else:
    exec(rest[0])
"""


def _child(mode: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", BLOCKER, ",".join(sorted(EXTRA_PACKAGES)), mode, *args],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300)


def test_every_core_module_imports_without_the_extras() -> None:
    code = """
import pkgutil, importlib, sys, modelkit
bad = []
for m in pkgutil.walk_packages(modelkit.__path__, "modelkit."):
    if m.name.startswith("modelkit.train") or m.name == "modelkit.__main__":
        continue  # the [train] extra; __main__ would run the CLI
    importlib.import_module(m.name)
leaked = sorted(n for n in sys.modules if n.split(".")[0] in {"torch", "safetensors", "fickling", "diffusers"})
print("LEAKED", leaked)
"""
    r = _child("code", code)
    assert r.returncode == 0, r.stderr
    assert "LEAKED []" in r.stdout


def _files(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    tensors = {"model.diffusion_model.w": rng.standard_normal((8, 4)).astype(np.float32),
               "h": rng.standard_normal(5).astype(np.float16),
               "b": torchfree.Bits(np.array([0x3F80, 0xC000, 0x7F80], dtype=np.uint16), "bfloat16"),
               "i": np.arange(3, dtype=np.int64)}
    out = {"zip": folder / "m.ckpt", "legacy": folder / "legacy.pt", "st": folder / "m.safetensors",
           "bad": folder / "hostile.ckpt"}
    torchfree.save_zip(tensors, str(out["zip"]))
    torchfree.save_legacy(tensors, str(out["legacy"]))
    torchfree.save_safetensors(tensors, str(out["st"]))
    out["bad"].write_bytes(hostile.os_system(str(folder / "PWNED")))
    return out


def test_core_commands_work_without_the_extras(tmp_path: Path) -> None:
    f = _files(tmp_path)
    scan = _child("cli", "scan", "--json", str(tmp_path))
    assert scan.returncode == 1, scan.stderr  # hostile.ckpt is unsafe
    verdicts = {Path(x["path"]).name: x["verdict"] for x in json.loads(scan.stdout)["files"]}
    assert verdicts == {"m.ckpt": "safe", "legacy.pt": "safe", "m.safetensors": "safe", "hostile.ckpt": "unsafe"}
    for name in ("zip", "legacy", "st"):
        r = _child("cli", "inspect", "--json", str(f[name]))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["files"][0]["tensor_count"] == 4
    h = _child("cli", "hash", "--json", str(f["zip"]))
    assert h.returncode == 0, h.stderr
    import hashlib

    assert json.loads(h.stdout)["files"][0]["hashes"]["sha256"] == hashlib.sha256(f["zip"].read_bytes()).hexdigest()
    for name in ("zip", "legacy"):
        out = tmp_path / f"{name}.safetensors"
        c = _child("cli", "convert", str(f[name]), "-o", str(out))
        assert c.returncode == 0, c.stderr
        v = _child("cli", "verify", "--json", str(f[name]), str(out))
        assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout + v.stderr
        d = _child("cli", "diff", "--json", str(f["st"]), str(out))
        assert json.loads(d.stdout)["counts"] == {"same": 4}, d.stdout
    for dtype in ("fp16", "bf16", "fp32"):
        out = tmp_path / f"p-{dtype}.safetensors"
        p = _child("cli", "prune", str(f["zip"]), "--dtype", dtype, "-o", str(out))
        assert p.returncode == 0, p.stderr
        v = _child("cli", "verify", "--json", str(f["zip"]), str(out))
        assert json.loads(v.stdout)["ok"], v.stdout


def test_torch_commands_say_how_to_install_it(tmp_path: Path) -> None:
    f = _files(tmp_path)
    out = tmp_path / "out.safetensors"
    for args in (["load", str(f["zip"])],
                 ["merge", "models", str(f["zip"]), str(f["st"]), "-o", str(out)],
                 ["merge", "lora", str(f["zip"]), str(f["st"]), "-o", str(out)],
                 ["lora", "extract", str(f["zip"]), str(f["st"]), "-o", str(out)]):
        r = _child("cli", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "needs torch" in lines[0] and "pip install 'modelkit[torch]'" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if "modelkit-tmp" in p]
    r = _child("cli", "scan", "--explain", str(f["bad"]))
    assert r.returncode == 2 and "pip install 'modelkit[explain]'" in r.stderr, r.stderr
    r = _child("code", "import modelkit, sys; modelkit.load(sys.argv[-1])", str(f["zip"]))
    assert r.returncode == 1 and "MissingExtraError" in r.stderr and "modelkit[torch]" in r.stderr


def test_remote_paths_say_how_to_install_the_remote_extra() -> None:
    """No huggingface_hub/fsspec: a URL is one line naming the pip command, exit 2, nothing tried."""
    for args in (["scan", "https://127.0.0.1:9/model.ckpt"], ["scan", "hf://org/repo/model.ckpt"],
                 ["inspect", "https://127.0.0.1:9/model.ckpt"], ["hash", "s3://bucket/model.safetensors"]):
        r = _child("cli", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'modelkit[remote]'" in lines[0], (args, r.stderr)
