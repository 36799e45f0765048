"""Metrics on hand-built cases whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from segrl.engine.train import free_loopback_port
from segrl.metrics import (
    confusion_matrix,
    format_iou_table,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
    prediction_miou,
)


def test_confusion_counts_truth_rows_prediction_columns_and_skips_ignore():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert conf.sum() == 5  # the ignored pixel is not counted


def test_iou_mean_and_accuracy_known_answer():
    conf = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    # class 0: tp 1, union 1+2+2-1... rows/cols: row0=2, col0=2 -> 1/(2+2-1)=1/3
    # class 1: tp 2, row1=2, col1=3 -> 2/3 ; class 2: tp 0, row2=1, col2=0 -> 0
    assert iou_per_class(conf).tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert mean_iou(conf) == pytest.approx(1 / 3)
    assert pixel_accuracy(conf) == pytest.approx(3 / 5)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 1])
    conf = confusion_matrix(pred, target, 4)
    ious = iou_per_class(conf)
    assert ious[:2].tolist() == [1.0, 1.0] and ious[2:].isnan().all()
    assert mean_iou(conf) == 1.0


def test_empty_matrix_gives_nan_not_an_exception():
    conf = torch.zeros(3, 3, dtype=torch.int64)
    assert math.isnan(mean_iou(conf)) and math.isnan(pixel_accuracy(conf))


def test_confusion_is_additive_over_batches():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 8, 8), generator=g)
    pred = torch.randint(0, 5, (4, 8, 8), generator=g)
    whole = confusion_matrix(pred, target, 5)
    parts = sum(confusion_matrix(pred[i], target[i], 5) for i in range(4))
    assert torch.equal(whole, parts)


def test_out_of_range_truth_is_rejected_with_the_value():
    with pytest.raises(ValueError, match=r"\[7\]"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 3)


def test_prediction_miou_is_one_for_identical_maps_and_symmetric():
    a = torch.tensor([[0, 1], [2, 2]])
    b = torch.tensor([[0, 1], [1, 2]])
    assert prediction_miou(a, a, 3) == 1.0
    assert prediction_miou(a, b, 3) == pytest.approx(prediction_miou(b, a, 3))
    # class 0: 1/1, class 1: 1/2, class 2: 1/2
    assert prediction_miou(a, b, 3) == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_table_lists_every_class_and_the_mean():
    conf = torch.tensor([[3, 1], [0, 0]])
    table = format_iou_table(conf, ["road", "bike"])
    assert "| road | 75.00 | 4 |" in table and "| bike | 0.00 | 0 |" in table
    assert "**37.50**" in table


def test_all_reduce_sums_over_gloo_ranks():
    """Two real gloo ranks in subprocesses each add their own matrix."""
    import torch.multiprocessing as mp

    # forked, not spawned: a spawned rank imports torch again, tens of seconds on two busy cores
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_loopback_port()
    procs = [ctx.Process(target=_reduce_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(r == [[1, 1], [0, 2]] for r in results)
    assert [p.exitcode for p in procs] == [0, 0]


def _reduce_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    from segrl.metrics import all_reduce_confusion

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mine = torch.tensor([[1, 0], [0, 1]]) if rank == 0 else torch.tensor([[0, 1], [0, 1]])
    queue.put(all_reduce_confusion(mine).tolist())
    dist.destroy_process_group()
