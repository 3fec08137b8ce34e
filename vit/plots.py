"""Pictures of a run, drawn with matplotlib's object API on the Agg canvas: no display, no
pyplot and its global figure registry, so a figure can be drawn on any thread (the trainer draws
curves.png on its background writer)."""
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vit.environment import atomic_write


def new_figure(**kwargs) -> Figure:
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def save_figure(fig: Figure, path, dpi: int = 120):
    """A PNG written atomically (a kill mid-write never leaves a broken one). A figure made by
    pyplot (it has a manager) is closed, so pyplot's registry does not keep it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    if fig.canvas.manager is not None:
        import matplotlib.pyplot as plt
        plt.close(fig)


def plot_curves(rows: list[dict], path):
    """Train and test loss, train and test accuracy against epoch, from metrics rows (and the
    average of the weights' test loss and accuracy when the rows have them), titled with the run's
    name: the folder the picture is written into, the run directory."""
    path = Path(path)
    save_figure(curves_figure(rows, run_name=path.resolve().parent.name), path)


def curves_figure(rows: list[dict], run_name: str) -> Figure:
    epochs = [int(r["epoch"]) for r in rows]
    fig = new_figure(figsize=(11, 4.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    curves = [("train", "train", "-o"), ("test", "test", "-s")]
    if "ema_test_loss" in rows[0]:
        curves.append(("ema_test", "test, average of the weights", "-^"))
    for prefix, label, style in curves:
        loss_ax.plot(epochs, [float(r[f"{prefix}_loss"]) for r in rows], style, label=label, markersize=3)
        acc_ax.plot(epochs, [100 * float(r[f"{prefix}_acc"]) for r in rows], style, label=label, markersize=3)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    best = max(rows, key=lambda r: float(r["test_acc"]))
    # The note sits inside the axes, in the lower right corner (accuracy curves rise away from it),
    # wherever the best epoch is: an offset from the point ran over the tick labels at epoch 1.
    acc_ax.annotate(f"best test {100 * float(best['test_acc']):.2f}% (epoch {int(best['epoch'])})",
                    (int(best["epoch"]), 100 * float(best["test_acc"])), xytext=(0.97, 0.05),
                    textcoords="axes fraction", ha="right", va="bottom", arrowprops={"arrowstyle": "->"})
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # One legend for both panels, below them: inside either it would cover curves that fill the axes.
    fig.legend(*loss_ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(curves))
    fig.suptitle(f"Run {run_name}: {len(rows)} epoch{'s' * (len(rows) != 1)}")
    return fig


def plot_confusion(matrix, class_names: list[str], path, title: str = "Confusion matrix"):
    """A labelled confusion matrix with the count in every cell: rows are the true class,
    columns the predicted class. matrix: [C, C] integer counts (nested lists or a tensor)."""
    counts = [[int(c) for c in row] for row in matrix]
    n = len(class_names)
    fig = new_figure(figsize=(1.0 + 0.75 * n, 0.6 + 0.7 * n))
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images")
    # Dark text on light cells and white text on dark ones, so every count stays readable.
    threshold = max(max(row) for row in counts) / 2
    for true in range(n):
        for predicted in range(n):
            count = counts[true][predicted]
            ax.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    save_figure(fig, path)


def plot_mistakes(images, true_names: list[str], predicted_names: list[str], confidences: list[float], path,
                  columns: int = 5, title: str = "Most confident mistakes"):
    """A grid of uint8 images [K, 3, H, W], each captioned with its true class, the predicted
    class and the probability the model gave to its (wrong) prediction."""
    count = len(true_names)
    rows = max(1, -(-count // columns))
    fig = new_figure(figsize=(2.0 * columns, 2.3 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if count == 0:
        axes[0][0].text(0, 0.5, "no mistakes", fontsize=14, transform=axes[0][0].transAxes)
    for ax, image, true, predicted, confidence in zip(axes.flat, images, true_names, predicted_names, confidences):
        # Nearest-neighbour upscaling shows the pixels the model saw, not a smoothed version.
        ax.imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(f"true: {true}\npred: {predicted} ({100 * confidence:.1f}%)", fontsize=9)
    fig.suptitle(title)
    save_figure(fig, path)
