"""Loss curves as a PNG: train loss and validation loss (with bits per byte) against steps, and the LR below.

Drawn with matplotlib's Agg canvas on a `Figure` of its own (no pyplot, no global backend switch), so it is
safe in any process, headless or not, and nothing happens at import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def plot_loss_curves(records: Iterable[Mapping[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Write the loss-curve PNG for a run's metrics records (the lines of metrics.jsonl) and return its path.

    Records with `event == "train"` give the train curve (`step`, `loss`, `lr`); `event == "eval"` gives
    the validation curve (`step`, `val_loss`, `val_bpb`). The file is replaced atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    # a loss that was not finite is null in metrics.jsonl (strict JSON): a gap in the curve
    train = [(r["step"], r["loss"], r.get("lr")) for r in records if r.get("event") == "train" and _num(r.get("loss"))]
    val = [
        (r["step"], r["val_loss"], r.get("val_bpb"))
        for r in records
        if r.get("event") == "eval" and _num(r.get("val_loss"))
    ]

    fig = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if train:
        ax.plot([s for s, _, _ in train], [v for _, v, _ in train], lw=1.2, color="tab:blue", label="train loss")
    if val:
        ax.plot([s for s, _, _ in val], [v for _, v, _ in val], "o-", ms=4, color="tab:orange", label="val loss")
        last = val[-1]
        best = min(val, key=lambda v: v[1])
        if last[2] is not None and last[1] > 0:
            ratio = last[2] / last[1]  # bpb is a fixed multiple of the loss for a given split
            bpb_ax = ax.secondary_yaxis("right", functions=(lambda x: x * ratio, lambda x: x / ratio))
            bpb_ax.set_ylabel("val bits per byte")
            ax.annotate(f"best val {best[1]:.3f} ({best[1] * ratio:.3f} bpb)", xy=(best[0], best[1]),
                        xytext=(0, 12), textcoords="offset points", ha="center", fontsize=8)  # fmt: skip
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(loc="upper right")
    ax.set_title(title or "loss")
    lrs = [(s, lr) for s, _, lr in train if lr is not None]
    if lrs:
        ax_lr.plot([s for s, _ in lrs], [lr for _, lr in lrs], color="tab:green", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _num(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
