"""Two Ray nodes (ray.cluster_utils.Cluster, 1 CPU and 1 logical GPU each), one cluster for the
module: scoring across them gives the same table as a plain process, and DDP training with one
worker on each node gives the same result as both workers on one node."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from _pools import write_checkpoints, write_pool

from segrl.config import ScoreConfig, load_config
from segrl.engine.score import decode_frames, iter_shards, score_pool
from segrl.engine.train import train
from segrl.scoring import PoolScorer, inspect_checkpoints

pytestmark = pytest.mark.integration


def plain_scores(cfg: ScoreConfig) -> dict[str, np.ndarray]:
    """The same frames through the same functions, no Ray: the reference answer."""
    info = inspect_checkpoints(cfg.checkpoints)
    scorer = PoolScorer(cfg, info)
    rows = []
    for _, table in iter_shards(cfg):
        batch = decode_frames(table, tuple(cfg.image_size), None)
        ok = batch["error"] == ""
        if not ok.any():
            continue
        out = scorer.score(batch["image"][ok], list(batch["id"][ok]), batch["original_size"][ok])
        rows.append({"id": batch["id"][ok], **out})
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def test_two_nodes_score_like_a_plain_process(two_node_cluster, tmp_path):
    manifest, bad = write_pool(tmp_path / "pool")
    checkpoints = write_checkpoints(tmp_path / "train", k=2)
    cfg = load_config(overrides=[
        f"pool={manifest}", f"checkpoints={checkpoints}", f"out={tmp_path / 'out'}",
        "image_size=[64,80]", "batch_size=4", "shard_size=8",
    ], cls=ScoreConfig)
    summary = score_pool(cfg, progress=False)
    assert summary.scored == 20 and summary.errors == len(bad)

    from ray.util.state import list_actors

    workers = [a for a in list_actors(limit=1000) if "MapWorker" in a.class_name]
    assert len({a.node_id for a in workers}) == 2, "the actors did not spread over both nodes"

    table = pq.read_table(tmp_path / "out" / "scores.parquet").to_pandas().set_index("id")
    reference = plain_scores(cfg)
    table = table.loc[list(reference["id"])]
    for column in ("entropy_mean", "margin_mean", "stability", "mean_max_prob"):
        np.testing.assert_allclose(table[column].to_numpy(), reference[column], atol=1e-5, err_msg=column)
    assert (np.stack(table["class_hist"].to_numpy()) == reference["class_hist"]).all()


TINY_TRAIN = ["data.synthetic_train_images=16", "data.synthetic_val_images=4", "data.synthetic_size=[48,64]",
              "data.crop_size=[48,64]", "train.batch_size=4", "train.epochs=1", "train.log_every_steps=1000",
              "compute.num_workers=2", "compute.threads_per_worker=1", "compute.use_gpu=false"]


def train_worker_nodes(run):
    """``run()``'s result and the node ids of the Ray Train workers it started."""
    from ray.util.state import list_actors

    def workers() -> dict[str, str]:
        return {a.actor_id: a.node_id for a in list_actors(limit=10000) if a.class_name == "RayTrainWorker"}

    before = workers()
    result = run()
    return result, [node for actor, node in workers().items() if actor not in before]


def test_two_node_training_matches_one_node(two_node_cluster, tmp_path):
    def run(name: str, cpus_per_worker: float):
        return lambda: train(load_config(overrides=[*TINY_TRAIN, f"name={name}", f"store.root={tmp_path}",
                                                    f"compute.cpus_per_worker={cpus_per_worker}"]))

    # a whole CPU per worker and one per node: the workers must spread; half a CPU each: packed
    spread, spread_nodes = train_worker_nodes(run("spread", 1))
    single, single_nodes = train_worker_nodes(run("single", 0.5))
    assert len(spread_nodes) == 2 and len(set(spread_nodes)) == 2
    assert len(single_nodes) == 2 and len(set(single_nodes)) == 1
    losses = [h["loss"] for h in spread.metrics["history"]]
    assert losses == pytest.approx([h["loss"] for h in single.metrics["history"]], rel=1e-4)
    assert spread.metrics["val_miou"] == pytest.approx(single.metrics["val_miou"], abs=1e-4)
