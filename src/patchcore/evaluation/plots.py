"""Decision plots of one evaluated dataset (`--save_plots`): ROC and precision-recall curves
of the image scores and a histogram of the good and defective images' scores, each with the
saved threshold marked, as PNGs under `plots/` of the run folder.

The curves are read off the metrics' own ranking (`patchcore.evaluation.metrics.
ranked_counts`: true and false positives at each distinct score, as scikit-learn's
`roc_curve` and `precision_recall_curve` count them); the threshold's own point comes from `patchcore.model.calibration.decide`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from patchcore.evaluation.metrics import ranked_counts
from patchcore.files import atomic_write, make_folder
from patchcore.model.calibration import decide

PLOTS_FOLDER = "plots"
PLOT_KINDS = ("roc", "pr", "scores")


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates [T + 1], from (0, 0)."""
    true_positives, false_positives = ranked_counts(scores, labels)
    positives, negatives = true_positives[-1], false_positives[-1]
    fpr = np.r_[0.0, false_positives / max(negatives, 1)]
    tpr = np.r_[0.0, true_positives / max(positives, 1)]
    return fpr, tpr


def pr_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision [T] at each distinct score, highest score first."""
    true_positives, false_positives = ranked_counts(scores, labels)
    recall = true_positives / max(true_positives[-1], 1)
    precision = true_positives / (true_positives + false_positives)
    return recall, precision


def _threshold_point(scores, labels, threshold: float) -> tuple[float, float, float]:
    """(false-positive rate, recall, precision) of the decisions at `threshold`."""
    rejected = decide(np.asarray(scores, dtype=np.float64), threshold)
    labels = np.asarray(labels).astype(bool)
    fpr = float(rejected[~labels].mean()) if (~labels).any() else float("nan")
    recall = float(rejected[labels].mean()) if labels.any() else float("nan")
    precision = float(labels[rejected].mean()) if rejected.any() else float("nan")
    return fpr, recall, precision


def _save(figure: Figure, path: Path) -> None:
    canvas = FigureCanvasAgg(figure)
    atomic_write(path, lambda temporary: canvas.print_png(str(temporary)))


def save_decision_plots(
    folder: Path, dataset: str, scores, labels, threshold: float | None
) -> list[Path]:
    """Writes `<dataset>_roc.png`, `_pr.png` (when both good and defective images exist) and
    `_scores.png` into `folder`; returns their paths."""
    folder = make_folder(Path(folder))
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    written = []
    marked = threshold is not None
    point = _threshold_point(scores, labels, threshold) if marked else None
    if labels.any() and (~labels).any():
        fpr, tpr = roc_points(scores, labels)
        figure = Figure(figsize=(4.5, 4.2), dpi=100)
        axes = figure.add_subplot()
        axes.plot(fpr, tpr, color="tab:blue", drawstyle="default")
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        if marked:
            axes.plot(point[0], point[1], "o", color="tab:red",
                      label=f"threshold {threshold:.4g}: FPR {point[0]:.1%}, recall {point[1]:.1%}")  # fmt: skip
            axes.legend(loc="lower right", fontsize=7)
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        axes.set(xlabel="false-positive rate (good images rejected)",
                 ylabel="true-positive rate (defects rejected)",
                 title=f"{dataset}: ROC, image AUROC {area:.3f}", xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
        figure.tight_layout()
        written.append(folder / f"{dataset}_roc.png")
        _save(figure, written[-1])

        recall, precision = pr_points(scores, labels)
        figure = Figure(figsize=(4.5, 4.2), dpi=100)
        axes = figure.add_subplot()
        axes.plot(np.r_[0.0, recall], np.r_[precision[0], precision], color="tab:blue")
        if marked and not np.isnan(point[2]):
            axes.plot(point[1], point[2], "o", color="tab:red",
                      label=f"threshold {threshold:.4g}: recall {point[1]:.1%}, "
                            f"precision {point[2]:.1%}")  # fmt: skip
            axes.legend(loc="lower left", fontsize=7)
        axes.set(xlabel="recall (defective images rejected)", ylabel="precision",
                 title=f"{dataset}: precision-recall", xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
        figure.tight_layout()
        written.append(folder / f"{dataset}_pr.png")
        _save(figure, written[-1])

    figure = Figure(figsize=(5.5, 3.6), dpi=100)
    axes = figure.add_subplot()
    finite = np.isfinite(scores)
    bins = np.histogram_bin_edges(scores[finite], bins=30) if finite.any() else 10
    for chosen, name, colour in ((~labels, "good", "tab:green"), (labels, "defective", "tab:red")):
        if (chosen & finite).any():
            axes.hist(scores[chosen & finite], bins=bins, alpha=0.55, color=colour,
                      label=f"{name} ({int(chosen.sum())})")  # fmt: skip
    if marked:
        axes.axvline(threshold, color="black", linestyle="--",
                     label=f"threshold {threshold:.4g}")  # fmt: skip
    axes.legend(fontsize=7)
    axes.set(xlabel="image score", ylabel="images", title=f"{dataset}: image scores")
    figure.tight_layout()
    written.append(folder / f"{dataset}_scores.png")
    _save(figure, written[-1])
    return written
