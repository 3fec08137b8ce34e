"""Pictures of a run, drawn with matplotlib's non-interactive backend (no display needed)."""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path):
    """Write to a temporary name, then rename: a kill mid-write never leaves a broken PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(rows: list[dict], path):
    """Train and test loss, train and test accuracy against epoch, from metrics.csv rows."""
    epochs = [int(r["epoch"]) for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        loss_ax.plot(epochs, [float(r[f"{split}_loss"]) for r in rows], style, label=split, markersize=3)
        acc_ax.plot(epochs, [100 * float(r[f"{split}_acc"]) for r in rows], style, label=split, markersize=3)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    best = max(rows, key=lambda r: float(r["test_acc"]))
    acc_ax.annotate(f"best test {100 * float(best['test_acc']):.2f}%", (int(best["epoch"]), 100 * float(best["test_acc"])),
                    textcoords="offset points", xytext=(-60, -25), arrowprops={"arrowstyle": "->"})
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
