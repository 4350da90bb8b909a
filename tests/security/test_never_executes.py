"""The product's promise: no reader ever executes a pickle from the file.

Each hostile fixture is first proven live: the real ``pickle`` module, run in a child process,
creates the marker. Then every modelkit reader and the scanner see the same bytes, and the
marker must never appear (the autouse fixture in conftest checks it after every test too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import modelkit
from fixtures import hostile
from modelkit.errors import FormatError, UnsafeFileError


def _payload_is_live(data: bytes, tmp_path: Path, marker: str) -> None:
    blob = tmp_path / "payload.bin"
    blob.write_bytes(data)
    code = "import pickle,sys\ntry:\n pickle.loads(open(sys.argv[1],'rb').read())\nexcept Exception:\n pass\n"
    subprocess.run([sys.executable, "-c", code, str(blob)], check=True, cwd=tmp_path)
    assert os.path.exists(marker), "fixture payload is not live"
    os.unlink(marker)


@pytest.mark.parametrize("payload", sorted(hostile.PAYLOADS))
def test_plain_pickle_payloads_refused(tmp_path: Path, marker: str, payload: str) -> None:
    data = hostile.PAYLOADS[payload](marker)
    _payload_is_live(data, tmp_path, marker)
    path = tmp_path / "evil.pt"
    path.write_bytes(data)
    with pytest.raises(UnsafeFileError) as info:
        modelkit.open_model(path)
    assert "builtins.exec" in str(info.value) or "os.system" in str(info.value)
    assert modelkit.scan(path).files[0].verdict == "unsafe"
    assert not os.path.exists(marker)


@pytest.mark.parametrize("payload", sorted(hostile.PAYLOADS))
def test_torch_zip_payloads_refused(tmp_path: Path, marker: str, payload: str) -> None:
    path = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(path), marker, payload=payload)
    with pytest.raises(UnsafeFileError):
        modelkit.open_model(path)
    report = modelkit.scan(path).files[0]
    assert report.verdict == "unsafe"
    assert any(f.member == "archive/data.pkl" for f in report.findings)


def test_torch_zip_with_renamed_folder_refused(tmp_path: Path, marker: str) -> None:
    path = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(path), marker, member_prefix="innocent")
    with pytest.raises(UnsafeFileError):
        modelkit.open_model(path)


def test_payload_in_other_zip_member_is_scanned(tmp_path: Path, marker: str) -> None:
    path = tmp_path / "evil.ckpt"
    hostile.hostile_extra_member(str(path), marker)
    report = modelkit.scan(path).files[0]
    assert report.verdict == "unsafe"
    assert any(f.member == "archive/extra.pkl" and f.rule == "MK-P001" for f in report.findings)


def test_legacy_stream_payload_refused(tmp_path: Path, marker: str) -> None:
    path = tmp_path / "evil.pt"
    hostile.hostile_legacy(str(path), marker)
    with pytest.raises(UnsafeFileError):
        modelkit.open_model(path)
    assert modelkit.scan(path).files[0].verdict == "unsafe"


def test_nested_load_from_bytes_payload_refused(tmp_path: Path, marker: str) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(hostile.nested_load_from_bytes(marker))
    with pytest.raises(UnsafeFileError):
        modelkit.open_model(path)
    report = modelkit.scan(path).files[0]
    assert report.verdict == "unsafe"
    assert "builtins.exec" in report.globals_seen


def test_concatenated_pickle_is_scanned(tmp_path: Path, marker: str) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(hostile.concatenated(marker))
    report = modelkit.scan(path).files[0]
    assert report.verdict == "unsafe"
    assert {"MK-P007", "MK-P001"} <= {f.rule for f in report.findings}


def test_npy_object_array_refused(tmp_path: Path, marker: str) -> None:
    path = tmp_path / "evil.npy"
    hostile.hostile_npy(str(path), marker)
    with pytest.raises(UnsafeFileError):
        modelkit.open_model(path)
    report = modelkit.scan(path).files[0]
    assert report.verdict == "unsafe"
    assert {"MK-N001", "MK-P001"} <= {f.rule for f in report.findings}


def test_npz_object_member_refused(tmp_path: Path, marker: str) -> None:
    npy = tmp_path / "x.npy"
    hostile.hostile_npy(str(npy), marker)
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.write(npy, "w.npy")
    with pytest.raises(UnsafeFileError):
        modelkit.open_model(path)
    assert modelkit.scan(path).files[0].verdict == "unsafe"


def test_payload_before_a_parse_error_is_unsafe_not_error(tmp_path: Path, marker: str) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(hostile.after_error(marker))
    with pytest.raises((UnsafeFileError, FormatError)):
        modelkit.open_model(path)
    report = modelkit.scan(path).files[0]
    assert report.verdict == "unsafe"
    assert {"MK-P001", "MK-P003"} <= {f.rule for f in report.findings}


def test_zip_name_mismatch_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, path)
    data = bytearray(path.read_bytes())
    # rename the first local header's file name only (central directory keeps the real name)
    i = data.index(b"/data.pkl")
    data[i : i + 9] = b"/data.pkX"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsafeFileError):
        modelkit.open_model(path)
    report = modelkit.scan(path).files[0]
    assert report.verdict == "unsafe" and any(f.rule == "MK-Z001" for f in report.findings)


def test_readers_never_import_pickle_loaders() -> None:
    """No module of the package calls an unrestricted loader (the grep the hooks run, as a test).

    torch.load(weights_only=True) is torch's own restricted loader; modelkit only calls it in
    ``load --bench``, after modelkit's own safe read of the same file succeeded.
    """
    import re

    root = Path(modelkit.__file__).parent
    bad = re.compile(r"pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|(^|[^.\w])(eval|exec)\(|pickle\.Unpickler")
    hits = [f"{p}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if bad.search(line) and "# safe:" not in line and "weights_only=True" not in line]
    assert hits == []


def test_safetensors_reader_never_unpickles(tmp_path: Path, marker: str) -> None:
    """Pickle payloads stored as tensor bytes and as metadata are data, nothing more."""
    from fixtures import build

    payload = hostile.global_reduce(marker)
    import torch

    path = tmp_path / "m.safetensors"
    build.write_safetensors(str(path), {"w": torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
                            metadata={"note": payload.decode("latin1")})
    with modelkit.open_model(path) as mf:
        assert bytes(mf["w"].read().numpy().tobytes()) == payload
    assert modelkit.scan(path).files[0].verdict == "safe"
    assert not os.path.exists(marker)
