"""Scanner features: wrappers, polyglots, nested blobs, --allow, --strict, -j, policies, --explain."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import modelkit
from fixtures import build, hostile
from modelkit.cli.main import cli
from modelkit.errors import UsageError


def _verdict(path: Path, **kw: object) -> str:
    return modelkit.scan.scan_file(path, **kw).verdict  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt,opener", [("gzip", gzip.compress), ("bzip2", bz2.compress), ("xz", lzma.compress)])
def test_compressed_wrappers_are_scanned_inside(tmp_path: Path, marker: str, fmt: str, opener) -> None:
    evil = tmp_path / "evil.ckpt.gz"
    evil.write_bytes(opener(hostile.os_system(marker)))
    report = modelkit.scan.scan_file(evil)
    assert report.verdict == "unsafe"
    assert {"MK-W001", "MK-P001"} <= {f.rule for f in report.findings}
    clean = tmp_path / "clean.pt.gz"
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    clean.write_bytes(opener(buf.getvalue()))
    assert _verdict(clean) == "safe"
    # readers refuse wrappers with a clear message instead of guessing
    with pytest.raises(modelkit.FormatError, match="compressed"):
        modelkit.open_model(clean)


def test_corrupt_wrapper_is_an_error_never_safe(tmp_path: Path) -> None:
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(b"\x80\x02}q\x00.")[:12])
    assert _verdict(p) == "error"


def test_pickle_zip_polyglot_is_flagged(tmp_path: Path, marker: str) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    poly = tmp_path / "poly.pt"
    poly.write_bytes(pickle.dumps({"w": 1}, protocol=2) + buf.getvalue())
    report = modelkit.scan.scan_file(poly)
    assert report.verdict == "unsafe"
    assert any(f.rule == "MK-Z003" for f in report.findings)


def test_byte_constants_holding_a_pickle_or_zip_are_scanned(tmp_path: Path, marker: str) -> None:
    inner_zip = io.BytesIO()
    with zipfile.ZipFile(inner_zip, "w") as z:
        z.writestr("archive/data.pkl", hostile.os_system(marker))
    for blob in (hostile.global_reduce(marker), inner_zip.getvalue()):
        p = tmp_path / "nested.pkl"
        p.write_bytes(pickle.dumps({"payload": blob}, protocol=4))
        report = modelkit.scan.scan_file(p)
        assert report.verdict == "unsafe", report.findings
        assert any(f.rule == "MK-P009" for f in report.findings)
        assert any(f.rule == "MK-P001" and ">" in (f.member or "") for f in report.findings)


def test_allow_is_audited_and_reported(tmp_path: Path) -> None:
    p = tmp_path / "ns.pt"
    p.write_bytes(b"\x80\x02cmy_trainer.config\nConfig\n)\x81}b.")
    assert _verdict(p) == "unsafe"
    assert _verdict(p, allow=["my_trainer.config.Config"]) == "safe"
    r = CliRunner().invoke(cli, ["scan", "--allow", "my_trainer.config.Config", "--json", str(p)])
    doc = json.loads(r.stdout.split("\n", 1)[1] if r.stdout.startswith("allowed") else r.stdout)
    assert r.exit_code == 0 and doc["allowed"] == ["my_trainer.config.Config"]
    assert doc["files"][0]["findings"][0]["rule"] == "MK-P008"


@pytest.mark.parametrize("entry", ["nonsense", "os.system ", "os.", ".system", "os..system", "builtins.eval()"])
def test_allow_entries_must_be_module_dot_name(tmp_path: Path, entry: str) -> None:
    p = tmp_path / "ns.pt"
    p.write_bytes(b"\x80\x02cmy_trainer.config\nConfig\n)\x81}b.")
    r = CliRunner().invoke(cli, ["scan", "--allow", entry, "--json", str(p)])
    assert r.exit_code == 2
    assert "is not a MODULE.NAME global" in json.loads(r.stdout)["error"]["problem"]
    with pytest.raises(UsageError):
        modelkit.scan.scan([str(p)], allow=[entry])


def test_strict_makes_suspicious_count(tmp_path: Path) -> None:
    p = tmp_path / "two.pkl"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=2) + pickle.dumps({"b": 2}, protocol=2))
    assert _verdict(p) == "suspicious"
    assert CliRunner().invoke(cli, ["scan", str(p)]).exit_code == 0
    assert CliRunner().invoke(cli, ["scan", "--strict", str(p)]).exit_code == 1


def test_jobs_keep_order_and_results(tmp_path: Path, marker: str) -> None:
    for i in range(6):
        build.write_safetensors(str(tmp_path / f"m{i}.safetensors"), {"w": torch.ones(2)})
    hostile.hostile_legacy(str(tmp_path / "m3x.pt"), marker)
    serial = modelkit.scan.scan([tmp_path])
    parallel = modelkit.scan.scan([tmp_path], jobs=2)
    assert [(f.path, f.verdict) for f in serial.files] == [(f.path, f.verdict) for f in parallel.files]
    assert parallel.counts["unsafe"] == 1


def test_require_safetensors_policy(tmp_path: Path) -> None:
    ck = tmp_path / "m.ckpt"
    torch.save({"w": torch.ones(2)}, ck)
    st = tmp_path / "m.safetensors"
    build.write_safetensors(str(st), {"w": torch.ones(2)})
    assert _verdict(ck) == "safe"
    assert _verdict(ck, require_safetensors=True) == "unsafe"
    assert _verdict(st, require_safetensors=True) == "safe"
    assert CliRunner().invoke(cli, ["scan", "--require-safetensors", str(ck), str(st)]).exit_code == 1


def test_explain_shows_the_decompiled_payload(tmp_path: Path, marker: str) -> None:
    p = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(p), marker, payload="os_system")
    r = CliRunner().invoke(cli, ["scan", "--explain", str(p)])
    assert r.exit_code == 1
    assert "from os import system" in r.stdout and "decompiled by fickling" in r.stdout


def test_findings_name_the_opcode_and_offset(tmp_path: Path, marker: str) -> None:
    p = tmp_path / "evil.pkl"
    data = hostile.stack_global(marker)
    p.write_bytes(data)
    f = next(f for f in modelkit.scan.scan_file(p).findings if f.rule == "MK-P001")
    assert f.opcode == "STACK_GLOBAL" and data[f.offset] == 0x93 and f.global_name == "builtins.exec"


def test_the_extension_never_decides(tmp_path: Path, marker: str) -> None:
    p = tmp_path / "model.safetensors"
    p.write_bytes(hostile.os_system(marker))
    assert _verdict(p) == "unsafe"
    walked = modelkit.scan.scan([tmp_path])
    assert walked.files[0].verdict == "unsafe"
