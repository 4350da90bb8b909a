"""Counts in words for human output: ``1 tensor``, ``2 tensors``."""

from __future__ import annotations


def count(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, plural unless ``n`` is 1 (``many`` when the plural is not ``word + "s"``).

    Example:
        >>> count(1, "tensor"), count(1143, "tensor"), count(2, "entry", "entries")
        ('1 tensor', '1,143 tensors', '2 entries')
    """
    return f"{n:,} {word if n == 1 else many or word + 's'}"
