"""benchmarks/al_camvid.py's table logic: which numbers share a line, and the targets' verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest
from _benchmarks import load_benchmark

from segrl.config import load_config


@pytest.fixture(scope="module")
def al():
    return load_benchmark("al_camvid")


def point_row(al, row, seed, *mious, recipe="supervised"):
    """A point row's result: round r has (r + 1) x 10 clicks per image when it is a loop."""
    clicks = [al.POOL_IMAGES * 20] if len(mious) == 1 else [al.POOL_IMAGES * 10 * (r + 1) for r in range(len(mious))]
    rounds = [{"round": r, "clicks": c, "labeled_share": c / (al.POOL_IMAGES * 172800), "val_miou": m}
              for r, (c, m) in enumerate(zip(clicks, mious, strict=True))]
    return {"row": row, "recipe": recipe, "seed": seed, "rounds": rounds, "seconds": 60.0}


def image_row(al, row, seed, *mious, shares=(0.011, 0.056, 0.101)):
    rounds = [{"round": r, "clicks": 0, "labeled_share": shares[r], "val_miou": m} for r, m in enumerate(mious)]
    return {"row": row, "recipe": "supervised", "seed": seed, "rounds": rounds, "seconds": 60.0}


def test_a_loops_round_zero_joins_its_random_method_once_per_seed(al):
    results = {
        "a": point_row(al, "random_points@20", 0, 0.30),
        "b": point_row(al, "pixelpick_points@20", 0, 0.25, 0.33),
        "c": point_row(al, "margin_points@20", 0, 0.25, 0.31),  # the same round 0 as b: counted once
        "d": image_row(al, "entropy_images", 0, 0.20, 0.28, 0.35, shares=(0.011, 0.055, 0.099)),
        "e": image_row(al, "random_images", 0, 0.20, 0.30, 0.36),
    }
    groups = al.budget_groups(results)
    assert groups[("10 clicks/img", "supervised")] == {"random_points": [
        {"budget": "10 clicks/img", "share": pytest.approx(10 / 172800), "miou": 0.25, "round": 0, "seed": 0}]}
    assert set(groups[("20 clicks/img", "supervised")]) == {"random_points", "pixelpick_points", "margin_points"}
    # pixel rounds share a line by name, whatever share each method spent
    assert set(groups[("~5.5% pixels", "supervised")]) == {"entropy_images", "random_images"}
    assert len(groups[("~1% pixels", "supervised")]["random_images"]) == 1


def test_targets_say_met_missed_or_not_measured_from_the_tables_numbers(al):
    ref = {"val_miou": 0.40}
    results = {
        **{f"r{s}": point_row(al, "random_points@20", s, m) for s, m in enumerate((0.30, 0.31, 0.29))},
        **{f"p{s}": point_row(al, "pixelpick_points@20", s, 0.26, m) for s, m in enumerate((0.385, 0.39, 0.395))},
        "i0": image_row(al, "random_images", 0, 0.20, 0.30, 0.36),
        "e0": image_row(al, "entropy_images", 0, 0.20, 0.28, 0.37),  # round 1 loses to random; round 2 wins
        "x0": image_row(al, "region_entropy", 0, 0.20, 0.31, 0.29),  # ends below its round before
    }
    lines = al.target_lines(al.budget_groups(results), ref, results)
    text = "\n".join(lines)
    assert "at <= 20 clicks/img, best row >= 95% of full: met (pixelpick_points, supervised, 20 clicks/img: " \
           "39.00 mIoU = 97.5%)" in text
    assert "at <= 5 clicks/img, best row >= 85% of full: not measured" in text
    # 39.0 vs 30.0: +9 mIoU, beyond 2 and beyond the spreads (0.5 + 1.0)
    assert "20 clicks/img (supervised): best active row pixelpick_points 39.00 vs random_points 30.00: +9.00 mIoU, " \
           "needed > 2.00: met (n = 3 and 3)" in text
    assert "~5.5% pixels (supervised): best active row region_entropy 31.00 vs random_images 30.00: +1.00 mIoU, " \
           "needed > 0.00: met on one seed, spread not known (n = 1 and 1)" in text
    assert "~10% pixels (supervised): best active row entropy_images 37.00 vs random_images 36.00" in text
    assert "no later round below the one before beyond the seeds' spread: MISSED: region_entropy (supervised) " \
           "round 2: -2.00 mIoU (n = 1)" in text


def test_a_small_gain_within_two_miou_is_missed_at_few_clicks(al):
    ref = {"val_miou": 0.40}
    results = {"r": point_row(al, "random_points@20", 0, 0.30), "p": point_row(al, "pixelpick_points@20", 0, 0.26, 0.31)}
    text = "\n".join(al.target_lines(al.budget_groups(results), ref, results))
    assert "best active row pixelpick_points 31.00 vs random_points 30.00: +1.00 mIoU, needed > 2.00: MISSED" in text
    assert "at <= 20 clicks/img, best row >= 95% of full: MISSED" in text


def test_a_row_whose_rounds_trained_other_steps_is_refused(al):
    al.check_equal_steps("random_points@20", "runs/x", [{"round": 0, "steps": 2000}], 2000)
    # a finished loop of an older setting (1000 steps), resumed under a name without the steps
    with pytest.raises(RuntimeError, match=r"runs/x\): round 1 trained 1000 steps, not the setting's 2000"):
        al.check_equal_steps("pixelpick_points@20", "runs/x",
                             [{"round": 0, "steps": 2000}, {"round": 1, "steps": 1000}], 2000)


def test_the_camvid_default_config_is_the_benchmarked_click_loop(al):
    """configs/camvid.yaml is what the README's numbers describe: pixelpick_points@20, supervised, equal steps."""
    default = Path(__file__).resolve().parents[2] / "configs" / "camvid.yaml"
    shipped = load_config(default)
    benchmarked_al = [o for o in al.common(al.SETTINGS["full"], "data", "runs") if o.startswith("al.")]
    benchmarked = load_config(default, [*al.ROWS["pixelpick_points@20"], *al.RECIPES["supervised"], *benchmarked_al])
    assert shipped.al == benchmarked.al  # the row's overrides change nothing in the shipped loop
    assert shipped.method.name == benchmarked.method.name == "supervised"
    assert shipped.train.steps == al.SETTINGS["full"]["steps"]
    assert tuple(shipped.data.base_size) == al.SETTINGS["full"]["size"]
    # 10 random + 10 PixelPick clicks in every one of CamVid train's frames: 20 per image
    per_image = shipped.al.initial_points_per_image + shipped.al.budget_per_round / al.POOL_IMAGES
    assert per_image == 20 and shipped.al.budget_per_round == shipped.al.points_per_image * al.POOL_IMAGES


def test_an_active_row_is_compared_with_random_on_the_seeds_both_ran(al):
    """Seed 0's lucky random images start its region loop too: against the mean of three
    random seeds the one-seed region row would look far better than it is."""
    ref = {"val_miou": 0.50}
    results = {
        **{f"i{s}": image_row(al, "random_images", s, *m)
           for s, m in enumerate(((0.41, 0.43, 0.43), (0.24, 0.25, 0.41), (0.23, 0.25, 0.36)))},
        "r0": image_row(al, "ripu_regions", 0, 0.41, 0.46, 0.47),
    }
    text = "\n".join(al.target_lines(al.budget_groups(results), ref, results))
    assert "~5.5% pixels (supervised): best active row ripu_regions 46.00 vs random_images 43.00: +3.00 mIoU, " \
           "needed > 0.00: met on one seed, spread not known (n = 1 and 1)" in text
    assert "~10% pixels (supervised): best active row ripu_regions 47.00 vs random_images 43.00: +4.00" in text


def test_the_best_row_is_the_best_of_the_most_seeds_and_its_per_seed_gaps_are_shown(al):
    ref = {"val_miou": 0.50}
    results = {
        **{f"i{s}": image_row(al, "random_images", s, *m)
           for s, m in enumerate(((0.41, 0.43, 0.43), (0.24, 0.25, 0.41), (0.23, 0.25, 0.36)))},
        **{f"r{s}": image_row(al, "ripu_regions", s, *m)
           for s, m in enumerate(((0.41, 0.46, 0.47), (0.24, 0.36, 0.45), (0.23, 0.42, 0.42)))},
        "l0": image_row(al, "labor_spl", 0, 0.41, 0.48, 0.45),  # one seed, a higher mean
    }
    text = "\n".join(al.target_lines(al.budget_groups(results), ref, results))
    # 41.33 +- 5.03 vs 31.00 +- 10.39: +10.33 within 15.43, though ahead on every seed
    assert "~5.5% pixels (supervised): best active row ripu_regions 41.33 vs random_images 31.00: +10.33 mIoU, " \
           "needed > 15.43: MISSED (n = 3 and 3); ahead on 3 of 3 seeds (+3.00 / +11.00 / +17.00), " \
           "paired gap +10.33 ± 7.02" in text


def test_frames_near_val_are_those_of_its_sequence_within_the_seconds(al):
    val = ["0016E5_07959", "0016E5_07961", "0016E5_08159"]
    train = ["0016E5_07650", "0016E5_07659", "0016E5_07680", "0016E5_08130", "0016E5_08459", "0016E5_08460",
             "0006R0_07959", "0001TP_008000", "Seq05VD_f00000"]
    # 30 Hz: 10 s is 300 frame numbers either side of a val frame (07659 and 08459 are exactly that)
    assert al.frames_near(train, val, 10) == ["0016E5_07659", "0016E5_07680", "0016E5_08130", "0016E5_08459"]
    assert al.frames_near(train, val, 1) == ["0016E5_08130"]
    assert al.frames_near(train, ["Seq05VD_f00030"], 1) == ["Seq05VD_f00000"]  # Seq05VD numbers carry an 'f'
    assert al.frames_near(train, val, 0) == []


def test_a_smaller_pool_counts_clicks_per_image_of_its_own_frames(al):
    """349 frames asked 20 clicks each: the line is '20 clicks/img', not 19 of the 367."""
    row = point_row(al, "random_points@20", 0, 0.30)
    row["rounds"][0]["clicks"] = 349 * 20
    assert list(al.budget_groups({"a": row}, pool_images=349)) == [("20 clicks/img", "supervised")]
    assert list(al.budget_groups({"a": row})) == [("19 clicks/img", "supervised")]
