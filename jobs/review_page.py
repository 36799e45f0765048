"""Rewrite the review page (review.html, review.json) of a stored loop run, running no step.

    python jobs/review_page.py --run runs/camvid_stal
    python jobs/review_page.py --run runs/camvid_stal report.compare_runs=[runs/camvid_random]

The loop rewrites the page after every step by itself; this is for a page with other
``report.*`` settings (compare runs, frames per round) or of a run that is not running.
It reads the run's config.yaml, so the dataset (the oracle's ground truth) and the round
models must be where the run found them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from segrl.config import ConfigError, load_config
from segrl.data.labels import DataError
from segrl.loop.run import ActiveLearningLoop
from segrl.storage import StoreError, open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run folder (local or s3://), holding config.yaml")
    parser.add_argument("overrides", nargs="*", help="report.* overrides, e.g. report.frames_per_round=24")
    args = parser.parse_args(argv)
    wrong = [o for o in args.overrides if not o.startswith("report.")]
    if wrong:
        print(f"error: only report.* keys can be overridden here, not {wrong[0]!r}", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory() as folder:  # load_config reads a local file; the run may be in S3
            config = Path(folder) / "config.yaml"
            config.write_text(open_store(args.run).read_text("config.yaml"))
            cfg = load_config(config, args.overrides)
        page = ActiveLearningLoop(cfg).write_review()
    except (ConfigError, StoreError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"review:  {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
