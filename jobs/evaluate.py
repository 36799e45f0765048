"""Evaluate a run's latest checkpoint on a split and print the per-class IoU table.

    python jobs/evaluate.py --run runs/camvid_supervised --split val
    python jobs/evaluate.py --run s3://bucket/runs/camvid_supervised --split val data.root=/data/camvid
"""

from __future__ import annotations

import argparse
import sys

from segrl.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder or s3:// URI")
    parser.add_argument("--split", default="val")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the saved config")
    args = parser.parse_args(argv)

    from segrl.evaluate import evaluate_run
    from segrl.storage import StoreError

    try:
        result = evaluate_run(args.run, args.split, args.overrides, args.endpoint_url, args.batch_size)
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.table)
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"results:    {result.output_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
