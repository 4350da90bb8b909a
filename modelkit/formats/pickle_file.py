"""Plain pickles of tensors or numpy arrays (``pickle.dump(state_dict, f)``).

A tensor in a plain pickle carries its storage as a nested legacy ``torch.save`` stream inside
``torch.storage._load_from_bytes(b"...")``; a numpy array carries its raw bytes in its BUILD
state. Both are byte ranges of this file, so tensors are still read lazily by offset.
"""

from __future__ import annotations

import mmap
from typing import Any

from ..errors import FormatError, UnsafeFileError
from ..model import ModelFile, Source
from .flatten import assemble, flatten
from .pickle_vm import PickleError
from .probe import probe, probe_chain, tail
from .torch_legacy import magic_kind
from .unpickler import StorageRef, make_policy, reader_error, refuse, run_pickle


def read_pickle(path: str, src: Source) -> ModelFile:
    """Open a plain pickle (the caller owns ``src``)."""
    with mmap.mmap(src.fd, 0, access=mmap.ACCESS_READ) as mm:
        first = probe(mm)
        kind = magic_kind(first.value) if first.is_pickle and not first.refused and not first.unsafe else "no"
        if kind == "exact":  # a legacy torch stream, whatever protocol spells its magic
            from .torch_legacy import read_torch_legacy

            return read_torch_legacy(path, src)
        if kind == "maybe":
            raise UnsafeFileError(path, "refused to load: torch could take its first pickle "
                                        f"({type(first.value).__name__}) for the legacy magic number and read on "
                                        "as a torch stream")
        try:
            root, end = run_pickle(mm, make_policy(refuse(path), None))
        except PickleError as exc:
            raise reader_error(path, exc, "the pickle") from None
        refuse_trailing(path, mm, end)
    flat = flatten(path, root)

    def locate(ref: StorageRef) -> tuple[int, int, Any]:
        if ref.file_offset is None or ref.nbytes is None:
            raise FormatError(path, f"storage {ref.key!r} has no data in this file")
        return ref.file_offset, ref.nbytes, None

    return assemble(path, "pickle", src, flat, locate, info={"trailing_bytes": src.size - end})


def refuse_trailing(path: str, data: Any, end: int) -> None:
    """Pickles concatenated after the first one run in loaders that call ``pickle.load`` in a
    loop; refuse the file when one of them reaches a global outside the allow-list."""
    if end >= len(data):
        return
    for p in probe_chain(tail(data, end), end):
        if p.dangerous:
            module, name, off = p.dangerous[0]
            if module == "<call>":
                raise UnsafeFileError(path, f"refused to load: a pickle after the first one at byte {off}: {name}")
            raise UnsafeFileError(path, f"refused to load: a pickle after the first one names {module}.{name} "
                                        f"(at byte {off})", global_name=f"{module}.{name}")
