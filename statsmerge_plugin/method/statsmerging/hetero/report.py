"""Student-versus-teacher evaluation (test split, evaluation only) and the report files.

Accuracies are computed with the same logits the task pool uses: students (and ``_pretrained_``)
through the task's CLIP zero-shot head, teachers through their own head. The test split is read here
and nowhere else in the heterogeneous mode; nothing computed here feeds back into training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch
from torch.utils.data import DataLoader


@torch.no_grad()
def accuracy(
    logits: Callable[[torch.Tensor], torch.Tensor],
    dataset,
    processor,
    batch_size: int = 256,
    device=None,
    max_batches: Optional[int] = None,
) -> float:
    """Top-1 accuracy of ``logits(pixels)`` over ``dataset`` processed by ``processor``."""
    from fusion_bench.dataset.image_dataset import ImageClassificationDataset

    loader = DataLoader(
        ImageClassificationDataset(dataset, processor), batch_size=batch_size, shuffle=False
    )
    correct = total = 0
    for i, (pixels, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if device is not None:
            pixels = pixels.to(device)
        pred = logits(pixels).argmax(-1).cpu()
        correct += int((pred == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def markdown_table(rows: Mapping[str, Mapping]) -> str:
    """Markdown table of the per-task records (accuracies in %)."""
    lines = [
        "| task | teacher | teacher acc. | student acc. | student / teacher | "
        "`_pretrained_` acc. | "
        "labels used | steps | cache hit | distil time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    for task, r in rows.items():
        ratio = r.get("student_over_teacher")
        lines.append(
            f"| {task} | {r['teacher_kind']} ({r.get('teacher_class', '')}) | "
            f"{pct(r.get('teacher_accuracy'))} | {pct(r.get('student_accuracy'))} | "
            f"{'–' if ratio is None else f'{100 * ratio:.1f}%'} | "
            f"{pct(r.get('pretrained_accuracy'))} | "
            f"{r['use_labels']} | {r['steps']} | {r['cache_hit']} | {r['distill_seconds']} |"
        )
    return "\n".join(lines)


def write_report(out: Path, report: Mapping, loss_curves: Mapping[str, list]) -> Dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``accuracy.png`` and ``distill_loss.png``."""
    from statsmerge_plugin.plotting import loss_curves as plot_losses

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    text = [
        "# Heterogeneous teachers distilled into the target architecture",
        "",
        f"Target architecture: `_pretrained_` ({report.get('target', '')}).",
        f"Same-architecture models: {', '.join(report.get('same_architecture', [])) or 'none'}.",
        "Accuracies on each task's **test** split (evaluation only).",
        "",
        markdown_table(report.get("teachers", {})),
        "",
    ]
    paths["markdown"].write_text("\n".join(text))
    rows = report.get("teachers", {})
    if rows and all(r.get("teacher_accuracy") is not None for r in rows.values()):
        paths["figure"] = accuracy_figure(rows, out / "accuracy.png")
    curves = {t: v for t, v in loss_curves.items() if v}
    if curves:
        paths["loss"] = plot_losses(
            curves, out / "distill_loss.png", "distillation loss per teacher"
        )
    return paths


def accuracy_figure(rows: Mapping[str, Mapping], path: Path) -> Path:
    """Grouped bars: ``_pretrained_``, teacher and student accuracy per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(rows)
    series = {
        "_pretrained_ (zero-shot)": [rows[t].get("pretrained_accuracy") or 0 for t in tasks],
        "teacher (own head)": [rows[t]["teacher_accuracy"] for t in tasks],
        "student (zero-shot head)": [rows[t].get("student_accuracy") or 0 for t in tasks],
    }
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(tasks), 3.6))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - 1) * 0.27, [100 * v for v in values], 0.27, label=name)
    ax.set_xticks(x, tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title("distilled students vs their teachers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
