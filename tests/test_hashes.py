"""Hashes against values computed independently in the test."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fixtures import build
from modelkit.cli.main import cli
from modelkit.ops.hashes import blake3_available, check, hash_file


def _safetensors(path: Path, n: int = 600_000, metadata: dict[str, str] | None = None) -> bytes:
    build.write_safetensors(str(path), {"w": torch.arange(n, dtype=torch.float32)}, metadata=metadata)
    return path.read_bytes()


@pytest.mark.parametrize("cores", [1, 2, 8])
def test_every_hash_in_one_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    """The hashes run in lanes on their own threads (inline on one core): same digests, in file order."""
    import modelkit.ops.hashes as H
    from modelkit import portable

    monkeypatch.setattr(portable, "usable_cpus", lambda: cores)
    monkeypatch.setattr(H, "CHUNK", 100_003)  # odd chunks cross the 1 MiB window and the header
    p = tmp_path / "m.safetensors"
    data = _safetensors(p)
    (n,) = struct.unpack("<Q", data[:8])
    res = hash_file(p, ("sha256", "autov1", "autov2", "autov3", "crc32"))
    full = hashlib.sha256(data).hexdigest()
    assert res.hashes["sha256"] == full
    assert res.hashes["autov2"] == full[:10]
    assert res.hashes["autov1"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert res.hashes["autov3"] == hashlib.sha256(data[8 + n :]).hexdigest()[:12]
    assert res.hashes["crc32"] == f"{zlib.crc32(data):08x}"


def test_small_and_non_safetensors_files(tmp_path: Path) -> None:
    p = tmp_path / "e.pt"
    build.a1111_embedding(str(p))
    res = hash_file(p)
    assert res.hashes["autov1"] == hashlib.sha256(b"").hexdigest()[:8]  # what A1111 shows for < 1 MiB
    assert "autov3" not in res.hashes


@pytest.mark.skipif(not blake3_available(), reason="blake3 package not installed")
def test_blake3(tmp_path: Path) -> None:
    import blake3

    p = tmp_path / "m.safetensors"
    data = _safetensors(p, 1000)
    assert hash_file(p, ("blake3",)).hashes["blake3"] == blake3.blake3(data).hexdigest()


def test_check_finds_stale_embedded_hashes(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    build.write_safetensors(str(p), {"w": torch.arange(1000, dtype=torch.float32)})
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    good = hashlib.sha256(data[8 + n :]).hexdigest()
    meta = {"sshs_model_hash": good, "modelspec.hash_sha256": "0x" + "0" * 64, "sshs_legacy_hash": "12345678"}
    res = check(hash_file(p, ("sha256", "autov3")), meta)
    by = {c.key: c.ok for c in res.checks}
    assert by == {"sshs_model_hash": True, "modelspec.hash_sha256": False, "sshs_legacy_hash": None}
    assert res.mismatches == 1


def test_hash_cli(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    _safetensors(p, 1000, metadata={"sshs_model_hash": "deadbeef"})
    r = CliRunner().invoke(cli, ["hash", "--check", "--json", str(p)])
    assert r.exit_code == 1  # the embedded hash is wrong
    doc = json.loads(r.stdout)
    assert doc["schema"] == "modelkit.hash/1" and doc["files"][0]["checks"][0]["ok"] is False
    r = CliRunner().invoke(cli, ["hash", "--algo", "crc32", str(p)])
    assert r.exit_code == 0 and "CRC32" in r.stdout and "SHA256" not in r.stdout
    r = CliRunner().invoke(cli, ["hash", str(tmp_path / "missing.ckpt")])
    assert r.exit_code == 2 and "no such file" in r.stderr
