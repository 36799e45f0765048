"""The loop's selection rules on hand-built score tables: budgets, no double charging,
region non-overlap, determinism; LabOR's mapping to original pixels; the round report."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest

from segrl.config import ALConfig, ConfigError, load_config
from segrl.loop import select
from segrl.loop.labor import scale_points, to_grid
from segrl.loop.report import miou_plot_png, rounds_table
from segrl.loop.run import score_signals
from segrl.loop.select import round_budget, select_region_rows, select_whole_images


def pool(n: int = 5, h: int = 10, w: int = 10) -> pa.Table:
    ids = [f"img{i}" for i in range(n)]
    return pa.table({"id": ids, "image_uri": [f"/x/{i}.png" for i in ids], "height": [h] * n, "width": [w] * n})


def scores(values: list[float]) -> pa.Table:
    return pa.table({"id": [f"img{i}" for i in range(len(values))], "entropy_mean": values,
                     "instability": values[::-1]})


def test_round_budget_in_each_unit():
    assert round_budget(ALConfig(budget_per_round=0.1), 1000, 10) == 100
    assert round_budget(ALConfig(budget_per_round=2, budget_unit="images"), 1000, 10) == 200
    assert round_budget(ALConfig(budget_per_round=37, budget_unit="pixels"), 1000, 10) == 37
    assert round_budget(ALConfig(budget_per_round=25, budget_unit="clicks", acquisition="labor_ppl"), 1000, 10) == 25


def test_entropy_picks_the_most_uncertain_images_that_fit_and_never_a_fully_asked_one():
    al = ALConfig(acquisition="entropy")
    rows = select_whole_images(al, pool(), scores([0.9, 0.1, 0.8, 0.5, 0.7]), {"img0": 100}, budget=250).to_pylist()
    # img0 is fully asked for already; img2 (0.8), img4 (0.7) fit, img3 would exceed 250
    assert [r["id"] for r in rows] == ["img2", "img4"]
    assert all(r["unit"] == "image" and r["cost_pixels"] == 100 for r in rows)


def test_a_partly_labeled_image_costs_only_its_remaining_pixels():
    rows = select_whole_images(ALConfig(acquisition="entropy"), pool(2), scores([0.9, 0.1]), {"img0": 64}, budget=36).to_pylist()
    assert [(r["id"], r["cost_pixels"]) for r in rows] == [("img0", 36)]


def test_stability_selection_uses_instability_and_random_is_seeded():
    rows = select_whole_images(ALConfig(acquisition="stability"), pool(), scores([0.9, 0.1, 0.8, 0.5, 0.7]), {}, 100).to_pylist()
    assert [r["id"] for r in rows] == ["img4"]  # instability [0.7, 0.5, 0.8, 0.1, 0.9]: img4 is least stable
    a = select_whole_images(ALConfig(acquisition="random", seed=3), pool(), None, {}, 300).to_pylist()
    b = select_whole_images(ALConfig(acquisition="random", seed=3), pool(), None, {}, 300).to_pylist()
    c = select_whole_images(ALConfig(acquisition="random", seed=4), pool(), None, {}, 300).to_pylist()
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 3
    assert [r["id"] for r in a] != [r["id"] for r in c]


def test_regions_never_overlap_and_never_charge_asked_pixels_twice():
    regions = pa.table({"id": ["img0", "img0", "img1", "img1"], "y0": [0, 0, 0, 5], "x0": [0, 2, 0, 5],
                        "y1": [4, 4, 4, 10], "x1": [4, 6, 4, 10], "score": [0.9, 0.8, 0.7, 0.6]})
    asked = {"img1": np.zeros((10, 10), bool)}
    asked["img1"][0:2, 0:4] = True  # 8 of img1's first region's 16 pixels were asked for before
    rows = select_region_rows(pool(2), regions, budget=16 + 8 + 25, labeled_mask=asked.get).to_pylist()
    assert [(r["id"], r["y0"], r["x0"], r["cost_pixels"]) for r in rows] == [
        ("img0", 0, 0, 16),  # the overlapping img0 region (0.8) is skipped
        ("img1", 0, 0, 8),
        ("img1", 5, 5, 25),
    ]
    assert sum(r["cost_pixels"] for r in rows) <= 49


def test_labor_points_map_to_the_pixels_nearest_resize_keeps():
    assert scale_points([(0, 0, 1), (3, 5, 2)], small=(4, 6), original=(8, 12)) == [[0, 0], [6, 10]]
    small = np.zeros((4, 6), bool)
    small[1, 2] = True
    big = to_grid(small, (8, 12))
    assert big.sum() == 4 and big[2:4, 4:6].all()


def test_budget_unit_clicks_is_for_points_only():
    with pytest.raises(ConfigError, match="al.budget_unit"):
        load_config(overrides=["al.budget_unit=clicks", "al.budget_per_round=10"])
    with pytest.raises(ConfigError, match="al.acquisition"):
        load_config(overrides=["al.acquisition=entropyy"])


def scores_file(tmp_path, values: list[float], points: list[list[float]]) -> pa.parquet.ParquetFile:
    """A scores.parquet as scoring writes it (pool columns, entropy, embeddings), 2 rows a group."""
    table = pool(len(values)).append_column("entropy_mean", pa.array(values))
    flat = pa.array(np.asarray(points, dtype=np.float32).reshape(-1))
    table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, len(points[0])))
    pa.parquet.write_table(table, tmp_path / "scores.parquet", row_group_size=2)
    return pa.parquet.ParquetFile(tmp_path / "scores.parquet")


def test_spread_selection_passes_over_neighbouring_frames_and_charges_what_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(select, "BATCH_ROWS", 2)  # the shortlist is streamed over several batches
    # img0..img2: one stretch of video (the same features); img3, img4 elsewhere
    source = scores_file(tmp_path, [0.9, 0.8, 0.7, 0.6, 0.5], [[1, 0], [1, 0], [1, 0], [0, 1], [-1, 0]])
    top = select.select_image_step(ALConfig(acquisition="entropy"), source, {}, budget=200).to_pylist()
    assert [r["id"] for r in top] == ["img0", "img1"]
    al = ALConfig(acquisition="entropy", spread_candidates=2.5)
    rows = select.select_image_step(al, source, {"img0": 40}, budget=160).to_pylist()
    # the shortlist (2.5 x 160 = 400 pixels) is img0..img3 (360: img0 costs its 60 pixels left);
    # img3 is the farthest from img0, asked for before; then only img0 still fits
    assert [(r["id"], r["cost_pixels"]) for r in rows] == [("img3", 100), ("img0", 60)]
    assert [r["uri"] for r in rows] == ["/x/img3.png", "/x/img0.png"]


def test_spread_selection_asks_for_embeddings_and_the_config_for_a_whole_image_acquisition(tmp_path):
    pa.parquet.write_table(pool(2).append_column("entropy_mean", pa.array([0.5, 0.4])), tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="embedding"):
        select.select_image_step(ALConfig(acquisition="entropy", spread_candidates=2),
                                 pa.parquet.ParquetFile(tmp_path / "s.parquet"), {}, budget=100)
    with pytest.raises(ConfigError, match="al.spread_candidates.*al.acquisition"):
        load_config(overrides=["al.acquisition=random", "al.spread_candidates=2"])
    with pytest.raises(ConfigError, match="al.spread_candidates"):
        load_config(overrides=["al.acquisition=entropy", "al.spread_candidates=0.5"])
    # and the loop's scoring writes the column the spread reads
    assert score_signals(ALConfig(acquisition="entropy", spread_candidates=2)) == ("entropy", "embedding")
    assert score_signals(ALConfig(acquisition="stability")) == ("stability",)


def test_report_table_and_plot():
    rows = [{"round": 0, "labeled_images": 4, "labeled_pixels": 400, "labeled_share": 0.04, "clicks": 0,
             "val_miou": 0.25, "steps": 120, "seconds": {"select": 0.1, "label": 0.2, "train": 30.0, "score": 5.0}},
            {"round": 1, "labeled_images": 6, "labeled_pixels": 600, "labeled_share": 0.06, "clicks": 0,
             "val_miou": 0.3, "seconds": {"select": 0.1, "label": 0.2, "train": 31.0}}]
    table = rounds_table(rows)
    assert "| 0 | 4 | 400 | 4.000 | 0 | 25.00 | 120 | 0.1 | 0.2 | 30.0 | 5.0 |" in table
    assert table.splitlines()[-1].endswith("| 30.00 | - | 0.1 | 0.2 | 31.0 | - |")  # steps unknown
    assert miou_plot_png(rows, "t")[:4] == b"\x89PNG"


def test_with_a_labeled_source_domain_the_pool_is_the_target_minus_its_held_out_frames(tmp_path):
    from pathlib import Path

    from segrl.loop.run import ActiveLearningLoop

    camvid = Path(__file__).resolve().parents[3] / "shared" / "data" / "camvid"
    cfg = load_config(overrides=["data.dataset=camvid", f"data.root={camvid}", "data.target_prefixes=[0001TP]",
                                 "data.target_eval_count=20", f"store.root={tmp_path}", "run=da"])
    loop = ActiveLearningLoop(cfg)
    loop.state = {}
    loop._write_pool(loop._pool_frames())
    ids = pa.parquet.read_table(tmp_path / "da" / "pool.parquet").column("id").to_pylist()
    assert len(ids) == 62 - 20 and all(i.startswith("0001TP") for i in ids)


@pytest.mark.parametrize("mode", ["from_scratch", "continue"])
def test_retrain_modes_start_a_round_afresh_or_from_the_last_training_state(tmp_path, mode):
    """from_scratch: no weights from earlier rounds, a whole schedule; continue: round r
    resumes round r-1's newest training checkpoint (model, optimiser, recipe) on the
    [r, r+1) / (rounds + 1) share of one schedule."""
    from segrl.loop.run import ActiveLearningLoop

    cfg = load_config(overrides=[f"store.root={tmp_path}", "run=loop", "al.rounds=2", f"al.retrain={mode}"])
    loop = ActiveLearningLoop(cfg)
    for name in ("ckpt_00000004/checkpoint.pt", "ckpt_00000012/checkpoint.pt", "checkpoint_manager_snapshot.json"):
        loop.store.write_bytes(f"rounds/00/model/train/{name}", b"x")
    first, second = loop._retrain_changes(0), loop._retrain_changes(1)
    if mode == "from_scratch":
        assert first == second == {}
    else:
        assert first == {"train.schedule_span": (0.0, 1 / 3)}
        assert second == {"train.schedule_span": (1 / 3, 2 / 3),
                          "train.resume_from": loop.store.uri("rounds/00/model/train/ckpt_00000012/checkpoint.pt")}


def test_round_steps_grow_with_the_labels_so_later_labels_get_their_share(tmp_path):
    from segrl.loop.run import ActiveLearningLoop

    base = [f"store.root={tmp_path}", "run=loop", "train.steps=10"]
    loop = ActiveLearningLoop(load_config(overrides=base))
    loop.state = {}
    assert loop._round_steps(400) == 10  # round 0 sets the pace: 400 labeled pixels, 10 steps
    assert loop._round_steps(1000) == 25  # 2.5x the labels, 2.5x the steps
    assert loop.state["first_labeled_pixels"] == 400  # kept in state.json for a resumed loop
    fixed = ActiveLearningLoop(load_config(overrides=[*base, "al.scale_steps=false"]))
    fixed.state = {}
    assert fixed._round_steps(1000) == 0  # 0 = train.steps as configured


def test_a_labeled_manifest_with_pixel_counts_exposes_them_to_the_sampler(tmp_path):
    from segrl.data.build import _label_count_columns

    with_counts = tmp_path / "counted.parquet"
    pa.parquet.write_table(pa.table({"id": ["a"], "image_uri": ["a.png"], "label_uri": ["a_l.png"],
                                     "labeled_pixels": [3], "image_pixels": [10]}), with_counts)
    without = tmp_path / "plain.parquet"
    pa.parquet.write_table(pa.table({"id": ["a"], "image_uri": ["a.png"], "label_uri": ["a_l.png"]}), without)
    assert _label_count_columns(str(with_counts), "") == ("labeled_pixels", "image_pixels")
    assert _label_count_columns(str(without), "") == ()
