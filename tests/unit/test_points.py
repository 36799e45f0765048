"""Point acquisitions (PixelPick): the per-image pixel rules on hand-made maps, the
pool-level image choice under a click budget, and the loop's point rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from _pools import png_bytes, write_checkpoints

from segrl.acquisition import PIXEL_SCORES, select_random
from segrl.acquisition.points import (
    cell_side,
    point_rng,
    random_points,
    spread_top_points,
    top_share_points,
)
from segrl.config import ALConfig, ConfigError, ScoreConfig, load_config, replace
from segrl.data.labels import decode_label
from segrl.data.synthetic import render_scene
from segrl.engine.score import decode_frames
from segrl.labeling import oracle_label, selection_table, validate_selection
from segrl.loop import labor as loop_labor
from segrl.loop import points as loop_points
from segrl.loop.labor import to_grid
from segrl.loop.select import choose_point_images, round_budget
from segrl.scoring import PoolScorer, inspect_checkpoints

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 4 x 4 uncertainty; cells of 2 x 2 for 4 points: TL holds the four best pixels.
SCORE = np.array([[9, 8, 1, 0],
                  [7, 6, 2, 0],
                  [0, 0, 0, 0],
                  [3, 0, 0, 5]], dtype=np.float64)
ALL = np.ones((4, 4), bool)


def yx(points: np.ndarray) -> list[list[int]]:
    return points.tolist()


# ---------------------------------------------------------------------- per image


def test_spread_top_points_takes_each_cells_best_before_any_cells_second():
    assert cell_side(4, 4, 4) == 2 and cell_side(4, 4, 6) == 1 and cell_side(3, 3, 100) == 1
    # plain top-4 would be the TL block (0,0) (0,1) (1,0) (1,1); one per cell: 9, 5, 3, 2
    assert yx(spread_top_points(SCORE, ALL, 4)) == [[0, 0], [3, 3], [3, 0], [1, 2]]
    # 6 points: cells of one pixel, so plain top-k by score
    assert yx(spread_top_points(SCORE, ALL, 6)) == [[0, 0], [0, 1], [1, 0], [1, 1], [3, 3], [3, 0]]


def test_spread_top_points_skips_labeled_pixels_and_takes_second_passes_in_score_order():
    no_corner = ALL.copy()
    no_corner[0, 0] = False
    assert yx(spread_top_points(SCORE, no_corner, 4)) == [[0, 1], [3, 3], [3, 0], [1, 2]]
    two_cells = np.zeros((4, 4), bool)
    two_cells[:2, :2] = two_cells[2:, 2:] = True
    # pass 0: TL 9, BR 5; pass 1: TL 8, BR's zeros tie and go by raster order: (2, 2)
    assert yx(spread_top_points(SCORE, two_cells, 4)) == [[0, 0], [3, 3], [0, 1], [2, 2]]
    assert yx(spread_top_points(SCORE, two_cells, 100)) == yx(spread_top_points(SCORE, two_cells, 8))
    assert spread_top_points(SCORE, np.zeros((4, 4), bool), 3).shape == (0, 2)


def test_top_share_points_draws_from_the_most_uncertain_share_only():
    score = np.arange(10, dtype=np.float64)[None]  # 1 x 10, pixel x scores x
    picks = top_share_points(score, np.ones((1, 10), bool), 2, 0.3, point_rng(0, "a"))
    assert {x for _, x in yx(picks)} <= {7, 8, 9} and len({x for _, x in yx(picks)}) == 2
    same = top_share_points(score, np.ones((1, 10), bool), 2, 0.3, point_rng(0, "a"))
    assert yx(picks) == yx(same)
    # the share is never fewer pixels than the points asked: ceil(0.05 x 10) = 1 < 2 -> the top 2
    tight = top_share_points(score, np.ones((1, 10), bool), 2, 0.05, point_rng(0, "a"))
    assert sorted(x for _, x in yx(tight)) == [8, 9]
    # labeled pixels are not candidates, and do not count in the share
    open_ = np.ones((1, 10), bool)
    open_[0, 9] = False
    assert {x for _, x in yx(top_share_points(score, open_, 3, 0.3, point_rng(1, "b")))} == {6, 7, 8}
    with pytest.raises(ValueError, match="share"):
        top_share_points(score, open_, 1, 0.0, point_rng(0, "a"))


def test_random_points_are_distinct_unlabeled_and_seeded_by_image():
    candidates = np.zeros((20, 30), bool)
    candidates[5:15, 10:20] = True
    picks = random_points(candidates, 10, point_rng(3, "img0"))
    assert len({tuple(p) for p in yx(picks)}) == 10 and candidates[picks[:, 0], picks[:, 1]].all()
    assert yx(picks) == yx(random_points(candidates, 10, point_rng(3, "img0")))
    assert yx(picks) != yx(random_points(candidates, 10, point_rng(4, "img0")))
    assert yx(picks) != yx(random_points(candidates, 10, point_rng(3, "img1")))
    few = np.zeros((3, 3), bool)
    few[1, 2] = few[2, 0] = True
    assert sorted(yx(random_points(few, 5, point_rng(0, "x")))) == [[1, 2], [2, 0]]


def test_rules_reject_bad_input():
    with pytest.raises(ValueError, match="count"):
        spread_top_points(SCORE, ALL, -1)
    with pytest.raises(ValueError, match="score"):
        spread_top_points(SCORE[:3], ALL, 1)
    with pytest.raises(ValueError, match="NaN"):
        spread_top_points(np.full((4, 4), np.nan), ALL, 1)


# ---------------------------------------------------------------------- pool level


def pool(n: int = 5, h: int = 10, w: int = 10) -> pa.Table:
    ids = [f"img{i}" for i in range(n)]
    return pa.table({"id": ids, "image_uri": [f"/x/{i}.png" for i in ids], "height": [h] * n, "width": [w] * n})


def test_point_images_spread_the_clicks_over_seeded_random_images():
    al = ALConfig(acquisition="random_points", budget_unit="clicks", points_per_image=3, seed=5)
    table = pool()
    order = select_random(table.column("id").to_pylist(), 1, 5, seed=5)  # the seeded image order
    rows, clicks = choose_point_images(al, table, {}, 7)
    assert table.column("id").take(pa.array(rows)).to_pylist() == order[:3]
    assert clicks.tolist() == [3, 3, 1]  # the last image takes what is left
    # a budget beyond pool x points_per_image reaches every image, points_per_image each
    rows, clicks = choose_point_images(al, table, {}, 1000)
    assert table.column("id").take(pa.array(rows)).to_pylist() == order and clicks.tolist() == [3] * 5


def test_point_images_skip_fully_asked_images_and_cap_clicks_at_pixels_left():
    al = ALConfig(acquisition="margin_points", budget_unit="clicks", points_per_image=3)
    rows, clicks = choose_point_images(al, pool(3), {"img0": 100, "img1": 99}, 1000)
    got = dict(zip(pool(3).column("id").take(pa.array(rows)).to_pylist(), clicks.tolist(), strict=True))
    assert got == {"img1": 1, "img2": 3}
    assert choose_point_images(al, pool(3), {}, 0)[0].size == 0


def test_point_budgets_are_clicks_and_need_the_clicks_unit():
    al = ALConfig(acquisition="pixelpick_points", budget_unit="clicks", budget_per_round=50)
    assert round_budget(al, 10_000, 10) == 50
    for name in ("random_points", "margin_points", "entropy_points", "pixelpick_points"):
        assert load_config(overrides=[f"al.acquisition={name}", "al.budget_unit=clicks",
                                      "al.budget_per_round=20"]).al.acquisition == name
        with pytest.raises(ConfigError, match="al.budget_unit.*'share'.*" + name):
            load_config(overrides=[f"al.acquisition={name}"])
    with pytest.raises(ConfigError, match="al.point_top_share.*1.5"):
        load_config(overrides=["al.acquisition=pixelpick_points", "al.budget_unit=clicks",
                               "al.budget_per_round=20", "al.point_top_share=1.5"])


# ---------------------------------------------------------------------- the loop's rows


class FakeScorer:
    """Two classes with p0 = 0.5 + (1 - SCORE / 10) / 2: margin = SCORE / 10 on every frame."""

    def __init__(self, cfg, info) -> None:
        pass

    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        p0 = torch.from_numpy(0.5 + (1 - SCORE / 10) / 2).float()
        probs = torch.stack([p0, 1 - p0])[None].repeat(len(images), 1, 1, 1)
        return probs[None]  # K=1 x N x C x H x W


@pytest.fixture()
def fake_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_points, "PoolScorer", FakeScorer)
    monkeypatch.setattr(loop_points, "inspect_checkpoints", lambda *args: None)
    monkeypatch.setattr(loop_labor, "decode_frames",
                        lambda batch, size, endpoint, retry_seconds=None: {"image": np.zeros((batch.num_rows, *size, 3), np.uint8)})


def rows_for(acquisition: str, table: pa.Table, budget: int, masks: dict, counts: dict,
             size: tuple[int, int] = (4, 4), **al) -> list[dict]:
    cfg = ALConfig(acquisition=acquisition, budget_unit="clicks", **al)
    return loop_points.point_rows(cfg, table, budget, masks.get, counts, "ckpt", size, load_config().store)


@pytest.mark.parametrize("acquisition", ["margin_points", "entropy_points"])
def test_uncertainty_point_rows_are_the_spread_top_pixels(fake_model, acquisition: str):
    rows = rows_for(acquisition, pool(2, 4, 4), 8, {}, {}, points_per_image=4)
    # two classes: entropy ranks pixels as margin does, so both give spread_top_points(SCORE)
    assert [r["points"] for r in rows] == [[[0, 0], [3, 3], [3, 0], [1, 2]]] * 2
    assert all(r["unit"] == "points" and r["cost_clicks"] == r["cost_pixels"] == 4 for r in rows)
    assert (rows[0]["y0"], rows[0]["x0"], rows[0]["y1"], rows[0]["x1"]) == (0, 0, 4, 4)
    validate_selection(selection_table(rows))


def test_pixelpick_point_rows_come_from_the_top_share(fake_model):
    rows = rows_for("pixelpick_points", pool(3, 4, 4), 6, {}, {}, points_per_image=2, point_top_share=0.25)
    top4 = {(0, 0), (0, 1), (1, 0), (1, 1)}  # ceil(0.25 x 16) = 4 most uncertain
    assert len(rows) == 3 and all({tuple(p) for p in r["points"]} <= top4 and r["cost_clicks"] == 2 for r in rows)


def test_point_rows_map_to_original_pixels_and_never_ask_a_labeled_one(fake_model):
    table = pool(1, 8, 8)  # scoring grid 4 x 4: grid (y, x) is original (2y, 2x)
    labeled = np.zeros((8, 8), bool)
    labeled[0, 0] = True  # grid (0, 0), the best pixel, is labeled: its cell gives (0, 1) instead
    rows = rows_for("margin_points", table, 4, {"img0": labeled}, {"img0": 1}, points_per_image=4)
    assert rows[0]["points"] == [[0, 2], [6, 6], [6, 0], [2, 4]]


def test_random_point_rows_need_no_model_and_are_answered_exactly(monkeypatch: pytest.MonkeyPatch, tmp_path):
    def no_model(*args):
        raise AssertionError("random points must not load or run a model")

    monkeypatch.setattr(loop_points, "PoolScorer", no_model)
    monkeypatch.setattr(loop_labor, "decode_frames", no_model)
    table = pool(4, 8, 8)
    labeled = np.zeros((8, 8), bool)
    labeled[:4] = True  # img1's top half is labeled
    rows = rows_for("random_points", table, 14, {"img1": labeled}, {"img1": 32}, points_per_image=4, seed=2)
    assert sum(r["cost_clicks"] for r in rows) == 14 and len(rows) == 4
    again = rows_for("random_points", table, 14, {"img1": labeled}, {"img1": 32}, points_per_image=4, seed=2)
    assert rows == again
    for row in rows:
        assert all(y % 2 == 0 and x % 2 == 0 for y, x in row["points"])  # pixels the 4 x 4 grid keeps
        if row["id"] == "img1":
            assert all(y >= 4 for y, _ in row["points"])
    selection = validate_selection(selection_table(rows))
    truth = np.arange(64, dtype=np.uint8).reshape(8, 8) % 7

    class Store:
        def __init__(self) -> None:
            self.written: dict[str, bytes] = {}

        def write_bytes(self, key: str, data: bytes) -> None:
            self.written[key] = data

    store = Store()
    oracle_label(selection, lambda _id: truth, store, "labels")
    for row in rows:
        answer = decode_label(store.written[f"labels/{row['id']}.png"], row["id"])
        asked = np.zeros((8, 8), bool)
        asked[tuple(np.asarray(row["points"]).T)] = True
        assert (answer[asked] == truth[asked]).all() and (answer[~asked] == 255).all()


def test_point_rows_with_a_real_model_are_the_rules_over_its_maps(tmp_path):
    """The real decode + PoolScorer path: each image's margin points are spread_top_points
    of the final model's margin map on the 32 x 40 grid, doubled to the 64 x 80 frames."""
    grid = (32, 40)
    checkpoint = write_checkpoints(tmp_path / "ckpt", k=1, size=grid) / "ckpt_00000001"
    uris = []
    for i in range(3):
        path = tmp_path / f"frame{i}.png"
        path.write_bytes(png_bytes(render_scene(7, i, (64, 80), "target")[0]))
        uris.append(str(path))
    table = pa.table({"id": ["f0", "f1", "f2"], "image_uri": uris, "height": [64] * 3, "width": [80] * 3})
    labeled = np.zeros((64, 80), bool)
    labeled[:, :40] = True  # f1's left half is labeled already
    store = load_config().store
    al = ALConfig(acquisition="margin_points", budget_unit="clicks", points_per_image=6, seed=1)
    rows = loop_points.point_rows(al, table, 15, {"f1": labeled}.get, {"f1": 64 * 40}, str(checkpoint), grid, store)
    assert sum(r["cost_clicks"] for r in rows) == 15 and all(r["cost_clicks"] == r["cost_pixels"] for r in rows)
    scorer = PoolScorer(ScoreConfig(pool="-", checkpoints=str(checkpoint), out="-", store=store),
                        inspect_checkpoints(str(checkpoint)))
    for row in rows:
        frame = decode_frames(pa.table({"id": [row["id"]], "image_uri": [row["uri"]], "shard": [0], "row": [0]}),
                              grid, None)["image"]
        margin_map = PIXEL_SCORES["margin"](scorer.probabilities(frame)[-1])[0].numpy()
        open_ = ~to_grid(labeled, grid) if row["id"] == "f1" else np.ones(grid, bool)
        want = spread_top_points(margin_map, open_, row["cost_clicks"]) * 2
        assert row["points"] == want.tolist()
        if row["id"] == "f1":
            assert all(x >= 40 for _, x in row["points"])
    pixelpick = loop_points.point_rows(replace(al, acquisition="pixelpick_points"), table, 18, {}.get, {},
                                       str(checkpoint), grid, store)
    assert [len(r["points"]) for r in pixelpick] == [6, 6, 6]
    assert all(len({tuple(p) for p in r["points"]}) == 6 for r in pixelpick)


def test_initial_points_land_on_the_training_grid_and_repeat_for_a_seed():
    from segrl.loop.points import initial_point_row

    row = initial_point_row("f1", "f1.png", (360, 480), (90, 120), 7, seed=3)
    assert row["unit"] == "points" and row["cost_clicks"] == row["cost_pixels"] == 7
    # every point is a pixel the nearest resize to 90 x 120 keeps: a multiple of 4 both ways
    assert all(y % 4 == 0 and x % 4 == 0 for y, x in row["points"])
    assert initial_point_row("f1", "f1.png", (360, 480), (90, 120), 7, seed=3)["points"] == row["points"]
    assert initial_point_row("f1", "f1.png", (360, 480), (90, 120), 7, seed=4)["points"] != row["points"]
    native = initial_point_row("f1", "f1.png", (6, 5), None, 30, seed=0)
    assert native["cost_clicks"] == 30 and len({tuple(p) for p in native["points"]}) == 30


def test_a_point_loop_starts_with_random_clicks_in_every_pool_image(tmp_path):
    from segrl.config import ConfigError, load_config
    from segrl.loop.run import ActiveLearningLoop

    base = [f"store.root={tmp_path}", "run=points", "data.synthetic_train_images=6", "al.initial_labeled=0",
            "al.acquisition=pixelpick_points", "al.budget_unit=clicks", "al.budget_per_round=12"]
    loop = ActiveLearningLoop(load_config(overrides=[*base, "al.initial_points_per_image=4"]))
    loop.state = {}
    loop._write_pool(loop._pool_frames())
    rows = loop._initial_rows()
    assert len(rows) == 6 and {r["unit"] for r in rows} == {"points"}
    assert [r["cost_clicks"] for r in rows] == [4] * 6
    with pytest.raises(ConfigError, match="al.initial_points_per_image.*cannot be combined with al.initial_labeled"):
        load_config(overrides=[*base, "al.initial_labeled=2", "al.initial_points_per_image=4"])
    with pytest.raises(ConfigError, match="al.initial_labeled.*al.initial_points_per_image"):
        load_config(overrides=base)
