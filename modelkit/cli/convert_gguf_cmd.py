"""``modelkit convert --to gguf``: a denoiser as the GGUF file ComfyUI-GGUF loads."""

from __future__ import annotations

import os

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError, UsageError
from ..paths import signals_raise
from ._words import count
from .output import Output, human_bytes


def default_target(src: str, quant: str, out_dir: str | None) -> str:
    """``STEM-QUANT.gguf`` beside the input (or in ``out_dir``), as GGUF files are usually named."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(src)))[0]
    folder = out_dir if out_dir is not None else os.path.dirname(os.path.abspath(src))
    return os.path.join(folder, f"{stem}-{quant.upper()}.gguf")


def run_gguf(out: Output, paths: tuple[str, ...], o: str | None, out_dir: str | None, quant: str,
             base: str | None, force: bool, dry_run: bool, ignore_scan: bool) -> int:
    """Write each input's denoiser as GGUF and render it; the exit code."""
    from ..ops.gguf_ops import check_quant, to_gguf

    rows = []
    code = EXIT_OK
    try:
        q = check_quant(quant)
        if o is not None and len(paths) != 1:
            raise UsageError(None, f"-o names one output, and there are {len(paths)} inputs", "Use --out-dir")
    except ModelkitError as exc:
        out.fail(exc, "modelkit.convert/1")
        return EXIT_ERROR
    for src in paths:
        target = o if o is not None else default_target(src, q, out_dir)
        try:
            with signals_raise():
                r = to_gguf(src, target, quant=q, base=base, force=force, dry_run=dry_run, ignore_scan=ignore_scan)
        except ModelkitError as exc:
            code = max(code, EXIT_FINDINGS if isinstance(exc, UnsafeFileError) else EXIT_ERROR)
            rows.append({"source": src, "output": target, "status": "error", **exc.to_dict()})
            out.error(exc)
            continue
        rows.append(r.to_dict())
        verb = "would write" if r.status == "dry-run" else "wrote"
        out.result(f"{r.source} -> {r.output}  ({verb} the {r.arch} denoiser as GGUF {r.quant}, "
                   f"{count(r.tensors, 'tensor')}, {human_bytes(r.size)})")
        out.line(f"  {count(r.quantized, 'tensor')} quantized, {r.tensors - r.quantized} at full precision")
        if r.left_out:
            out.line(f"  {count(r.left_out, 'tensor')} of other components left out (a GGUF file holds the "
                     "denoiser; prune --part vae/te keeps the others)")
    if out.json_mode:
        out.json({"schema": "modelkit.convert/1", "files": rows})
    return code
