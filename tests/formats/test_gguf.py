"""GGUF: the reader against the ``gguf`` package's own reader, and a family of broken and hostile
headers built byte by byte, each refused in one line (or scanned as what byte 0 spells)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

import modelkit
from modelkit.errors import FormatError
from modelkit.formats.gguf_file import GGML_TYPES
from modelkit.scan.engine import scan_file


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def build(tensors: list[tuple[str, list[int], int, int]], kv: bytes = b"", n_kv: int = 0, *, version: int = 3,
          n_tensors: int | None = None, data: bytes | None = None, align: int = 32) -> bytes:
    """A GGUF file by hand: ``tensors`` as (name, ggml dims, type code, offset)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, n_kv) + kv
    for name, dims, code, off in tensors:
        head += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", code, off)
    head += b"\0" * (-len(head) % align)
    if data is None:
        end = 0
        for _n, dims, code, off in tensors:
            _q, block, size = GGML_TYPES.get(code, ("?", 1, 1))
            end = max(end, off + int(np.prod(dims)) // block * size)
        data = bytes(range(256)) * (end // 256 + 1)
        data = data[:end]
    return head + data


GOOD = [("a.weight", [8, 4], 0, 0), ("a.bias", [8], 1, 128)]


@pytest.fixture
def good(tmp_path: Path) -> Path:
    p = tmp_path / "good.gguf"
    p.write_bytes(build(GOOD))
    return p


def test_the_reader_reads_a_plain_file(good: Path) -> None:
    with modelkit.open_model(good) as mf:
        assert mf.container == "gguf"
        assert {k: (v.dtype.name, v.shape) for k, v in mf.items()} == {"a.weight": ("float32", (4, 8)),
                                                                       "a.bias": ("float16", (8,))}
        data_start = mf.info["gguf"]["data_start"]
        raw = good.read_bytes()
        assert bytes(mf["a.weight"].read_raw()) == raw[data_start : data_start + 128]
    r = scan_file(good)
    assert (r.verdict, r.container, r.findings) == ("safe", "gguf", ())


def _variants() -> dict[str, bytes]:
    """Each a way a GGUF header can lie; every one must be refused, never trusted."""
    out = {
        "version-9": build(GOOD, version=9),
        "huge-tensor-count": build(GOOD, n_tensors=1 << 40),
        "tensor-count-more-than-written": build(GOOD, n_tensors=3),
        "huge-kv-count": build(GOOD, n_kv=1 << 40),
        "zero-dim": build([("a", [0, 4], 0, 0)]),
        "five-dims": build([("a", [1, 1, 1, 1, 1], 0, 0)]),
        "unknown-type": build([("a", [8], 99, 0)], data=b"\0" * 64),
        "q8-row-not-whole-blocks": build([("a", [30, 2], 8, 0)], data=b"\0" * 128),
        "misaligned-offset": build([("a", [8], 0, 4)]),
        "overlap": build([("a", [16], 0, 0), ("b", [16], 0, 32)]),
        "past-the-end": build([("a", [1 << 20], 0, 0)], data=b"\0" * 64),
        "duplicate-name": build([("a", [8], 0, 0), ("a", [8], 0, 32)]),
        "bad-utf8-name": build([("x", [8], 0, 0)]).replace(b"\x01\x00\x00\x00\x00\x00\x00\x00x", b"\x01\x00\x00\x00\x00\x00\x00\x00\xff", 1),
        "huge-string": b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1 << 50),
        "alignment-not-power-of-two": build(GOOD, _s("general.alignment") + struct.pack("<II", 4, 24), 1, align=24),
        "unknown-kv-type": build(GOOD, _s("k") + struct.pack("<I", 77), 1),
        "huge-array": build(GOOD, _s("k") + struct.pack("<IIQ", 9, 4, 1 << 40), 1),
        "nested-array": build(GOOD, _s("k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 1) + b"\0" * 4, 1),
    }
    whole = build(GOOD)
    for cut in (5, 12, 23, 30, 60, len(whole) - 1):
        out[f"truncated-at-{cut}"] = whole[:cut]
    return out


@pytest.mark.parametrize("name", sorted(_variants()))
def test_broken_headers_are_refused_in_one_line(name: str, tmp_path: Path) -> None:
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(_variants()[name])
    with pytest.raises(FormatError) as exc:
        modelkit.open_model(p)
    assert "\n" not in str(exc.value) and str(p) in str(exc.value)
    r = scan_file(p)
    assert r.verdict == "error" and r.findings, name
    assert all(f.rule in ("MK-S001", "MK-F001") for f in r.findings), r.findings


def test_a_gguf_whose_bytes_spell_a_pickle_is_scanned_as_one(tmp_path: Path, marker: str) -> None:
    """torch.load unpickles any non-zip file: GGUF's magic is BINFLOAT plus 8 bytes, and what
    follows is the attacker's. The scan probes byte 0 as it does for every non-zip file."""
    payload = b"cos\nsystem\n(S'touch " + marker.encode() + b"'\ntR."
    p = tmp_path / "polyglot.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" + payload + b"\0" * 64)
    r = scan_file(p)
    assert r.verdict == "unsafe"
    assert any(f.global_name == "os.system" for f in r.findings)


def _write_with_gguf(path: Path, arrays: dict[str, np.ndarray], quant: dict[str, str]) -> dict[str, np.ndarray]:
    import gguf as g

    w = g.GGUFWriter(str(path), "flux")
    w.add_string("general.name", "tiny")
    for name, a in arrays.items():
        if name in quant:
            qt = g.GGMLQuantizationType[quant[name]]
            try:
                packed = g.quantize(a, qt)
            except NotImplementedError:  # gguf has no numpy quantizer for K-quants: random blocks
                shape = g.quant_shape_to_byte_shape(a.shape, qt)
                # bytes below 0x3C: every fp16 scale they make is finite, so dequantizing warns of nothing
                packed = np.random.default_rng(3).integers(0, 0x3C, shape, dtype=np.uint8)
            w.add_tensor(name, packed, raw_dtype=qt)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "BF16"])
def test_the_reader_agrees_with_ggufs_own(tmp_path: Path, qname: str) -> None:
    import gguf as g

    rng = np.random.default_rng(1)
    arrays = {"double_blocks.0.img_attn.qkv.weight": rng.standard_normal((32, 512)).astype(np.float32),
              "double_blocks.0.img_attn.qkv.bias": rng.standard_normal(512).astype(np.float16),
              "img_in.weight": rng.standard_normal((4, 256)).astype(np.float32)}
    p = tmp_path / f"{qname}.gguf"
    _write_with_gguf(p, arrays, {"double_blocks.0.img_attn.qkv.weight": qname, "img_in.weight": qname})
    reader = g.GGUFReader(str(p))
    with modelkit.open_model(p) as mf:
        assert mf.metadata["general.architecture"] == "flux" and mf.metadata["general.name"] == "tiny"
        for t in reader.tensors:
            ref = mf[t.name]
            assert ref.byte_range == (int(t.data_offset), int(t.data_offset) + int(t.n_bytes)), t.name
            assert bytes(ref.read_raw()) == np.asarray(t.data).tobytes(), t.name
            if t.tensor_type.name in ("F32", "F16", "BF16"):
                assert ref.dtype.name == {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[t.tensor_type.name]
                assert ref.shape == tuple(int(d) for d in reversed(t.shape))
                continue
            assert mf.info["gguf"]["types"][t.name] == t.tensor_type.name
            assert tuple(mf.info["gguf"]["shapes"][t.name]) == arrays[t.name].shape
            ours = g.dequantize(np.frombuffer(bytes(ref.read_raw()), np.uint8).reshape(ref.shape), t.tensor_type)
            assert np.array_equal(ours, g.dequantize(t.data, t.tensor_type))
    assert scan_file(p).verdict == "safe"


def test_detection_sees_logical_shapes(tmp_path: Path) -> None:
    from modelkit.detect.view import KeyView

    rng = np.random.default_rng(2)
    p = tmp_path / "q.gguf"
    _write_with_gguf(p, {"x.weight": rng.standard_normal((64, 256)).astype(np.float32)}, {"x.weight": "Q8_0"})
    with modelkit.open_model(p) as mf:
        assert mf["x.weight"].shape == (64, 272)  # packed bytes per row
        assert KeyView.of(mf).shape("x.weight") == (64, 256)


@pytest.mark.parametrize("cut", [4, 8, 23])
def test_a_gguf_cut_short_is_named_as_one(tmp_path: Path, cut: int) -> None:
    p = tmp_path / "short.gguf"
    p.write_bytes(build(GOOD)[:cut])
    with pytest.raises(FormatError, match="GGUF"):
        modelkit.open_model(p)
    r = scan_file(p)
    assert r.container == "gguf" and [f.rule for f in r.findings] == ["MK-S001"]
