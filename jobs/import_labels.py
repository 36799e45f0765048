"""Import annotators' labels for one round of an active-learning run.

    python jobs/import_labels.py --run runs/camvid-al --round 3 --labels ~/answers/round03
    python jobs/import_labels.py --run runs/camvid-al --round 3 --labels ~/Downloads/project-1.json
    python jobs/import_labels.py --run runs/camvid-al --round 3 --labels ~/Downloads/task_7.zip
    python jobs/import_labels.py --run s3://bucket/runs/camvid-al --round 3 \\
        --labels s3://bucket/answers/round03 --endpoint-url http://seaweed:8333

Reads the round's selection from <run>/rounds/<NN>/selection.parquet (NN = the round,
two digits) and the classes from keys "num_classes" and "classes" of <run>/state.json.
--labels is one of (--format auto tells them apart by name):
  png           a folder of single-channel <id>.png, one per selected id (see the README.md
                the export wrote)
  label_studio  Label Studio's JSON export (.json) of the project made from tasks.json
  cvat          a CVAT export: "CVAT for images 1.1" (annotations.xml or its .zip) or
                "Segmentation mask 1.1" (.zip or unzipped folder with labelmap.txt)
Every answer is checked before anything is written; only the requested pixels are kept
and the sparse labels go to <run>/rounds/<NN>/labels/ with an _IMPORTED.json marker last.
Exit status 2, with the problems listed, when the labels are rejected.
"""

from __future__ import annotations

import argparse
import sys

from segrl.console import exit_now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run folder: local path or s3://bucket/prefix")
    parser.add_argument("--round", required=True, type=int, help="round number (0, 1, ...)")
    parser.add_argument("--labels", required=True,
                        help="folder or s3:// prefix of <id>.png files, or a Label Studio / CVAT export")
    parser.add_argument("--format", default="auto", choices=("auto", "png", "label_studio", "cvat"),
                        help="what --labels holds (default: by its name)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    args = parser.parse_args(argv)
    # Imported here so --help answers without loading numpy, pyarrow and friends.
    from segrl.data.labels import DataError
    from segrl.labeling.tools import import_answers
    from segrl.loop.state import STATE_FILE, read_state_object
    from segrl.storage import StoreError, open_store

    if args.round < 0:
        print(f"error: --round must be >= 0, got {args.round}", file=sys.stderr)
        return 2
    round_dir = f"rounds/{args.round:02d}"
    try:
        store = open_store(args.run, args.endpoint_url)
        state = read_state_object(store)  # a damaged file is named, with how to recover
        num_classes = _num_classes(state, store.uri(STATE_FILE))
        selection = store.read_table(f"{round_dir}/selection.parquet")
        summary = import_answers(
            selection,
            args.labels,
            store,
            f"{round_dir}/labels",
            num_classes,
            state.get("classes"),
            fmt=args.format,
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
    dropped = {i: n for i, n in summary["dropped_pixels_per_image"].items() if n}
    if dropped:
        print("dropped (labeled outside the request, not taken): "
              + ", ".join(f"{i} {n} px" for i, n in dropped.items()))
    if summary["clicks"]:
        print(f"clicks charged: {summary['clicks']}")
    if summary["unlabeled_images"]:
        print(f"images with no requested pixel labeled: {', '.join(summary['unlabeled_images'])}")
    if summary.get("skipped_files"):
        print(f"skipped (not <id>.png): {', '.join(summary['skipped_files'])}")
    print(f"labels: {summary['labels']}")
    return 0


def _num_classes(state: dict, source: str) -> int:
    """The run's class count, state.json's key "num_classes"."""
    from segrl.loop.state import damaged

    value = state.get("num_classes")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise damaged(source, f"it needs a positive integer 'num_classes', got {value!r}")
    classes = state.get("classes")
    if classes is not None and not (isinstance(classes, list) and len(classes) == value):
        raise damaged(source, f"its 'classes' {classes!r} are not a list of {value} class names")
    return value


if __name__ == "__main__":
    exit_now(main())  # the status a script sees, never an abort in the interpreter's teardown
