"""``modelkit inspect PATH...``"""

from __future__ import annotations

import os
import sys

import click

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError
from ..ops.inspect import InspectResult, inspect
from ..paths import empty_folder_warning, iter_inputs
from ..tempfiles import abandoned_warning
from ._words import count
from .output import Output, human_bytes

#: A1111's AutoV1 hashes the 64 KiB at this offset; a file no longer than it gives the hash of no bytes.
AUTOV1_OFFSET = 0x100000
AUTOV1_NOTE = "not applicable: the file is no longer than 1 MiB, so AutoV1 (the 64 KiB at offset 1 MiB) hashes no bytes"


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "json_mode", is_flag=True, help="Print JSON (schema modelkit.inspect/1).")
@click.option("--keys", is_flag=True, help="List every tensor: name, dtype, shape.")
@click.option("--hashes", is_flag=True, help="Also compute sha256, AutoV2, AutoV3 and CRC32 (reads the whole file).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no chatter; results and errors stay.")
def inspect_cmd(paths: tuple[str, ...], json_mode: bool, keys: bool, hashes: bool, quiet: bool) -> None:
    """Show what model files hold, without running or loading them.

    A folder gives one line per model file inside it. Exit status: 0 ok, 1 a file was refused
    as unsafe, 2 a file could not be read.
    """
    out = Output(json_mode, quiet)
    rows: list[dict[str, object]] = []
    code = EXIT_OK
    for given in paths:
        is_dir = os.path.isdir(given)
        try:
            files = list(iter_inputs([given], lambda d: out.warn(empty_folder_warning(d)),
                                     on_stale=lambda p, n: out.warn(abandoned_warning(p, n))))
        except ModelkitError as exc:
            out.error(exc)
            rows.append({"path": given, **exc.to_dict()})
            code = EXIT_ERROR
            continue
        for f in files:
            try:
                res = inspect(f, keys=keys, hashes=hashes)
            except ModelkitError as exc:
                unsafe = isinstance(exc, UnsafeFileError)
                code = max(code, EXIT_FINDINGS if unsafe else EXIT_ERROR)
                rows.append({"path": f, **exc.to_dict()})
                if is_dir and not json_mode:
                    out.result(f"{f}  {'REFUSED' if unsafe else 'ERROR'}  {exc.problem}")
                else:
                    out.error(exc)
                continue
            row = res.to_dict()
            if "autov1" in res.hashes and res.size <= AUTOV1_OFFSET:
                row["hash_notes"] = {"autov1": AUTOV1_NOTE}
            rows.append(row)
            for w in res.warnings:
                out.warn(f"{f}: {w}")
            if is_dir:
                out.result(_one_line(res))
            else:
                _block(out, res)
    if json_mode:
        out.json({"schema": "modelkit.inspect/1", "files": rows})
    sys.exit(code)


def _what(r: InspectResult) -> str:
    d = r.detection or {}
    parts = [d.get("kind") or "unknown"]
    if d.get("subtype"):
        parts.append(str(d["subtype"]))
    if d.get("base"):
        parts.append(str(d["base"]))
    return " ".join(parts)


def _one_line(r: InspectResult) -> str:
    dts = ",".join(sorted(r.bytes_by_dtype)) or "-"
    return (f"{r.path}  {_what(r)}  {r.container}  {human_bytes(r.size)}  {count(r.tensor_count, 'tensor')}  "
            f"{count(r.parameter_count, 'param')}  {dts}")


def _block(out: Output, r: InspectResult) -> None:
    out.result(r.path)
    d = r.detection or {}
    variant = ", ".join(f"{k}={v}" for k, v in (d.get("variant") or {}).items() if v is not None)
    out.result(f"  type          {_what(r)}" + (f" ({variant})" if variant else "") +
             f"  [confidence {d.get('confidence', 'low')}]")
    for ev in (d.get("evidence") or [])[:6]:
        out.result(f"    evidence: {ev}")
    details = ", ".join(f"{k}={v}" for k, v in r.info.items() if isinstance(v, str))
    extra = f" ({details})" if details else ""
    out.result(f"  container     {r.container}{extra}")
    out.result(f"  size          {human_bytes(r.size)} ({r.size:,} bytes)")
    out.result(f"  tensors       {r.tensor_count:,}")
    out.result(f"  parameters    {r.parameter_count:,}")
    for i, (dt, n) in enumerate(sorted(r.bytes_by_dtype.items(), key=lambda kv: -kv[1])):
        out.result(f"  {'dtypes' if i == 0 else '':12}  {dt:<10} {human_bytes(n)}")
    for k, v in r.hashes.items():
        if k == "autov1" and r.size <= AUTOV1_OFFSET:
            continue  # the hash of no bytes, the same for every small file
        out.result(f"  {k:<12}  {v}")
    if r.quantization:
        out.result(f"  quantization  {r.quantization['text']}")
    if r.wrappers:
        out.result(f"  wrappers      {', '.join(r.wrappers)}")
    for group, info in r.junk.items():
        out.result(f"  junk          {group}: {count(info['tensors'], 'tensor')}, {human_bytes(info['bytes'])} (prune drops it)")
    for defect in r.defects:
        out.result(f"  defect        {defect}")
    if r.placeholders:
        out.result(f"  placeholders  {', '.join(r.placeholders)}")
    if r.metadata:
        out.result(f"  metadata      {count(len(r.metadata), 'entry', 'entries')}")
        for k, v in list(r.metadata.items())[:20]:
            out.result(f"    {k}: {_short(v)}")
    if r.extras:
        out.result(f"  extras        {count(len(r.extras), 'non-tensor value')}")
        for k, v in list(r.extras.items())[:20]:
            out.result(f"    {k}: {_short(v)}")
        if len(r.extras) > 20:
            out.result(f"    ... {len(r.extras) - 20} more (use --json)")
    if r.tensors is not None:
        width = max((len(t.name) for t in r.tensors), default=4)
        out.result("  keys")
        for t in r.tensors:
            view = "" if t.contiguous else "  (view)"
            if t.packed_shape is not None:
                view += f"  (stored as uint8 {list(t.packed_shape)})"
            out.result(f"    {t.name:<{width}}  {t.dtype:<9} {list(t.shape)}{view}")


def _short(v: object, limit: int = 100) -> str:
    s = str(v).replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."
