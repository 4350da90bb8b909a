from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so tests can import fixtures/

REALDATA = ROOT.parent / "shared" / "realdata"

#: Packages of the extras ([torch], [explain], [train], [hash]). In the core install (no torch:
#: ``pip install modelkit``, the second venv of .ci/run) a test module that imports one of them
#: is reported as skipped, with the reason; everything else runs. A *modelkit* module that
#: imports one of them at import time is a bug, not a skip: tests/core/test_no_torch.py
#: imports every core module with these packages blocked.
EXTRA_PACKAGES = frozenset({"torch", "safetensors", "fickling", "blake3", "diffusers", "transformers", "peft",
                            "accelerate", "PIL", "tensorboard", "picklescan", "modelscan", "sd_mecha",
                            "huggingface_hub", "fsspec", "dask", "distributed", "gguf"})


class _ExtraOptionalModule(pytest.Module):
    def _getobj(self):  # type: ignore[no-untyped-def]
        try:
            return super()._getobj()
        except pytest.Collector.CollectError as exc:
            cause = exc.__cause__ or exc.__context__
            while cause is not None and not isinstance(cause, ModuleNotFoundError):
                cause = cause.__cause__ or cause.__context__
            name = (getattr(cause, "name", None) or "").split(".")[0]
            if name in EXTRA_PACKAGES:
                raise pytest.skip.Exception(f"needs {name}, which this install lacks (an extra: the core "
                                            f"install has no torch)", allow_module_level=True) from None
            raise


def _needed_extra(excinfo: pytest.ExceptionInfo[BaseException]) -> str | None:
    """The extra package a test's own code (tests/ or fixtures/, not modelkit/) failed to import,
    where this install lacks it; else None."""
    exc = excinfo.value
    name = (getattr(exc, "name", None) or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    if name not in EXTRA_PACKAGES or importlib.util.find_spec(name) is not None:
        return None
    frames = [e for e in excinfo.traceback if "importlib" not in str(e.path) and "site-packages" not in str(e.path)]
    if not frames:
        return None
    where = Path(str(frames[-1].path)).resolve()
    return name if where.is_relative_to(ROOT / "tests") or where.is_relative_to(ROOT / "fixtures") else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In the core install, a test whose own code imports torch (or another extra) is a skip with
    the reason, not a failure. An import of an extra inside modelkit stays a failure."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.failed and (name := _needed_extra(call.excinfo)) is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: needs {name}, which this install lacks (the core install has no torch)")


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    return _ExtraOptionalModule.from_parent(parent, path=module_path)


@pytest.fixture
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is not present (only in the project's own workspace)")
    return REALDATA


@pytest.fixture
def marker(tmp_path: Path) -> str:
    """A path a hostile payload would create; tests assert it never appears."""
    return str(tmp_path / "PWNED")


def same_bits(a, b) -> bool:
    """Same dtype, shape and bytes (works for every dtype, float8 included)."""
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    ab = a.contiguous().reshape(-1).view(torch.uint8)
    bb = b.contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(ab, bb)


@pytest.fixture(autouse=True)
def _no_marker_left(tmp_path: Path):
    yield
    assert not os.path.exists(tmp_path / "PWNED"), "a hostile payload was executed"


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets an empty hash cache of its own (never the user's ~/.cache)."""
    folder = tmp_path_factory.mktemp("hashcache")
    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(folder))
    monkeypatch.delenv("MODELKIT_HASH_CACHE", raising=False)
    return folder
