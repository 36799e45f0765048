"""Pools and the K-checkpoint scorer, without Ray: sources, decode errors, known answers."""

from __future__ import annotations

import io
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _pools import png_bytes, write_checkpoints
from PIL import Image

from segrl.config import ScoreConfig, load_config
from segrl.data.labels import DataError
from segrl.data.pool import (
    check_pool_ids,
    decode_pool_frame,
    decode_pool_image,
    id_file_problem,
    iter_pool_batches,
    load_pool_image,
    parse_synthetic_pool,
    synthetic_pool_uri,
    write_synthetic_pool_manifest,
)
from segrl.data.synthetic import render_scene, split_offset
from segrl.engine.score import ScoreActor, decode_frames, score_pool
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


def test_scorer_embeddings_are_the_final_models_mean_features_when_asked(tmp_path):
    ckpts = write_checkpoints(tmp_path / "train", k=2, size=(32, 40))
    scorer = PoolScorer(scorer_config(ckpts, signals="[entropy,embedding]"), inspect_checkpoints(str(ckpts)))
    images = frames(3)
    out = scorer.score(images, ["a", "b", "c"], np.array([[32, 40]] * 3))
    _, features = scorer.models[-1](scorer.normalise(images), return_features=True)
    expected = torch.nn.functional.normalize(features.mean(dim=(2, 3)), dim=1).detach().numpy()
    assert out["embedding"].shape == (3, scorer.models[-1].feature_channels)
    np.testing.assert_allclose(out["embedding"], expected, rtol=1e-5, atol=1e-6)
    assert "embedding" not in PoolScorer(scorer_config(ckpts), inspect_checkpoints(str(ckpts))).score(
        images, ["a", "b", "c"], np.array([[32, 40]] * 3))


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


# --------------------------------------------------------------------------- issue 18: hostile pools


def _pool_rows(uris: list[str]) -> pa.Table:
    n = len(uris)
    return pa.table({"id": [f"f{i}" for i in range(n)], "image_uri": uris,
                     "shard": np.zeros(n, np.int64), "row": np.arange(n, dtype=np.int64)})


def test_a_decompression_bomb_is_an_error_row_like_any_unreadable_frame(tmp_path, monkeypatch):
    """PIL refuses frames over 2x MAX_IMAGE_PIXELS at open; lowered here so the 'bomb' is tiny."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "bomb.png").write_bytes(png_bytes(np.zeros((60, 50, 3), np.uint8)))  # 3000 px > 2 x 1000
    (tmp_path / "fine.png").write_bytes(png_bytes(np.zeros((20, 20, 3), np.uint8)))
    out = decode_frames(_pool_rows([str(tmp_path / "bomb.png"), str(tmp_path / "fine.png")]), (16, 16), None)
    assert "bomb.png: too large to decode" in out["error"][0] and "3000 pixels" in out["error"][0]
    assert out["error"][1] == "" and out["original_size"][1].tolist() == [20, 20]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_frame_decodes_small_when_the_model_wants_less(fmt):
    """JPEG via the DCT's draft scale, others by box reduction right after decoding: never
    below the model's size, the file's own size still reported (boxes map back to it)."""
    image, _ = render_scene(3, 1, (480, 640), "target")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=95)
    frame, original = decode_pool_frame(buffer.getvalue(), f"big.{fmt.lower()}", (60, 80))
    assert original == (480, 640)
    assert 60 <= frame.shape[0] < 120 and 80 <= frame.shape[1] < 160  # 1/8 scale at most, never below
    full = decode_pool_image(buffer.getvalue(), "big")
    assert full.shape == (480, 640, 3)


def test_decode_frames_of_a_large_frame_match_a_full_decode_resized(tmp_path):
    from segrl.engine.score import _resize_frame

    image, _ = render_scene(3, 2, (480, 640), "target")
    (tmp_path / "big.png").write_bytes(png_bytes(image))
    out = decode_frames(_pool_rows([str(tmp_path / "big.png")]), (60, 80), None)
    assert out["error"][0] == "" and out["original_size"][0].tolist() == [480, 640]
    expected = _resize_frame(image, (60, 80)).astype(int)
    assert np.abs(out["image"][0].astype(int) - expected).mean() < 3  # box-reduce then resize ~ resize


def test_repeated_pool_ids_are_refused_naming_them(tmp_path):
    (tmp_path / "pool.csv").write_text("id,image_uri\na,x.png\nb,y.png\na,z.png\nc,w.png\nc,v.png\n")
    with pytest.raises(DataError, match=r"repeats 2 id\(s\): 'a' \(2x\), 'c' \(2x\)"):
        check_pool_ids(str(tmp_path / "pool.csv"))
    (tmp_path / "folder" / "s1").mkdir(parents=True)
    (tmp_path / "folder" / "s2").mkdir()
    for name in ("s1/0001.png", "s2/0001.jpg", "s2/0002.png"):
        (tmp_path / "folder" / name).write_bytes(b"x")
    with pytest.raises(DataError, match="'0001' \\(2x\\)"):  # the stems of two files collide
        check_pool_ids(str(tmp_path / "folder"))
    check_pool_ids("synthetic://target?n=5")


def test_score_pool_refuses_repeated_ids_before_writing_anything(tmp_path):
    checkpoints = write_checkpoints(tmp_path / "ckpts", k=1)
    (tmp_path / "pool.csv").write_text("id,image_uri\na,x.png\na,y.png\n")
    out = tmp_path / "out"
    cfg = ScoreConfig(pool=str(tmp_path / "pool.csv"), checkpoints=str(checkpoints), out=str(out))
    with pytest.raises(DataError, match="repeats 1 id"):
        score_pool(cfg, progress=False)
    assert not out.exists() or not any(out.rglob("*"))


def test_an_id_that_escapes_its_folder_is_an_error_row_when_pseudo_labels_are_written():
    for bad in ("../x", "/etc/x", "a/../../x", "a//b", "", ".tmp-x", "a\\..\\x"):
        assert id_file_problem(bad), bad
    for fine in ("0001TP_006690", "seq1/0001", "frame.v2"):
        assert id_file_problem(fine) == ""
    actor = ScoreActor.__new__(ScoreActor)  # the check alone: no models needed
    actor.scorer = types.SimpleNamespace(out_store=object(), pseudo_all=True, pseudo_ids=frozenset())
    errors = actor._pseudo_label_errors(np.array(["ok", "../x", "bad"], object), np.array(["", "", "unreadable"], object))
    assert errors[0] == "" and "'../x' cannot name a file" in errors[1] and errors[2] == "unreadable"
    actor.scorer = types.SimpleNamespace(out_store=None, pseudo_all=False, pseudo_ids=frozenset())
    assert actor._pseudo_label_errors(np.array(["../x"], object), np.array([""], object))[0] == ""


def test_a_decode_task_reserves_the_largest_frame_pil_accepts_plus_its_batch(monkeypatch):
    """Ray runs no more decode tasks on a node than its memory holds: each reserves what one
    frame just under PIL's bomb limit takes while decoding, and the batch it returns."""
    from segrl.config import ConfigError
    from segrl.data.pool import largest_frame_decode_bytes
    from segrl.engine.score import decode_task_memory

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert largest_frame_decode_bytes() == 2 * 1000 * 7  # RGBA/CMYK 4 bytes a pixel + the RGB copy 3
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a user who disabled the limit: PIL's default
    assert largest_frame_decode_bytes() == 2 * 89_478_485 * 7
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    gib = 2.0**30
    assert decode_task_memory(16, (60, 80), 0, 8 * gib) == 2 * 10_000 * 7 + 16 * 60 * 80 * 3
    assert decode_task_memory(4, (10, 10), 0, 0.0) == 140_000 + 1200  # no memory figure: uncapped
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    assert decode_task_memory(16, (60, 80), 0, 0.5 * gib) == int(0.5 * gib)  # capped: a task always fits
    assert decode_task_memory(16, (60, 80), 300, 8 * gib) == 300 * 2**20  # decode_memory_mb wins
    with pytest.raises(ConfigError, match=r"'decode_memory_mb' = 9000 is more than any node has \(8192 MiB"):
        decode_task_memory(16, (60, 80), 9000, 8 * gib)


def test_decode_memory_mb_must_not_be_negative():
    from segrl.config import ConfigError

    with pytest.raises(ConfigError, match="decode_memory_mb"):
        load_config(overrides=["pool=p", "checkpoints=c", "out=o", "decode_memory_mb=-1"], cls=ScoreConfig)


def test_an_unreachable_frame_store_becomes_an_error_row_after_store_retry_seconds():
    """A frame on an S3 endpoint that is down is tried again for store.retry_seconds (the
    config's value, here 0; before, always the store's 3-minute default), then becomes an
    error row naming the endpoint and the setting."""
    import time

    started = time.perf_counter()
    out = decode_frames(_pool_rows(["s3://frames/a.png"]), (16, 16), "http://127.0.0.1:9", retry_seconds=0)
    assert time.perf_counter() - started < 30
    assert "127.0.0.1:9 is unreachable" in out["error"][0]
    assert "tried again for 0 s: store.retry_seconds" in out["error"][0]
