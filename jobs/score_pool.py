"""Score an unlabeled pool with a run's checkpoints on Ray Data (one pass, every signal).

    python jobs/score_pool.py --config configs/score_synthetic.yaml
    python jobs/score_pool.py --config configs/score_camvid.yaml \\
        pool=s3://bucket/pool.parquet checkpoints=s3://bucket/run/train out=s3://bucket/run/rounds/00
    ray job submit --working-dir . -- python jobs/score_pool.py --config ...

Writes scores.parquet, errors.parquet (and regions.parquet, pseudo_labels/) under `out`.
Rerunning with the same `out` skips the shards already committed.
"""

from __future__ import annotations

import argparse
import sys

from segrl.config import ConfigError, ScoreConfig, load_config
from segrl.console import add_verbose_flag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="scoring YAML (see configs/score_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pool=... out=...")
    parser.add_argument("--top", type=int, default=10, help="print the N most uncertain frames")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)

    from segrl.data.labels import DataError
    from segrl.engine.score import score_pool
    from segrl.storage import StoreError

    try:
        cfg = load_config(args.config, args.overrides, cls=ScoreConfig)
        summary = score_pool(cfg)
    except (ConfigError, DataError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"scored {summary.scored} frames ({summary.errors} unreadable) in {summary.seconds:.1f}s; "
          f"{summary.shards_scored_now} shard(s) scored now, {summary.shards_skipped} already done")
    _print_top(summary.scores_uri, cfg, args.top)
    print(f"scores:  {summary.scores_uri}")
    print(f"errors:  {summary.errors_uri}")
    if summary.regions_uri:
        print(f"regions: {summary.regions_uri}")
    return 0


def _print_top(scores_uri: str, cfg: ScoreConfig, n: int) -> None:
    from segrl.storage import open_store

    store = open_store(scores_uri.rsplit("/", 1)[0], cfg.store.endpoint_url or None)
    table = store.read_table("scores.parquet")
    column = next((c for c in ("entropy_mean", "margin_mean", "instability") if c in table.column_names), None)
    if column is None or n <= 0 or table.num_rows == 0:
        return
    rows = sorted(zip(table.column(column).to_pylist(), table.column("id").to_pylist(), strict=True),
                  reverse=True)[:n]
    print(f"\nTop {len(rows)} frames by {column} (label these first):")
    print(f"| rank | id | {column} |\n| ---: | --- | ---: |")
    for rank, (value, sample_id) in enumerate(rows, 1):
        print(f"| {rank} | {sample_id} | {value:.4f} |")
    print()


if __name__ == "__main__":
    sys.exit(main())
