from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so tests can import fixtures/

REALDATA = ROOT.parent / "shared" / "realdata"


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
