"""``.npy`` and ``.npz`` files, without object arrays (those are pickles and are refused)."""

from __future__ import annotations

import ast
import struct
import zlib
from dataclasses import replace
from typing import Any

from .. import dtypes
from ..errors import FormatError, TruncatedFileError, UnsafeFileError
from ..model import ModelFile, Source, TensorRef
from .zipdir import ZipDirectory, ZipEntry, read_directory

NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 1 << 20


def parse_npy_header(path: str, head: bytes, where: str = "") -> tuple[dtypes.DType, str, tuple[int, ...], bool, int]:
    """Parse an .npy header from its first bytes.

    Returns:
        (dtype, byteorder "little"/"big", shape, fortran_order, header length in bytes).
    """
    label = f"{where}: " if where else ""
    if not head.startswith(NPY_MAGIC) or len(head) < 10:
        raise FormatError(path, f"{label}not an .npy array")
    major = head[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", head[8:10])
        start = 10
    elif major in (2, 3):
        if len(head) < 12:
            raise TruncatedFileError(path, f"{label}the .npy header is cut short")
        (hlen,) = struct.unpack("<I", head[8:12])
        start = 12
    else:
        raise FormatError(path, f"{label}unsupported .npy version {major}")
    if hlen > MAX_NPY_HEADER:
        raise FormatError(path, f"{label}the .npy header claims {hlen} bytes")
    if start + hlen > len(head):
        raise TruncatedFileError(path, f"{label}the .npy header is cut short")
    text = head[start : start + hlen].decode("latin1" if major < 3 else "utf-8", "replace")
    try:
        header = ast.literal_eval(text.strip())  # literals only: no names, no calls
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise FormatError(path, f"{label}the .npy header is not a valid dict literal") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise FormatError(path, f"{label}the .npy header needs exactly descr, fortran_order and shape")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str):
        raise UnsafeFileError(path, f"{label}structured or object arrays are refused (they can hold pickles)")
    if "O" in descr:
        raise UnsafeFileError(path, f"{label}object arrays are pickles and are refused")
    dt = dtypes.from_numpy_descr(descr)
    if dt is None:
        raise FormatError(path, f"{label}unsupported numpy dtype {descr!r}")
    if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape):
        raise FormatError(path, f"{label}the .npy shape is not a tuple of non-negative ints")
    return dt, "big" if descr[0] == ">" else "little", shape, bool(fortran), start + hlen


def _strides(shape: tuple[int, ...], fortran: bool) -> tuple[int, ...]:
    dims = list(shape) if fortran else list(reversed(shape))
    out, acc = [], 1
    for s in dims:
        out.append(acc)
        acc *= max(s, 1)
    return tuple(out) if fortran else tuple(reversed(out))


def _ref(name: str, src: Source, dt: dtypes.DType, order: str, shape: tuple[int, ...], fortran: bool,
         start: int, nbytes: int, compressed: Any = None) -> TensorRef:
    return TensorRef(name=name, dtype=dt, shape=shape, strides=_strides(shape, fortran), storage_offset=0,
                     storage_start=start, storage_nbytes=nbytes, storage_key=name, byteorder=order,
                     compressed=compressed, source=src)


def read_npy(path: str, src: Source) -> ModelFile:
    head = src.pread(min(src.size, MAX_NPY_HEADER + 16), 0)
    dt, order, shape, fortran, hend = parse_npy_header(path, head)
    numel = 1
    for s in shape:
        numel *= s
    if hend + numel * dt.itemsize > src.size:
        raise TruncatedFileError(path, f"the array needs {numel * dt.itemsize} bytes but the file has {src.size - hend}")
    t = _ref("array", src, dt, order, shape, fortran, hend, numel * dt.itemsize)
    return ModelFile(path=path, container="npy", size=src.size, tensors={"array": t}, key_paths={"array": ()},
                     source=src)


def _member_head(path: str, src: Source, e: ZipEntry) -> bytes:
    if e.method == 0:
        return src.pread(min(e.compressed_size, MAX_NPY_HEADER + 16), e.data_offset)
    if e.method == 8:
        d = zlib.decompressobj(-15)
        raw = src.pread(min(e.compressed_size, 4 << 20), e.data_offset)
        try:
            return d.decompress(raw, MAX_NPY_HEADER + 16)
        except zlib.error as exc:
            raise FormatError(path, f"member {e.name!r} is corrupt ({exc})") from None
    raise FormatError(path, f"member {e.name!r} uses compression method {e.method}")


def read_npz(path: str, src: Source, zd: ZipDirectory | None = None) -> ModelFile:
    zd = zd or read_directory(path, src)
    tensors: dict[str, TensorRef] = {}
    for e in zd.entries:
        if not e.name.endswith(".npy"):
            raise FormatError(path, f"member {e.name!r} of an .npz archive is not an .npy array")
        if e.encrypted:
            raise FormatError(path, f"member {e.name!r} is encrypted")
        dt, order, shape, fortran, hend = parse_npy_header(path, _member_head(path, src, e), e.name)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dt.itemsize
        if hend + nbytes > e.size:
            raise TruncatedFileError(path, f"member {e.name!r} is shorter than its array")
        name = e.name[:-4]
        if name in tensors:
            raise FormatError(path, f"the archive holds {name!r} twice")
        if e.method == 0:
            tensors[name] = _ref(name, src, dt, order, shape, fortran, e.data_offset + hend, nbytes)
        else:
            # Deflated: the tensor is read by inflating the member; it starts ``hend`` bytes in.
            if hend % dt.itemsize:
                raise FormatError(path, f"member {e.name!r}: its header length is not a multiple of the item size")
            t = _ref(name, src, dt, order, shape, fortran, e.data_offset, e.size, (e.data_offset, e.compressed_size, e.size, e.crc))
            tensors[name] = replace(t, storage_offset=hend // dt.itemsize)
    return ModelFile(path=path, container="npz", size=src.size, tensors=tensors,
                     key_paths={k: (k,) for k in tensors}, source=src)

