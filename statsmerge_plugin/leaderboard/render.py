"""Rendering a summary: the markdown tables (per task, per group, shape) and the bar chart PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .methods import OUR_METHODS


def pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(summary: dict, command: str, header: str = "") -> str:
    tasks = summary["tasks"]
    short = [t.removeprefix("mini_") for t in tasks]
    lines = [header, ""] if header else []
    lines += [
        "| Method | " + " | ".join(short) + " | Avg | Norm. | Time (s) | Peak RSS (MB) | Notes |",
        "|---" * (len(tasks) + 6) + "|",
    ]
    for method, row in summary["methods"].items():
        if "accuracy" in row:
            cells = [pct(row["accuracy"].get(t)) for t in tasks]
            avg = pct(row["average"]) + (
                f" ± {100 * row['average_std']:.1f}" if row.get("average_std") else ""
            )
            norm = pct(row.get("normalized"))
        else:
            cells, avg, norm = ["–"] * len(tasks), f"**{row['status']}**", "–"
        note = row["note"] if row["status"] == "ok" else "; ".join(row["errors"])[:200]
        time_s = "–" if row["wall_time_s"] is None else f"{row['wall_time_s']:.0f}"
        rss = "–" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.0f}"
        lines.append(
            f"| {row['label']} | "
            + " | ".join(cells)
            + f" | {avg} | {norm} | {time_s} | {rss} | {note} |"
        )
    if summary.get("groups"):
        lines += ["", group_markdown(summary)]
    lines += ["", f"Command: `{command}`", ""]
    build = summary.get("build")
    if build:
        digests = ", ".join(f"{part} `{d[:12]}`" for part, d in build["digests"].items())
        lines += [f"Build: `{build['key']}` (sha256 of its {digests})", ""]
    return "\n".join(lines)


GROUP_LABELS = {
    "seen": "Seen tasks",
    "unseen": "Unseen tasks",
    "clean": "Clean",
    "corrupted": "Corrupted (mean)",
}


def group_markdown(summary: dict) -> str:
    """One row per method, one column per task group average (seen / unseen, clean / corruptions)."""
    groups = summary["groups"]
    names = list(groups)
    head = [GROUP_LABELS.get(g, g.replace("_", " ").capitalize()) for g in names]
    lines = ["Averages per task group (accuracy %):", ""]
    if "unseen" in groups:
        unseen = ", ".join(t.removeprefix("mini_") for t in groups["unseen"])
        lines += [f"Unseen tasks (no model in the pool, zero-shot heads): {unseen}.", ""]
    lines += ["| Method | " + " | ".join(head) + " |", "|---" * (len(names) + 1) + "|"]
    for row in summary["methods"].values():
        averages = row.get("group_average", {})
        cells = [pct(averages.get(g)) for g in names]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shape_markdown(shape: dict) -> str:
    out = ["Shape figures (accuracy %, this run):", ""]
    for key in ("pretrained_average", "individual_average", "individual_min"):
        if key in shape:
            out.append(f"- {key.replace('_', ' ')}: {100 * shape[key]:.1f}")
    for key in ("simple_average_gap_points", "task_arithmetic_gap_points"):
        if key in shape:
            out.append(
                f"- {key.replace('_gap_points', '').replace('_', ' ')}: {shape[key]:.1f} points below individual"
            )
    if "pretrained_below_every_individual" in shape:
        out.append(
            f"- pretrained below every task's individual model: {shape['pretrained_below_every_individual']}"
        )
    for r in shape.get("ranking", []):
        out.append(
            f"- {r['pair']}: {'holds' if r['holds'] else '**does not hold**'} ({r['values'][0]} vs {r['values'][1]})"
        )
    return "\n".join(out) + "\n"


def bar_chart(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (r["label"], r["average"], r.get("average_std", 0.0), m in OUR_METHODS)
        for m, r in summary["methods"].items()
        if "average" in r
    ]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    y = range(len(rows))
    ax.barh(
        list(y),
        [100 * r[1] for r in rows],
        xerr=[100 * r[2] for r in rows],
        color=["tab:orange" if r[3] else "tab:blue" for r in rows],
    )
    for i, r in enumerate(rows):
        ax.text(100 * r[1] + 0.5, i, f"{100 * r[1]:.1f}", va="center", fontsize=8)
    ax.set_yticks(list(y), labels=[r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("average test accuracy (%)")
    ax.set_xlim(0, 105)
    ax.set_title("Leaderboard (orange: this package)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
