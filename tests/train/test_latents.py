"""Latent caching: built once, reused, invalidated by a changed image, bucket or VAE; same losses."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import torch  # noqa: E402

from modelkit.errors import FormatError  # noqa: E402
from modelkit.train import latents, train  # noqa: E402
from modelkit.train.config import resolved  # noqa: E402

from .test_train import _config  # noqa: E402


def _entries(folder: Path) -> dict[str, tuple[int, int]]:
    """Cache file name -> (inode, mtime_ns)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.suffix == ".safetensors"}


def _count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = latents.encode

    def counting(vae: Any, pixels: Any) -> Any:
        calls.append(int(pixels.shape[0]))
        return real(vae, pixels)

    monkeypatch.setattr(latents, "encode", counting)
    return calls


def test_cache_is_built_once_reused_and_trains_like_no_cache(tiny_model: dict[str, str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    extra = ("train.max_steps=2", "train.batch_size=2", "dataset.flip=true", "output.save_state=false",
             "output.dtype=float32")
    calls = _count_encodes(monkeypatch)
    first = train(_config(tiny_model, tmp_path / "a", "lora", *extra, "dataset.cache_latents=true",
                          f"dataset.cache_dir={cache}"))
    assert sum(calls) == 6  # 3 images, both orientations (flip=true), each encoded once
    built = _entries(cache)
    assert len(built) == 6 and sum(".f." in n for n in built) == 3
    assert any("6 encoded, 0 reused" in n for n in first.notes)

    calls.clear()
    second = train(_config(tiny_model, tmp_path / "b", "lora", *extra, "dataset.cache_latents=true",
                           f"dataset.cache_dir={cache}"))
    assert calls == [] and _entries(cache) == built  # nothing encoded, no file rewritten
    assert second.losses == first.losses

    plain = train(_config(tiny_model, tmp_path / "c", "lora", *extra))
    assert sum(calls) == 0  # without the cache the loop encodes through the VAE directly, not latents.encode
    assert plain.losses == pytest.approx(first.losses, rel=1e-4)


def test_default_cache_folder_is_inside_the_output_dir(tiny_model: dict[str, str], tmp_path: Path) -> None:
    cfg = resolved(_config(tiny_model, tmp_path / "out", "lora", "dataset.cache_latents=true"))
    assert latents.cache_folder(cfg) == str(tmp_path / "out" / ".modelkit-latents")


def test_cached_batch_gives_the_same_loss_and_stale_entries_are_rebuilt(tiny_model: dict[str, str],
                                                                       tmp_path: Path) -> None:
    from PIL import Image

    from modelkit.train import data
    from modelkit.train.base import load_base
    from modelkit.train.step import compute_loss, load_batch

    from . import tiny

    images = tiny.write_images(str(tmp_path / "images"))
    cfg = resolved(_config(tiny_model, tmp_path, "lora", f"dataset.path={images}"))
    base = load_base(cfg.model)
    ds = data.scan(cfg.dataset)
    folder = tmp_path / "cache"
    cache = latents.LatentCache(str(folder), latents.vae_identity(base.vae))
    assert cache.build(ds.items, False, base.vae) == latents.CacheStats(3, 0, 0)

    # the same micro-batch, from pixels and from the cache: the same loss
    for micro, indices in ((0, [0]), (5, [0, 2])):
        plain = compute_loss(cfg, base, base.unet, load_batch(ds, indices, cfg, micro, str), micro, "cpu",
                             torch.float32, False)
        cached_batch = load_batch(ds, indices, cfg, micro, str, cache)
        assert cached_batch.pixels is None and tuple(cached_batch.latent_mean.shape) == (len(indices), 4, 8, 8)
        cached = compute_loss(cfg, base, base.unet, cached_batch, micro, "cpu", torch.float32, False)
        torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)

    before = _entries(folder)
    old_mean = cache.load(ds.items[0], False)[0].clone()
    # a changed image (new content, size and mtime): its entry alone is encoded again, the old file goes
    Image.new("RGB", (64, 64), (10, 200, 10)).save(ds.items[0].path)
    st = os.stat(ds.items[0].path)
    os.utime(ds.items[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(FormatError, match="latent cache"):
        cache.load(ds.items[0], False)
    assert cache.build(ds.items, False, base.vae) == latents.CacheStats(1, 2, 1)
    after = _entries(folder)
    assert len(after) == 3 and len(set(after) & set(before)) == 2
    assert not torch.equal(cache.load(ds.items[0], False)[0], old_mean)

    # another bucket is another key; a damaged entry is encoded again
    assert cache.entry(ds.items[1], False)[1] != cache.entry(replace(ds.items[1], bucket=(64, 32)), False)[1]
    damaged = Path(cache.entry(ds.items[1], False)[0])
    damaged.write_bytes(damaged.read_bytes()[:40])
    assert cache.build(ds.items, False, base.vae) == latents.CacheStats(1, 2, 0)

    # another VAE: every entry is encoded again
    with torch.no_grad():
        next(base.vae.parameters()).add_(0.01)
    other = latents.LatentCache(str(folder), latents.vae_identity(base.vae))
    assert other.vae_id != cache.vae_id
    assert other.build(ds.items, False, base.vae) == latents.CacheStats(3, 0, 3)
    assert len(_entries(folder)) == 3


def test_vae_identity_ignores_private_config_entries() -> None:
    """diffusers' ``_use_default_values`` comes in a different order in every process; the cache key must not."""
    import torch

    from modelkit.train.latents import vae_identity

    class FakeVAE:
        def __init__(self, config: dict[str, Any], weight: torch.Tensor):
            self.config, self.weight = config, weight

        def state_dict(self) -> dict[str, torch.Tensor]:
            return {"w": self.weight}

    w = torch.arange(6, dtype=torch.float32)
    a = FakeVAE({"latent_channels": 4, "_use_default_values": ["act_fn", "shift_factor"]}, w)
    b = FakeVAE({"latent_channels": 4, "_use_default_values": ["shift_factor", "act_fn"]}, w)
    assert vae_identity(a) == vae_identity(b)
    assert vae_identity(a) != vae_identity(FakeVAE({"latent_channels": 8}, w))
    assert vae_identity(a) != vae_identity(FakeVAE({"latent_channels": 4}, w + 1))
