"""Test fixtures for scoring: K checkpoints of an untrained model and pools with bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segrl.data.synthetic import SYNTHETIC_CLASSES, render_scene
from segrl.models import build_model
from segrl.scoring import save_scoring_checkpoint

ARCH = "lraspp_mobilenet_v3_large"
SIZE = (64, 80)


def write_checkpoints(root: Path, k: int = 3, size: tuple[int, int] = SIZE) -> Path:
    """``root/ckpt_0000000{1..k}/checkpoint.pt``: k differently initialised models.

    The models are untrained, which is all the scoring pipeline needs: distinct
    checkpoints give distinct predictions, so stability is below 1.
    """
    for i in range(1, k + 1):
        torch.manual_seed(i)
        model = build_model(ARCH, len(SYNTHETIC_CLASSES))
        save_scoring_checkpoint(str(root / f"ckpt_{i:08d}"), model, ARCH, SYNTHETIC_CLASSES, size, i)
    return root


def png_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, **kwargs).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_FILES = {
    "empty": b"",
    "truncated": None,  # filled in below: the first half of a real PNG
    "not_an_image": b"this is a text file, not a frame\n" * 20,
    "sixteen_bit": None,  # a 16-bit grey PNG: a depth map, not a photo
}


def write_pool(root: Path, good: int = 20, size: tuple[int, int] = SIZE) -> tuple[Path, list[str]]:
    """A manifest of ``good`` real synthetic frames (PNG, some at another size) plus bad rows.

    Returns the manifest path and the ids of the bad rows (empty, truncated, not an
    image, 16-bit, missing file).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(good):
        frame_size = size if i % 4 else (size[0] * 2, size[1] * 2)  # mixed sizes get resized
        image, _ = render_scene(7, i, frame_size, "target")
        (images / f"frame_{i:03d}.png").write_bytes(png_bytes(image))
        rows.append({"id": f"frame_{i:03d}", "image_uri": f"images/frame_{i:03d}.png"})
    whole = png_bytes(render_scene(7, 999, size, "target")[0])
    bad = dict(BAD_FILES, truncated=whole[: len(whole) // 2],
               sixteen_bit=png_bytes((np.arange(size[0] * size[1]).reshape(size) * 7).astype(np.uint16)))
    for name, data in bad.items():
        (images / f"{name}.png").write_bytes(data)
        rows.append({"id": f"bad_{name}", "image_uri": f"images/{name}.png"})
    rows.append({"id": "bad_missing", "image_uri": "images/does_not_exist.png"})
    manifest = root / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest, [r["id"] for r in rows if r["id"].startswith("bad_")]
