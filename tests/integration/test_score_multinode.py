"""Scoring across two Ray nodes (ray.cluster_utils.Cluster, logical GPUs) gives the
same table as scoring the same frames in a plain process."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from _pools import write_checkpoints, write_pool

from segrl.config import ScoreConfig, load_config
from segrl.engine.score import decode_frames, iter_shards, score_pool
from segrl.scoring import PoolScorer, inspect_checkpoints

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    cluster.shutdown()


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


def test_two_nodes_score_like_a_plain_process(two_nodes, tmp_path):
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
