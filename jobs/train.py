"""Train a segmentation model on Ray Train.

    python jobs/train.py                                          # synthetic scenes, local Ray
    python jobs/train.py --config configs/camvid_supervised.yaml data.root=../shared/data/camvid
    ray job submit -- python jobs/train.py --config ... store.root=s3://bucket/runs

Rerunning the same run name resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from segrl.config import ConfigError, load_config
from segrl.console import add_verbose_flag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (default: built-in synthetic config)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.01")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    from segrl.engine.selftrain import run_self_training
    from segrl.engine.train import train
    from segrl.storage import StoreError

    try:
        cfg = load_config(args.config, args.overrides)
        # st / st_pp are pipelines of several training runs and scoring passes
        summary = run_self_training(cfg) if cfg.method.name in ("st", "st_pp") else train(cfg)
    except (ConfigError, StoreError, ValueError, FileNotFoundError) as exc:
        # Bad input found before training started: nothing was written to the store.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.metrics.get("table", ""))
    print(f"run:        {summary.run_uri}")
    if hasattr(summary, "checkpoint_uri"):
        print(f"checkpoint: {summary.checkpoint_uri}")
    else:
        for stage, result in summary.stages.items():
            print(f"stage {stage}: {result}")
    print(f"metrics:    {summary.run_uri.rstrip('/')}/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
