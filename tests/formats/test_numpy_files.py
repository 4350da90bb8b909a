from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import modelkit
from fixtures import build


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_npy_and_npz_read_exactly(tmp_path: Path, framework: str) -> None:
    arrays = build.numpy_files(str(tmp_path))
    for name, arr in arrays.items():
        with modelkit.open_model(tmp_path / f"{name}.npy") as mf:
            assert mf.container == "npy"
            got = mf["array"].read(framework)
            np.testing.assert_array_equal(np.asarray(got), arr)
    for zname in ("stored", "compressed"):
        with modelkit.open_model(tmp_path / f"{zname}.npz") as mf:
            assert mf.container == "npz" and set(mf) == set(arrays)
            for name, arr in arrays.items():
                np.testing.assert_array_equal(np.asarray(mf[name].read(framework)), arr)


def test_numpy_arrays_in_a_plain_pickle(tmp_path: Path) -> None:
    import pickle

    arrays = {"a": np.arange(6, dtype="<f4").reshape(2, 3), "b": np.array([1, 2], dtype=">i4"), "s": np.float32(2.5)}
    for proto in (2, 4):
        path = tmp_path / f"arr{proto}.pkl"
        path.write_bytes(pickle.dumps(arrays, protocol=proto))
        with modelkit.open_model(path) as mf:
            np.testing.assert_array_equal(mf["a"].read("numpy"), arrays["a"])
            np.testing.assert_array_equal(mf["b"].read("numpy"), arrays["b"])
            assert mf.extras["s"] == 2.5
