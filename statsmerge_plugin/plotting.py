"""Figures saved beside the reports: coefficient heatmaps and loss curves (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def coefficient_heatmap(
    coefficients: np.ndarray, tasks: Sequence[str], path: Path, title: str, xlabel: str
) -> Path:
    """A tasks x layers heatmap of merging coefficients (StatsMerging Fig. 3)."""
    k, l = coefficients.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.08 * l, 24), 1.2 + 0.45 * k))
    im = ax.imshow(coefficients, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(k), labels=list(tasks))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(
    curves: Mapping[str, Sequence[float]], path: Path, title: str, xlabel: str = "step"
) -> Path:
    """One line per named curve; log-scale y when every value is positive."""
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = True
    for name, values in curves.items():
        ax.plot(np.arange(len(values)), values, label=name, linewidth=1)
        positive = positive and all(v > 0 for v in values)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
