"""The CLI on a terminal: hostile names are escaped, one bad argument does not stop the others,
exit codes agree across commands, and ``-q`` means the same everywhere (issue 16)."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fixtures import hostile
from modelkit.cli.main import cli
from modelkit.cli.output import Output, shown

# Erases the line, returns to column 0, prints a fake verdict and hides what follows.
HOSTILE = "x\x1b[2K\rSAFE       innocent\x1b[8m.ckpt"
BIDI = "evil\u202egnp.safetensors"  # shows as "evilsrosnetefas.png" on a terminal that honours bidi

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="Windows file names cannot hold controls")


def _run(*args: str) -> Result:
    r = CliRunner().invoke(cli, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{args}: {r.exception!r}"
    return r


def _safetensors(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A tiny valid safetensors file, built by hand (no torch needed)."""
    header: dict[str, object] = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<2f", 1.0, 2.0))
    return path


def _no_terminal_controls(r: Result) -> None:
    for stream in (r.stdout, r.stderr):
        assert not any(c in stream for c in "\x1b\r\x07\x7f\x9b\u202e"), repr(stream)


# -- 1. terminal injection -------------------------------------------------------------------------


def test_shown_escapes_controls_as_ls_does() -> None:
    assert shown("model.safetensors") == "model.safetensors"
    assert shown("bad ünï 模型.ckpt") == "bad ünï 模型.ckpt"  # printable text is left alone
    assert shown(HOSTILE) == r"x\e[2K\rSAFE       innocent\e[8m.ckpt"
    assert shown("a\tb\nc\x00d\x7fe\x85f\x9bg") == r"a\tb\nc\x00d\x7fe\x85f\x9bg"
    assert shown(BIDI) == r"evil\u202egnp.safetensors"
    assert shown("zero\u200bwidth\u2028line") == r"zero\u200bwidth\u2028line"
    assert shown(os.fsdecode(b"raw\xffbyte")) == r"raw\udcffbyte"  # a name that is not UTF-8
    if os.sep == "/":
        assert shown("a\\e") == r"a\\e"  # a real backslash never reads as an escape


@posix_only
def test_a_hostile_file_name_cannot_drive_the_terminal(tmp_path: Path) -> None:
    evil = _safetensors(tmp_path / HOSTILE)
    bidi = _safetensors(tmp_path / BIDI)
    for args in (["scan", str(tmp_path)], ["scan", str(evil), str(bidi)], ["hash", str(tmp_path)],
                 ["hash", "--check", str(evil)]):
        r = _run(*args)
        assert r.exit_code == 0, (args, r.output)
        _no_terminal_controls(r)
        assert shown(str(evil)) in r.stdout and shown(str(bidi)) in r.stdout or "--check" in args, args
    r = _run("scan", str(evil))
    assert r.stdout.splitlines()[0] == f"SAFE       {tmp_path}/x\\e[2K\\rSAFE       innocent\\e[8m.ckpt"
    # the name in an error line is escaped too
    broken = tmp_path / ("broken\x1b[1A\u202e.ckpt")
    broken.write_bytes(b"not a model at all")
    r = _run("inspect", str(broken))
    assert r.exit_code == 2 and shown(str(broken)) in r.stderr
    _no_terminal_controls(r)


@posix_only
def test_json_keeps_the_exact_name(tmp_path: Path) -> None:
    evil = _safetensors(tmp_path / HOSTILE)
    r = _run("scan", "--json", str(evil))
    assert r.exit_code == 0 and json.loads(r.stdout)["files"][0]["path"] == str(evil)
    r = _run("hash", "--json", str(evil))
    assert r.exit_code == 0 and json.loads(r.stdout)["files"][0]["path"] == str(evil)


# -- 2. one bad argument does not stop the others ----------------------------------------------------


@posix_only
def test_a_missing_argument_is_one_failed_file(tmp_path: Path) -> None:
    good = _safetensors(tmp_path / "good.safetensors")
    missing = tmp_path / "missing.ckpt"
    dangling = tmp_path / "dangling.ckpt"
    os.symlink(tmp_path / "nowhere", dangling)

    r = _run("scan", str(missing), str(good), str(dangling))
    assert r.exit_code == 2 and "Invalid value" not in r.output
    lines = r.stdout.splitlines()
    assert lines[0] == f"ERROR      {missing}" and "no such file" in lines[1]
    assert f"SAFE       {good}" in lines and f"ERROR      {dangling}" in lines
    assert lines[-1].startswith("3 files: 1 safe") and "2 could not be scanned" in lines[-1]
    doc = json.loads(_run("scan", "--json", str(missing), str(good), str(dangling)).stdout)
    assert [f["verdict"] for f in doc["files"]] == ["error", "safe", "error"]

    r = _run("hash", str(missing), str(good), str(dangling))
    assert r.exit_code == 2 and "Invalid value" not in r.output
    errors = r.stderr.splitlines()
    assert len(errors) == 2 and all(ln.startswith("modelkit: error: ") for ln in errors)
    assert f"{missing}: no such file" in errors[0] and f"{dangling}: no such file" in errors[1]
    assert r.stdout.splitlines()[0] == str(good) and "SHA256" in r.stdout
    r = _run("hash", "--json", str(missing), str(good))
    rows = json.loads(r.stdout)["files"]
    assert r.exit_code == 2 and rows[0]["error"] == "InputNotFoundError" and "hashes" in rows[1]


# -- 3. exit codes -----------------------------------------------------------------------------------


def test_hash_check_on_an_unsafe_file_exits_1(tmp_path: Path, marker: str) -> None:
    evil = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(evil), marker, payload="os_system")
    good = _safetensors(tmp_path / "good.safetensors")
    r = _run("hash", "--check", str(evil), str(good))
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith(f"modelkit: error: {evil}: ") and str(good) in r.stdout
    assert _run("hash", str(evil)).exit_code == 0  # plain hashing reads bytes, never the pickle
    assert _run("hash", "--check", str(evil), str(tmp_path / "missing.ckpt")).exit_code == 1  # findings first
    assert _run("hash", "--check", str(good), str(tmp_path / "missing.ckpt")).exit_code == 2
    assert not os.path.exists(marker)


# -- 4. -q ---------------------------------------------------------------------------------------------


def test_quiet_keeps_results_and_drops_chatter(tmp_path: Path) -> None:
    good = _safetensors(tmp_path / "good.safetensors")
    r = _run("scan", "-q", "--allow", "collections.OrderedDict", str(good))
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout.splitlines() == [f"SAFE       {good}",
                                     "1 files: 1 safe, 0 suspicious, 0 unsafe, 0 could not be scanned; "
                                     "allowed: collections.OrderedDict"]
    r = _run("hash", "-q", "--algo", "crc32", str(good))
    assert r.exit_code == 0 and r.stderr == "" and r.stdout.splitlines()[0] == str(good) and "CRC32" in r.stdout
    # errors stay
    r = _run("hash", "-q", str(tmp_path / "missing.ckpt"))
    assert r.exit_code == 2 and r.stderr.startswith("modelkit: error: ")


def test_quiet_json_is_the_json_and_nothing_else(tmp_path: Path) -> None:
    good = _safetensors(tmp_path / "good.safetensors")
    (tmp_path / "empty").mkdir()
    for cmd in ("scan", "hash"):
        r = _run(cmd, "-q", "--json", str(good), str(tmp_path / "empty"))
        assert r.exit_code == 0 and r.stderr == "", (cmd, r.stderr)
        assert json.loads(r.stdout)["files"][0]["path"] == str(good)
    r = _run("scan", "-q", "--json", "--allow", "no-dot", str(good))  # a usage error still says so in JSON
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["error"]


def test_quiet_turns_bars_off_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    out = Output(quiet=True)
    assert out.bar(1 << 40) is None and out.steps_bar(10) is None
    assert list(out.progress(iter([1, 2]), total=2)) == [1, 2]


# -- 5. wording ---------------------------------------------------------------------------------------


def test_a_usage_error_with_a_suggestion_has_no_stray_period() -> None:
    r = _run("prune", "--forc", "x")
    assert r.exit_code == 2
    assert r.stderr == ("modelkit: error: No such option '--forc'. Did you mean '--force'? "
                        "Try 'modelkit prune -h' for help\n")
    r = _run("scan", "--job", "2", "x")
    assert "'--jsonl'?) Try 'modelkit scan -h' for help" in r.stderr and "?." not in r.stderr
    r = _run("prune", "--json", "--forc", "x")
    assert json.loads(r.stdout)["error"]["problem"] == "No such option '--forc'. Did you mean '--force'?"
    r = _run("convert", "-j", "x", "y")  # a message without a question keeps its period
    assert r.stderr.endswith("is not a valid integer. Try 'modelkit convert -h' for help\n")
