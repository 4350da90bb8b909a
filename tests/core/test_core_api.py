"""The core's own work on files written without torch: detection of a real SD 1.x layout, every
container convert reads, bit-exact conversion, hostile files refused, diff of changed values.
These run in every install; in the core venv they are the proof that ``pip install modelkit``
does its job."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import modelkit
from fixtures import hostile, torchfree
from fixtures.sd_layout import tiny_sd1_layout
from modelkit import numcast
from modelkit.errors import UnsafeFileError

HOSTILE = [hostile.global_reduce, hostile.os_system, hostile.stack_global, hostile.inst, hostile.obj,
           hostile.build_setstate, hostile.hidden_in_dict, hostile.after_error, hostile.concatenated,
           hostile.nested_load_from_bytes]


def _sd1(tmp_path: Path, fmt: str) -> tuple[Path, dict[str, object]]:
    tensors = torchfree.sd1_tensors(tiny_sd1_layout(context_dim=768))  # the SD 1.x context width
    path = tmp_path / f"sd1.{ {'zip': 'ckpt', 'legacy': 'pt', 'st': 'safetensors'}[fmt] }"
    {"zip": torchfree.save_zip, "legacy": torchfree.save_legacy, "st": torchfree.save_safetensors}[fmt](
        tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("fmt", ["zip", "legacy", "st"])
def test_detect_inspect_convert_verify(tmp_path: Path, fmt: str) -> None:
    path, tensors = _sd1(tmp_path, fmt)
    assert modelkit.scan(path).files[0].verdict == "safe"
    det = modelkit.detect(path)
    assert (det.kind, det.base) == ("checkpoint", "sd1"), det.evidence
    info = modelkit.inspect(path)
    assert info.tensor_count == len(tensors)
    out = tmp_path / "out.safetensors"
    modelkit.convert(path, out)
    assert modelkit.verify(path, out).ok
    with modelkit.open_model(out) as mf:
        for name, arr in tensors.items():
            got = mf[name].read("numpy")
            assert got.dtype == np.asarray(arr).dtype and np.array_equal(got, arr), name
    assert modelkit.diff(path, out).counts() == {"same": len(tensors)}
    assert modelkit.hash_file(out).hashes["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_prune_casts_without_torch_as_numcast_says(tmp_path: Path) -> None:
    path, tensors = _sd1(tmp_path, "zip")
    out = tmp_path / "bf16.safetensors"
    modelkit.prune(path, out, dtype="bf16")
    assert modelkit.verify(path, out).ok
    with modelkit.open_model(out) as mf:
        for name, arr in tensors.items():
            ref = mf[name]
            if np.asarray(arr).dtype == np.float16:
                assert ref.dtype.name == "bfloat16"
                want = numcast.cast(arr, modelkit.dtypes.BY_NAME["float16"], ref.dtype)
                assert np.array_equal(ref.read("numpy"), want)
            else:
                assert np.array_equal(ref.read("numpy"), arr)


def test_numpy_containers(tmp_path: Path) -> None:
    a = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian: swapped on the way out
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "b.npz", w=np.ones((2, 2), np.float16), i=np.arange(3))
    for name in ("a.npy", "b.npz"):
        src = tmp_path / name
        assert modelkit.scan(src).files[0].verdict == "safe"
        out = tmp_path / f"{name}.safetensors"
        modelkit.convert(src, out)
        assert modelkit.verify(src, out).ok
    with modelkit.open_model(tmp_path / "a.npy.safetensors") as mf:
        (ref,) = mf.values()
        assert np.array_equal(ref.read("numpy"), a.astype("<f4"))


@pytest.mark.parametrize("build", HOSTILE, ids=lambda f: f.__name__)
def test_hostile_pickles_are_refused(tmp_path: Path, marker: str, build) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.pkl"
    path.write_bytes(build(marker))
    assert modelkit.scan(path).files[0].verdict == "unsafe"
    with pytest.raises(UnsafeFileError):
        modelkit.convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_hostile_containers_are_refused(tmp_path: Path, marker: str) -> None:
    for i, build in enumerate([hostile.hostile_torch_zip, hostile.hostile_extra_member, hostile.hostile_legacy,
                               hostile.hostile_npy]):
        path = tmp_path / f"bad{i}.ckpt"
        build(str(path), marker)
        assert modelkit.scan(path).files[0].verdict == "unsafe", build.__name__
        with pytest.raises(UnsafeFileError):
            modelkit.inspect(path)


def test_diff_reports_the_largest_change(tmp_path: Path) -> None:
    a = {"w": np.zeros(4, np.float32), "b": torchfree.Bits(np.array([0x3F80, 0x4000], np.uint16), "bfloat16")}
    b = {"w": np.array([0, 0.5, -2, 0], np.float32), "b": torchfree.Bits(np.array([0x3F80, 0x4040], np.uint16), "bfloat16")}
    torchfree.save_safetensors(a, str(tmp_path / "a.safetensors"))
    torchfree.save_safetensors(b, str(tmp_path / "b.safetensors"))
    d = {e.name: e for e in modelkit.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").entries}
    assert d["w"].change == "values" and d["w"].max_abs == 2.0
    assert d["b"].change == "values" and d["b"].max_abs == 1.0  # bf16 2.0 -> 3.0
