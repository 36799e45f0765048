"""Import annotators' label PNGs for one round of an active-learning run.

    python jobs/import_labels.py --run runs/camvid-al --round 3 --labels ~/answers/round03
    python jobs/import_labels.py --run s3://bucket/runs/camvid-al --round 3 \\
        --labels s3://bucket/answers/round03 --endpoint-url http://seaweed:8333

Reads the round's selection from <run>/rounds/<NN>/selection.parquet (NN = the round,
two digits) and the class count from key "num_classes" of <run>/state.json; expects
one single-channel PNG per selected id, <id>.png, in the --labels folder (see the
README.md the export wrote). Every file is checked before anything is written; the
sparse labels go to <run>/rounds/<NN>/labels/ with an _IMPORTED.json marker last.
Exit status 2, with the problems listed, when the labels are rejected.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run folder: local path or s3://bucket/prefix")
    parser.add_argument("--round", required=True, type=int, help="round number (0, 1, ...)")
    parser.add_argument("--labels", required=True, help="folder or s3:// prefix of <id>.png files")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    args = parser.parse_args(argv)
    # Imported here so --help answers without loading numpy, pyarrow and friends.
    from segrl.data.labels import DataError
    from segrl.labeling import import_labels
    from segrl.storage import StoreError, open_store

    if args.round < 0:
        print(f"error: --round must be >= 0, got {args.round}", file=sys.stderr)
        return 2
    round_dir = f"rounds/{args.round:02d}"
    try:
        store = open_store(args.run, args.endpoint_url)
        num_classes = _num_classes(store.read_json("state.json"), store.uri("state.json"))
        selection = store.read_table(f"{round_dir}/selection.parquet")
        summary = import_labels(
            selection,
            args.labels,
            store,
            f"{round_dir}/labels",
            num_classes,
            endpoint_url=args.endpoint_url,
        )
    except (DataError, StoreError) as exc:
        # Rejected or unreadable input: import_labels wrote nothing.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"imported {summary['images']} label map(s): {summary['labeled_pixels']} of "
        f"{summary['requested_pixels']} requested pixels labeled"
    )
    if summary["unlabeled_images"]:
        print(f"images with no requested pixel labeled: {', '.join(summary['unlabeled_images'])}")
    if summary["skipped_files"]:
        print(f"skipped (not <id>.png): {', '.join(summary['skipped_files'])}")
    print(f"labels: {summary['labels']}")
    return 0


def _num_classes(state: object, source: str) -> int:
    """The run's class count, state.json's key "num_classes"."""
    from segrl.data.labels import DataError

    value = state.get("num_classes") if isinstance(state, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"{source} needs a positive integer 'num_classes', got {value!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
