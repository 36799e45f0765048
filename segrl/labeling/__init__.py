"""Labeling: the ground-truth oracle and the export/import of manifests for annotators.

A round's selection (:data:`SELECTION_SCHEMA`) becomes sparse label maps under
``rounds/<NN>/labels/<id>.png``: uint8 HxW, class ids where a pixel was asked for,
the ignore index (255) elsewhere. :func:`oracle_label` answers from ground truth;
:func:`export_manifest` / :func:`import_labels` go through people (PNG answers), and
``segrl.labeling.label_studio`` / ``segrl.labeling.cvat`` through their tools
(``segrl.labeling.tools`` picks by config and by file); ``segrl.labeling.answers`` holds
the checks every import shares.
"""

from segrl.labeling.answers import MARKER_NAME, LabelImportError, dropped_pixels, store_answers
from segrl.labeling.external import export_manifest, import_labels
from segrl.labeling.oracle import (
    SELECTION_COLUMNS,
    SELECTION_SCHEMA,
    UNITS,
    encode_label_png,
    label_key,
    labeled_pixel_count,
    merge_sparse,
    oracle_label,
    requested_mask,
    rows_by_image,
    selection_table,
    sparse_label,
    store_mask_reader,
    validate_selection,
)

__all__ = [
    "MARKER_NAME",
    "SELECTION_COLUMNS",
    "SELECTION_SCHEMA",
    "UNITS",
    "LabelImportError",
    "dropped_pixels",
    "encode_label_png",
    "export_manifest",
    "import_labels",
    "label_key",
    "labeled_pixel_count",
    "merge_sparse",
    "oracle_label",
    "requested_mask",
    "rows_by_image",
    "selection_table",
    "sparse_label",
    "store_answers",
    "store_mask_reader",
    "validate_selection",
]
