"""The shape report as people read it: one variant's rows, diagnostics and checks
(:func:`format_shape`, what ``statsmerge-mini shape`` prints) and the table of every variant of a
recipe-loop log (:func:`format_variants`, ``statsmerge-mini variants``)."""

from __future__ import annotations

from typing import Dict, Sequence

from .diagnostics import COEFFICIENT_RANGE
from .shape import TA_GRID, TIES, shape_checks


def format_shape(result: Dict[str, object]) -> str:
    """Per-row averages, the single-vector diagnostic and the checks, as plain text."""
    from .evaluate import format_table

    rows = result["rows"]
    lines = [
        format_table(rows),
        "",
        "one task vector at λ = 0.3 (own accuracy, others' change); its top "
        f"{TIES['threshold']} % (TIES's trim) at λ = 1 (own accuracy):",
    ]
    for task, s in result["single_vector"].items():
        trimmed = f"   trimmed {100 * s['own_trimmed']:5.1f}" if "own_trimmed" in s else ""
        lines.append(
            f"  {task:<20} own {100 * s['own']:5.1f}   others {100 * s['others_change']:+5.1f}"
            + trimmed
        )
    mean_change = sum(s["others_change"] for s in result["single_vector"].values()) / len(
        result["single_vector"]
    )
    lines.append(f"  mean change of the other tasks: {100 * mean_change:+.2f}")
    diagnostics = result.get("diagnostics") or {}
    if diagnostics.get("adamerging_confidence"):
        lines += ["", "AdaMerging's merged model, confident vs unsure half (accuracy):"]
        for task, c in diagnostics["adamerging_confidence"].items():
            lines.append(
                f"  {task:<20} confident {100 * c['confident']:5.1f}   unsure "
                f"{100 * c['unsure']:5.1f}   gap {100 * c['gap']:+5.1f}"
            )
    free = diagnostics.get("free_control_coefficients") or {}
    if "average_clamped" in free:
        lines += [
            "",
            f"free control: average {100 * free['average']:.1f}; with its λ clamped to "
            f"[{COEFFICIENT_RANGE[0]}, {COEFFICIENT_RANGE[1]}]: {100 * free['average_clamped']:.1f} "
            f"({100 * (free['average_clamped'] - free['average']):+.1f})",
        ]
    lines.append("")
    for name, ok, detail in shape_checks(rows, diagnostics):
        lines.append(f"  [{'x' if ok else ' '}] {name} {detail}")
    return "\n".join(lines)


def format_variants(records: Sequence[Dict[str, object]]) -> str:
    """A markdown table of recipe-loop records (one row per variant and seed), val averages in %."""
    cols = ["zero-shot", "individual", "simple_average"]
    cols += [f"task_arithmetic_{lam}" for lam in TA_GRID] + ["ties", "adamerging"]
    head = "| variant | knobs changed | seed | ZS | ind (min task) | SA | TA .1 | TA .2 | TA .3 | TIES "
    head += "| AdaM | one τ at 0.3: others | AdaM conf − unsure (min) "
    head += "| free λ in range, max |λ|; Δ avg clamped "
    head += "| targets met |"
    lines = [head, "|" + "---|" * 15]
    for rec in records:
        rows = rec["rows"]
        ind = rows["individual"]
        cells = []
        for col in cols:
            if col not in rows:
                cells.append("–")
            elif col == "individual":
                low = min(v for k, v in ind.items() if k != "average")
                cells.append(f"{100 * ind['average']:.1f} ({100 * low:.0f})")
            else:
                cells.append(f"{100 * rows[col]['average']:.1f}")
        single = rec["single_vector"].values()
        others = 100 * sum(s["others_change"] for s in single) / len(single)
        diagnostics = rec.get("diagnostics") or {}
        confidence = diagnostics.get("adamerging_confidence")
        gap = f"{100 * min(c['gap'] for c in confidence.values()):+.1f}" if confidence else "–"
        free = diagnostics.get("free_control_coefficients")
        spread = f"{100 * free['fraction_within']:.0f} %, {free['max_abs']:.1f}" if free else "–"
        if free and "average_clamped" in free:  # the clamp's cost (older records lack it)
            spread += f"; clamped {100 * (free['average_clamped'] - free['average']):+.1f}"
        checks = shape_checks(rows, diagnostics)
        met = f"{sum(ok for _, ok, _ in checks)}/{len(checks)}"
        knobs = ", ".join(f"{k}={v}" for k, v in rec["overrides"].items() if k != "num_threads")
        seed = rec["seed"]
        if len(rec.get("tasks", ())) not in (0, 8):  # a subset (records before it: all eight)
            seed = f"{seed} ({len(rec['tasks'])} tasks)"
        lines.append(
            f"| {rec['name']} | {knobs or '–'} | {seed} | "
            + " | ".join(cells)
            + f" | {others:+.2f} | {gap} | {spread} | {met} |"
        )
    return "\n".join(lines)
