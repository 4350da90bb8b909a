"""The dataset: captions, kohya repeat folders, buckets, caption processing, bad images."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from modelkit.errors import ConfigError  # noqa: E402
from modelkit.train import data  # noqa: E402
from modelkit.train.config import DatasetConfig  # noqa: E402


def _img(path: Path, size: tuple[int, int] = (64, 64), mode: str = "RGB", caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour: object = (10, 20, 30, 40) if mode in ("RGBA", "CMYK") else (10, 20, 30) if mode == "RGB" else 10
    Image.new(mode, size, colour).save(path)  # type: ignore[arg-type]
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_scan_captions_repeats_and_bad_images(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", caption="a cat, sitting")
    _img(tmp_path / "b.jpg")
    (tmp_path / "b.caption").write_text("  a   dog \n")
    _img(tmp_path / "3_style" / "c.png", (128, 64), caption="wide")
    _img(tmp_path / "bad" / "tiny.png", (8, 8), caption="x")
    _img(tmp_path / "bad" / "alpha.png", mode="RGBA")
    _img(tmp_path / "bad" / "cmyk.jpg", mode="CMYK")
    (tmp_path / "bad" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    good = tmp_path / "bad" / "trunc.png"
    _img(good, (64, 64))
    good.write_bytes(good.read_bytes()[:60])
    skipped: list[data.Skipped] = []
    ds = data.scan(DatasetConfig(path=str(tmp_path), resolution=64, min_bucket=32, max_bucket=128, bucket_step=32,
                                 repeats=2, default_caption="default"), skipped.append)
    by_name = {Path(i.path).name: i for i in ds.items}
    assert set(by_name) == {"a.png", "b.jpg", "c.png"}
    assert by_name["a.png"].caption == "a cat, sitting" and by_name["b.jpg"].caption == "a dog"
    assert by_name["a.png"].repeats == 2 and by_name["c.png"].repeats == 3
    assert by_name["c.png"].bucket[0] > by_name["c.png"].bucket[1]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert set(reasons) == {"tiny.png", "alpha.png", "cmyk.jpg", "corrupt.png", "trunc.png"}
    assert "CMYK" in reasons["cmyk.jpg"] and "alpha" in reasons["alpha.png"] and "smaller" in reasons["tiny.png"]
    assert ds.skipped == skipped
    assert ds.tag_frequency["style"] == {"wide": 1} and ds.tag_frequency["."]["a cat"] == 1


def test_no_usable_image_is_a_config_error(tmp_path: Path) -> None:
    _img(tmp_path / "tiny.png", (8, 8))
    with pytest.raises(ConfigError, match="no usable image"):
        data.scan(DatasetConfig(path=str(tmp_path)))
    with pytest.raises(ConfigError, match="no such folder"):
        data.scan(DatasetConfig(path=str(tmp_path / "missing")))


def test_buckets_cover_the_area_and_match_aspect() -> None:
    buckets = data.make_buckets(512, 64, 256, 1024)
    assert (512, 512) in buckets and all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert data.nearest_bucket((1920, 1080), buckets) == (640, 384)
    assert data.nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert data.nearest_bucket((500, 1000), buckets) == (320, 704)  # 0.4545 is the closest ratio to 0.5 that fits


def test_batches_are_deterministic_and_never_mix_buckets(tmp_path: Path) -> None:
    items = [data.Item(f"{i}.png", "", 1 + i % 2, (64, 64), (64, 64) if i % 3 else (96, 32)) for i in range(10)]
    ds = data.Dataset(items)
    a, b = ds.batches(2, seed=5, epoch=0), ds.batches(2, seed=5, epoch=0)
    assert a == b and a != ds.batches(2, seed=5, epoch=1)
    assert sum(len(x) for x in a) == sum(i.repeats for i in items)
    for batch in a:
        assert len({items[i].bucket for i in batch}) == 1


def test_caption_processing_keeps_tokens_and_is_seeded() -> None:
    cfg = DatasetConfig(path="x", shuffle_tags=True, keep_tokens=1, tag_dropout=0.3)
    caption = "sks person, red hat, smiling, outdoors, photo, high quality"
    outs = {data.process_caption(caption, cfg, random.Random(i)) for i in range(20)}
    assert all(o.startswith("sks person") for o in outs) and len(outs) > 1
    same = data.process_caption(caption, cfg, data.sample_rng(1, 2, 3))
    assert same == data.process_caption(caption, cfg, data.sample_rng(1, 2, 3))
    drop = DatasetConfig(path="x", caption_dropout=0.999)
    assert data.process_caption(caption, drop, random.Random(0)) == ""
    assert data.process_caption(caption, DatasetConfig(path="x"), random.Random(0)) == caption


def test_load_pixels_crops_to_the_bucket(tmp_path: Path) -> None:
    _img(tmp_path / "w.png", (200, 100))
    item = data.Item(str(tmp_path / "w.png"), "", 1, (200, 100), (96, 64))
    px, (top, left) = data.load_pixels(item, flip=True)
    assert tuple(px.shape) == (3, 64, 96) and float(px.min()) >= -1.0 and float(px.max()) <= 1.0
    assert top == 0 and left > 0
