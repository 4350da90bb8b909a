"""What ``pip install modelkit`` (and the pre-commit hook, which installs the repository with
``language: python``) pulls in: the core only, no torch, no CUDA wheel, no fickling. Resolved for
real by pip (``--dry-run --report``), against the package index."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: what the core may install: modelkit and these (with their own small pure-Python dependencies)
CORE = {"modelkit", "numpy", "click", "tqdm", "colorama"}  # colorama: click's and tqdm's on Windows
HEAVY = re.compile(r"^(torch|nvidia-.*|triton|safetensors|fickling|diffusers|transformers)$")


def _resolve(spec: str, tmp_path: Path) -> set[str]:
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), spec], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, f"pip could not resolve {spec} (is the package index reachable?): {r.stderr[-2000:]}"
    return {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}


def test_the_core_install_and_the_pre_commit_hook_pull_no_torch(tmp_path: Path) -> None:
    hooks = (ROOT / ".pre-commit-hooks.yaml").read_text()
    assert "additional_dependencies" not in hooks and hooks.count("language: python") >= 1
    names = _resolve(".", tmp_path)  # what pre-commit's `language: python` runs: pip install of the repo
    assert not {n for n in names if HEAVY.match(n)}, names
    assert names <= CORE, f"the core install pulls more than it should: {sorted(names - CORE)}"

