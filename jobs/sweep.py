"""Sweep loss weights, budgets or any config key with Ray Tune; print the ranked table.

    python jobs/sweep.py --config configs/sweep_synthetic.yaml
    python jobs/sweep.py --config configs/sweep_camvid.yaml store.root=s3://bucket/runs

Rerunning the same sweep restores it: finished trials are kept, the rest continue.
"""

from __future__ import annotations

import argparse
import sys

from segrl.config import ConfigError
from segrl.console import add_verbose_flag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML (base config + space + tune)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the base config")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)

    from segrl.engine.tune import run_sweep
    from segrl.storage import StoreError
    from segrl.sweep import load_sweep

    try:
        sweep = load_sweep(args.config, args.overrides)
        result = run_sweep(sweep)
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.markdown)
    print(f"\nsweep:   {result.sweep_uri}{' (restored)' if result.restored else ''}")
    print(f"results: {result.sweep_uri.rstrip('/')}/results.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
