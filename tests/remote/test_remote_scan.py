"""Remote scanning against a loopback server: the same verdicts as local scans of the same bytes,
a fraction of the bytes, and every misbehaving server failing closed with one clear line.

The server (``fixtures/http_server.py``) binds 127.0.0.1; nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub  # noqa: F401 - the [remote] extra: a core install skips this module
import numpy as np
import pytest

import modelkit.remote as remote
from fixtures import corpus
from fixtures.http_server import Loopback, serve
from fixtures.torchfree import save_safetensors, save_zip
from modelkit.errors import UsageError
from modelkit.remote import http as rhttp
from modelkit.scan.engine import scan_file
from tests.security import corpus_gen

ROOT = Path(__file__).resolve().parents[2]


def _comparable(report: Any) -> dict[str, Any]:
    """The report without where the file was: its name (which labels of nested data carry) and the
    transfer figures."""
    d = report.to_dict()
    path = d.pop("path")
    d.pop("remote", None)
    out: dict[str, Any] = json.loads(json.dumps(d).replace(json.dumps(path)[1:-1], "<file>"))
    return out


@pytest.fixture(autouse=True)
def _fast_retries_and_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quick retries; and the hub client allowed out to the loopback server, which the training tests'
    HF_HUB_OFFLINE=1 (read by huggingface_hub once, at import) would forbid in this process and its children."""
    import huggingface_hub.constants

    monkeypatch.setattr(remote, "BASE_WAIT", 0.01)
    monkeypatch.setattr(remote, "RETRIES", 2)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """URL path -> local file: the hostile and benign corpora, a sample of every generated family,
    and a checkpoint big enough that ranged reads matter."""
    root = tmp_path_factory.mktemp("served")
    marker = str(root / "PWNED")
    paths = corpus.build_hostile(str(root / "hostile"), marker) + corpus.build_benign(str(root / "benign"))
    samples = corpus_gen.generate(marker)
    by_family: dict[str, list[corpus_gen.Sample]] = {}
    for s in samples:
        by_family.setdefault(s.family, []).append(s)
    gen = root / "generated"
    gen.mkdir()
    for _fam, group in sorted(by_family.items()):
        for s in group[:: max(1, len(group) // 6)]:  # about six variants per family, spread out
            p = gen / s.filename
            p.write_bytes(s.data)
            paths.append(str(p))
    rng = np.random.default_rng(0)
    big = {f"model.diffusion_model.block_{i}.weight": rng.standard_normal((256, 256)).astype(np.float16)
           for i in range(160)}
    big.update({f"model.diffusion_model.block_{i}.bias": rng.standard_normal(256).astype(np.float32)
                for i in range(160)})
    save_zip(big, str(root / "big.ckpt"))
    save_safetensors(big, str(root / "big.safetensors"), {"format": "pt"})
    paths += [str(root / "big.ckpt"), str(root / "big.safetensors")]
    from fixtures.demo import main as build_demo  # built here: a clean clone has no fixtures/demo/

    build_demo(str(root / "demo"))
    for demo in sorted((root / "demo").glob("*")):
        if demo.is_file() and not demo.name.startswith("."):
            paths.append(str(demo))
    return {f"/f{i}/{os.path.basename(p)}": p for i, p in enumerate(paths)}


@pytest.fixture(scope="module")
def server(files: dict[str, str]) -> Iterator[Loopback]:
    with serve(files) as srv:
        yield srv


@pytest.fixture
def srv(server: Loopback) -> Loopback:
    server.set_mode("")
    server.reset_counts()
    return server


def test_remote_verdicts_equal_local_ones_for_every_file(srv: Loopback, files: dict[str, str]) -> None:
    """The differential: each served file scanned remotely gives exactly the local report."""
    verdicts = set()
    for url_path, local in files.items():
        want = scan_file(local)
        got = scan_file(srv.url + url_path)
        assert _comparable(got) == _comparable(want), url_path
        assert got.remote is not None and got.remote["size"] == os.path.getsize(local)
        verdicts.add(want.verdict)
    assert {"safe", "unsafe"} <= verdicts  # the corpus has both, so equality means something


def test_byte_counts_match_the_server_and_stay_small(srv: Loopback, files: dict[str, str]) -> None:
    for name in ("big.ckpt", "big.safetensors"):
        url_path = next(k for k in files if k.endswith("/" + name))
        size = os.path.getsize(files[url_path])
        srv.reset_counts()
        r = scan_file(srv.url + url_path)
        assert r.verdict == "safe"
        assert r.remote is not None and r.remote["bytes"] == srv.sent  # what we count is what was sent
        assert r.remote["requests"] == srv.requests
        assert srv.sent < size // 8, (name, srv.sent, size)  # a fraction of the file, not a download
        assert not r.remote["whole_file"]


@pytest.mark.parametrize(("mode", "expect"), [
    ("wrong-length", "length"),
    ("truncate", "peer closed connection"),
    ("etag-change", "the file changed between requests"),
    ("wrong-range", "asked for bytes"),
    ("status:503:99", "HTTP 503"),
    ("status:404:99", "HTTP 404"),
])
def test_misbehaving_servers_fail_closed(srv: Loopback, files: dict[str, str], mode: str, expect: str) -> None:
    url_path = next(k for k in files if k.endswith("/big.ckpt"))
    srv.set_mode(mode)
    r = scan_file(srv.url + url_path)
    assert r.verdict == "error"
    assert [f.rule for f in r.findings] == ["MK-R001"]
    assert expect in r.findings[0].message
    assert "\n" not in r.findings[0].message


def test_a_hostile_file_behind_a_lying_server_is_never_safe(srv: Loopback, files: dict[str, str]) -> None:
    for mode in ("wrong-length", "truncate", "etag-change", "status:503:99"):
        for url_path in [k for k in files if "/hostile/" in k]:
            srv.set_mode(mode)
            assert scan_file(srv.url + url_path).verdict in ("unsafe", "error"), (mode, url_path)


def test_a_server_that_ignores_range_is_read_whole_and_says_so(srv: Loopback, files: dict[str, str]) -> None:
    srv.set_mode("no-ranges")
    for name in ("big.ckpt", "big.safetensors", "zip_data_pkl.ckpt"):
        url_path = next(k for k in files if k.endswith("/" + name))
        r = scan_file(srv.url + url_path)
        assert _comparable(r) == _comparable(scan_file(files[url_path]))
        assert r.remote is not None and r.remote["whole_file"]
        assert "ignores Range requests" in r.remote["notes"][0]
        assert srv.requests == 1 or name != "big.ckpt" or srv.requests >= 1


def test_the_whole_file_cap_holds(srv: Loopback, files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKIT_REMOTE_MAX_DOWNLOAD", "1000")
    srv.set_mode("no-ranges")
    url_path = next(k for k in files if k.endswith("/big.ckpt"))
    r = scan_file(srv.url + url_path)
    assert r.verdict == "error" and "over the 1000-byte cap" in r.findings[0].message


def test_retries_cure_rate_limits_and_redirects_are_followed(srv: Loopback, files: dict[str, str]) -> None:
    url_path = next(k for k in files if k.endswith("/big.ckpt"))
    want = _comparable(scan_file(files[url_path]))
    for mode in ("status:429:2", "status:503:1", "redirect"):
        srv.set_mode(mode)
        assert _comparable(scan_file(srv.url + url_path)) == want, mode


def test_hf_paths_through_the_endpoint(srv: Loopback, files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = next(k for k in files if k.endswith("/zip_data_pkl.ckpt"))
    big = next(k for k in files if k.endswith("/big.safetensors"))
    srv.hf["org/models"] = {"unet/big.safetensors": files[big], "bad.ckpt": files[hostile],
                            "README.md": str(ROOT / "README.md")}
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    assert scan_file("hf://org/models/unet/big.safetensors").verdict == "safe"
    assert scan_file("hf://org/models@main/bad.ckpt").verdict == "unsafe"
    missing = scan_file("hf://org/models/nope.ckpt")
    assert missing.verdict == "error" and "HTTP 404" in missing.findings[0].message
    srv.reset_counts()
    listed = list(remote.expand(["hf://org/models@v1"], (".ckpt", ".safetensors")))
    at = srv.commit("org/models")  # a repository is listed, and its files read, at the commit v1 is at
    assert listed == [f"hf://org/models@{at}/bad.ckpt", f"hf://org/models@{at}/unet/big.safetensors"]
    assert srv.listed == [("org/models", at)]
    assert [scan_file(u).verdict for u in listed] == ["unsafe", "safe"]


def test_hf_token_is_sent_to_the_hub_only(srv: Loopback, files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []
    big = next(k for k in files if k.endswith("/big.safetensors"))
    srv.hf["org/private"] = {"m.safetensors": files[big]}
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_123")
    real = rhttp.Http._get

    def spy(self: Any, src: Any, start: int, end: int | None, first: bool = False) -> bytes:
        seen.append(self.headers.get("authorization"))
        return real(self, src, start, end, first)

    monkeypatch.setattr(rhttp.Http, "_get", spy)
    scan_file("hf://org/private/m.safetensors")
    scan_file(srv.url + big)
    assert seen[0] == "Bearer hf_test_token_123"
    assert seen[-1] is None  # a plain URL never gets the hub token


def test_parse_hf() -> None:
    assert remote.parse_hf("hf://a/b@refs/pr/3/x/y.ckpt") == remote.HfPath("a/b", "refs/pr/3", "x/y.ckpt")
    assert remote.parse_hf("hf://a/b") == remote.HfPath("a/b", None, None)
    for bad in ("hf://a", "hf://a/b/../c", "hf:///x"):
        with pytest.raises(UsageError):
            remote.parse_hf(bad)


def _cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelkit", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, input=stdin, timeout=300)


def test_cli_manifest_jsonl_and_threads(srv: Loopback, files: dict[str, str], tmp_path: Path) -> None:
    picked = [k for k in files if k.endswith(("/big.ckpt", "/zip_data_pkl.ckpt", "/big.safetensors"))]
    manifest = tmp_path / "urls.txt"
    manifest.write_text("# three files\n" + "\n".join(srv.url + k for k in picked) + "\n\n")
    p = _cli("scan", "--manifest", str(manifest), "--jsonl", "-j", "3")
    assert p.returncode == 1, p.stderr  # one is unsafe
    lines = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert sorted(d["path"] for d in lines) == sorted(srv.url + k for k in picked)
    for d in lines:
        local = files[d["path"][len(srv.url):]]
        assert d["verdict"] == scan_file(local).verdict
        assert d["remote"]["bytes"] > 0
    human = _cli("scan", srv.url + picked[0])
    assert "fetched" in human.stdout and "request" in human.stdout
    stdin = _cli("scan", "--manifest", "-", "--json", stdin=srv.url + picked[0] + "\n")
    assert json.loads(stdin.stdout)["files"][0]["path"] == srv.url + picked[0]


def test_cli_inspect_and_hash_of_a_url_equal_local(srv: Loopback, files: dict[str, str]) -> None:
    url_path = next(k for k in files if k.endswith("/big.safetensors"))
    local = files[url_path]
    r = _cli("hash", "--json", srv.url + url_path)
    lo = _cli("hash", "--json", local)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"][0]["hashes"] == json.loads(lo.stdout)["files"][0]["hashes"]
    i = json.loads(_cli("inspect", "--json", srv.url + url_path).stdout)["files"][0]
    il = json.loads(_cli("inspect", "--json", local).stdout)["files"][0]
    for key in ("container", "tensor_count", "parameter_count", "detection", "hashes", "size"):
        assert i[key] == il[key], key


def test_remote_hash_of_a_cut_stream_fails_closed(srv: Loopback, files: dict[str, str]) -> None:
    from modelkit.errors import RemoteError
    from modelkit.ops.hashes import hash_file

    url_path = next(k for k in files if k.endswith("/big.ckpt"))
    srv.set_mode("truncate")
    with pytest.raises(RemoteError):
        hash_file(srv.url + url_path)


def test_fsspec_urls_scan_like_local_files(files: dict[str, str]) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    picked = [k for k in files if k.endswith(("/big.ckpt", "/zip_data_pkl.ckpt", "/legacy.pt", "/big.safetensors"))]
    for k in picked:
        fs.pipe(f"/served{k}", Path(files[k]).read_bytes())
        r = scan_file(f"memory://served{k}")
        assert _comparable(r) == _comparable(scan_file(files[k])), k
        assert r.remote is not None and r.remote["bytes"] > 0


def test_the_dask_recipe_gives_the_local_results(srv: Loopback, files: dict[str, str]) -> None:
    """The recipe on a real local cluster (scheduler and two worker processes) against the server."""
    from dask.distributed import Client, LocalCluster

    from modelkit.recipes.dask_scan import scan_on_cluster

    picked = sorted(files)[:: max(1, len(files) // 24)]
    urls = [srv.url + k for k in picked]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        got = scan_on_cluster(client, urls, batch=5, threads=4)
    assert [g["path"] for g in got] == urls
    for g, k in zip(got, picked):
        want = scan_file(files[k]).to_dict()
        assert g["verdict"] == want["verdict"], k
        assert [f["rule"] for f in g["findings"]] == [f["rule"] for f in want["findings"]], k


def test_detect_and_open_model_read_a_url_by_ranges(srv: Loopback, files: dict[str, str]) -> None:
    import modelkit

    for name in ("big.ckpt", "big.safetensors", "sd15-tiny.ckpt", "lora-tiny.safetensors"):
        url_path = next(k for k in files if k.endswith("/" + name))
        assert modelkit.detect(srv.url + url_path).to_dict() == modelkit.detect(files[url_path]).to_dict(), name
    url_path = next(k for k in files if k.endswith("/big.safetensors"))
    with modelkit.open_model(srv.url + url_path) as rm, modelkit.open_model(files[url_path]) as lm:
        assert list(rm) == list(lm)
        for key in list(lm)[:5]:
            assert rm[key].read_raw() == lm[key].read_raw()


def test_merges_and_layout_conversions_refuse_a_remote_input_in_one_line(srv: Loopback, files: dict[str, str],
                                                                tmp_path: Path) -> None:
    url = srv.url + next(k for k in files if k.endswith("/sd15-tiny.ckpt"))
    out = tmp_path / "o.safetensors"
    for args in (["merge", "models", url, url, "-o", str(out)], ["convert", url, "--to", "diffusers", "-o", str(out)]):
        p = _cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "downloaded by convert and prune; this command takes local inputs" in lines[0], \
            p.stderr
    assert not list(tmp_path.iterdir())


def test_announced_spans_merge_within_the_byte_budget() -> None:
    from modelkit.remote.source import _merge

    spans = [(0, 512), (1000, 1512), (10_000, 10_512), (50_000, 50_512), (1_000_000, 1_000_512)]
    assert _merge(spans, 2048, 0) == [(0, 1512), (10_000, 10_512), (50_000, 50_512), (1_000_000, 1_000_512)]
    # the closest gaps first, while their bytes fit: 8,488 then 39,488; the 949,488 one does not
    assert _merge(spans, 2048, 50_000) == [(0, 50_512), (1_000_000, 1_000_512)]
    joined = _merge(spans, 2048, 10 << 20)
    assert joined == [(0, 1_000_512)]
    fetched = sum(e - s for s, e in _merge(spans, 2048, 50_000))
    assert fetched - sum(e - s for s, e in spans) <= 50_000 + 2048


@pytest.mark.parametrize("mode", ["", "single-range-only", "multi-200"])
def test_many_ranges_per_request_where_the_server_can(srv: Loopback, files: dict[str, str], mode: str) -> None:
    """multipart/byteranges cuts the requests; servers that answer one range, or the whole file, to a
    request for several are asked one range at a time, with the same result."""
    url_path = next(k for k in files if k.endswith("/big.ckpt"))
    srv.set_mode(mode)
    r = scan_file(srv.url + url_path)
    assert _comparable(r) == _comparable(scan_file(files[url_path]))
    assert r.remote is not None and not r.remote["whole_file"]
    assert r.remote["bytes"] < os.path.getsize(files[url_path]) // 8
    if mode == "":
        assert r.remote["requests"] <= 16
    else:  # asked one range at a time after the first answer
        assert r.remote["requests"] > 16


def test_multipart_bodies_are_parsed_by_their_content_ranges() -> None:
    from modelkit.errors import RemoteError
    from modelkit.remote.http import multipart_ranges

    b = b"BOUND"

    def part(a: int, data: bytes, total: int = 100) -> bytes:
        return b"\r\n--BOUND\r\nContent-Type: application/octet-stream\r\n" + \
            f"Content-Range: bytes {a}-{a + len(data) - 1}/{total}\r\n\r\n".encode() + data

    tricky = b"xx\r\n--BOUND\r\nyy"  # the boundary inside the data: lengths, not searches, decide
    body = part(0, b"hello") + part(40, tricky) + b"\r\n--BOUND--\r\n"
    assert multipart_ranges(body, b, 100, "u") == [(0, b"hello"), (40, tricky)]
    for bad in (part(0, b"hello"),  # no closing boundary
                part(0, b"hello", total=101) + b"\r\n--BOUND--\r\n",  # another total length
                part(98, b"hello") + b"\r\n--BOUND--\r\n",  # past the end of the file
                part(0, b"hello")[:-2] + b"\r\n--BOUND--\r\n",  # cut short
                b"\r\n--BOUND\r\nContent-Type: x\r\n\r\nhello\r\n--BOUND--\r\n",  # no Content-Range
                b"no boundary at all"):
        with pytest.raises(RemoteError):
            multipart_ranges(bad, b, 100, "u")


def test_inspect_scans_through_the_readers_source_not_a_second_download(srv: Loopback, files: dict[str, str]) -> None:
    import modelkit

    url = srv.url + next(k for k in files if k.endswith("/big.ckpt"))
    srv.reset_counts()
    scan_file(url)
    scanned = srv.sent
    srv.reset_counts()
    assert modelkit.inspect(url).tensor_count == 320
    assert srv.sent < scanned * 1.5, (srv.sent, scanned)  # the scan reused what the reader fetched


def test_an_unreachable_server_is_one_error_line_not_a_traceback() -> None:
    from click.testing import CliRunner

    from modelkit.cli.main import cli

    r = CliRunner().invoke(cli, ["scan", "http://127.0.0.1:9/x.ckpt"])
    assert r.exit_code == 2 and r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert "MK-R001" in r.output and "Traceback" not in r.output and "fetched 0 B in 0 requests" in r.output


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def hub(srv: Loopback, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loopback]:
    """The server as the Hub, with the repos, commits and SHA-256 claims a test sets taken away after."""
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    yield srv
    for name in [n for n in srv.hf if n.startswith(("pin/", "datasets/pin/"))]:
        del srv.hf[name]
    srv.commits.clear()
    srv.hub_sha256.clear()


def test_an_hf_scan_names_the_commit_and_sha256_and_reads_only_that_commit(hub: Loopback,
                                                                           files: dict[str, str]) -> None:
    """The first answer's X-Repo-Commit pins the rest of the scan to that commit (a branch that moves
    mid-scan cannot mix two files), and the result says what a download must match."""
    big = files[next(k for k in files if k.endswith("/big.ckpt"))]
    commit = "ab" * 20
    hub.hf["pin/repo"] = {"big.ckpt": big}
    hub.commits["pin/repo"] = commit
    for mode in ("", "redirect"):  # the Hub's 302 to its CDN carries the commit and the LFS SHA-256
        hub.set_mode(mode)
        hub.reset_counts()
        r = scan_file("hf://pin/repo@main/big.ckpt")
        assert r.verdict == "safe" and r.remote is not None, mode
        assert (r.remote["commit"], r.remote["sha256"]) == (commit, _sha256(big)), mode
        assert r.remote["etag"], mode
        asked = [p for p in hub.paths if not p.startswith("/cdn/")]
        assert asked[0] == "/pin/repo/resolve/main/big.ckpt", mode
        assert len(asked) > 1 and set(asked[1:]) == {f"/pin/repo/resolve/{commit}/big.ckpt"}, mode
    hub.set_mode("")
    plain = scan_file(hub.url + next(k for k in files if k.endswith("/big.ckpt")))
    assert plain.remote is not None and plain.remote["etag"]
    assert plain.remote["commit"] is None and plain.remote["sha256"] is None  # only the Hub says these
    shown = _cli("scan", "hf://pin/repo/big.ckpt")
    assert shown.returncode == 0, shown.stderr
    assert f"read at commit {commit}; the Hub's sha256 {_sha256(big)} (not checked: a scan reads ranges" in shown.stdout
    as_json = json.loads(_cli("scan", "--json", "hf://pin/repo/big.ckpt").stdout)["files"][0]["remote"]
    assert (as_json["commit"], as_json["sha256"]) == (commit, _sha256(big))


def test_bytes_that_miss_the_hubs_sha256_fail_closed(hub: Loopback, files: dict[str, str]) -> None:
    """Where the whole file is read (hash; a file scanned whole), its bytes must hash to the SHA-256
    the Hub gives: a CDN that sends other bytes is an error, never a result."""
    from modelkit.errors import RemoteError
    from modelkit.ops.hashes import hash_file

    legacy = files[next(k for k in files if k.endswith("/legacy.pt"))]  # not a zip: scanned whole
    st = files[next(k for k in files if k.endswith("/big.safetensors"))]
    hub.hf["pin/sums"] = {"legacy.pt": legacy, "m.safetensors": st}
    assert scan_file("hf://pin/sums/legacy.pt").verdict == scan_file(legacy).verdict
    assert hash_file("hf://pin/sums/m.safetensors", ("sha256", "autov2")).hashes["sha256"] == _sha256(st)
    whole = scan_file("hf://pin/sums/legacy.pt")
    assert whole.remote is not None and whole.remote["sha256_checked"] is True  # read whole: checked
    ranged = scan_file("hf://pin/sums/m.safetensors")
    assert ranged.remote is not None and ranged.remote["sha256"] == _sha256(st)
    assert ranged.remote["sha256_checked"] is False  # ranges: the Hub's claim, reported as such
    hub.hub_sha256.update({"legacy.pt": "0" * 64, "m.safetensors": "1" * 64})
    for mode in ("", "redirect"):
        hub.set_mode(mode)
        r = scan_file("hf://pin/sums/legacy.pt")
        assert r.verdict == "error" and r.findings[0].rule == "MK-R001", mode
        assert f"the Hub gives the file's SHA-256 as {'0' * 64}" in r.findings[0].message, mode
        for algos in (("sha256",), ("autov2",), ("sha256", "autov1", "crc32"), ("crc32",), ("autov3",)):
            with pytest.raises(RemoteError, match="SHA-256 as 1111"):  # any whole read is checked
                hash_file("hf://pin/sums/m.safetensors", algos)
    hub.set_mode("")
    cli = _cli("hash", "hf://pin/sums/m.safetensors")
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "hf://pin/sums/m.safetensors" in cli.stderr and "SHA-256" in cli.stderr
    assert hash_file("hf://pin/sums/m.safetensors", ("autov1",)).hashes  # a 64 KiB window cannot be checked


def test_dataset_repos_and_hub_web_addresses_read_the_file(hub: Loopback, files: dict[str, str]) -> None:
    """hf://datasets/... (HfFileSystem's syntax) and a file's Hub web address, as a browser shows it
    (/blob/, which serves an HTML page) or as a download link (/resolve/...?download=true), are read
    as the file they name: the local verdict, the commit and SHA-256, the token sent to the Hub."""
    hostile = files[next(k for k in files if k.endswith("/zip_data_pkl.ckpt"))]
    big = files[next(k for k in files if k.endswith("/big.ckpt"))]
    hub.hf["datasets/pin/data"] = {"weights/bad.ckpt": hostile, "weights/big.ckpt": big, "notes.txt": big}
    hub.hf["pin/model"] = {"sub dir/big.ckpt": big}
    want_bad, want_big = _comparable(scan_file(hostile)), _comparable(scan_file(big))
    assert _comparable(scan_file("hf://datasets/pin/data/weights/bad.ckpt")) == want_bad
    at = hub.commit("datasets/pin/data")
    assert list(remote.expand(["hf://datasets/pin/data@v2"], (".ckpt",))) == [
        f"hf://datasets/pin/data@{at}/weights/bad.ckpt", f"hf://datasets/pin/data@{at}/weights/big.ckpt"]
    assert remote.parse_hf("hf://datasets/pin/data") == remote.HfPath("pin/data", None, None, "dataset")
    assert remote.parse_hf("hf://datasets/x") == remote.HfPath("datasets/x", None, None)  # a model repo named so
    for url, want in ((f"{hub.url}/datasets/pin/data/blob/main/weights/bad.ckpt", want_bad),
                      (f"{hub.url}/pin/model/blob/main/sub%20dir/big.ckpt", want_big),
                      (f"{hub.url}/pin/model/resolve/main/sub%20dir/big.ckpt?download=true", want_big)):
        r = scan_file(url)
        assert _comparable(r) == want, url
        assert r.remote is not None and r.remote["commit"] == hub.commit(
            "datasets/pin/data" if "/datasets/" in url else "pin/model"), url
    page = f"{hub.url}/pin/model/blob/main/sub%20dir/big.ckpt"
    assert remote.hub_page(page) == remote.HfPath("pin/model", "main", "sub dir/big.ckpt")
    for other in (page.replace("127.0.0.1", "localhost"), f"{hub.url}/pin/model/tree/main/x.ckpt",
                  f"{hub.url}/pin/model/blob/main/../x.ckpt", "hf://pin/model/x.ckpt"):
        assert remote.hub_page(other) is None, other  # another host (no token goes there), or not a file


def test_hub_addresses_edge_cases(hub: Loopback, files: dict[str, str]) -> None:
    """Revisions with slashes (refs/pr/N, refs/convert/parquet), as written or URL-encoded; a URL that
    does not parse is one line, not a traceback; a date is not an ETag; a Hub page answered 401 asks
    for HF_TOKEN."""
    from modelkit.errors import RemoteError
    from modelkit.ops.hashes import hash_file

    big = files[next(k for k in files if k.endswith("/big.ckpt"))]
    for url, want in (("hf://o/r@refs/pr/3/x.ckpt", remote.HfPath("o/r", "refs/pr/3", "x.ckpt")),
                      ("hf://o/r@refs%2Fpr%2F3/x.ckpt", remote.HfPath("o/r", "refs/pr/3", "x.ckpt")),
                      ("hf://datasets/o/r@refs/convert/parquet/d/x.ckpt",
                       remote.HfPath("o/r", "refs/convert/parquet", "d/x.ckpt", "dataset"))):
        assert remote.parse_hf(url) == want, url
    assert remote.hub_page(f"{hub.url}/o/r/blob/refs/pr/3/m.ckpt") == remote.HfPath("o/r", "refs/pr/3", "m.ckpt")
    assert remote.hub_page(f"{hub.url}/o/r/blob/refs%2Fpr%2F3/m.ckpt") == remote.HfPath("o/r", "refs/pr/3", "m.ckpt")
    hub.hf["pin/pr"] = {"m.ckpt": big}
    assert scan_file("hf://pin/pr@refs/pr/3/m.ckpt").verdict == "safe"
    assert any("/resolve/refs%2Fpr%2F3/m.ckpt" in p for p in hub.paths)
    for bad in ("https://[::1/x.safetensors", "http://exa mple.org/x.ckpt"):
        r = scan_file(bad)
        assert r.verdict == "error" and r.findings[0].rule == "MK-R001", bad
        with pytest.raises(RemoteError):
            hash_file(bad, ("sha256",))
        cli = _cli("hash", bad)
        assert cli.returncode == 2 and "Traceback" not in cli.stderr and cli.stderr.count("\n") == 1, cli.stderr
    hub.set_mode("status:401:99")
    r = scan_file(f"{hub.url}/pin/pr/blob/main/m.ckpt")
    assert r.verdict == "error" and "HF_TOKEN" in r.findings[0].message
    r = scan_file(hub.url + next(k for k in files if k.endswith("/big.ckpt")))
    assert "HF_TOKEN" not in r.findings[0].message  # not the Hub: no token to set
    hub.set_mode("")


def test_a_date_is_not_an_etag(monkeypatch: pytest.MonkeyPatch) -> None:
    class Resp:
        headers = {"last-modified": "Wed, 01 Jan 2025 00:00:00 GMT"}

    h = rhttp.Http("http://x/m.ckpt", "http://x/m.ckpt", {})
    h.validator = h._validator(Resp())
    h._pin(Resp())
    assert h.validator == ("last-modified", "Wed, 01 Jan 2025 00:00:00 GMT") and h.pins["etag"] is None
