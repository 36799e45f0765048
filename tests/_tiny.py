"""Config overrides for runs small enough for the integration tests on 2 cores."""

from __future__ import annotations


def tiny_overrides(train_images: int, val_images: int, size: tuple[int, int], *extra: str) -> list[str]:
    """Overrides for a run small enough for 2 cores: synthetic data, constant lr, 2 DDP workers.

    The workers ask for half a CPU each so Ray Data's read tasks and the driver are never starved.
    """
    h, w = size
    return [
        f"data.synthetic_train_images={train_images}",
        f"data.synthetic_val_images={val_images}",
        f"data.synthetic_size=[{h},{w}]",
        f"data.crop_size=[{h},{w}]",
        "train.batch_size=4",
        "train.lr=0.003",
        "train.schedule=constant",
        "train.log_every_steps=1000",
        "compute.num_workers=2",
        "compute.cpus_per_worker=0.5",
        "compute.threads_per_worker=1",
        *extra,
    ]
