"""GGUF K-quants (Q2_K ... Q6_K): modelkit's numpy quantizer makes llama.cpp's bytes, the gguf
package reads them back, and ``convert --to gguf --quant Q4_K`` writes them in ComfyUI-GGUF's layout.

``data/kquant_golden.npz`` holds varied float32 super-blocks with the bytes of ggml's reference
quantizers (``quantize_row_qN_K_ref``, what ``llama-quantize`` uses without an importance matrix);
``data/README.md`` says how it was made.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

import modelkit
from fixtures.torchfree import save_safetensors
from modelkit.ops import kquants
from modelkit.ops.gguf_ops import K_QUANTS, to_gguf

GOLDEN = Path(__file__).parent / "data" / "kquant_golden.npz"
#: Worst |dequantized - x| over a super-block's largest |x|, for well-scaled values (a normal
#: distribution): a little above half a quantization step of each type.
BOUND = {"Q2_K": 0.45, "Q3_K": 0.24, "Q4_K": 0.10, "Q5_K": 0.06, "Q6_K": 0.025}
#: Root-mean-square error over the values' standard deviation.
RMS = {"Q2_K": 0.35, "Q3_K": 0.18, "Q4_K": 0.085, "Q5_K": 0.045, "Q6_K": 0.022}


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as g:
        return {k: g[k] for k in g.files}


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_bytes_equal_llama_cpps_reference_quantizer(golden: dict[str, np.ndarray], qtype: str) -> None:
    x, want = golden["x"], golden[qtype]
    assert x.dtype == np.float32 and x.shape[1] == 256 and len(x) >= 200
    assert want.shape == (len(x), kquants.TYPES[qtype][0])
    ours = kquants.quantize(x, qtype)
    bad = sorted({str(golden["case"][i]) for i in np.nonzero((ours != want).any(axis=1))[0]})
    assert bad == [], f"{qtype} differs from ggml in: {bad}"
    # the same blocks one by one and in chunks that cut the input anywhere give the same bytes
    assert kquants.quantize(x[:1], qtype).tobytes() == want[:1].tobytes()
    cases = set(golden["case"].tolist())
    assert {"zeros", "constant", "one-outlier", "negative-only", "ties-half", "beyond-fp16"} <= cases


def test_chunking_and_shapes(golden: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    x = golden["x"][:60]
    whole = kquants.quantize(x, "Q5_K")
    monkeypatch.setattr(kquants, "CHUNK", 7)
    for threads in (1, 3):
        assert kquants.quantize(x, "Q5_K", threads=threads).tobytes() == whole.tobytes()
    # a tensor's rows, as gguf.quantize shapes them: (..., row bytes)
    t = x.reshape(3, 4, 5 * 256)
    out = kquants.quantize(t, "Q5_K")
    assert out.shape == (3, 4, 5 * 176) and out.tobytes() == whole.tobytes()
    assert kquants.quantize(np.clip(t, -1e3, 1e3).astype(np.float16), "Q6_K").shape == (3, 4, 5 * 210)
    with pytest.raises(ValueError, match="super-blocks"):
        kquants.quantize(np.zeros((4, 320), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="not a K-quant"):
        kquants.quantize(np.zeros((1, 256), np.float32), "Q8_0")


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_ggufs_dequantizer_reads_our_bytes_within_the_types_bound(golden: dict[str, np.ndarray], qtype: str) -> None:
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal((24, 256)) * 0.02, rng.standard_normal((24, 256)),
                        (rng.standard_normal((24, 256)) * 0.05).astype(np.float16)]).astype(np.float32)
    q = kquants.quantize(x, qtype)
    back = gguf.dequantize(q, gguf.GGMLQuantizationType[qtype]).reshape(x.shape)
    assert back.dtype == np.float32 and np.isfinite(back).all()
    worst = np.abs(back - x).max(axis=1) / np.abs(x).max(axis=1)
    assert worst.max() < BOUND[qtype], worst.max()
    assert np.sqrt(np.mean((back - x) ** 2)) / x.std() < RMS[qtype]
    assert np.abs(back - x).max() > 0  # lossy: the check above is not vacuous
    # all-zero super-blocks come back as zeros; the golden file's well-scaled cases stay in bound
    assert not gguf.dequantize(kquants.quantize(np.zeros((2, 256), np.float32), qtype),
                               gguf.GGMLQuantizationType[qtype]).any()
    keep = np.isin(golden["case"], ["normal*1", "normal*0.01", "normal*10", "fp16-rounded", "bf16-rounded", "laplace"])
    gx = golden["x"][keep]
    gb = gguf.dequantize(golden[qtype][keep], gguf.GGMLQuantizationType[qtype]).reshape(gx.shape)
    assert (np.abs(gb - gx).max(axis=1) / np.abs(gx).max(axis=1)).max() < BOUND[qtype]


def tiny_flux_256(path: Path) -> dict[str, np.ndarray]:
    """A Flux-named fp16 transformer whose linear rows are whole 256-value super-blocks, one whose
    rows are 320 values (not whole super-blocks), Flux's kept-at-full-precision layers and a VAE key."""
    rng = np.random.default_rng(1)
    h = 256
    t = {
        "model.diffusion_model.img_in.weight": rng.standard_normal((h, 64)) * 0.05,
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": rng.standard_normal((3 * h, h)) * 0.02,
        "model.diffusion_model.double_blocks.0.img_attn.qkv.bias": rng.standard_normal(3 * h) * 0.02,
        "model.diffusion_model.double_blocks.0.img_mlp.0.weight": rng.standard_normal((2 * h, h)) * 0.02,
        "model.diffusion_model.double_blocks.0.txt_mlp.2.weight": rng.standard_normal((64, 320)) * 0.02,
        "model.diffusion_model.single_blocks.0.linear2.weight": rng.standard_normal((h, 2 * h)) * 0.02,
        "model.diffusion_model.final_layer.linear.weight": rng.standard_normal((64, h)) * 0.02,
        "first_stage_model.decoder.conv_in.weight": rng.standard_normal((8, 4, 3, 3)),
    }
    arrays = {k: v.astype(np.float16) for k, v in t.items()}
    save_safetensors(arrays, str(path))
    return arrays


QUANTIZED = {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.0.weight", "single_blocks.0.linear2.weight"}


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_convert_to_gguf_k_quant_is_what_comfyui_gguf_reads(tmp_path: Path, qtype: str) -> None:
    src = tmp_path / "flux.safetensors"
    arrays = tiny_flux_256(src)
    out = tmp_path / f"flux-{qtype}.gguf"
    r = to_gguf(src, out, quant=qtype, base="flux")
    assert (r.status, r.arch, r.quant, r.quantized, r.left_out) == ("written", "flux", qtype, 3, 1)
    reader = gguf.GGUFReader(str(out))
    assert bytes(reader.get_field("general.architecture").parts[-1]).decode() == "flux"
    by_name = {t.name: t for t in reader.tensors}
    assert set(by_name) == {k.removeprefix("model.diffusion_model.") for k in arrays if k.startswith("model.")}
    for full, arr in arrays.items():
        name = full.removeprefix("model.diffusion_model.")
        if name not in by_name:
            continue
        t = by_name[name]
        assert tuple(int(v) for v in reversed(t.shape)) == arr.shape, name
        vals = gguf.dequantize(t.data, t.tensor_type).reshape(arr.shape)
        if name in QUANTIZED:
            assert t.tensor_type.name == qtype, name
            want = kquants.quantize(arr.astype(np.float32), qtype)
            assert np.asarray(t.data).tobytes() == want.tobytes(), name
            err = np.abs(vals - arr.astype(np.float32)).max() / np.abs(arr.astype(np.float32)).max()
            assert 0 < err < BOUND[qtype], name
        else:
            # 1-D, Flux's in/out layers, and rows that are not whole super-blocks (ComfyUI-GGUF: F16)
            assert t.tensor_type.name == "F16", name
            assert np.array_equal(vals, arr.astype(np.float32)), name
    assert modelkit.verify(src, out).ok


def test_verify_recomputes_k_quants_and_catches_a_changed_byte(tmp_path: Path) -> None:
    src = tmp_path / "flux.safetensors"
    tiny_flux_256(src)
    g = tmp_path / "flux-Q4_K.gguf"
    to_gguf(src, g, quant="Q4_K", base="flux")
    r = modelkit.verify(src, g)
    assert r.ok, r.mismatches
    data = bytearray(g.read_bytes())
    with modelkit.open_model(g) as mf:
        start = mf["single_blocks.0.linear2.weight"].byte_range[0]
    data[start + 100] ^= 0x10  # a 4-bit level inside the first super-block
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    r = modelkit.verify(src, bad)
    assert not r.ok and [m.name for m in r.mismatches] == ["single_blocks.0.linear2.weight"]


def test_cli_writes_a_k_quant(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    src = tmp_path / "flux.safetensors"
    tiny_flux_256(src)
    r = CliRunner().invoke(cli, ["convert", str(src), "--to", "gguf", "--quant", "q4_k", "--base", "flux",
                                 "--out-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)["files"][0]
    assert doc["output"] == str(tmp_path / "flux-Q4_K.gguf") and doc["quant"] == "Q4_K" and doc["quantized"] == 3
    reader = gguf.GGUFReader(doc["output"])
    assert int(reader.get_field("general.file_type").parts[-1][0]) == 14  # llama.cpp's MOSTLY_Q4_K_S
    assert "Q4_K" in modelkit.inspect(doc["output"]).bytes_by_dtype
