"""The CPython interpreters on this machine that differential tests run the real unpickler under.

modelkit's pickle VM must decode bytes as CPython's C unpickler does, and ``_pickle.c`` changes
between releases; so tests that compare the VM with CPython run their child under every CPython
3.10–3.13 found: this interpreter, any listed in ``MODELKIT_TEST_PYTHONS`` (separated by
``os.pathsep``), ``python3.1X`` on the PATH, pyenv's versions (``$PYENV_ROOT`` or ``~/.pyenv``;
pyenv-win's ``versions/3.1X.Y/python.exe`` too), python.org's macOS frameworks, and on Windows
what the ``py`` launcher knows (``py -3.1X``). The children use the standard library only.
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
    home = Path.home() / ".pyenv"
    for root in (Path(os.environ.get("PYENV_ROOT") or home) / "versions", home / "pyenv-win" / "versions"):
        if root.is_dir():
            for version in sorted(root.iterdir()):
                # pyenv: versions/3.1X.Y/bin/python3; pyenv-win: versions/3.1X.Y/python.exe
                for exe in (version / "bin" / "python3", version / "bin" / "python", version / "python.exe"):
                    if exe.is_file():
                        out.append(str(exe))
                        break
    for minor in MINORS:  # python.org's installers on macOS
        exe = Path(f"/Library/Frameworks/Python.framework/Versions/3.{minor}/bin/python3.{minor}")
        if sys.platform == "darwin" and exe.is_file():
            out.append(str(exe))
    launcher = shutil.which("py") if sys.platform == "win32" else None
    for minor in MINORS if launcher else ():  # Windows has no python3.1X: the launcher knows each install
        try:
            where = subprocess.run([launcher, f"-3.{minor}", "-I", "-c", "import sys; print(sys.executable)"],
                                   capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if where.returncode == 0 and where.stdout.strip():
            out.append(where.stdout.strip())
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
