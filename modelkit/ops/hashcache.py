"""A cache of whole-file hashes, so a big model is read for its sha256 once, not once per command.

A1111 keeps its model hashes in ``cache.json`` for the same reason: hashing a 7 GB checkpoint
takes seconds, and ``modelkit hash``, ``convert``, ``prune`` and ``merge`` would each do it again
(the last three record the source's sha256 in the output's provenance).

An entry is keyed by the file's identity on disk: device, inode, size, mtime and ctime in
nanoseconds. Nobody can set a file's ctime (``touch`` and ``os.utime`` set it to *now*), so a file
rewritten or replaced in any way no longer matches. Two rules keep a stale hash out:

* the file's stat must be the same before and after it was hashed (it did not change meanwhile);
* its mtime and ctime must be older than the start of the hash by ``RACY_NS``: file times come
  from a coarse clock (a few ms on ext4, 2 s on FAT), so a change made in the same tick as an
  earlier one could leave the times as they were (git's "racily clean" problem). A file written
  in the last 3 seconds is simply not cached.

The cache is one JSON file (``hashes.json``) in ``$MODELKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/modelkit``, else ``~/.cache/modelkit``; ``MODELKIT_HASH_CACHE=0`` turns it off.
It is best effort: a missing, unreadable or corrupt cache is a miss, and a cache that cannot be
written is skipped without a word (the hash itself is still right). Writes are atomic
(``paths.write_text_atomic``); two processes writing at once can lose one entry, never corrupt the file.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ..paths import write_text_atomic

ENV_DIR = "MODELKIT_CACHE_DIR"
ENV_SWITCH = "MODELKIT_HASH_CACHE"
FILE = "hashes.json"
VERSION = 1
#: how much older than the start of a hash a file's mtime and ctime must be for it to be cached
RACY_NS = 3_000_000_000
#: entries kept; the oldest go first
MAX_ENTRIES = 2048


def cache_path() -> str | None:
    """Where the cache lives, or None when it is turned off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "no", "false"):
        return None
    base = os.environ.get(ENV_DIR)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg, "modelkit") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "modelkit")
    return os.path.join(base, FILE)


def identity(st: os.stat_result) -> dict[str, int]:
    """What must match for a cached hash to be used."""
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("entries"), dict):
        return {}
    entries: dict[str, Any] = doc["entries"]
    return entries


def lookup(st: os.stat_result, algos: tuple[str, ...] | list[str]) -> dict[str, str] | None:
    """The cached hashes of the file whose stat is ``st``, if every one of ``algos`` was cached."""
    path = cache_path()
    if path is None:
        return None
    try:
        entry = _load(path).get(_key(st))
        if not isinstance(entry, dict) or entry.get("id") != identity(st):
            return None
        hashes, done = entry.get("hashes"), entry.get("algos")
        if not isinstance(hashes, dict) or not isinstance(done, list) or \
                not all(isinstance(a, str) for a in done) or not set(algos) <= set(done):
            return None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
            return None
        return dict(hashes)
    except Exception:  # noqa: BLE001 - a cache is best effort: whatever is wrong with it is a miss
        return None


def store(file: str, before: os.stat_result, after: os.stat_result, started_ns: int,
          algos: tuple[str, ...] | list[str], hashes: dict[str, str], cache: str | None = None) -> bool:
    """Remember ``hashes`` (computed for ``algos``) of ``file``, if the two rules allow it.

    ``before``/``after``: the file's stat when the hash started and ended; ``started_ns``:
    ``time.time_ns()`` when it started; ``cache``: the ``cache_path()`` taken when the hash
    started (default: now). Returns whether an entry was written.
    """
    path = cache or cache_path()
    if path is None or identity(before) != identity(after):
        return False
    if max(before.st_mtime_ns, before.st_ctime_ns) >= started_ns - RACY_NS:
        return False
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        entries = _load(path)
        old = entries.get(_key(before))
        if isinstance(old, dict) and old.get("id") == identity(before) and isinstance(old.get("hashes"), dict) \
                and isinstance(old.get("algos"), list):
            hashes = {**old["hashes"], **hashes}
            algos = [*old["algos"], *algos]
        entries[_key(before)] = {"id": identity(before), "path": os.path.abspath(file),
                                 "algos": sorted({str(a) for a in algos}), "hashes": hashes, "used": time.time()}
        if len(entries) > MAX_ENTRIES:
            ranked = sorted(entries, key=lambda k: _used(entries[k]), reverse=True)
            entries = {k: entries[k] for k in ranked[:MAX_ENTRIES]}
        write_text_atomic(path, json.dumps({"version": VERSION, "entries": entries}))
    except Exception:  # noqa: BLE001 - best effort: a cache that cannot be written is skipped
        return False
    return True


def _used(entry: Any) -> float:
    used = entry.get("used") if isinstance(entry, dict) else None
    return float(used) if isinstance(used, float) and used == used else 0.0
