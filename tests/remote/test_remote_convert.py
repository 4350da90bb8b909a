"""``convert`` and ``prune`` of a remote file: downloaded whole, once, into a private temp folder
beside the output, then converted as the local file; the same output bytes as converting a local copy,
the same refusals, and nothing left behind (no output, no temp folder) when anything fails.

The server (``fixtures/http_server.py``) binds 127.0.0.1; nothing here reaches the internet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub  # noqa: F401 - the [remote] extra: a core install skips this module
import pytest

import modelkit
import modelkit.remote as remote
from fixtures import build, hostile
from fixtures.http_server import Loopback, serve
from fixtures.sd_layout import tiny_sd1_layout
from modelkit.errors import ModelkitError, OutputExistsError, RemoteError, UnsafeFileError
from modelkit.remote.download import DOWNLOAD, remote_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fast_retries_and_online(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(remote, "BASE_WAIT", 0.01)
    monkeypatch.setattr(remote, "RETRIES", 2)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """URL path -> local file: a tiny SD1 checkpoint (a torch zip), the same as safetensors, a
    hostile checkpoint and a cut one."""
    root = tmp_path_factory.mktemp("served")
    ckpt = str(root / "sd15-tiny.ckpt")
    build.sd_checkpoint(ckpt, tiny_sd1_layout(context_dim=768))
    sft = str(root / "sd15-tiny.safetensors")
    modelkit.convert(ckpt, sft)
    bad = str(root / "hostile.ckpt")
    hostile.hostile_torch_zip(bad, str(root / "PWNED"), payload="os_system")
    cut = root / "cut.ckpt"
    cut.write_bytes(Path(ckpt).read_bytes()[: os.path.getsize(ckpt) // 2])
    return {f"/models/{os.path.basename(p)}": p for p in (ckpt, sft, bad, str(cut))}


@pytest.fixture(scope="module")
def server(files: dict[str, str]) -> Iterator[Loopback]:
    with serve(files) as srv:
        srv.hf["org/repo"] = {"unet/" + os.path.basename(p): p for p in files.values()}
        yield srv


@pytest.fixture
def srv(server: Loopback) -> Loopback:
    server.set_mode("")
    server.reset_counts()
    return server


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("mode", ["", "no-ranges", "redirect"])
@pytest.mark.parametrize("op", ["convert", "prune"])
def test_remote_output_is_the_local_output_byte_for_byte(srv: Loopback, files: dict[str, str], tmp_path: Path,
                                                         op: str, mode: str) -> None:
    """The remote file is downloaded once (its bytes counted by the server) and gives the very bytes a
    local copy of the same name gives; the result names the URL; only the output is left."""
    srv.set_mode(mode)
    local = files["/models/sd15-tiny.ckpt"]
    fn = getattr(modelkit, op)
    kw = {"dtype": "fp16"} if op == "prune" else {}
    want = tmp_path / "local" / "out.safetensors"  # the same name: the title comes from it
    want.parent.mkdir()
    fn(local, want, **kw)
    out = tmp_path / "remote" / "out.safetensors"
    ticks: list[tuple[str, int]] = []
    r = fn(srv.url + "/models/sd15-tiny.ckpt", out, progress=lambda n, b: ticks.append((n, b)), **kw)
    assert r.source == srv.url + "/models/sd15-tiny.ckpt" and r.output == str(out) and r.status == "written"
    assert out.read_bytes() == want.read_bytes()
    assert _left(out.parent) == ["out.safetensors"]  # the temp folder is gone
    size = os.path.getsize(local)
    assert sum(b for n, b in ticks if n == DOWNLOAD) == size  # the download is reported as it goes
    assert size <= srv.sent <= size + (64 << 10)  # one download (and at most the first ranged request)


def test_hf_path_and_default_output_names(srv: Loopback, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without -o the output is named after the remote file, in the current folder (or --out-dir)."""
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.chdir(tmp_path)
    r = modelkit.convert("hf://org/repo/unet/sd15-tiny.ckpt")
    assert r.output == "sd15-tiny.safetensors" and (tmp_path / "sd15-tiny.safetensors").is_file()
    r = modelkit.prune(srv.url + "/models/sd15-tiny.ckpt?download=true", out_dir="pruned", dtype="fp16")
    assert r.output == os.path.join("pruned", "sd15-tiny.pruned.safetensors") and Path(r.output).is_file()
    assert _left(tmp_path) == ["pruned", "sd15-tiny.safetensors"] and _left(tmp_path / "pruned") == [
        "sd15-tiny.pruned.safetensors"]
    assert remote_name("https://h/a/b%20c.ckpt?x=1") == "b c.ckpt"
    assert remote_name("https://h/") == "model" and remote_name("s3://bucket/dir/x:y.pt") == "x_y.pt"
    assert remote_name("https://h/..") == "model" and remote_name("https://h/" + "é" * 300 + ".ckpt") == "é" * 77 + "~.ckpt"  # 160 bytes


def test_existing_output_is_refused_before_any_download(srv: Loopback, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        modelkit.convert(srv.url + "/models/sd15-tiny.ckpt", out)
    assert srv.requests == 0 and out.read_bytes() == b"keep"


def test_a_hostile_remote_file_is_refused_and_its_copy_removed(srv: Loopback, files: dict[str, str],
                                                               tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    with pytest.raises(UnsafeFileError) as ei:
        modelkit.convert(srv.url + "/models/hostile.ckpt", out)
    assert ei.value.path == srv.url + "/models/hostile.ckpt"  # the URL, not the temp copy
    assert _left(tmp_path) == [] and not (Path(files["/models/hostile.ckpt"]).parent / "PWNED").exists()


@pytest.mark.parametrize(("mode", "expect"), [
    ("truncate-late", "peer closed connection"),
    ("etag-change", "the file changed between requests"),
    ("status:404:99", "HTTP 404"),
    ("wrong-length", "length"),
])
def test_a_download_that_goes_wrong_fails_closed_and_leaves_nothing(srv: Loopback, tmp_path: Path, mode: str,
                                                                    expect: str) -> None:
    srv.set_mode(mode)
    with pytest.raises(RemoteError, match=expect):
        modelkit.prune(srv.url + "/models/sd15-tiny.ckpt", tmp_path / "o.safetensors")
    assert _left(tmp_path) == []


def test_a_hub_download_that_misses_the_hubs_sha256_fails_closed(srv: Loopback, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub gives an LFS file's SHA-256 (X-Linked-Etag): a download that hashes otherwise is refused
    before anything is converted, and leaves nothing; the true SHA-256 passes (the 302 to the CDN too)."""
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    for mode in ("", "redirect"):
        srv.set_mode(mode)
        srv.hub_sha256["unet/sd15-tiny.ckpt"] = "f" * 64
        try:
            with pytest.raises(RemoteError, match="the Hub gives the file's SHA-256 as f{64}, but the bytes"):
                modelkit.convert("hf://org/repo/unet/sd15-tiny.ckpt", tmp_path / "o.safetensors")
        finally:
            srv.hub_sha256.clear()
        assert _left(tmp_path) == [], mode
        modelkit.convert("hf://org/repo/unet/sd15-tiny.ckpt", tmp_path / "o.safetensors")
        assert _left(tmp_path) == ["o.safetensors"], mode
        (tmp_path / "o.safetensors").unlink()


def test_a_corrupt_remote_file_is_named_by_its_url(srv: Loopback, tmp_path: Path) -> None:
    url = srv.url + "/models/cut.ckpt"
    with pytest.raises(ModelkitError) as ei:
        modelkit.convert(url, tmp_path / "o.safetensors")
    assert ei.value.path is not None and ei.value.path.startswith(url), ei.value
    assert "modelkit-tmp" not in str(ei.value) and _left(tmp_path) == []


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "0"}
    return subprocess.run([sys.executable, "-m", "modelkit", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_cli_convert_and_prune_of_urls(srv: Loopback, tmp_path: Path) -> None:
    """Exit codes and one line per result or error, as for local files; --json names the URL."""
    url = srv.url + "/models/sd15-tiny.ckpt"
    p = _cli("convert", url, "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    row = res["files"][0]
    assert row["source"] == url and row["output"] == "sd15-tiny.safetensors"
    p = _cli("prune", srv.url + "/models/sd15-tiny.safetensors", "--out-dir", "p", "--dtype", "fp16", "-q",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert _left(tmp_path / "p") == ["sd15-tiny.pruned.safetensors"]
    p = _cli("convert", srv.url + "/models/hostile.ckpt", "-o", "h.safetensors", cwd=tmp_path)
    assert p.returncode == 1 and "hostile.ckpt" in p.stderr and not (tmp_path / "h.safetensors").exists()
    srv.set_mode("status:404:99")
    p = _cli("convert", srv.url + "/models/nothing.ckpt", "-o", "n.safetensors", cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "HTTP 404" in lines[0], p.stderr
    assert _left(tmp_path) == ["p", "sd15-tiny.safetensors"]


def test_the_bar_counts_a_url_as_downloaded_then_written(srv: Loopback, files: dict[str, str]) -> None:
    """The CLI's bar total for a URL: twice its size (the download, then the tensors written), asked only
    when a bar is drawn (one small ranged request)."""
    from modelkit.cli.convert_cmd import _size

    url = srv.url + "/models/sd15-tiny.ckpt"
    assert _size(url) == 0 and srv.requests == 0
    assert _size(url, bars=True) == 2 * os.path.getsize(files["/models/sd15-tiny.ckpt"])
    assert srv.requests == 1 and srv.sent <= 64 << 10
    srv.set_mode("status:404:99")
    assert _size(url, bars=True) == 0  # the command's own download says what is wrong


def test_a_dry_run_reads_ranges_and_says_what_a_run_writes(srv: Loopback, files: dict[str, str],
                                                           tmp_path: Path) -> None:
    """--dry-run downloads nothing whole: it plans from ranged reads, with the header a real run writes."""
    url = srv.url + "/models/sd15-tiny.ckpt?download=true"
    for op, kw in (("convert", {}), ("prune", {"dtype": "fp16"})):
        out = tmp_path / f"{op}.safetensors"
        srv.reset_counts()
        dry = getattr(modelkit, op)(url, out, dry_run=True, **kw)
        assert dry.status == "dry-run" and not out.exists()
        assert srv.sent < os.path.getsize(files["/models/sd15-tiny.ckpt"]) // 2, (op, srv.sent)
        real = getattr(modelkit, op)(url, out, force=True, **kw)
        assert (dry.size, dry.tensors) == (real.size, real.tensors), op
        assert {k: v for k, v in dry.metadata.items() if k != "modelkit.source_sha256"} == \
            {k: v for k, v in real.metadata.items() if k != "modelkit.source_sha256"}, op


def test_output_folder_problems_are_one_line_naming_the_output(srv: Loopback, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A file where the output folder should be, or too little room for the download (known from the
    length before a byte is written, with or without ranges): OutputWriteError naming the output; the
    folders this run made are removed again."""
    from modelkit.errors import OutputWriteError

    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(OutputWriteError, match="a file is in the way"):
        modelkit.convert(srv.url + "/models/sd15-tiny.ckpt", out_dir=tmp_path / "afile")
    p = _cli("convert", srv.url + "/models/sd15-tiny.ckpt", "--out-dir", "afile", cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "a file is in the way" in lines[0], p.stderr
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda f: real(f)._replace(free=1000))
    for mode in ("", "no-ranges"):
        srv.set_mode(mode)
        target = tmp_path / "new" / "deeper" / "o.safetensors"
        with pytest.raises(OutputWriteError) as ei:
            modelkit.prune(srv.url + "/models/sd15-tiny.ckpt", target)
        assert ei.value.path == str(target) and "needs" in ei.value.problem, ei.value
        assert _left(tmp_path) == ["afile"], mode  # new/deeper made for the output, removed again


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_the_downloaded_copy_is_its_owners_only(srv: Loopback, tmp_path: Path) -> None:
    modes: list[tuple[int, int]] = []

    def look(name: str, n: int) -> None:
        if name == DOWNLOAD and not modes:
            (tmp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".modelkit-tmp")]
            (copy,) = list(tmp.iterdir())
            modes.append((tmp.stat().st_mode & 0o777, copy.stat().st_mode & 0o777))

    modelkit.convert(srv.url + "/models/sd15-tiny.ckpt", tmp_path / "o.safetensors", progress=look)
    assert modes == [(0o700, 0o600)]


def test_awkward_remote_names(srv: Loopback, files: dict[str, str], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Names from URLs: device names and long non-Latin names become names every OS can hold; the
    download works under them; a copy that cannot be removed is a warning naming it."""
    assert remote_name("https://h/NUL.ckpt") == "_NUL.ckpt" and remote_name("https://h/com1") == "_com1"
    long = remote_name("https://h/" + "模" * 90 + ".ckpt")
    assert long.endswith("~.ckpt") and len(long.encode()) <= 160
    server_path = "/models/" + "模" * 90 + ".ckpt"
    srv.files[server_path] = files["/models/sd15-tiny.ckpt"]
    monkeypatch.chdir(tmp_path)
    r = modelkit.convert(srv.url + "/models/" + "%E6%A8%A1" * 90 + ".ckpt")
    assert r.output == long[: -len(".ckpt")] + ".safetensors" and Path(r.output).is_file()
    import modelkit.remote.download as dl

    monkeypatch.setattr(dl.shutil, "rmtree", lambda *a, **k: None)
    r = modelkit.convert(srv.url + "/models/sd15-tiny.ckpt", tmp_path / "k.safetensors")
    assert any("could not remove the downloaded copy" in w for w in r.warnings), r.warnings
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".modelkit-tmp")]
    assert len(left) == 1
    import shutil as sh

    sh.rmtree(left[0])


def test_fsspec_urls_convert_like_local_files(files: dict[str, str], tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/convert-src/sd15-tiny.ckpt", Path(files["/models/sd15-tiny.ckpt"]).read_bytes())
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        modelkit.prune(files["/models/sd15-tiny.ckpt"], tmp_path / "a" / "o.safetensors", dtype="bf16")
        r = modelkit.prune("memory://convert-src/sd15-tiny.ckpt", tmp_path / "b" / "o.safetensors", dtype="bf16")
        assert r.source == "memory://convert-src/sd15-tiny.ckpt"
        assert (tmp_path / "a" / "o.safetensors").read_bytes() == (tmp_path / "b" / "o.safetensors").read_bytes()
        assert _left(tmp_path / "b") == ["o.safetensors"]
    finally:
        fs.rm("/convert-src", recursive=True)
