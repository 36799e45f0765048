"""What a user sees after every round: a markdown table across rounds and a plot of mIoU
against the labeled share of the pool."""

from __future__ import annotations

import io
from typing import Any


def rounds_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per round with labels so far, val mIoU, the model's training steps and
    time per step."""
    lines = [
        "| round | labeled images | labeled pixels | labeled share % | clicks | val mIoU % | "
        "train steps | select s | label s | train s | score s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        seconds = row.get("seconds", {})
        miou = row.get("val_miou")
        lines.append(
            f"| {row['round']} | {row['labeled_images']} | {row['labeled_pixels']} | "
            f"{100 * row['labeled_share']:.3f} | {row.get('clicks', 0)} | "
            f"{'-' if miou is None else f'{100 * miou:.2f}'} | "
            # the optimiser steps of the round's model: rounds of one loop compare only at equal steps
            f"{row.get('steps') if row.get('steps') is not None else '-'} | "
            + " | ".join(f"{seconds[k]:.1f}" if k in seconds else "-" for k in ("select", "label", "train", "score"))
            + " |"
        )
    return "\n".join(lines)


def miou_plot_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """PNG bytes of val mIoU (%) against labeled share of the pool (%), one point per round."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("val_miou") is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([100 * r["labeled_share"] for r in done], [100 * r["val_miou"] for r in done], marker="o")
    for r in done:
        ax.annotate(str(r["round"]), (100 * r["labeled_share"], 100 * r["val_miou"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("labeled share of the pool's pixels (%)")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
