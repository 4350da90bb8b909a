"""The engine: ambiguity gives unknown, names never decide, probes stay few, the table is data."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modelkit
from fixtures import build
from fixtures import detect_layouts as L
from modelkit.detect import RULES, KeyView, detect_view, tables
from modelkit.detect.result import BASES, KINDS, Detection
from modelkit.detect.view import MAX_PROBES
from tests.detect.helpers import detect_layout

PKG = Path(modelkit.__file__).parent / "detect"


def test_a_couple_of_random_keys_is_unknown(tmp_path: Path) -> None:
    det = detect_layout(tmp_path, {"foo.weight": ((4, 4), "float32"), "bar": ((3,), "float32")})
    assert (det.kind, det.base, det.confidence) == ("unknown", None, "low")
    assert det.evidence[0].startswith("no rule matched 2 tensors; ") and "foo (1)" in det.evidence[0]
    (tmp_path / "one").mkdir()
    det = detect_layout(tmp_path / "one", {"foo.weight": ((4, 4), "float32")})
    assert det.evidence[0].startswith("no rule matched 1 tensor; ")


def test_empty_file_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({}, path)
    assert modelkit.detect(path).kind == "unknown"


def test_checkpoint_with_lora_tensors_merged_in_says_so(tmp_path: Path) -> None:
    layout, values = L.lora_layout(L.sd1_targets(), "lora")
    det = detect_layout(tmp_path, {**L.sd1_checkpoint(), **layout}, values=values)
    assert (det.kind, det.base, det.confidence) == ("checkpoint", "sd1", "medium")
    assert det.details["foreign_keys"] == len(layout) and det.details["also_matched"] == ["lora"]
    assert any("keys outside a checkpoint's components (e.g. lora_" in e for e in det.evidence)


def test_vae_and_text_encoder_without_a_unet_is_ambiguous(tmp_path: Path) -> None:
    det = detect_layout(tmp_path, {**L.ldm_vae(""), **L.hf_clip("", 768, 1)})
    assert det.kind == "unknown" and set(det.details["candidates"]) == {"vae.ldm", "text-encoder.clip"}


def test_file_names_never_decide(tmp_path: Path) -> None:
    layout, values = L.lora_layout(L.sd1_targets(), "lora")
    lora = detect_layout(tmp_path, layout, "sdxl_vae_embedding.safetensors", values=values)
    assert (lora.kind, lora.base) == ("lora", "sd1")
    vae = detect_layout(tmp_path, L.ldm_vae(""), "sd15-lora-inpainting.ckpt", "zip", wrap="state_dict")
    assert vae.kind == "vae"
    emb = tmp_path / "flux-controlnet.pt"
    build.save_torch(L.a1111_embedding(), str(emb))
    assert modelkit.detect(emb).kind == "embedding"


def test_open_modelfile_and_path_give_the_same_answer(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    L.write(L.sdxl_checkpoint(), str(path))
    with modelkit.open_model(path) as mf:
        from_mf = modelkit.detect(mf)
    assert from_mf == modelkit.detect(path)


def test_detection_reads_no_tensor_for_a_checkpoint_and_few_for_ia3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    original = modelkit.TensorRef.read

    def counting(self: modelkit.TensorRef, framework: str | None = None) -> object:
        reads.append(self.name)
        return original(self, framework)

    monkeypatch.setattr(modelkit.TensorRef, "read", counting)
    assert detect_layout(tmp_path, L.sdxl_checkpoint()).base == "sdxl"
    assert reads == []
    layout, values = L.lora_layout(L.sd1_targets(te=False), "ia3", on_input=r"attn2\.to_[kv]$")
    path = tmp_path / "ia3.safetensors"
    L.write(layout, str(path), values=values)
    with modelkit.open_model(path) as mf:
        view = KeyView.of(mf)
        assert detect_view(view).base == "sd1"
    assert 1 <= view.probes <= MAX_PROBES and len(reads) == view.probes
    assert all(r.endswith(".on_input") for r in reads)


def test_bfloat16_alphas_are_read_without_torch(tmp_path: Path) -> None:
    layout, values = L.lora_layout(L.sd1_targets(), "lora", alpha=8.0)
    tensors = L.tensors(layout, values)
    tensors = {k: (v.to(torch.bfloat16) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    path = tmp_path / "bf16.safetensors"
    build.write_safetensors(str(path), tensors)
    code = ("import sys\nsys.modules['torch'] = None\nimport modelkit\n"
            f"d = modelkit.detect({str(path)!r})\n"
            "assert (d.kind, d.base, d.details['alphas']) == ('lora', 'sd1', [8.0]), d\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rule_table_is_consistent() -> None:
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    assert set(names) == set(tables.SIGNATURES)
    assert all(r.kind in KINDS for r in RULES)
    assert set(tables.CONTEXT_WIDTH_BASE.values()) <= set(BASES)


def test_tables_module_is_data_only() -> None:
    tree = ast.parse((PKG / "tables.py").read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))]


def test_modules_stay_small_and_import_no_torch_at_module_level() -> None:
    for path in PKG.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) < 400, path
        top = ast.parse(text).body
        imported = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
        assert not any(m == "torch" or m.startswith("torch.") for m in imported), path


def test_detection_validates_its_vocabulary() -> None:
    with pytest.raises(ValueError):
        Detection("model")
    with pytest.raises(ValueError):
        Detection("lora", base="sd15")
    with pytest.raises(ValueError):
        Detection("lora", confidence="sure")
    d = Detection("lora", "lora", "sd1", {}, "high", ("x",), {"ranks": {4}})
    assert d.to_dict()["details"] == {"ranks": [4]}
