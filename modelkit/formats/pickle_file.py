"""Plain pickles of tensors or numpy arrays (``pickle.dump(state_dict, f)``).

A tensor in a plain pickle carries its storage as a nested legacy ``torch.save`` stream inside
``torch.storage._load_from_bytes(b"...")``; a numpy array carries its raw bytes in its BUILD
state. Both are byte ranges of this file, so tensors are still read lazily by offset.
"""

from __future__ import annotations

import mmap
from typing import Any

from ..errors import FormatError, TruncatedFileError
from ..model import ModelFile, Source
from .flatten import assemble, flatten
from .pickle_vm import PickleError
from .unpickler import StorageRef, make_policy, refuse, run_pickle


def read_pickle(path: str, src: Source) -> ModelFile:
    """Open a plain pickle (the caller owns ``src``)."""
    with mmap.mmap(src.fd, 0, access=mmap.ACCESS_READ) as mm:
        try:
            root, end = run_pickle(mm, make_policy(refuse(path), None))
        except PickleError as exc:
            cls = TruncatedFileError if exc.kind == "truncated" else FormatError
            raise cls(path, f"the pickle is corrupt at byte {exc.offset}: {exc}") from None
    flat = flatten(path, root)

    def locate(ref: StorageRef) -> tuple[int, int, Any]:
        if ref.file_offset is None or ref.nbytes is None:
            raise FormatError(path, f"storage {ref.key!r} has no data in this file")
        return ref.file_offset, ref.nbytes, None

    return assemble(path, "pickle", src, flat, locate, info={"trailing_bytes": src.size - end})
