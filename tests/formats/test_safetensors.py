"""The safetensors reader: every dtype, and every header lie rejected with its own message."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modelkit
from fixtures import build
from modelkit.errors import FormatError, ResourceLimitError, TruncatedFileError
from tests.conftest import same_bits


def test_every_safetensors_dtype_bit_equal(tmp_path: Path) -> None:
    state = {k: v for k, v in build.all_dtypes_state().items()
             if v.dtype not in (torch.complex128,) and not k.startswith("view.")}
    path = tmp_path / "all.safetensors"
    build.write_safetensors(str(path), state, metadata={"ss_network_dim": "4", "modelspec.title": "x"})
    ref = load_file(path)
    with modelkit.open_model(path) as mf:
        assert mf.container == "safetensors"
        assert mf.metadata == {"ss_network_dim": "4", "modelspec.title": "x"}
        assert set(mf) == set(ref)
        for k, t in ref.items():
            assert same_bits(mf[k].read(), t), k
            assert mf[k].dtype.st is not None


def _raw(header: dict, data: bytes = b"", pad_to: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    if pad_to:
        h = h + b" " * (pad_to - len(h))
    return struct.pack("<Q", len(h)) + h + data


BAD = {
    "offsets_lie": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12, "span 12"),
    "gap": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
             "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, b"\0" * 6, "gap"),
    "overlap": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                 "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4, "overlaps"),
    "uncovered": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 5, "cover"),
    "past_end": ({"a": {"dtype": "F32", "shape": [25_000_000_000], "data_offsets": [0, 100_000_000_000]}}, b"", "data ends"),
    "unknown_dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16, "unknown dtype"),
    "bad_shape": ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0", "shape"),
    "reversed": ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [3, 2]}}, b"\0" * 3, "data_offsets"),
    "meta_not_str": ({"__metadata__": {"a": 1}}, b"", "not a string"),
    "extra_field": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, b"\0", "exactly"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_header_lies_rejected(tmp_path: Path, case: str) -> None:
    header, data, words = BAD[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw(header, data))
    with pytest.raises(FormatError) as info:
        modelkit.open_model(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_duplicate_keys_and_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "dup.safetensors"
    h = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0")
    with pytest.raises(FormatError, match="twice"):
        modelkit.open_model(path)
    h = b'{"a": NaN}   '
    path.write_bytes(struct.pack("<Q", len(h)) + h)
    with pytest.raises(FormatError, match="JSON"):
        modelkit.open_model(path)


def test_header_claiming_100_gb_is_refused_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 100 * 1024**3) + b"{}")
    with pytest.raises(ResourceLimitError):
        modelkit.open_model(path)
    path.write_bytes(struct.pack("<Q", 50 * 1024**2) + b"{}")
    with pytest.raises(TruncatedFileError):
        modelkit.open_model(path)


def test_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    build.write_safetensors(str(path), {"w": torch.ones(100)})
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(TruncatedFileError):
        modelkit.open_model(path)


def test_padded_header_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    path.write_bytes(_raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02", pad_to=64))
    with modelkit.open_model(path) as mf:
        assert mf["a"].read().tolist() == [1, 2]
    path.write_bytes(_raw({}))
    with modelkit.open_model(path) as mf:
        assert len(mf) == 0
