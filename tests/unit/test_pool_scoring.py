"""Pools and the K-checkpoint scorer, without Ray: sources, decode errors, known answers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _pools import png_bytes, write_checkpoints

from segrl.config import ScoreConfig, load_config
from segrl.data.labels import DataError
from segrl.data.pool import (
    decode_pool_image,
    iter_pool_batches,
    load_pool_image,
    parse_synthetic_pool,
    synthetic_pool_uri,
    write_synthetic_pool_manifest,
)
from segrl.data.synthetic import render_scene, split_offset
from segrl.scoring import PoolScorer, inspect_checkpoints

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_decode_errors_say_why():
    rgb = np.zeros((4, 5, 3), np.uint8)
    assert decode_pool_image(png_bytes(rgb), "a.png").shape == (4, 5, 3)
    grey = decode_pool_image(png_bytes(np.zeros((4, 5), np.uint8)), "g.png")
    assert grey.shape == (4, 5, 3)  # grey frames are photos too
    with pytest.raises(DataError, match=r"x\.png: file is empty"):
        decode_pool_image(b"", "x.png")
    with pytest.raises(DataError, match="not a readable image"):
        decode_pool_image(b"hello" * 10, "x.png")
    with pytest.raises(DataError, match="cannot decode"):
        whole = png_bytes(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
        decode_pool_image(whole[: len(whole) // 2], "x.png")
    with pytest.raises(DataError, match="mode I;16"):
        decode_pool_image(png_bytes(np.zeros((4, 5), np.uint16)), "depth.png")
    with pytest.raises(DataError, match="nope.png"):
        load_pool_image("/definitely/not/here/nope.png")


def test_synthetic_pool_spec_round_trip_and_frames_match_the_renderer():
    uri = synthetic_pool_uri(5, "target", 3, (16, 20))
    assert parse_synthetic_pool(uri) == ("target", 5, 3, (16, 20))
    batches = list(iter_pool_batches(uri, 2))
    assert [b.num_rows for b in batches] == [2, 2, 1]
    frame_uri = batches[1].column("image_uri")[0].as_py()
    expected, _ = render_scene(3, split_offset("pool") + 2, (16, 20), "target")
    assert np.array_equal(load_pool_image(frame_uri), expected)
    with pytest.raises(DataError, match="n=<count"):
        parse_synthetic_pool("synthetic://target?n=0")


def test_manifest_pool_resolves_relative_uris_and_fills_missing_ids(tmp_path):
    pq.write_table(pa.table({"image_uri": ["img/a.png", "/abs/b.jpg"]}), tmp_path / "pool.parquet")
    (batch,) = iter_pool_batches(str(tmp_path / "pool.parquet"), 10)
    assert batch.column("id").to_pylist() == ["a", "b"]
    assert batch.column("image_uri").to_pylist() == [str(tmp_path / "img" / "a.png"), "/abs/b.jpg"]


def test_folder_pool_lists_images_sorted(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    ids = [i for b in iter_pool_batches(str(tmp_path), 2) for i in b.column("id").to_pylist()]
    assert ids == ["a", "b", "c"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        list(iter_pool_batches(str(tmp_path / "empty"), 2))
    with pytest.raises(DataError, match="none does not exist"):
        list(iter_pool_batches(str(tmp_path / "none"), 2))


def test_synthetic_manifest_streams_any_count(tmp_path):
    path = write_synthetic_pool_manifest(str(tmp_path / "m.parquet"), 70_000, size=(8, 8))
    table = pq.read_table(path)
    assert table.num_rows == 70_000 and len(set(table.column("id").to_pylist())) == 70_000


def scorer_config(checkpoints, **extra) -> ScoreConfig:
    overrides = ["pool=unused", f"checkpoints={checkpoints}", "out=unused", "image_size=[32,40]"]
    return load_config(overrides=overrides + [f"{k}={v}" for k, v in extra.items()], cls=ScoreConfig)


def frames(n: int) -> np.ndarray:
    return np.stack([render_scene(1, i, (32, 40), "target")[0] for i in range(n)])


def test_scorer_single_checkpoint_is_perfectly_stable_and_rows_are_per_image(tmp_path):
    ckpts = write_checkpoints(tmp_path / "train", k=1, size=(32, 40))
    cfg = scorer_config(ckpts)
    scorer = PoolScorer(cfg, inspect_checkpoints(str(ckpts)))
    out = scorer.score(frames(3), ["a", "b", "c"], np.array([[32, 40]] * 3))
    assert set(out) >= {"entropy_mean", "entropy_top_q", "margin_mean", "least_confidence_mean",
                        "mean_max_prob", "confident_share", "stability", "instability", "class_hist"}
    assert np.all(out["stability"] == 1.0) and np.all(out["instability"] == 0.0)
    assert out["entropy_mean"].shape == (3,) and out["class_hist"].shape == (3, 10)
    assert (out["class_hist"].sum(1) == 32 * 40).all()


def test_scorer_identical_checkpoints_are_stable_and_different_ones_are_not(tmp_path):
    ckpts = write_checkpoints(tmp_path / "train", k=2, size=(32, 40))
    twin = tmp_path / "twin"
    (twin / "ckpt_00000001").mkdir(parents=True)
    (twin / "ckpt_00000002").mkdir()
    for name in ("ckpt_00000001", "ckpt_00000002"):
        (twin / name / "checkpoint.pt").write_bytes((ckpts / "ckpt_00000002" / "checkpoint.pt").read_bytes())
    images, sizes = frames(2), np.array([[32, 40]] * 2)
    same = PoolScorer(scorer_config(twin), inspect_checkpoints(str(twin))).score(images, ["a", "b"], sizes)
    diff = PoolScorer(scorer_config(ckpts), inspect_checkpoints(str(ckpts))).score(images, ["a", "b"], sizes)
    assert np.allclose(same["stability"], 1.0)
    assert (diff["stability"] < 1.0).all()
    # The final checkpoint's entropy is the same whichever checkpoints precede it.
    assert np.allclose(same["entropy_mean"], diff["entropy_mean"], atol=1e-6)


def test_top_regions_are_boxes_in_original_pixels(tmp_path):
    ckpts = write_checkpoints(tmp_path / "train", k=1, size=(32, 40))
    cfg = scorer_config(ckpts, regions_top_r=3, region_size="[16,20]")
    scorer = PoolScorer(cfg, inspect_checkpoints(str(ckpts)))
    out = scorer.score(frames(1), ["a"], np.array([[64, 80]]))
    boxes, scores = out["region_boxes"][0], out["region_scores"][0]
    assert boxes.shape == (3, 4) and list(scores) == sorted(scores, reverse=True)
    # A 2x2 grid of 16x20 cells at 32x40 maps to 32x40 cells at 64x80.
    assert {tuple(b) for b in boxes} <= {(0, 0, 32, 40), (0, 40, 32, 80), (32, 0, 64, 40), (32, 40, 64, 80)}


def test_checkpoints_of_different_models_are_refused(tmp_path):
    from segrl.models import build_model
    from segrl.scoring import save_scoring_checkpoint

    write_checkpoints(tmp_path / "train", k=1)
    save_scoring_checkpoint(str(tmp_path / "train" / "ckpt_00000009"),
                            build_model("lraspp_mobilenet_v3_large", 3), "lraspp_mobilenet_v3_large",
                            ("a", "b", "c"))
    with pytest.raises(DataError, match="different model"):
        inspect_checkpoints(str(tmp_path / "train"))
    with pytest.raises(DataError, match="no checkpoints"):
        inspect_checkpoints(str(tmp_path / "empty"))
