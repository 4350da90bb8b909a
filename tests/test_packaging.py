"""The project as it ships: the sdist and the wheel ``python -m build`` makes, the version's one
source, the CHANGELOG's newest release, and the shell completion the README documents."""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import modelkit

ROOT = Path(__file__).resolve().parents[1]
VERSION = modelkit.__version__
NAME = f"modelkit-{VERSION}"


def _build_missing() -> str | None:
    """Why this Python cannot build the dists without fetching anything, or None if it can."""
    for module in ("build", "twine", "setuptools", "packaging"):
        if importlib.util.find_spec(module) is None:
            return f"needs {module} importable to build without isolation (pip install -e '.[dev]' setuptools)"
    from packaging.version import Version

    have = importlib.metadata.version("setuptools")
    if Version(have) < Version("77"):
        return f"needs setuptools>=77 (PEP 639 license metadata, as [build-system] requires); this Python has {have}"
    return None


BUILD_MISSING = _build_missing()
needs_build = pytest.mark.skipif(BUILD_MISSING is not None, reason=BUILD_MISSING or "")


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist and the wheel built from it (``python -m build``: sdist first, the wheel from the
    unpacked sdist), so the wheel proves the sdist is complete. Only ``modelkit.egg-info`` (ignored
    by git) is written in the tree."""
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out / f"{NAME}.tar.gz", out / f"{NAME}-py3-none-any.whl"


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(f"{NAME}.dist-info/METADATA").decode("utf-8")
    return email.parser.Parser(policy=email.policy.compat32).parsestr(text)


@needs_build
def test_sdist_holds_the_package_the_licence_and_the_docs(dists: tuple[Path, Path]) -> None:
    sdist, _ = dists
    with tarfile.open(sdist) as tf:
        names = {n.removeprefix(f"{NAME}/") for n in tf.getnames()}
        member = tf.extractfile(f"{NAME}/LICENSE")
        assert member is not None
        assert member.read() == (ROOT / "LICENSE").read_bytes()
    for required in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "PKG-INFO",
                     "modelkit/__init__.py", "modelkit/_version.py", "modelkit/py.typed"):
        assert required in names, required
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "modelkit/layout/configs").rglob("*") if p.is_file()}
    assert configs and configs <= names
    # setuptools would add tests/test*.py without their conftest and fixtures: the tests stay in git
    assert not {n for n in names if n.split("/")[0] in {"tests", "fixtures", "bench", ".github", ".ci"}}


@needs_build
def test_wheel_holds_the_package_its_data_and_the_licence_only(dists: tuple[Path, Path]) -> None:
    _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read(f"{NAME}.dist-info/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    assert {n.split("/")[0] for n in names} == {"modelkit", f"{NAME}.dist-info"}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "modelkit").rglob("*.py") if "__pycache__" not in p.parts}
    data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "modelkit/layout/configs").rglob("*") if p.is_file()}
    assert sources | data | {"modelkit/py.typed"} <= names


@needs_build
def test_wheel_metadata_version_licence_and_core_dependencies(dists: tuple[Path, Path]) -> None:
    from packaging.requirements import Requirement

    meta = _wheel_metadata(dists[1])
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    unconditional = {r.name for r in requires if r.marker is None}
    assert unconditional == {"numpy", "click", "tqdm"}
    for heavy in ("torch", "safetensors", "fickling"):
        markers = [str(r.marker) for r in requires if r.name == heavy]
        assert markers and all("extra ==" in m for m in markers), (heavy, markers)


@needs_build
def test_twine_check_passes_on_both_dists(dists: tuple[Path, Path]) -> None:
    run = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dists)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("PASSED") == 2, run.stdout


def test_the_version_has_one_source() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "modelkit._version.__version__" }' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION)
    copies = [p for p in (ROOT / "modelkit").rglob("*.py") if f'"{VERSION}"' in p.read_text(encoding="utf-8")]
    assert copies == [ROOT / "modelkit" / "_version.py"]


def test_changelog_newest_release_is_the_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings[0] == "[Unreleased]"
    releases = [re.fullmatch(r"\[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})", h) for h in headings[1:]]
    assert all(releases), headings
    versions = [tuple(int(x) for x in m.group(1).split(".")) for m in releases if m]
    dates = [m.group(2) for m in releases if m]
    assert versions == sorted(versions, reverse=True) and dates == sorted(dates, reverse=True)
    assert releases[0] is not None and releases[0].group(1) == VERSION


def _modelkit_script() -> str:
    script = shutil.which("modelkit", path=sysconfig.get_path("scripts"))
    if script is None:
        pytest.skip(f"no modelkit entry point in {sysconfig.get_path('scripts')} (install with pip install -e .)")
    return script


def _complete(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_modelkit_script()], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


CLICK = tuple(int(x) for x in importlib.metadata.version("click").split(".")[:2])


@pytest.mark.parametrize(("shell", "marker"), [
    ("bash", "complete -o nosort -F _modelkit_completion modelkit"),
    ("zsh", "#compdef modelkit"),
    ("fish", "complete --no-files --command modelkit"),
    pytest.param("powershell", "Register-ArgumentCompleter", marks=pytest.mark.skipif(
        CLICK < (8, 5), reason="click < 8.5 has no PowerShell completion")),
])
def test_shell_completion_script(shell: str, marker: str) -> None:
    run = _complete({"_MODELKIT_COMPLETE": f"{shell}_source"})
    assert run.returncode == 0, run.stderr
    assert marker in run.stdout
    assert f"_MODELKIT_COMPLETE={shell}_complete" in run.stdout.replace("'", "").replace(" ", "")  # calls modelkit back


def test_shell_completion_completes_command_names() -> None:
    run = _complete({"_MODELKIT_COMPLETE": "bash_complete", "COMP_WORDS": "modelkit sc", "COMP_CWORD": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["plain,scan"]
