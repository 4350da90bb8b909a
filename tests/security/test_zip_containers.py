"""Zip containers read another way than torch reads them (issue 13, sections 3 and 4), as families.

torch reads a zip with miniz (third_party/miniz-3.0.2, ``mz_zip_reader_locate_header_sig`` and
``mz_zip_reader_read_central_dir``): the last end-record signature with 22 bytes after it, the
zip64 record whenever a locator right before that record names a valid one, members by their
central sizes and their *local* header's name and extra lengths. CPython's zipfile reads the
same bytes differently (the directory right before the end records, member offsets shifted to
match). Each family below is generated over zip layouts (stored or deflated, zip64 or not, top
folder, comment length, which record is stray, which directory holds the payload):

* a differential runs the real readers (torch's ``PyTorchFileReader`` in a child, zipfile under
  each CPython 3.10-3.13 on the machine) on benign variants and checks that modelkit's model of
  each reader finds the same directory and the same data.pkl bytes;
* hostile variants: the payload only creates a marker; it is proven live in the loader that
  reads it (torch.load in a child, or pickle.loads of the payload bytes), then ``scan`` must say
  unsafe, both readers must refuse, and the marker must not appear here;
* member sizes: a variant scans safe only if torch.load and modelkit read the same tensors;
* zip bombs: members inflating to 500 MiB each are scanned in a child with bounded memory;
* TorchScript archives built by torch.jit.save: suspicious when benign, unsafe when their code
  runs on load (proven live in a child), refused by the reader either way.

Nothing here unpickles hostile bytes in the test process.
"""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from glob import glob
from pathlib import Path

import pytest

import modelkit
from modelkit.errors import FormatError, UnsafeFileError, UnsupportedFormatError
from modelkit.formats import open_model as open_raw
from modelkit.formats.zipdir import Archive, member_bytes, read_archive, torch_prefix
from modelkit.formats.zipread import InflateBudget, inflate_exact
from modelkit.model import Source
from tests.security.test_bypasses import (
    BENIGN_PKL,
    Member,
    TorchOracle,
    _describe,
    assert_live,
    assert_refused,
    build_zip,
    eocd,
    exec_call,
    pkl,
    torch_members,
    write,
    zip_parts,
)

torch = pytest.importorskip("torch")

DEADLINE = 300  # seconds a child may take before it counts as a hang


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchOracle]:
    """A child process running torch.load on request (test_bypasses.TorchOracle)."""
    child = TorchOracle(tmp_path_factory.mktemp("oracle"))
    yield child
    child.close()


# -- building archives: stored or deflated members, any end records ----------------------------------


def records(members: list[tuple[str, bytes]], method: int = 0, base: int = 0) -> tuple[bytes, bytes]:
    """Local records and central directory of ``members``, the first local record at ``base``."""
    if method == 0:
        return zip_parts([Member(name, data) for name, data in members], base)
    local = central = b""
    for name, data in members:
        lrec, crec = deflated_record(name, deflate(data), len(data), zlib.crc32(data), base + len(local))
        local += lrec
        central += crec
    return local, central


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def deflated_record(name: str, raw: bytes, size: int, crc: int, offset: int) -> tuple[bytes, bytes]:
    """(local record, central entry) of a deflated member whose local record starts at ``offset``."""
    n = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(raw), size, len(n), 0) + n + raw
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(raw), size, len(n),
                          0, 0, 0, 0, 0, offset) + n
    return local, central


def zip64_end(count: int, cd_size: int, cd_at: int, rec_at: int) -> bytes:
    """A zip64 end record written at ``rec_at`` and its locator (torch writes both on every save)."""
    rec = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_at)
    return rec + struct.pack("<IIQI", 0x07064B50, 0, rec_at, 1)


def archive(members: list[tuple[str, bytes]], method: int = 0, zip64: bool = False, comment: bytes = b"",
            sentinels: str = "") -> bytes:
    """A whole archive, end records as torch writes them (zip64) or as zipfile does; ``sentinels``
    names the classic fields ("count", "size", "offset") that say "see the zip64 record" instead."""
    local, central = records(members, method)
    end = zip64_end(len(members), len(central), len(local), len(local) + len(central)) if zip64 else b""
    count = 0xFFFF if "count" in sentinels else len(members)
    size = 0xFFFFFFFF if "size" in sentinels else len(central)
    offset = 0xFFFFFFFF if "offset" in sentinels else len(local)
    return local + central + end + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, offset,
                                               len(comment)) + comment


def torch_layout(data_pkl: bytes, prefix: str = "archive") -> list[tuple[str, bytes]]:
    return [(m.name, m.data) for m in torch_members(data_pkl, prefix)]


def benign(which: str) -> bytes:
    return pickle.dumps({"which": which, "pad": "x" * 40}, protocol=2)


def verdict(path: Path) -> tuple[str, str]:
    report = modelkit.scan(path).files[0]
    return report.verdict, _describe(report)


def assert_both_readers_refuse(path: Path) -> None:
    """modelkit.open_model (behind the scan) and the raw container reader both refuse."""
    for opener in (modelkit.open_model, open_raw):
        try:
            model = opener(path)
        except (UnsafeFileError, FormatError):
            continue
        model.close()
        pytest.fail(f"{opener.__module__}.open_model read {path.name}")


def has_rule(path: Path, rule: str) -> bool:
    return any(f.rule == rule for f in modelkit.scan(path).files[0].findings)


# -- the two directories families -----------------------------------------------------------------

METHODS = pytest.mark.parametrize("method", [0, 8], ids=["stored", "deflated"])
PREFIXES = pytest.mark.parametrize("prefix", ["archive", "my.model"])


def two_directories(first: bytes, second: bytes, method: int, prefix: str) -> tuple[bytes, bytes, bytes, bytes]:
    """Local records of two torch archives (``first``, ``second`` as data.pkl) and their directories."""
    la, ca = records(torch_layout(first, prefix), method, 0)
    lb, cb = records(torch_layout(second, prefix), method, len(la))
    return la + lb, ca, cb, la


@METHODS
@PREFIXES
@pytest.mark.parametrize("torch_reads", ["payload", "decoy"])
@pytest.mark.parametrize("classic", ["values", "partly-sentinel"])
def test_classic_and_zip64_records_name_different_directories(
        tmp_path: Path, marker: str, oracle: TorchOracle, method: int, prefix: str, torch_reads: str,
        classic: str) -> None:
    """The classic end record names one central directory, the zip64 record another: miniz follows zip64
    whenever its locator sits right before the end record, whatever the classic fields say."""
    payload = pkl(exec_call(marker))
    body, ca, cb, _ = two_directories(benign("A"), payload, method, prefix)
    if torch_reads == "decoy":
        body, ca, cb, _ = two_directories(payload, benign("A"), method, prefix)
    ca_at = len(body)
    cb_at = ca_at + len(ca)
    rec_at = cb_at + len(cb)
    # partly-sentinel: the size says "see zip64", the offset still names the classic directory
    classic_size = len(ca) if classic == "values" else 0xFFFFFFFF
    data = body + ca + cb + zip64_end(3, len(cb), cb_at, rec_at) + eocd(3, classic_size, ca_at)
    path = write(tmp_path, "evil.pt", data)
    if torch_reads == "payload":
        assert_live(None, tmp_path, marker, "torch", path=path, oracle=oracle)
    else:
        assert_live(payload, tmp_path, marker)  # read by any tool that trusts the classic record
    report = assert_refused(path, marker, global_name="builtins.exec")
    assert any(f.rule == "MK-Z001" and "zip64" in f.message for f in report.findings), _describe(report)
    if torch_reads == "decoy":
        assert any(f.global_name == "builtins.exec" and f.member and "[directory of" in f.member
                   for f in report.findings), _describe(report)
    assert_both_readers_refuse(path)


def zipfile_shift_layout(torch_data: bytes, zipfile_data: bytes, method: int) -> bytes:
    """One end record; torch reads the directory at its recorded offset, zipfile the one right before it.

    zipfile reads ``cd_size`` bytes right before the end record and shifts every member offset by the
    difference from the recorded offset (``concat``, for archives appended to other files). Here that
    is a second directory of the same size, whose offsets are written pre-shifted.
    """
    la, ca = records(torch_layout(torch_data), method, 0)
    lb, _ = records(torch_layout(zipfile_data), method, len(la))
    shift = len(ca)
    _, cb = records(torch_layout(zipfile_data), method, len(la) - shift)
    assert len(cb) == shift
    ca_at = len(la) + len(lb)
    return la + lb + ca + cb + eocd(3, len(ca), ca_at)


STRAYS = ["in-comment", "appended-record", "short-tail", "earlier-record"]


def stray_layout(stray: str, torch_data: bytes, other_data: bytes, method: int, zip64: bool) -> bytes:
    """Two directories and two end-record signatures; torch's miniz reads ``torch_data``'s directory.

    in-comment: the record torch reads hides in the comment of another (zipfile reads it too,
        but at a shifted offset); appended-record: a second record follows the first, whose comment
        length does not cover it; short-tail: a signature in the last 21 bytes, which miniz skips
        and zipfile chokes on; earlier-record: a complete record before the real one, pointing at
        the other directory (a reader that checks comment lengths or scans forward takes it).
    """
    body, c_torch, c_other, _ = two_directories(torch_data, other_data, method, "archive")
    t_at = len(body)
    o_at = t_at + len(c_torch)
    end_at = o_at + len(c_other)
    if stray == "short-tail":
        z64 = zip64_end(3, len(c_torch), t_at, end_at) if zip64 else b""
        return body + c_torch + c_other + z64 + eocd(3, len(c_torch), t_at) + b"PK\x05\x06" + b"\0" * 13
    # the other record comes first, at end_at; torch's zip64 record (if any) right after it
    z64 = zip64_end(3, len(c_torch), t_at, end_at + 22) if zip64 else b""
    if stray == "in-comment":
        return body + c_torch + c_other + eocd(3, len(c_other), o_at, comment=z64 + eocd(3, len(c_torch), t_at))
    if stray == "appended-record":
        return body + c_torch + c_other + eocd(3, len(c_other), o_at, comment_len=0) + z64 + eocd(3, len(c_torch), t_at)
    assert stray == "earlier-record"
    return body + c_torch + c_other + eocd(3, len(c_other), o_at) + z64 + eocd(3, len(c_torch), t_at)


@pytest.mark.parametrize(("stray", "payload_in"), [(s, p) for s in STRAYS for p in ("torch", "other")
                                                   if (s, p) != ("short-tail", "other")])  # no directory to hide in
@METHODS
@pytest.mark.parametrize("zip64", [False, True], ids=["classic", "zip64"])
def test_stray_end_records(tmp_path: Path, marker: str, oracle: TorchOracle, stray: str, method: int,
                           zip64: bool, payload_in: str) -> None:
    """A stray end-of-central-directory signature near the end: every directory any reader can reach is
    scanned, and the disagreement itself is unsafe."""
    payload = pkl(exec_call(marker))
    first, second = (payload, benign("B")) if payload_in == "torch" else (benign("B"), payload)
    path = write(tmp_path, "evil.pt", stray_layout(stray, first, second, method, zip64))
    if payload_in == "torch":
        assert_live(None, tmp_path, marker, "torch", path=path, oracle=oracle)
    else:
        assert_live(payload, tmp_path, marker)
    report = assert_refused(path, marker, global_name="builtins.exec")
    assert any(f.rule == "MK-Z001" and f.member is None for f in report.findings), _describe(report)
    assert_both_readers_refuse(path)


@METHODS
@pytest.mark.parametrize("payload_in", ["torch", "zipfile"])
def test_zipfile_reads_the_directory_before_the_end_record(tmp_path: Path, marker: str, oracle: TorchOracle,
                                                           method: int, payload_in: str) -> None:
    """torch reads the directory at the recorded offset, zipfile (numpy.load, most scanners) the one right
    before the end record: both are scanned, and the disagreement is unsafe."""
    payload = pkl(exec_call(marker))
    first, second = (payload, benign("B")) if payload_in == "torch" else (benign("B"), payload)
    path = write(tmp_path, "evil.pt", zipfile_shift_layout(first, second, method))
    if payload_in == "torch":
        assert_live(None, tmp_path, marker, "torch", path=path, oracle=oracle)
    else:
        with zipfile.ZipFile(path) as z:  # zipfile itself reads the payload's bytes as data.pkl
            assert z.read("archive/data.pkl") == payload
        assert_live(payload, tmp_path, marker)
    report = assert_refused(path, marker, global_name="builtins.exec")
    assert any(f.rule == "MK-Z001" and "zipfile" in f.message for f in report.findings), _describe(report)
    assert_both_readers_refuse(path)


def test_a_benign_stray_record_is_still_an_anomaly(tmp_path: Path) -> None:
    """Disagreeing readers are unsafe even when both directories are clean: what a reader sees is not
    what the scan saw."""
    for stray in STRAYS:
        path = write(tmp_path, f"{stray}.pt", stray_layout(stray, benign("A"), benign("B"), 0, False))
        got, why = verdict(path)
        assert got == "unsafe" and "MK-Z001" in why, f"{stray}: {got}: {why}"


SENTINELS = ["", "count", "size,offset", "count,size,offset"]


@METHODS
@pytest.mark.parametrize(("zip64", "sentinels"), [(False, "")] + [(True, s) for s in SENTINELS])
@pytest.mark.parametrize("comment", [0, 9, 300])
@PREFIXES
def test_clean_layouts_stay_clean(tmp_path: Path, method: int, zip64: bool, sentinels: str, comment: int,
                                  prefix: str) -> None:
    """The same layouts without a second directory are not anomalies (deflate aside, which torch never writes),
    whichever classic fields say "see zip64" (as they do past 65,535 members or 4 GiB)."""
    path = write(tmp_path, "ok.pt", archive(torch_layout(BENIGN_PKL, prefix), method, zip64, b"c" * comment, sentinels))
    report = modelkit.scan(path).files[0]
    rules = {f.rule for f in report.findings}
    if method == 0:
        assert report.verdict == "safe", _describe(report)
        modelkit.open_model(path).close()
    else:
        assert rules == {"MK-Z001"} and all("compressed" in f.message for f in report.findings), _describe(report)


# -- the differential: our model of each reader against the real readers ------------------------------

TORCH_READER = r"""
import json, sys, torch
out = []
for path in sys.argv[1:]:
    row = {}
    try:
        r = torch._C.PyTorchFileReader(path)
        row["records"] = sorted(r.get_all_records())
        try:
            row["data"] = bytes(r.get_record("data.pkl")).hex()
        except Exception as e:
            row["data_error"] = str(e)[:200]
    except Exception as e:
        row["error"] = str(e)[:200]
    out.append(row)
print(json.dumps(out))
"""

ZIPFILE_READER = r"""
import json, sys, zipfile
out = []
for path in sys.argv[1:]:
    try:
        with zipfile.ZipFile(path) as z:
            out.append({"names": z.namelist()})
    except Exception as e:
        out.append({"error": repr(e)[:200]})
print(json.dumps(out))
"""


def differential_layouts() -> dict[str, bytes]:
    """Benign variants of every layout above, plus the edges of each reader's search."""
    a, b = benign("A"), benign("B")
    out: dict[str, bytes] = {}
    for method in (0, 8):
        for zip64 in (False, True):
            for comment in (0, 9):
                out[f"plain-m{method}-z{int(zip64)}-c{comment}"] = archive(torch_layout(a), method, zip64,
                                                                             b"c" * comment)
        for sentinels in SENTINELS[1:]:
            out[f"sentinels-{sentinels}-m{method}"] = archive(torch_layout(a), method, True, sentinels=sentinels)
            for stray in STRAYS:
                out[f"{stray}-m{method}-z{int(zip64)}"] = stray_layout(stray, a, b, method, zip64)
        body, ca, cb, _ = two_directories(a, b, method, "archive")
        ca_at, cb_at = len(body), len(body) + len(ca)
        out[f"zip64-elsewhere-m{method}"] = body + ca + cb + zip64_end(3, len(cb), cb_at, cb_at + len(cb)) + eocd(
            3, len(ca), ca_at)
        rec = zip64_end(3, len(cb), cb_at + 56, len(body))[:56]  # a zip64 record placed before the directories
        out[f"zip64-far-m{method}"] = (body + rec + ca + cb + struct.pack("<IIQI", 0x07064B50, 0, len(body), 1)
                                       + eocd(3, len(ca), ca_at + 56))
        out[f"zipfile-shift-m{method}"] = zipfile_shift_layout(a, b, method)
    plain = archive(torch_layout(a))
    for garbage in (100, 5000, 40000, 66000, 70000):
        out[f"trailing-{garbage}"] = plain + b"x" * garbage
    out["prefixed-bytes"] = b"#" * 37 + plain  # zipfile shifts offsets; miniz does not
    # deflated data.pkl whose recorded sizes or stream lie
    raw = deflate(a)
    for label, (raw_x, size) in {"size-short": (raw, len(a) - 7), "size-long": (raw, len(a) + 1),
                                 "size-zero": (raw, 0), "stream-cut": (raw[:-6], len(a))}.items():
        local, central = deflated_record("archive/data.pkl", raw_x, size, zlib.crc32(a), 0)
        l2, c2 = records(torch_layout(a)[1:], 0, len(local))
        cd = central + c2
        out[f"deflate-{label}"] = local + l2 + cd + eocd(3, len(cd), len(local) + len(l2))
    return out


def _run_json(argv: list[str], files: list[str]) -> list[dict[str, object]]:
    done = subprocess.run(argv + files, capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    rows: list[dict[str, object]] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def _zipfile_view(arc: Archive) -> list[str] | None:
    """The member names modelkit says zipfile reads, or None where it says zipfile fails."""
    for zd in arc.others:
        if zd.label == "zipfile":
            return [e.name for e in zd.entries]
    if any(n.startswith(("zipfile cannot open", "zipfile reads another")) for n in arc.notes) or arc.torch is None:
        return None
    return [e.name for e in arc.torch.entries]


def test_our_model_of_torch_and_zipfile_matches_the_real_readers(tmp_path: Path) -> None:
    """torch's PyTorchFileReader (miniz) and zipfile under each CPython 3.10-3.13 find exactly the
    directory, records and data.pkl bytes that modelkit says they find."""
    layouts = differential_layouts()
    files = []
    for name, data in layouts.items():
        files.append(str(write(tmp_path, f"{name}.pt", data)))
    torch_rows = _run_json([sys.executable, "-c", TORCH_READER], files)
    pythons = sorted(glob("/root/.pyenv/versions/3.1[0-3].*/bin/python3.1[0-3]")) or [sys.executable]
    zipfile_rows = {py: _run_json([py, "-c", ZIPFILE_READER], files) for py in pythons}
    for i, (name, path) in enumerate(zip(layouts, files)):
        src = Source(path)
        try:
            arc = read_archive(path, src)
            real = torch_rows[i]
            if "error" in real:
                assert arc.torch is None, f"{name}: torch fails ({real['error']}) but modelkit reads a directory"
            else:
                assert arc.torch is not None, f"{name}: torch reads {real['records']}, modelkit: {arc.error}"
                prefix = torch_prefix(arc.torch) or ""
                ours = sorted(e.name[len(prefix):] for e in arc.torch.entries)
                if not arc.torch.broken:
                    assert ours == real["records"], f"{name}: torch {real['records']} vs ours {ours}"
                entry = arc.torch.lookup(prefix + "data.pkl")
                if "data" in real:
                    assert entry is not None, name
                    got = member_bytes(path, src, entry, InflateBudget())
                    torch_bytes = bytes.fromhex(str(real["data"]))
                    assert len(torch_bytes) == entry.size, name
                    if any("uninitialised" in p for p in got.problems):
                        assert torch_bytes[: len(got.data)] == got.data, name  # then torch's own heap bytes
                    else:
                        assert torch_bytes == got.data[: entry.size], f"{name}: {got.problems}"
                        assert got.problems == [] or got.data != torch_bytes, name
                else:
                    assert entry is None or arc.torch.broken or any(
                        "fewer than" in p for p in member_bytes(path, src, entry, InflateBudget()).problems), \
                        f"{name}: torch cannot read data.pkl ({real['data_error']}) but modelkit can"
            for py, rows in zipfile_rows.items():
                expect = rows[i].get("names")
                assert _zipfile_view(arc) == expect, f"{name} under {py}: zipfile {rows[i]} vs modelkit {_zipfile_view(arc)}"
        finally:
            src.close()


# -- member sizes: scan safe exactly when torch.load and modelkit read the same tensors ----------------

TORCH_LOADS = r"""
import json, sys, torch
out = []
for path in sys.argv[1:]:
    try:
        sd = torch.load(path, weights_only=True)
        out.append({k: v.tolist() for k, v in sd.items()})
    except Exception as e:
        out.append({"error": str(e)[:200]})
print(json.dumps(out))
"""


def _patch(data: bytes, name: str, where: str, sizes: Callable[[int, int], tuple[int, int]] | None = None,
           extra: int = 0) -> bytes:
    """Rewrite a member's (compressed, uncompressed) sizes in its central or local header, or grow its
    local extra length by ``extra`` (the local name and extra lengths decide where torch reads data)."""
    out = bytearray(data)
    sig, nlen_at, name_at, size_at = ((b"PK\x01\x02", 28, 46, 20) if where == "central" else (b"PK\x03\x04", 26, 30, 18))
    pos = out.find(sig)
    while pos >= 0:
        (nlen,) = struct.unpack_from("<H", out, pos + nlen_at)
        if out[pos + name_at : pos + name_at + nlen] == name.encode():
            if sizes is not None:
                csize, usize = struct.unpack_from("<II", out, pos + size_at)
                struct.pack_into("<II", out, pos + size_at, *sizes(csize, usize))
            if extra:
                (elen,) = struct.unpack_from("<H", out, pos + 28)
                struct.pack_into("<H", out, pos + 28, elen + extra)
            return bytes(out)
        pos = out.find(sig, pos + 4)
    raise AssertionError(f"no {where} header for {name}")


SIZE_EDITS: dict[str, dict[str, object]] = {
    "central-zeroed": {"where": "central", "sizes": lambda c, u: (0, 0)},
    "central-compressed-zeroed": {"where": "central", "sizes": lambda c, u: (0, u)},
    "central-uncompressed-zeroed": {"where": "central", "sizes": lambda c, u: (c, 0)},
    "central-shorter": {"where": "central", "sizes": lambda c, u: (c - 1, u - 1)},
    "central-longer": {"where": "central", "sizes": lambda c, u: (c + 1, u + 1)},
    "local-zeroed": {"where": "local", "sizes": lambda c, u: (0, 0)},
    "local-extra-shifts-data": {"where": "local", "extra": 4},
}


def test_member_sizes_are_read_as_torch_reads_them(tmp_path: Path) -> None:
    """Central sizes zeroed, shortened or lengthened; local sizes zeroed; the data shifted by the
    local extra length. Whatever torch.load does, a variant that scans safe is one that torch.load
    and modelkit both read, with the same tensors; one torch.load refuses is never safe."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(16, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16)}, buf)
    base = buf.getvalue()
    names = zipfile.ZipFile(io.BytesIO(base)).namelist()
    variants: dict[str, bytes] = {"unchanged": base}
    for member in names:
        if member.endswith(("data.pkl", "data/0", "data/1", "byteorder")):
            for label, edit in SIZE_EDITS.items():
                variants[f"{member.rsplit('/', 1)[-1]}-{label}"] = _patch(base, member, **edit)  # type: ignore[arg-type]
    files = [str(write(tmp_path, f"{k}.pt", v)) for k, v in variants.items()]
    loaded = _run_json([sys.executable, "-c", TORCH_LOADS], files)
    for (label, _), path, real in zip(variants.items(), files, loaded):
        got, why = verdict(Path(path))
        if "error" in real:
            assert got != "safe", f"{label}: torch.load fails ({real['error']}) but the scan says safe"
            with pytest.raises(modelkit.ModelkitError):
                modelkit.open_model(path).close()
        if got == "safe":
            assert "error" not in real, label
            with modelkit.open_model(path) as mf:
                ours = {k: mf[k].read().tolist() for k in mf}
            assert ours == real, f"{label}: torch.load read {real}, modelkit {ours}"


# -- zip bombs: streamed, one budget per scan --------------------------------------------------------


def zero_stream(mib: int, head: bytes = b"") -> bytes:
    """A raw deflate stream of ``head`` then ``mib`` MiB of zeros (about 1 KB per MiB), built without
    ever holding the zeros' inflated size: after the first MiB, every MiB deflates to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    first = c.compress(head + chunk) + c.flush(zlib.Z_SYNC_FLUSH)
    middle = c.compress(chunk) + c.flush(zlib.Z_SYNC_FLUSH)
    return first + middle * (mib - 1) + b"\x03\x00"  # then an empty final block


def bomb_archive(members: list[tuple[str, bytes, int]], stored: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    """Members given as (name, raw deflate stream, declared size), then stored members."""
    local = central = b""
    for name, raw, size in members:
        lrec, crec = deflated_record(name, raw, size, 0, len(local))
        local += lrec
        central += crec
    l2, c2 = records(list(stored), 0, len(local))
    cd = central + c2
    n = len(members) + len(stored)
    return local + l2 + cd + eocd(n, len(cd), len(local) + len(l2))


def npy_header(descr: str) -> bytes:
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': (1,), }}"
    pad = 63 - (10 + len(text)) % 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + pad + 1) + text.encode() + b" " * pad + b"\n"


def bomb_layouts() -> dict[str, tuple[bytes, tuple[str, ...]]]:
    """Small zips of members inflating to 500 MiB each, in every place a scan inflates members whole,
    with the verdicts the rest of each file calls for (the bound itself makes a file an error)."""
    size = 500 << 20
    big = zero_stream(500)
    object_npy = zero_stream(500, npy_header("|O") + b"\x80\x02B" + struct.pack("<I", size))
    script = (("evil/constants.pkl", pickle.dumps((), protocol=2)), ("evil/data.pkl", BENIGN_PKL),
              ("evil/version", b"3\n"))
    return {
        "data-pkl": (bomb_archive([("archive/data.pkl", big, size)] + [(f"archive/data/{i}", big, size)
                                                                     for i in range(3)],
                                  (("archive/version", b"3\n"),)), ("unsafe",)),
        "extra-pkl": (bomb_archive([("archive/x.pkl", big, size), ("archive/y.pkl", big, size)],
                                   (("archive/data.pkl", BENIGN_PKL),)), ("unsafe",)),
        "npz-object": (bomb_archive([(f"a{i}.npy", object_npy, size) for i in range(3)]), ("unsafe",)),
        "torchscript-code": (bomb_archive([("evil/code/__torch__.py", big, size)], script), ("error",)),
    }


BOMB_CHILD = r"""
import json, sys, tracemalloc
import modelkit
from modelkit.formats import open_model
# Python-level peak (inflated bytes are Python objects). ru_maxrss would not do: a child
# started from a big parent (the test run itself) inherits the parent's high-water mark.
tracemalloc.start()
out = []
for path in sys.argv[1:]:
    report = modelkit.scan(path).files[0]
    try:
        open_model(path).close()
        refused = None
    except Exception as e:
        refused = type(e).__name__
    out.append({"verdict": report.verdict, "findings": [[f.rule, f.message] for f in report.findings],
                "refused": refused})
print(json.dumps({"rows": out, "maxrss_kib": tracemalloc.get_traced_memory()[1] >> 10}))
"""


def test_zip_bombs_are_streamed_under_one_budget(tmp_path: Path) -> None:
    """A 1-2 MB zip whose members inflate to 500 MiB each, in data.pkl, extra .pkl members, .npz object
    arrays and TorchScript code: the scan stops at its inflate budget with a RESOURCE_LIMIT finding
    ("exceeds a resource bound"), the reader refuses, and the child scanning them all stays small."""
    layouts = bomb_layouts()
    files = [str(write(tmp_path, f"{k}.zip", v[0])) for k, v in layouts.items()]
    assert all(os.path.getsize(f) < 3 << 20 for f in files)
    done = subprocess.run([sys.executable, "-c", BOMB_CHILD, *files], capture_output=True, text=True,
                          timeout=DEADLINE, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for (label, (_, verdicts)), row in zip(layouts.items(), result["rows"]):
        assert row["verdict"] in verdicts, f"{label}: {row}"
        limits = [m for rule, m in row["findings"] if rule == "MK-P004"]
        assert limits and all("exceeds a resource bound" in m for m in limits), f"{label}: {row['findings']}"
        assert row["refused"] is not None, label
    assert result["maxrss_kib"] < 300 * 1024, f"the scans peaked at {result['maxrss_kib'] >> 10} MiB"


@pytest.mark.parametrize("declared", [0, 10, 1 << 20])
def test_tensor_inflation_stops_at_the_recorded_size(tmp_path: Path, declared: int) -> None:
    """A deflated tensor member (``.npz``) that claims a few bytes but inflates to 200 MiB costs what it
    claims: ``zipread.inflate_exact`` stops one byte past the recorded size and refuses it."""
    import tracemalloc

    raw = zero_stream(200)
    path = write(tmp_path, "member.bin", raw)
    src = Source(path)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="do not match the size"):
            inflate_exact(src, 0, len(raw), declared, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        src.close()
    assert peak < declared + (8 << 20), f"inflating peaked at {peak >> 20} MiB"


# -- TorchScript: torch.load hands these to torch.jit.load ---------------------------------------------


class PlainModule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class BufferModule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(3))
        self.sizes = [1, 2, 3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.steps.sum() + len(self.sizes)


class MarkerOnLoad(torch.nn.Module):
    """Its ``__setstate__`` creates ``path``: ``torch.from_file(path, shared=True)`` makes the file."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.probe = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.probe

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.probe = torch.from_file(self.path, True, 1)


class OuterModule(torch.nn.Module):
    """A plain module with the marker module inside it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.inner = MarkerOnLoad(path)
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.inner(x))


def jit_save(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


BENIGN_SCRIPTS: dict[str, Callable[[], torch.nn.Module]] = {"linear": PlainModule, "buffers": BufferModule}


@pytest.mark.parametrize("name", ["model.pt", "my.weights.ckpt"])
@pytest.mark.parametrize("module", list(BENIGN_SCRIPTS))
def test_benign_torchscript_is_suspicious_and_refused_in_one_line(tmp_path: Path, module: str, name: str) -> None:
    """A benign TorchScript module is its own finding (suspicious, not an error), and the reader says in
    one line that it is a program, not a state dict."""
    path = jit_save(BENIGN_SCRIPTS[module](), tmp_path / name)
    report = modelkit.scan(path).files[0]
    assert report.verdict == "suspicious", _describe(report)
    assert any(f.rule == "MK-T001" for f in report.findings), _describe(report)
    for opener in (modelkit.open_model, open_raw):
        with pytest.raises(UnsupportedFormatError) as caught:
            opener(path)
        assert "TorchScript" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("module", ["top", "nested"])
@pytest.mark.parametrize("name", ["evil.pt", "my.model.ckpt"])
def test_torchscript_setstate_runs_on_load(tmp_path: Path, marker: str, oracle: TorchOracle, module: str,
                                           name: str) -> None:
    """A TorchScript ``__setstate__`` runs inside torch.load(weights_only=False) (dispatched to torch.jit.load,
    torch/serialization.py ``_is_torchscript_zip``): proven live in a child; unsafe and refused here."""
    build = MarkerOnLoad if module == "top" else OuterModule
    path = jit_save(build(marker), tmp_path / name)
    assert not os.path.exists(marker)
    assert_live(None, tmp_path, marker, "torch", path=path, oracle=oracle)
    report = assert_refused(path, marker)
    assert any(f.rule == "MK-T002" for f in report.findings), _describe(report)
    with pytest.raises(UnsafeFileError, match="TorchScript"):
        open_raw(path)


@pytest.mark.parametrize("member", ["constants.pkl", "data.pkl"])
def test_python_payload_in_a_torchscript_pickle(tmp_path: Path, marker: str, member: str) -> None:
    """torch.jit.load's C++ unpickler imports no Python, but any other reader of the member does: a Python
    global in a TorchScript pickle is unsafe, while the TorchScript classes themselves are not."""
    clean = jit_save(PlainModule(), tmp_path / "clean.pt")
    payload = pkl(exec_call(marker))
    out = io.BytesIO()
    with zipfile.ZipFile(clean) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = payload if info.filename.endswith("/" + member) else zin.read(info)
            zout.writestr(info, data)
    assert_live(payload, tmp_path, marker)
    path = write(tmp_path, "evil.pt", out.getvalue())
    report = assert_refused(path, marker, global_name="builtins.exec")
    assert not any(f.global_name and f.global_name.startswith("__torch__.") and f.verdict == "unsafe"
                   for f in report.findings), _describe(report)


# -- sanity of the building blocks ------------------------------------------------------------------


def test_builders_write_what_zipfile_reads(tmp_path: Path) -> None:
    """The deflated builder and the zero stream are real zip data (checked with zipfile, no loader)."""
    data = archive(torch_layout(BENIGN_PKL), 8, True, b"note")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.read("archive/data.pkl") == BENIGN_PKL
    assert zlib.decompress(zero_stream(3), -15) == bytes(3 << 20)
    assert zlib.decompress(zero_stream(3, b"head"), -15) == b"head" + bytes(3 << 20)
    assert build_zip([Member("a/b", b"x")])[:4] == b"PK\x03\x04"
