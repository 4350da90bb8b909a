"""``modelkit convert IN... [-o OUT | --out-dir DIR]`` (and the batch runner ``prune`` shares)."""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import click

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError, UsageError
from ..ops.convert import ConvertResult, Progress, convert, run_many
from ..paths import empty_folder_warning, plan_outputs, signals_raise
from ._words import count
from .output import Output, human_bytes

Job = Callable[[str, str, Progress], Any]


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options convert and prune share."""
    for opt in reversed([
        click.argument("paths", nargs=-1, required=True, type=click.Path()),
        click.option("-o", "--output", "out", type=click.Path(),
                     help="Output file for one input file; for one input folder, the output folder (as --out-dir)."),
        click.option("--out-dir", type=click.Path(), help="Output folder; a folder input keeps its layout under it."),
        click.option("--force", is_flag=True, help="Replace an existing output (never the input)."),
        click.option("--dry-run", is_flag=True, help="Say what would be written; write nothing."),
        click.option("--ignore-scan", is_flag=True,
                     help="Read a file the scan calls unsafe anyway (still only through the allow-list)."),
        click.option("-j", "--jobs", type=int, default=1, show_default=True, help="Files processed at once."),
        click.option("--json", "json_mode", is_flag=True, help="Print JSON."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no chatter; results and errors stay."),
    ]):
        fn = opt(fn)
    return fn


@click.command("convert")
@common_options
@click.option("--to", "to", type=click.Choice(["single", "diffusers", "gguf"]),
              help="Between layouts: a diffusers folder -> one LDM .safetensors (single), or back (diffusers); "
                   "gguf: the denoiser as a GGUF file ComfyUI-GGUF loads.")
@click.option("--part", type=click.Choice(["unet", "vae", "te", "te2", "transformer", "clip_l", "clip_g", "t5xxl"]),
              help="With --to: one component only (te2: SDXL's second text encoder; Flux/SD3: transformer, "
                   "clip_l, clip_g, t5xxl).")
@click.option("--configs", "configs", type=click.Path(),
              help="With --to diffusers: a diffusers folder whose */config.json to use instead of the shipped ones.")
@click.option("--prediction", type=click.Choice(["eps", "v"]),
              help="With --to diffusers: the prediction type (SD2 files that do not say need it).")
@click.option("--quant", default="Q8_0", show_default=True,
              help="With --to gguf: Q8_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K, Q5_1, Q5_0, Q4_1, Q4_0, BF16, F16 or F32.")
@click.option("--base", type=click.Choice(["sd1", "sd2", "sdxl", "sd3", "flux"]),
              help="With --to gguf: the model family, where detection cannot tell.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]),
              help="For GGUF input: the float type its tensors are dequantized to (default fp16).")
def convert_cmd(paths: tuple[str, ...], out: str | None, out_dir: str | None, force: bool, dry_run: bool,
                ignore_scan: bool, jobs: int, json_mode: bool, quiet: bool, to: str | None, part: str | None,
                configs: str | None, prediction: str | None, quant: str, base: str | None,
                dtype: str | None) -> None:
    """Convert model files to .safetensors, type-aware and bit-exact.

    Embeddings become A1111's emb_params layout, hypernetworks keep their keys plus their
    structure in the metadata, checkpoints lose their state_dict wrapper. A file the scan calls
    unsafe is refused. Sidecars (.preview.png, .json, .civitai.info, .txt) are copied along.
    With --to single a diffusers folder becomes one LDM file (the keys A1111 and ComfyUI load);
    with --to diffusers an SD1/SD2/SDXL/SD3/Flux file becomes a diffusers folder; with --to gguf a
    denoiser becomes a GGUF file (--quant). A .gguf input is dequantized (--dtype).
    Exit status: 0 ok, 1 a file was refused as unsafe, 2 a file could not be converted.
    """
    out_ = Output(json_mode, quiet)
    if to == "gguf":
        from .convert_gguf_cmd import run_gguf

        if part or configs or prediction or dtype:
            out_.fail(UsageError(None, "--to gguf goes with --quant and --base only"), "modelkit.convert/1")
            sys.exit(EXIT_ERROR)
        sys.exit(run_gguf(out_, paths, out, out_dir, quant, base, force, dry_run, ignore_scan))
    if base is not None:
        out_.fail(UsageError(None, "--base goes with --to gguf"), "modelkit.convert/1")
        sys.exit(EXIT_ERROR)
    if to is not None or part is not None or configs is not None or prediction is not None:
        from .convert_layout_cmd import run_layout

        sys.exit(run_layout(out_, paths, out, out_dir, to, part, configs, prediction, force, dry_run, ignore_scan))

    def job(src: str, target: str, progress: Progress) -> ConvertResult:
        return convert(src, target, force=force, dry_run=dry_run, ignore_scan=ignore_scan, progress=progress,
                       dtype=dtype)

    sys.exit(run_command(out_, "convert", paths, out, out_dir, "", jobs, job, render_convert))


def render_convert(out: Output, r: Any) -> None:
    verb = "would write" if r.status == "dry-run" else "wrote"
    out.result(f"{r.source} -> {r.output}  ({verb} {r.kind}, {count(r.tensors, 'tensor')}, {human_bytes(r.size)})")
    for c in r.changes:
        out.line(f"  {c}")
    for s in r.sidecars:
        out.line(f"  sidecar {s}")


def run_command(out: Output, schema: str, paths: Sequence[str], o: str | None, out_dir: str | None, tag: str,
                jobs: int, job: Job, render: Callable[[Output, Any], None], whole_folders: bool = False) -> int:
    """Plan outputs, run ``job`` over them (``jobs`` at a time, with a progress bar), render; the exit code.

    With ``whole_folders`` a diffusers pipeline folder is one input (one output file), not walked."""
    try:
        if jobs < 1:
            raise UsageError(None, f"-j/--jobs must be 1 or more, not {jobs}")
        whole = [p for p in paths if whole_folders and os.path.isfile(os.path.join(p, "model_index.json"))]
        if not whole:
            _check_folder_output(paths, o)
        pairs = _whole_folder_outputs(paths, whole, o, out_dir, tag) if whole else \
            plan_outputs(paths, o, out_dir, tag, lambda d: out.warn(empty_folder_warning(d)))
    except ModelkitError as exc:
        out.fail(exc, f"modelkit.{schema}/1")
        return EXIT_ERROR
    explicit = {os.path.abspath(p) for p in paths if not os.path.isdir(p)}
    rows: list[dict[str, Any]] = [{} for _ in pairs]
    todo: list[int] = []
    for i, (src, target) in enumerate(pairs):
        if os.path.abspath(src) not in explicit and os.path.abspath(src) == os.path.abspath(target):
            rows[i] = {"source": src, "output": target, "status": "skipped", "reason": "already .safetensors"}
            out.result(f"{src}  skipped (already .safetensors; use --out-dir to rewrite it)")
        else:
            todo.append(i)
    code = EXIT_OK

    def done(k: int, res: Any) -> None:
        nonlocal code
        i = todo[k]
        src, target = pairs[i]
        if isinstance(res, ModelkitError):
            code = max(code, EXIT_FINDINGS if isinstance(res, UnsafeFileError) else EXIT_ERROR)
            rows[i] = {"source": src, "output": target, "status": "refused" if isinstance(res, UnsafeFileError)
                       else "error", **res.to_dict()}
            out.error(res)
            return
        rows[i] = res.to_dict()
        for w in res.warnings:
            out.warn(f"{src}: {w}")
        render(out, res)

    # Ctrl-C and SIGTERM go up to ``cli.main.main``: one line, exit 130 or 143.
    _run_with_progress(out, [pairs[i] for i in todo], job, jobs, done)
    if out.json_mode:
        out.json({"schema": f"modelkit.{schema}/1", "files": rows})
    return code


def _whole_folder_outputs(paths: Sequence[str], whole: Sequence[str], o: str | None, out_dir: str | None,
                          tag: str) -> list[tuple[str, str]]:
    """Outputs when some inputs are diffusers pipeline folders (each one input, as a file is).

    Raises:
        UsageError: ``-o`` with several inputs, or other folders beside them.
    """
    from ..paths import output_name

    if len(paths) != len(whole):
        raise UsageError(None, "diffusers pipeline folders cannot be mixed with other inputs in one run",
                         "Run the folders and the files separately")
    if o is not None and len(paths) != 1:
        raise UsageError(None, f"one output name for {len(paths)} inputs", "Use --out-dir for several inputs")
    pairs = []
    for p in paths:
        name = output_name(os.path.normpath(p), tag)
        folder = out_dir if out_dir is not None else os.path.dirname(os.path.abspath(os.path.normpath(p)))
        pairs.append((p, o if o is not None else os.path.join(folder, name)))
    return pairs


def _check_folder_output(paths: Sequence[str], o: str | None) -> None:
    """With one folder input ``-o`` names the output folder: refuse a name that reads as a file.

    Raises:
        UsageError: ``-o`` ends in ``.safetensors`` and is not an existing folder.
    """
    if o is None or len(paths) != 1 or not os.path.isdir(paths[0]) or os.path.isdir(o):
        return
    if o.lower().endswith(".safetensors"):
        raise UsageError(None, f"-o {o} names a file, but the input {paths[0]} is a folder and each of its "
                               "model files gets its own output",
                         "Give an output folder with --out-dir DIR, or one input file to write one .safetensors")


def _run_with_progress(out: Output, pairs: list[tuple[str, str]], job: Job, jobs: int,
                       done: Callable[[int, Any], None]) -> None:
    """Run the batch in a thread; the main thread draws the bar, renders results and takes Ctrl-C/SIGTERM.

    The bar counts bytes against the inputs' total size: each tensor as it is written, and at the
    end of a file whatever of its size the tensors did not cover (dropped or cast tensors, headers).
    """
    events: queue.Queue[tuple[Any, ...]] = queue.Queue()
    stop = threading.Event()
    sizes = [_size(src, out.bars_on()) for src, _ in pairs]
    index = {src: i for i, (src, _) in enumerate(pairs)}

    def counted(src: str, target: str, progress: Progress) -> Any:
        i = index[src]

        def tick(name: str, n: int) -> None:
            progress(name, n)  # raises once the batch is stopped
            events.put(("bytes", i, n))

        return job(src, target, tick)

    def work() -> None:
        try:
            run_many(pairs, counted, jobs=jobs, stop=stop, on_done=lambda i, r: events.put(("done", i, r)))
            events.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            events.put(("end", exc))

    worker = threading.Thread(target=work, name="modelkit-batch", daemon=True)
    desc = os.path.basename(pairs[0][0]) if len(pairs) == 1 else f"{len(pairs)} files"
    shown_bytes = [0] * len(pairs)
    with signals_raise():
        bar = out.bar(sum(sizes), desc)

        def advance(i: int, n: int) -> None:
            n = max(0, min(n, sizes[i] - shown_bytes[i]))
            shown_bytes[i] += n
            if bar is not None and n:
                bar.update(n)

        worker.start()
        try:
            while True:
                try:
                    ev = events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if ev[0] == "end":
                    if ev[1] is not None:
                        raise ev[1]
                    return
                if ev[0] == "bytes":
                    advance(ev[1], ev[2])
                elif ev[0] == "done":
                    advance(ev[1], sizes[ev[1]])
                    done(ev[1], ev[2])
        except KeyboardInterrupt:
            stop.set()
            worker.join()
            raise
        finally:
            if bar is not None:
                bar.close()


def _size(path: str, bars: bool = False) -> int:
    """The bytes a bar counts for ``path``: its size; for a URL (asked only when bars are drawn: one small
    request), twice its size, downloaded and then written."""
    from ..remote import is_remote

    if is_remote(path):
        from ..remote.download import remote_size

        return 2 * remote_size(path) if bars else 0
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
