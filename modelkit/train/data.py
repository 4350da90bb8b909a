"""The dataset: images with same-name captions, kohya repeat folders, aspect-ratio buckets.

* ``scan`` walks the folder once (no symlinks, no hidden files), opens every image and keeps those
  that are usable; a corrupt, truncated, tiny, CMYK or transparent image is reported and skipped.
* A folder named ``N_name`` (kohya's convention) repeats its images ``N`` times per epoch.
* Each image goes to the bucket (width x height, multiples of ``bucket_step``, area at most
  ``resolution``²) whose aspect ratio is closest to its own; batches never mix buckets.
* Data order is a pure function of ``(seed, epoch)``, and caption shuffling, tag dropout and flips
  of ``(seed, step, slot)``: a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import DatasetConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    """One usable image."""

    path: str
    caption: str
    repeats: int
    size: tuple[int, int]
    bucket: tuple[int, int]
    #: ``dataset.masked_loss``: ``""`` (no mask), ``"alpha"`` (the image's alpha) or a ``NAME.mask.png`` path.
    mask: str = ""


@dataclass(frozen=True)
class Skipped:
    """An image left out, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Dataset:
    """The scanned dataset: usable items, skipped images, and the tag frequency (for ``ss_tag_frequency``)."""

    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)

    def batches(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The batches of one epoch as item indices (with repeats); same answer for the same arguments."""
        rng = random.Random(seed * 1_000_003 + epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.items):
            groups.setdefault(item.bucket, []).extend([i] * item.repeats)
        out: list[list[int]] = []
        for bucket in sorted(groups):
            members = groups[bucket]
            rng.shuffle(members)
            out.extend(members[k : k + batch_size] for k in range(0, len(members), batch_size))
        rng.shuffle(out)
        return out


def make_buckets(resolution: int, step: int, smallest: int, largest: int) -> list[tuple[int, int]]:
    """Every ``(width, height)`` bucket: sides multiples of ``step`` in ``[smallest, largest]``, area <= resolution².

    For each width the tallest fitting height is taken, so every bucket is as large as allowed.
    """
    area = resolution * resolution
    found = set()
    w = max(step, smallest - smallest % step)
    while w <= largest:
        h = min(largest, (area // w) // step * step)
        if h >= smallest and h >= step:
            found.add((w, h))
            found.add((h, w))
        w += step
    found.add((resolution, resolution))
    return sorted(b for b in found if b[0] * b[1] <= area)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to ``size``; the larger one on a tie."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def scan(cfg: DatasetConfig, on_skip: Callable[[Skipped], None] | None = None) -> Dataset:
    """Walk ``cfg.path`` and keep the usable images.

    Args:
        cfg: the ``[dataset]`` section.
        on_skip: called for each skipped image (the CLI prints them as warnings).

    Returns:
        The dataset, items in sorted path order.

    Raises:
        ConfigError: the folder does not exist or holds no usable image.
    """
    from ..errors import ConfigError

    if not os.path.isdir(cfg.path):
        raise ConfigError(cfg.path, "key dataset.path: no such folder")
    buckets = make_buckets(cfg.resolution, cfg.bucket_step, cfg.min_bucket, cfg.max_bucket) if cfg.bucketing \
        else [(cfg.resolution, cfg.resolution)]
    ds = Dataset([])
    for path, repeats, group in _walk(cfg.path, cfg.repeats):
        size, problem, transparent = inspect_image(path, cfg.min_image_size, allow_alpha=cfg.masked_loss)
        mask = ""
        if problem is None and cfg.masked_loss:
            mask, problem = _find_mask(path, transparent)
        if problem is not None or size is None:
            skip = Skipped(path, problem or "unreadable")
            ds.skipped.append(skip)
            if on_skip is not None:
                on_skip(skip)
            continue
        caption = read_caption(path, cfg.caption_extensions) or cfg.default_caption
        ds.items.append(Item(path, caption, repeats, size, nearest_bucket(size, buckets), mask))
        freq = ds.tag_frequency.setdefault(group, {})
        for tag in split_tags(caption):
            freq[tag] = freq.get(tag, 0) + 1
    if not ds.items:
        raise ConfigError(cfg.path, f"key dataset.path: no usable image ({len(ds.skipped)} skipped)",
                          f"Put {', '.join(IMAGE_EXTENSIONS)} images there, with .txt/.caption captions")
    return ds


def _walk(root: str, default_repeats: int) -> list[tuple[str, int, str]]:
    """(image path, repeats, group name) for every image under ``root``, sorted; ``NAME.mask.png``
    beside an image ``NAME.*`` is that image's loss mask, not an image of its own."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, root)
        top = rel.split(os.sep)[0] if rel != "." else ""
        m = _REPEAT_DIR.match(top)
        repeats, group = (int(m.group(1)), m.group(2)) if m else (default_repeats, top or ".")
        for name in sorted(files):
            full = os.path.join(folder, name)
            if name.startswith(".") or os.path.islink(full) or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            if name.lower().endswith(MASK_SUFFIX) and any(
                    name[: -len(MASK_SUFFIX)] + ext in files for ext in _ALL_EXTENSIONS):
                continue
            if repeats > 0:
                out.append((full, repeats, group))
    return out


def check_image(path: str, min_size: int) -> tuple[tuple[int, int] | None, str | None]:
    """``(size, None)`` for a usable image, ``(None, reason)`` otherwise. Never raises for bad content."""
    size, problem, _ = inspect_image(path, min_size)
    return size, problem


#: The mask file of ``NAME.png`` (any image extension) is ``NAME.mask.png``.
MASK_SUFFIX = ".mask.png"
_ALL_EXTENSIONS = IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)


def _find_mask(path: str, transparent: bool) -> tuple[str, str | None]:
    """``(mask source, problem)``: ``NAME.mask.png`` beside the image, else ``"alpha"`` for a
    transparent image, else ``""`` (the whole image counts)."""
    from PIL import Image, UnidentifiedImageError

    file = os.path.splitext(path)[0] + MASK_SUFFIX
    if os.path.isfile(file) and not os.path.islink(file):
        try:
            with Image.open(file) as im:
                im.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            return "", f"its mask {os.path.basename(file)} is unreadable ({type(exc).__name__}: {exc})"
        return file, None
    return ("alpha" if transparent else ""), None


def _transparent(im: Any) -> bool:
    """Whether any pixel of an image with an alpha channel (or palette transparency) is not opaque."""
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        alpha = im.convert("RGBA").getchannel("A")
        low, _ = alpha.getextrema()
        return bool(low < 255)
    return False


def inspect_image(path: str, min_size: int, allow_alpha: bool = False) -> tuple[tuple[int, int] | None, str | None, bool]:
    """``(size, None, transparent)`` for a usable image, ``(None, reason, False)`` otherwise; never
    raises for bad content. A fully opaque alpha channel is ignored (the image is simply RGB); a
    transparent image is usable only with ``allow_alpha`` (``dataset.masked_loss``)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                transparent = _transparent(im)
                im = ImageOps.exif_transpose(im)
                size = (int(im.width), int(im.height))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        return None, f"corrupt or unreadable image ({type(exc).__name__}: {exc})", False
    if mode == "CMYK":
        return None, "CMYK image; save it as RGB", False
    if transparent and not allow_alpha:
        return None, ("image has an alpha channel (transparency); flatten it onto a background, or set "
                      "dataset.masked_loss = true to use it as the loss mask"), False
    if mode not in ("RGB", "L", "P", "1", "RGBA", "LA", "PA", "La", "RGBa"):
        return None, f"unsupported image mode {mode}; save it as 8-bit RGB", False
    if min(size) < min_size:
        return None, f"image is {size[0]}x{size[1]}, smaller than dataset.min_image_size={min_size}", False
    return size, None, transparent


def read_caption(image: str, extensions: Sequence[str]) -> str:
    """The first caption file beside ``image`` (``x.png`` -> ``x.txt``/``x.caption``), stripped; ``""`` if none."""
    stem = os.path.splitext(image)[0]
    for ext in extensions:
        cap = stem + (ext if ext.startswith(".") else "." + ext)
        if os.path.isfile(cap):
            with open(cap, encoding="utf-8", errors="replace") as f:
                return " ".join(f.read().split())
    return ""


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empties dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def process_caption(caption: str, cfg: DatasetConfig, rng: random.Random) -> str:
    """Apply caption dropout, tag shuffle (after the first ``keep_tokens`` tags) and tag dropout."""
    if cfg.caption_dropout and rng.random() < cfg.caption_dropout:
        return ""
    if not (cfg.shuffle_tags or cfg.tag_dropout):
        return caption
    tags = split_tags(caption)
    kept, rest = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
    if cfg.shuffle_tags:
        rng.shuffle(rest)
    if cfg.tag_dropout:
        rest = [t for t in rest if rng.random() >= cfg.tag_dropout]
    return ", ".join(kept + rest)


def load_pixels(item: Item, flip: bool = False) -> tuple[Any, tuple[int, int]]:
    """The image resized to cover its bucket and centre-cropped, as a ``[3, H, W]`` tensor in [-1, 1].

    Returns:
        ``(tensor, (crop_top, crop_left))`` in bucket pixels (SDXL conditions on the crop).
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(item.path) as raw:
        im = ImageOps.exif_transpose(raw).convert("RGB")
    im, crop = _fit(im, item.bucket, flip)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), crop


def _fit(im: Any, bucket: tuple[int, int], flip: bool) -> tuple[Any, tuple[int, int]]:
    """Resize to cover the bucket, centre-crop, flip: ``(image, (crop_top, crop_left))``."""
    from PIL import Image

    bw, bh = bucket
    scale = max(bw / im.width, bh / im.height)
    rw, rh = max(bw, round(im.width * scale)), max(bh, round(im.height * scale))
    im = im.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    im = im.crop((left, top, left + bw, top + bh))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im, (top, left)


def load_mask(item: Item, flip: bool = False) -> Any:
    """The loss mask of an item as a ``[1, H, W]`` tensor in [0, 1] at bucket pixels (ones without a
    mask): its ``NAME.mask.png`` (resized to the image when the sizes differ) or its alpha channel,
    resized, cropped and flipped exactly as the image is."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    bw, bh = item.bucket
    if not item.mask:
        return torch.ones(1, bh, bw)
    with Image.open(item.path) as raw:
        image = ImageOps.exif_transpose(raw)
        size = image.size
        if item.mask == "alpha":
            mask = image.convert("RGBA").getchannel("A")
    if item.mask != "alpha":
        with Image.open(item.mask) as raw:
            mask = ImageOps.exif_transpose(raw).convert("L")
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.LANCZOS)
    mask, _ = _fit(mask, item.bucket, flip)
    arr = np.asarray(mask, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def sample_rng(seed: int, step: int, slot: int) -> random.Random:
    """The RNG for one sample of one micro-step: a pure function of its arguments."""
    return random.Random((seed * 1_000_003 + step) * 4099 + slot)
