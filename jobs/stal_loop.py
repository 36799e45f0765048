"""The STAL active-learning loop: select -> label -> train -> score, round after round.

    python jobs/stal_loop.py                                   # built-in: synthetic scenes, local Ray
    python jobs/stal_loop.py --config configs/camvid.yaml data.root=../shared/data/camvid   # the CamVid default: clicks
    ray job submit -- python jobs/stal_loop.py --config ... store.root=s3://bucket/runs
    python jobs/stal_loop.py --config ... --resume <run>        # or rerun with the same run name

Every round prints the table so far; the store holds state.json, each round's selection,
labels, model, scores and metrics, and report.md + miou_vs_labeled.png across rounds, and
review.html, a page of what each round chose (rewritten after every step).
With ``al.labeling=external`` the job stops after exporting what to label; import the
answers with jobs/import_labels.py and rerun to continue.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segrl.config import ConfigError, load_config
from segrl.console import add_verbose_flag

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stal_synthetic.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"experiment YAML (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--resume", metavar="RUN", help="continue this run (same as run=RUN)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. al.acquisition=region_entropy")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    from segrl.data.labels import DataError
    from segrl.loop.run import run_loop
    from segrl.storage import StoreError

    overrides = list(args.overrides) + ([f"run={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config or str(DEFAULT_CONFIG), overrides)
        summary = run_loop(cfg)
    except (ConfigError, StoreError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.table)
    if summary.message:
        print(summary.message)
    run = summary.run_uri.rstrip("/")
    print(f"status:  {summary.status}")
    print(f"run:     {run}")
    print(f"report:  {run}/report.md")
    print(f"plot:    {run}/miou_vs_labeled.png")
    print(f"metrics: {run}/metrics.json")
    print(f"review:  {run}/review.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
