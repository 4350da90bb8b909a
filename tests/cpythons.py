"""The CPython interpreters on this machine that differential tests run the real unpickler under.

modelkit's pickle VM must decode bytes as CPython's C unpickler does, and ``_pickle.c`` changes
between releases; so tests that compare the VM with CPython run their child under every CPython
3.10–3.13 found: this interpreter, ``python3.1X`` on the PATH, pyenv's versions (``$PYENV_ROOT``
or ``~/.pyenv``), and any listed in ``MODELKIT_TEST_PYTHONS`` (separated by ``os.pathsep``). The
children use the standard library only.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

MINORS = (10, 11, 12, 13)


def _candidates() -> list[str]:
    out = [sys.executable]
    out += [p for p in os.environ.get("MODELKIT_TEST_PYTHONS", "").split(os.pathsep) if p]
    for minor in MINORS:
        found = shutil.which(f"python3.{minor}")
        if found:
            out.append(found)
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    if root.is_dir():
        for version in sorted(root.iterdir()):
            for name in ("python3", "python"):
                exe = version / "bin" / name
                if exe.is_file():
                    out.append(str(exe))
                    break
    return out


@functools.lru_cache(maxsize=1)
def interpreters() -> tuple[tuple[str, str], ...]:
    """((version "3.X", executable), ...): one working interpreter per minor version 3.10–3.13,
    this one first."""
    chosen: dict[str, str] = {}
    for exe in _candidates():
        try:
            out = subprocess.run([exe, "-I", "-c", "import sys, pickle; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = out.stdout.strip()
        if out.returncode == 0 and version in {f"3.{m}" for m in MINORS} and version not in chosen:
            chosen[version] = exe
    return tuple(chosen.items())
