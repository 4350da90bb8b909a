"""Every command against bad input: one ``modelkit: error:`` line naming the file, exit 2 (1 for an
unsafe file), no traceback, no hang, and still JSON on stdout with ``--json``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fixtures import hostile
from fixtures import merge_layouts as ml
from modelkit.cli.main import cli

K2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("good")
    a, b, lora = d / "a.safetensors", d / "b.safetensors", d / "style.safetensors"
    sd = ml.checkpoint(str(a), ml.sd1(), seed=0)
    ml.checkpoint(str(b), ml.sd1(), seed=1)
    ml.lora_file(str(lora), {ml.kohya_name(K2): ml.module("lora", tuple(sd[K2].shape))})
    return {"a": str(a), "b": str(b), "lora": str(lora), "dir": str(d)}


def _bad_inputs(d: Path, good: dict[str, str]) -> dict[str, str]:
    """Bad inputs of every sort, built in ``d``; name -> path."""
    data = Path(good["a"]).read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    files = {
        "empty.ckpt": b"",
        "png.ckpt": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        "text.safetensors": b"hello, this is not a model\n",
        "junk.safetensors": b"\x01\x02\x03\x04",
        "trunc-header.safetensors": data[:20],
        "trunc-data.safetensors": data[: 8 + hlen + 100],
        "badjson.safetensors": struct.pack("<Q", 20) + b'{"a": {"dtype": "F3',
        "past-eof.safetensors": _st_header({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}),
        "huge-header.safetensors": struct.pack("<Q", 1 << 62) + b"{" + b" " * 32,
    }
    out = {}
    for name, content in files.items():
        (d / name).write_bytes(content)
        out[name] = str(d / name)
    (d / "folder.ckpt").mkdir()
    out["folder.ckpt"] = str(d / "folder.ckpt")
    out["missing.ckpt"] = str(d / "missing.ckpt")
    # Windows: creating symlinks needs a privilege (admin or Developer Mode), and there is no
    # /dev/zero; those inputs are then left out (elsewhere they are always made)
    if _symlink(d / "loop-b.ckpt", d / "loop-a.ckpt") and _symlink(d / "loop-a.ckpt", d / "loop-b.ckpt"):
        out["loop-a.ckpt"] = str(d / "loop-a.ckpt")
    if sys.platform != "win32":
        os.symlink("/dev/zero", d / "zero.ckpt")
        out["zero.ckpt"] = str(d / "zero.ckpt")
    return out


def _symlink(target: Path, link: Path) -> bool:
    """Make the link; False where Windows refuses (no privilege). Elsewhere a failure is an error."""
    try:
        os.symlink(target, link)
    except OSError:
        if sys.platform != "win32":
            raise
        return False
    return True


def _mps_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.backends.mps.is_available())


def _st_header(header: dict[str, object]) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 8


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, good: dict[str, str]) -> dict[str, str]:
    return _bad_inputs(tmp_path_factory.mktemp("bad ünï"), good)


def _commands(x: str, g: dict[str, str], out: str) -> dict[str, list[str]]:
    """Every command and subcommand with ``x`` in each input position."""
    a, b, lora = g["a"], g["b"], g["lora"]
    return {
        "inspect": ["inspect", x],
        "convert": ["convert", x, "-o", out],
        "prune": ["prune", x, "-o", out],
        "hash": ["hash", x],
        "verify-src": ["verify", x, a],
        "verify-out": ["verify", a, x],
        "diff": ["diff", a, x],
        "load": ["load", x],
        "merge-lora-base": ["merge", "lora", x, lora, "-o", out],
        "merge-lora-lora": ["merge", "lora", a, x, "-o", out],
        "merge-models-a": ["merge", "models", x, b, "-o", out],
        "merge-models-c": ["merge", "models", a, b, x, "-o", out],
        "merge-models-vae": ["merge", "models", a, b, "--vae", x, "-o", out],
        "lora-extract": ["lora", "extract", a, x, "-o", out],
        "lora-merge": ["lora", "merge", lora, x, "-o", out],
        "lora-convert": ["lora", "convert", x, "-o", out, "--to", "diffusers"],
    }


COMMANDS = list(_commands("x", {"a": "", "b": "", "lora": ""}, ""))
BAD = ["empty.ckpt", "png.ckpt", "text.safetensors", "junk.safetensors", "trunc-header.safetensors",
       "trunc-data.safetensors", "badjson.safetensors", "past-eof.safetensors", "huge-header.safetensors",
       "folder.ckpt", "missing.ckpt", "loop-a.ckpt", "zero.ckpt"]


def _run(args: list[str]) -> Result:
    r = CliRunner().invoke(cli, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{args}: {r.exception!r}"
    assert "Traceback" not in r.output + r.stderr
    return r


def _one_error_line(r: Result, path: str, code: int = 2) -> str:
    assert r.exit_code == code, (r.exit_code, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("modelkit: warning: ")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("modelkit: error: ") and path in lines[0], lines[0]
    return lines[0]


def _error_json(r: Result) -> dict[str, object]:
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict) and str(doc["schema"]).startswith("modelkit.")
    err = doc["error"] if "error" in doc else doc["files"][0]  # inspect and hash keep per-file rows
    assert isinstance(err, dict) and {"error", "path", "problem", "remedy"} <= set(err)
    return err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_every_bad_input(tmp_path: Path, good: dict[str, str], bad: dict[str, str],
                                              command: str) -> None:
    out = str(tmp_path / "out.safetensors")
    for name in BAD:
        if name not in bad:
            continue  # a symlink Windows would not let this session make (see _bad_inputs)
        if command == "hash" and name not in ("missing.ckpt", "loop-a.ckpt"):
            continue  # hash reads bytes, not tensors: any regular file has a sha256 (devices: test_fifos_never_hang)
        if command in ("inspect", "convert", "prune", "hash") and name == "folder.ckpt":
            continue  # these walk folders (an empty one is a warning, tested below)
        path = bad[name]
        _one_error_line(_run(_commands(path, good, out)[command]), path)
        r = _run([*_commands(path, good, out)[command], "--json"])
        assert r.exit_code == 2
        assert _error_json(r)["path"] == path
        assert not os.path.exists(out)


@pytest.mark.parametrize("command", ["convert", "load", "merge-lora-lora", "merge-models-a", "lora-extract"])
def test_a_hostile_pickle_is_refused_with_exit_1(tmp_path: Path, good: dict[str, str], marker: str,
                                                 command: str) -> None:
    evil = tmp_path / "evil.ckpt"
    hostile.hostile_torch_zip(str(evil), marker, payload="os_system")
    out = str(tmp_path / "out.safetensors")
    _one_error_line(_run(_commands(str(evil), good, out)[command]), str(evil), code=1)
    r = _run([*_commands(str(evil), good, out)[command], "--json"])
    assert r.exit_code == 1 and _error_json(r)["error"] == "UnsafeFileError"
    assert not os.path.exists(marker) and not os.path.exists(out)


def test_an_empty_folder_is_said(tmp_path: Path) -> None:
    empty = tmp_path / "nothing here"
    empty.mkdir()
    for cmd in (["scan"], ["inspect"], ["hash"], ["convert"], ["prune"]):
        r = _run([*cmd, str(empty)])
        assert r.exit_code == 0 and f"{empty}: no model files in this folder" in r.stderr, (cmd, r.stderr)


def test_missing_input_stays_json(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.ckpt")
    for cmd in (["hash"], ["convert"], ["prune"], ["inspect"]):
        r = _run([*cmd, missing, "--json"])
        assert r.exit_code == 2 and _error_json(r)["error"] == "InputNotFoundError", cmd
        _one_error_line(r, missing)
    # scan reports every file it is given, a missing one as an ERROR verdict (tests/test_cli_terminal.py)
    r = _run(["scan", missing, "--json"])
    (entry,) = json.loads(r.stdout)["files"]
    assert r.exit_code == 2 and entry["path"] == missing and entry["verdict"] == "error"
    assert entry["findings"][0]["message"] == "no such file"


def test_unknown_bytes_are_named_plainly(bad: dict[str, str]) -> None:
    line = _one_error_line(_run(["inspect", bad["junk.safetensors"]]), bad["junk.safetensors"])
    assert "its first bytes match no known container" in line and "looks like not" not in line


@pytest.mark.parametrize("args, words", [
    (["merge", "models", "{a}", "{b}", "-o", "{out}", "--alpha", "foo"], "'foo' is not a valid float"),
    (["merge", "models", "{a}", "{b}", "-o", "{out}", "--alpha", "nan"], "--alpha must be a finite number"),
    (["merge", "models", "{a}", "{b}", "-o", "{out}", "--alpha", "inf"], "--alpha must be a finite number"),
    (["merge", "models", "{a}", "{b}", "-o", "{out}", "--block-weights", "1,2,3"], "25 block weights"),
    (["merge", "models", "{a}", "{b}", "-o", "{out}", "--block-weights", ",".join(["nan"] * 25)], "finite"),
    (["merge", "models", "{a}", "{b}", "-o", "{out}", "--dtype", "fp8x"], "'fp8x' is not one of"),
    (["merge", "models", "{a}", "{lora}", "-o", "{out}"], "shares none of the"),
    (["merge", "models", "{lora}", "{a}", "-o", "{out}"], "has no unet/te/vae weights"),
    (["merge", "lora", "{a}", "{lora}:abc", "-o", "{out}"], "the ratio 'abc' is not a number"),
    (["merge", "lora", "{a}", "{lora}", "-o", "{out}", "--unet-ratio", "nan"], "--unet-ratio must be a finite"),
    (["merge", "lora", "{a}", "{a}", "-o", "{out}"], "is not a LoRA"),
    (["merge", "lora", "{lora}", "{lora}", "-o", "{out}"], "is not a checkpoint"),
    (["lora", "extract", "{a}", "{b}", "-o", "{out}", "--rank", "0"], "0 is not in the range"),
    (["lora", "extract", "{a}", "{b}", "-o", "{out}", "--rank", "-1"], "-1 is not in the range"),
    (["lora", "extract", "{a}", "{b}", "-o", "{out}", "--min-diff", "nan"], "--min-diff must be a finite"),
    (["lora", "convert", "{lora}", "-o", "{out}", "--to", "bogus"], "'bogus' is not one of"),
    (["prune", "{a}", "-o", "{out}", "--dtype", "fp8x"], "--dtype must be one of"),
    (["convert", "{a}", "-o", "{out}", "-j", "0"], "-j/--jobs must be 1 or more"),
    (["hash", "{a}", "--algo", "md5"], "'md5' is not one of"),
    (["load", "{a}", "--device", "bogus"], "is not a device name"),
    (["load", "{a}", "--device", "mps"], "MPS is not available"),
    (["load", "{a}", "--dtype", "fp8x"], "is not a floating-point type"),
    (["load", "{a}", "--dtype", "int8"], "is not a floating-point type"),
    (["scan", "{a}", "--no-such-option"], "No such option"),
    (["verify", "{a}"], "Missing argument"),
])
def test_nonsense_options_are_one_line_and_json(tmp_path: Path, good: dict[str, str], args: list[str],
                                                words: str) -> None:
    if "mps" in args and _mps_available():
        pytest.skip("this machine has an MPS device (Apple silicon)")
    out = str(tmp_path / "out.safetensors")
    argv = [a.format(out=out, **good) for a in args]
    line = _one_error_line(_run(argv), "")
    assert words in line, line
    r = _run([*argv, "--json"])
    assert r.exit_code == 2 and words in str(_error_json(r)["problem"])
    assert not os.path.exists(out)


def test_cuda_without_a_gpu_is_a_clear_error(good: dict[str, str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = _one_error_line(_run(["load", good["a"], "--device", "cuda:1"]), "")
    assert "CUDA is not available" in line and "--device cpu" in line


@pytest.mark.parametrize("args", [
    ["convert", "{a}", "-o", "{a}"],
    ["merge", "models", "{a}", "{b}", "-o", "{b}"],
    ["lora", "extract", "{a}", "{b}", "-o", "{b}", "--force"],
    ["lora", "convert", "{lora}", "-o", "{lora}", "--to", "diffusers", "--force"],
])
def test_output_onto_an_input_is_refused(good: dict[str, str], args: list[str]) -> None:
    argv = [a.format(**good) for a in args]
    before = Path(good["b"]).stat().st_mtime_ns
    line = _one_error_line(_run(argv), "")
    assert "is the input file" in line and Path(good["b"]).stat().st_mtime_ns == before


def test_output_problems(tmp_path: Path, good: dict[str, str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    under_file = str(blocker / "out.safetensors")
    line = _one_error_line(_run(["merge", "lora", good["a"], good["lora"], "-o", under_file]), under_file)
    assert "a file is in the way" in line
    r = _run(["convert", good["a"], "--out-dir", str(blocker), "--json"])
    assert r.exit_code == 2 and _error_json(r)["error"] == "OutputWriteError"
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"x")
    line = _one_error_line(_run(["merge", "models", good["a"], good["b"], "-o", str(exists)]), str(exists))
    assert "already exists" in line and "--force" in line and exists.read_bytes() == b"x"
    sarif = str(blocker / "report.sarif")
    r = _run(["scan", good["a"], "--sarif", sarif])
    assert r.exit_code == 2 and r.stderr.startswith(f"modelkit: error: {sarif}: cannot create a file")
    r = _run(["scan", good["a"], "--sarif", sarif, "--json"])
    assert r.exit_code == 2 and _error_json(r)["error"] == "OutputWriteError"


def test_train_config_that_is_not_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    r = _run(["train", "lora", "--config", str(folder), "--json"])
    assert r.exit_code == 2 and "is a directory" in str(_error_json(r)["problem"])
    device = "/dev/zero" if os.name == "posix" else os.devnull  # NUL, Windows' character device
    line = _one_error_line(_run(["train", "lora", "--config", device]), device)
    assert "not a regular file" in line


@pytest.mark.skipif(sys.platform == "win32", reason="os.mkfifo and /dev/zero do not exist on Windows")
def test_fifos_never_hang(tmp_path: Path, good: dict[str, str], bad: dict[str, str]) -> None:
    """A FIFO in every input position, and /dev/zero, in a child process with a deadline: nothing may
    block on them or read them without end."""
    fifo = tmp_path / "pipe.ckpt"
    os.mkfifo(fifo)
    out = str(tmp_path / "out.safetensors")
    runs = [*_commands(str(fifo), good, out).values(), ["scan", str(fifo)], ["train", "lora", "--config", str(fifo)],
            ["hash", bad["zero.ckpt"], "/dev/zero"], ["convert", "/dev/zero", "-o", out]]
    code = textwrap.dedent("""
        import json, sys
        from click.testing import CliRunner
        from modelkit.cli.main import cli
        for args in json.loads(sys.argv[1]):
            r = CliRunner().invoke(cli, args)
            assert r.exit_code == 2, (args, r.exit_code, r.output, r.exception)
            assert "Traceback" not in r.output and "not a regular file" in r.output, (args, r.output)
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr


@pytest.mark.skipif(os.name != "posix", reason="a folder's mode bits do not stop writes on Windows")
@pytest.mark.skipif(os.name == "posix" and os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_folder(tmp_path: Path, good: dict[str, str]) -> None:
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        target = str(ro / "out.safetensors")
        line = _one_error_line(_run(["convert", good["a"], "-o", target]), target)
        assert "Permission denied" in line and "Choose a folder you can write to" in line
    finally:
        ro.chmod(0o755)


def test_names_that_are_not_utf8_print_on_a_strict_stdout(tmp_path: Path) -> None:
    """A damaged pickle names a global with bytes that are not UTF-8; with a strict UTF-8 stdout
    (a UTF-8 locale, not C.UTF-8) the JSON and the error line still print, escaped."""
    import json
    import subprocess
    import sys

    p = tmp_path / "broken.pt"
    p.write_bytes(b"\x80\x02ccoll\xdaections\nOrderedDict\nq\x00)Rq\x01.")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    r = subprocess.run([sys.executable, "-m", "modelkit", "inspect", str(p), "--json"], capture_output=True, env=env)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert "coll\udcdaections" in doc["files"][0]["problem"]
    err = r.stderr.decode()
    assert "Traceback" not in err and err.count("\n") == 1 and "coll\\udcdaections" in err
