"""Measuring a build through FusionBench's own ``CLIPVisionModelPool`` / ``CLIPVisionModelTaskPool``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

from .registry import register_tasks


def dataset_config(root: Path, task: str, split: str) -> dict:
    return {
        "_target_": "datasets.load_from_disk",
        "dataset_path": str(Path(root) / "data" / task / split),
    }


def modelpool(
    root: Path,
    tasks: Sequence[str],
    splits: Sequence[str] = ("train", "val", "test"),
    test_from: str = "test",
):
    """A ``CLIPVisionModelPool`` over a build directory (what the YAML config describes).

    ``test_from`` names the split served as the pool's ``test_datasets`` (FusionBench's test-time
    adaptation reads those; ``"val"`` lets it adapt on val images instead).
    """
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import DictConfig

    root = Path(root)
    models = {"_pretrained_": str(root / "pretrained")}
    models.update({t: str(root / "models" / t) for t in tasks})
    kwargs = {
        f"{s}_datasets": DictConfig(
            {t: dataset_config(root, t, test_from if s == "test" else s) for t in tasks}
        )
        for s in splits
    }
    return CLIPVisionModelPool(DictConfig(models), processor=str(root / "pretrained"), **kwargs)


def taskpool(root: Path, tasks: Sequence[str], split: str = "test", batch_size: int = 500):
    """A ``CLIPVisionModelTaskPool`` evaluating on ``split`` of ``tasks``."""
    from fusion_bench.taskpool import CLIPVisionModelTaskPool
    from omegaconf import DictConfig

    register_tasks(tasks)
    root = Path(root)
    return CLIPVisionModelTaskPool(
        DictConfig({t: dataset_config(root, t, split) for t in tasks}),
        processor=str(root / "pretrained"),
        clip_model=str(root / "pretrained"),
        dataloader_kwargs={"batch_size": batch_size, "num_workers": 0, "shuffle": False},
        fast_dev_run=False,
    )


def accuracies(report: dict, tasks: Sequence[str]) -> Dict[str, float]:
    return {t: round(float(report[t]["accuracy"]), 4) for t in tasks}


def evaluate_build(
    root: Path, tasks: Sequence[str], merges: bool = True, split: str = "test"
) -> Dict[str, Dict[str, float]]:
    """Per-task accuracies of pretrained, individual and (optionally) SA / TA(0.3) models."""
    from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm

    pool = modelpool(root, tasks)
    everything = taskpool(root, tasks, split)
    result = {"pretrained": accuracies(everything.evaluate(pool.load_model("_pretrained_")), tasks)}
    result["individual"] = {}
    for t in tasks:
        single = taskpool(root, [t], split)
        result["individual"][t] = accuracies(single.evaluate(pool.load_model(t)), [t])[t]
    if merges and len(tasks) > 1:
        merged = SimpleAverageAlgorithm().run(modelpool(root, tasks))
        result["simple_average"] = accuracies(everything.evaluate(merged), tasks)
        merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(modelpool(root, tasks))
        result["task_arithmetic_0.3"] = accuracies(everything.evaluate(merged), tasks)
    for name, accs in result.items():
        accs["average"] = round(sum(accs[t] for t in tasks) / len(tasks), 4)
    return result


def format_table(
    results: Dict[str, Dict[str, float]], tasks: Optional[Sequence[str]] = None
) -> str:
    """A markdown table, one row per model, tasks as columns."""
    tasks = list(tasks or [k for k in next(iter(results.values())) if k != "average"])
    head = "| model | " + " | ".join(t.replace("mini_", "") for t in tasks) + " | avg |"
    rows = [head, "|" + "---|" * (len(tasks) + 2)]
    for name, accs in results.items():
        cells = [f"{100 * accs[t]:.1f}" for t in tasks] + [f"**{100 * accs['average']:.1f}**"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
