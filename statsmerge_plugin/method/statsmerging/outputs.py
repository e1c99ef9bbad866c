"""What a StatsMerging run writes beside FusionBench's report: ``<log_dir>/statsmerging/``.

``coefficients.pt`` (the coefficients, tasks, tensor names and options), ``coefficients.csv``,
``statistics.csv`` (S_k^l per task and tensor), ``loss.csv`` and ``loss.png``,
``coefficients_heatmap.png`` and ``summary.json``. A second run into the same log dir writes
``statsmerging_1/``: earlier outputs are never overwritten.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import List, Sequence

import torch

from .statistics import feature_names

log = logging.getLogger(__name__)


def fresh_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``name_1``, ``name_2``... if taken: earlier outputs are never overwritten."""
    path, i = parent / name, 0
    while path.exists():
        i += 1
        path = parent / f"{name}_{i}"
    path.mkdir(parents=True)
    return path


def _write_csv(path: Path, header: Sequence[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _fmt(values) -> List[str]:
    return [f"{v:.6g}" for v in values]


def write_outputs(
    log_dir,
    tasks: List[str],
    names: List[str],
    coefficients: torch.Tensor,
    features: torch.Tensor,
    losses: List[float],
    summary: dict,
    options: dict,
    title: str,
) -> Path:
    """Write every output into a fresh ``<log_dir>/statsmerging*`` and return it.

    ``coefficients`` is ``[K, L]`` (layer-wise, one column per name in ``names``) or ``[K, 1]``
    (task-wise); ``features`` the per-task statistics ``[K, L, 3 + r]``."""
    from statsmerge_plugin.plotting import coefficient_heatmap, loss_curves

    out = fresh_dir(Path(log_dir), "statsmerging")
    columns = names if coefficients.shape[1] == len(names) else ["all_tensors"]
    coef = coefficients.cpu()
    torch.save(
        {"coefficients": coef, "tasks": tasks, "tensor_names": columns, "options": options},
        out / "coefficients.pt",
    )
    _write_csv(
        out / "coefficients.csv",
        ["task", *columns],
        ([task, *_fmt(coef[k].tolist())] for k, task in enumerate(tasks)),
    )
    rank = features.shape[-1] - 3
    _write_csv(
        out / "statistics.csv",
        ["task", "tensor", *feature_names(rank)],
        (
            [task, name, *_fmt(features[k, l].tolist())]
            for k, task in enumerate(tasks)
            for l, name in enumerate(names)
        ),
    )
    _write_csv(out / "loss.csv", ["step", "loss"], enumerate(losses))
    if losses:
        loss_curves({"distillation loss": losses}, out / "loss.png", "StatsMerging training loss")
    coefficient_heatmap(
        coef.numpy(),
        tasks,
        out / "coefficients_heatmap.png",
        title,
        "parameter tensor index" if len(columns) > 1 else "",
    )
    summary = summary | {"output_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(f"StatsMerging outputs written to {out}")
    return out
