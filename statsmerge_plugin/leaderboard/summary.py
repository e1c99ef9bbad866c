"""Summarising runs: task groups of a protocol (seen/unseen, clean/corrupted), the per-task,
average and normalized accuracies over seeds, and the shape figures the miniature is held to."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence

from statsmerge_plugin.mini.corruptions import CORRUPTIONS, split_key

from .methods import METHODS


@dataclass
class RunResult:
    """One ``fusion_bench`` process: accuracies per task, wall time, peak memory, or the failure."""

    method: str
    seed: int
    status: str = "ok"
    accuracy: Dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_rss_mb: float = 0.0
    error: str = ""
    log_dir: str = ""
    conditions: List[str] = field(default_factory=list)  # test-time adaptation: one run each


def base_task(key: str) -> str:
    """The task a task-pool key evaluates: ``mini_gtsrb__spatter`` -> ``mini_gtsrb``."""
    return split_key(key)[0]


def task_groups(tasks: Sequence[str], model_names: Sequence[str] = ()) -> Dict[str, List[str]]:
    """Groups of task-pool keys whose averages are reported separately (empty: no protocol groups).

    * ``seen`` / ``unseen``: keys whose task has / has no model in the model pool (only when some
      task has none: the generalization protocol);
    * ``clean``, ``<corruption>`` for each corruption present, ``corrupted`` (all corrupted keys): when
      some key is ``<task>__<corruption>`` (the robustness protocol).
    """
    groups: Dict[str, List[str]] = {}
    if model_names:
        seen = [t for t in tasks if base_task(t) in set(model_names)]
        if len(seen) < len(tasks):
            groups["seen"] = seen
            groups["unseen"] = [t for t in tasks if t not in seen]
    corrupted = {t: split_key(t)[1] for t in tasks if split_key(t)[1] is not None}
    if corrupted:
        groups["clean"] = [t for t in tasks if t not in corrupted]
        for c in CORRUPTIONS:
            if c in corrupted.values():
                groups[c] = [t for t in tasks if corrupted.get(t) == c]
        groups["corrupted"] = [t for t in tasks if t in corrupted]
    return groups


def individual_runs(tasks: Sequence[str], model_names: Sequence[str]) -> Dict[str, List[str]]:
    """For "individual": each model's task -> the task-pool keys it is evaluated on (its own task,
    clean and corrupted). Tasks without a model (unseen) are left out."""
    runs: Dict[str, List[str]] = {}
    for key in tasks:
        task = base_task(key)
        if not model_names or task in model_names:
            runs.setdefault(task, []).append(key)
    return runs


def task_accuracies(report: dict) -> Dict[str, float]:
    return {
        k: float(v["accuracy"])
        for k, v in report.items()
        if isinstance(v, dict) and "accuracy" in v and k != "average"
    }


def summarize(
    results: List[RunResult],
    tasks: List[str],
    methods: Sequence[str],
    model_names: Sequence[str] = (),
) -> dict:
    """Mean (and std over seeds) per method and per task group (:func:`task_groups`); normalized
    accuracy against the individual models (over the tasks they cover)."""
    groups = task_groups(tasks, model_names)
    rows = {}
    for method in methods:
        runs = [r for r in results if r.method == method]
        covered = (
            [t for keys in individual_runs(tasks, model_names).values() for t in keys]
            if method == "individual"
            else list(tasks)
        )
        covered = [t for t in tasks if t in covered]
        ok = [r for r in runs if r.status == "ok" and all(t in r.accuracy for t in covered)]
        note = METHODS[method][2]
        if any(r.conditions for r in runs):
            note += (
                "; adapted once per test condition (clean, each corruption), as FusionBench does"
            )
        row = {
            "label": METHODS[method][0],
            "note": note,
            "seeds": [r.seed for r in runs],
            "status": (
                "ok" if ok and len(ok) == len(runs) else (runs[0].status if not ok else "partial")
            ),
            "errors": [r.error for r in runs if r.error],
            "wall_time_s": statistics.mean(r.wall_time_s for r in runs) if runs else None,
            "peak_rss_mb": max((r.peak_rss_mb for r in runs), default=None),
        }
        if ok:
            row["accuracy"] = {t: statistics.mean(r.accuracy[t] for r in ok) for t in covered}
            averages = [statistics.mean(r.accuracy[t] for t in covered) for r in ok]
            row["average"] = statistics.mean(averages)
            row["average_std"] = statistics.stdev(averages) if len(averages) > 1 else 0.0
            row["group_average"] = {
                name: statistics.mean(row["accuracy"][t] for t in keys)
                for name, keys in groups.items()
                if keys and all(t in row["accuracy"] for t in keys)
            }
        rows[method] = row
    individual = rows.get("individual", {}).get("accuracy")
    if individual:
        for row in rows.values():
            if "accuracy" in row:
                row["normalized"] = statistics.mean(
                    row["accuracy"][t] / individual[t] if individual[t] > 0 else float("nan")
                    for t in individual
                )
    return {
        "tasks": tasks,
        "model_names": list(model_names),
        "groups": groups,
        "methods": rows,
        "runs": [asdict(r) for r in results],
        "shape": shape_figures(rows),
    }


def shape_figures(rows: dict) -> dict:
    """The mini benchmark's shape checks (issue #3): gaps and the real benchmark's ranking."""
    avg = {m: r["average"] for m, r in rows.items() if "average" in r}
    acc = {m: r["accuracy"] for m, r in rows.items() if "accuracy" in r}
    figures: dict = {}
    if "individual" in avg:
        figures["individual_average"] = avg["individual"]
        figures["individual_min"] = min(acc["individual"].values())
    if "pretrained" in avg:
        figures["pretrained_average"] = avg["pretrained"]
        if "individual" in acc:
            figures["pretrained_below_every_individual"] = all(
                acc["pretrained"][t] < acc["individual"][t] for t in acc["individual"]
            )
    for m in ("simple_average", "task_arithmetic"):
        if m in avg and "individual" in avg:
            figures[f"{m}_gap_points"] = 100 * (avg["individual"] - avg[m])
    chain = [
        "pretrained",
        "simple_average",
        "task_arithmetic",
        "ties",
        "adamerging_lw",
        "individual",
    ]
    strict = {
        ("pretrained", "simple_average"),
        ("ties", "adamerging_lw"),
        ("adamerging_lw", "individual"),
    }
    ranks = []
    for a, b in zip(chain, chain[1:]):
        if a in avg and b in avg:
            holds = avg[a] < avg[b] if (a, b) in strict else avg[a] <= avg[b]
            ranks.append(
                {
                    "pair": f"{a} {'<' if (a, b) in strict else '≤'} {b}",
                    "holds": holds,
                    "values": [round(100 * avg[a], 1), round(100 * avg[b], 1)],
                }
            )
    figures["ranking"] = ranks
    return figures
