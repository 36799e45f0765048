"""Every self-training recipe on a real local Ray cluster: ProDA, whose extra terms average their
gradients across ranks, on 2 DDP workers; distillation and the ST++ pipeline, which have no
cross-rank code of their own, on 1 worker (each worker is a process that imports torch)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _tiny import tiny_overrides

from segrl.config import load_config
from segrl.engine.selftrain import run_self_training
from segrl.engine.train import train

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]

TINY = tiny_overrides(16, 4, (48, 64), "data.synthetic_unlabeled_images=16")


def losses(metrics: dict) -> list[float]:
    return [epoch["loss"] for epoch in metrics["history"]]


def test_proda_with_contrastive_and_adversarial_terms_then_distillation(tmp_path: Path, capfd):
    """ProDA's unlabeled target streams through Ray Data into both workers (as a pool too large
    for the frame cache would), decoded by Ray Data tasks on the CPU the workers leave."""
    # ProDA starts from a source-only model in practice; from scratch is enough to check the parts
    proda = train(load_config(overrides=[
        *TINY, f"store.root={tmp_path}", "name=proda", "train.epochs=3", "method.name=proda",
        "method.lambda_contrastive=0.1", "method.contrastive_threshold=0.0",
        "method.lambda_adv=0.01", "train.snapshots=1", "data.stream_unlabeled=always",
    ]))
    history = proda.metrics["history"]
    assert "[segrl] unlabeled set: streamed through Ray Data" in capfd.readouterr().out
    # every step of every epoch drew its unlabeled batch from the stream: 16 frames / 2 workers /
    # batch 4 = 2 steps an epoch, 4 unlabeled images a step, on 2 workers
    assert [epoch["streamed_unlabeled_images"] for epoch in history] == [16, 16, 16]
    assert all(math.isfinite(v) for v in losses(proda.metrics))
    assert losses(proda.metrics)[-1] < losses(proda.metrics)[0]
    # every term ran: its mean is logged per epoch
    assert {"loss_u", "loss_structure", "loss_contrastive", "loss_adv"} <= set(history[-1])
    assert history[-1]["loss_contrastive"] > 0
    assert history[-1]["eval_s"] > 0 and history[-1]["previous_checkpoint_s"] > 0  # the run's overheads
    snapshot = next((tmp_path / "proda" / "snapshots").glob("ckpt_*")) / "checkpoint.pt"
    distilled = train(load_config(overrides=[
        *TINY, f"store.root={tmp_path}", "name=distill", "train.steps=10", "method.name=distill",
        "compute.num_workers=1",
        f"method.teacher_weights={snapshot}",
    ]))
    assert losses(distilled.metrics)[-1] < losses(distilled.metrics)[0]
    # exactly train.steps optimiser steps: two 4-step epochs and a last one cut at step 10
    assert distilled.metrics["step"] == 10 and len(distilled.metrics["history"]) == 3
    assert list((tmp_path / "distill" / "train").glob("ckpt_*"))


def test_st_plus_plus_pipeline_splits_relabels_and_trains_two_students(tmp_path: Path):
    cfg = load_config(overrides=[*TINY, f"store.root={tmp_path}", "name=stpp", "train.epochs=2", "compute.num_workers=1",
                                 "method.name=st_pp", "method.checkpoints_k=2", "method.reliable_ratio=0.5"])
    summary = run_self_training(cfg)
    run = tmp_path / "stpp"
    reliable = (run / "reliable_ids.txt").read_text().split()
    unreliable = (run / "unreliable_ids.txt").read_text().split()
    assert len(reliable) == len(unreliable) == 8 and not set(reliable) & set(unreliable)
    assert len(list((run / "teacher" / "snapshots").glob("ckpt_*"))) == 2
    # stage 2 learns every unlabeled image: reliable ones with the teacher's labels,
    # the rest with the stage-1 student's
    import pyarrow.parquet as pq

    stage2 = pq.read_table(run / "pseudo_student2.parquet").to_pylist()
    assert len(stage2) == 16
    for row in stage2:
        owner = "teacher" if row["id"] in reliable else "student1"
        assert f"/pseudo/{owner}/pseudo_labels/" in row["label_uri"]
    assert set(summary.stages) == {"teacher", "pseudo_teacher", "split", "student1", "pseudo_student1", "student2"}
    student = summary.stages["student2"]
    assert student["steps"] == 2 * 16 // 4 and math.isfinite(summary.metrics["val_miou"])
    # a rerun of the finished pipeline trains nothing again
    again = run_self_training(cfg)
    assert again.stages == summary.stages
