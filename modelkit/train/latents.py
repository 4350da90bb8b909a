"""Latent caching: each image is encoded by the VAE once, and its latent distribution kept on disk.

An entry is one ``.safetensors`` file (``mean`` and ``std`` of the VAE's diagonal Gaussian, written
by the core's atomic writer) named ``<image>.<n|f>.<key>.safetensors``: ``<image>`` is a hash of the
image's absolute path, ``n``/``f`` the orientation (``f``: flipped, cached only with
``dataset.flip``), and ``<key>`` a hash of everything the latents depend on: the path, the file's
size and mtime, the bucket (which fixes the resize and the crop), the flip and the VAE (its config,
dtype and every weight byte). A changed image, bucket or VAE gives another key: the entry is
encoded again and the stale file of that image and orientation is removed. The key is also in the
file's metadata and checked before an entry is reused.

The latents themselves are drawn at every step from the cached distribution with the step's own
generator, exactly as without a cache, so caching changes nothing but the time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, ModelkitError
from .export import save_tensors

LAYOUT = "modelkit-latents/1"
#: The default cache folder, inside ``output.dir``.
FOLDER = ".modelkit-latents"


def cache_folder(config: Any) -> str:
    """``dataset.cache_dir``, or ``<output.dir>/.modelkit-latents``."""
    return str(config.dataset.cache_dir or os.path.join(config.output.dir, FOLDER))


def vae_identity(vae: Any) -> str:
    """A hash of the VAE's config, dtype and weights: latents made by another VAE never match."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    # Private entries are bookkeeping, not the model: diffusers' ``_use_default_values`` is a list
    # built from a set, in a different order in every process, which made every run re-encode.
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode(vae: Any, pixels: Any) -> tuple[Any, Any]:
    """``(mean, std)`` of the VAE's latent distribution for ``[B, 3, H, W]`` pixels (unscaled)."""
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.std


@dataclass(frozen=True)
class CacheStats:
    """What ``LatentCache.build`` did."""

    built: int
    reused: int
    removed: int


class LatentCache:
    """The cache of one VAE in one folder.

    Args:
        folder: where the entries live (created when needed).
        vae_id: ``vae_identity`` of the VAE that encodes.
    """

    def __init__(self, folder: str, vae_id: str):
        self.folder = folder
        self.vae_id = vae_id

    def entry(self, item: Any, flip: bool) -> tuple[str, str]:
        """``(file, key)`` of an item's entry; the key changes with the image file, bucket, flip or VAE."""
        path = os.path.abspath(item.path)
        st = os.stat(path)
        fields = {"layout": LAYOUT, "image": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                  "bucket": list(item.bucket), "flip": bool(flip), "vae": self.vae_id}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
        stem = hashlib.sha256(path.encode()).hexdigest()[:16]
        return os.path.join(self.folder, f"{stem}.{'f' if flip else 'n'}.{key}.safetensors"), key

    def _valid(self, file: str, key: str) -> bool:
        from .. import open_model

        if not os.path.isfile(file):
            return False
        try:
            with open_model(file) as mf:
                return mf.metadata.get("modelkit.latents.key") == key and set(mf) == {"mean", "std"}
        except (ModelkitError, OSError):  # unreadable or not ours: encode again
            return False

    def build(self, items: Iterable[Any], flips: bool, vae: Any,
              autocast: Callable[[], Any] = contextlib.nullcontext,
              on_entry: Callable[[int, int], None] | None = None) -> CacheStats:
        """Encode every item (both orientations with ``flips``) whose entry is missing or stale.

        Args:
            items: dataset ``Item``s (duplicates are cached once).
            flips: cache the flipped image too.
            vae: the VAE, on its training device and dtype.
            autocast: the training's autocast context, so cached latents equal uncached ones.
            on_entry: ``(done, total)`` after each entry.

        Returns:
            How many entries were built, reused, and stale files removed.

        Raises:
            OutputWriteError: the cache folder cannot be written.
        """
        from .data import load_pixels

        os.makedirs(self.folder, exist_ok=True)
        todo = sorted({(os.path.abspath(i.path), f): i for i in items for f in ((False, True) if flips else (False,))}.items())
        built = reused = removed = 0
        for done, ((_, flip), item) in enumerate(todo, 1):
            file, key = self.entry(item, flip)
            if self._valid(file, key):
                reused += 1
            else:
                pixels, crop = load_pixels(item, flip)
                with autocast():
                    mean, std = encode(vae, pixels[None])
                meta = {"modelkit.layout": LAYOUT, "modelkit.latents.key": key, "image": os.path.abspath(item.path),
                        "bucket": f"{item.bucket[0]}x{item.bucket[1]}", "flip": str(flip), "crop_top": str(crop[0]),
                        "crop_left": str(crop[1]), "vae": self.vae_id}
                save_tensors(file, {"mean": mean[0], "std": std[0]}, meta, force=True)
                built += 1
                removed += self._remove_stale(file)
            if on_entry is not None:
                on_entry(done, len(todo))
        return CacheStats(built, reused, removed)

    def _remove_stale(self, current: str) -> int:
        """Delete the other entries of the same image and orientation (an older key)."""
        name = os.path.basename(current)
        prefix = name.rsplit(".", 2)[0] + "."  # "<stem>.<n|f>."
        count = 0
        for other in os.listdir(self.folder):
            if other != name and other.startswith(prefix) and other.endswith(".safetensors"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, other))
                    count += 1
        return count

    def load(self, item: Any, flip: bool) -> tuple[Any, Any, tuple[int, int]]:
        """``(mean, std, (crop_top, crop_left))`` of a built entry, on the CPU.

        Raises:
            FormatError: the entry is missing or stale (the image changed after the cache was built).
        """
        from .. import load, open_model

        file, key = self.entry(item, flip)
        try:
            with open_model(file) as mf:
                meta = dict(mf.metadata)
        except (ModelkitError, OSError) as exc:
            raise FormatError(item.path, f"has no latent cache entry ({exc})",
                              "The image changed during training; run again to rebuild the cache") from None
        if meta.get("modelkit.latents.key") != key:
            raise FormatError(file, f"is a stale latent cache entry of {item.path}", "Run again to rebuild the cache")
        tensors = load(file)
        return tensors["mean"], tensors["std"], (int(meta["crop_top"]), int(meta["crop_left"]))


__all__ = ["FOLDER", "LAYOUT", "CacheStats", "LatentCache", "cache_folder", "encode", "vae_identity"]
