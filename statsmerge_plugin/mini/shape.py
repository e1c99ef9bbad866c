"""The *shape* of a build: how FusionBench's reference merges rank on it, and the cheap recipe loop.

A miniature is only useful if it ranks merging methods as FusionBench's real CLIP ViT-B/32 eight-task
benchmark does (zero-shot 48, individual 90, simple averaging 66.5, task arithmetic (0.3) 69,
TIES 72, layer-wise AdaMerging 82.6; see ``docs/mini-benchmark.md``). :func:`measure_shape` measures
that ordering on one split of a build with FusionBench's own algorithms and task pool, plus the
single-task-vector diagnostic (how much one task vector at λ = 0.3 costs the *other* tasks), which
predicts task arithmetic before the expensive rows run. :func:`shape_checks` states the targets.

``statsmerge-mini shape --set pretrain_steps=2000 --set ft_lr=1e-4`` builds a recipe variant (no test
evaluation: recipes are chosen on val) and prints its val shape; every run is appended to a JSON-lines
log, so the variants tried, failures included, stay on record.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .diagnostics import (
    COEFFICIENT_RANGE,
    coefficient_range,
    free_control,
    merge_with_coefficients,
    merged_model_confidence,
    trimmed_task_model,
)
from .evaluate import accuracies, modelpool, taskpool
from .recipe import Recipe
from .registry import register_tasks

TA_GRID = (0.1, 0.2, 0.3)
# FusionBench's method defaults (fusion_bench_config/method/{ties_merging,adamerging/clip}.yaml)
TIES = {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "sum"}
ADAMERGING_STEPS = 1000
#: steps of the free-coefficient control (the leaderboard's statsmerging_free: 500)
FREE_CONTROL_STEPS = 500
#: diagnostic targets: AdaMerging's confident half this much more accurate than its unsure half on
#: every task; this fraction of the free control's coefficients within COEFFICIENT_RANGE
CONFIDENCE_GAP = 0.10
WITHIN_RANGE = 0.90


def parse_overrides(items: Sequence[str], base: Recipe) -> Dict[str, object]:
    """``["ft_lr=1e-4", ...]`` -> ``{"ft_lr": 1e-4}``, typed like ``base``'s fields."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    out: Dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise KeyError(
                f"bad recipe override {item!r}: expected KNOB=VALUE with KNOB one of "
                f"{', '.join(fields)}"
            )
        kind = type(getattr(base, name))
        try:
            out[name] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError as err:
            raise ValueError(f"recipe knob {name}: {value!r} is not a {kind.__name__}") from err
    return out


def _average(accs: Dict[str, float]) -> float:
    return round(sum(accs.values()) / len(accs), 4)


def _row(accs: Dict[str, float]) -> Dict[str, float]:
    return dict(accs, average=_average(accs))


def adamerging(root: Path, tasks: Sequence[str], split: str, max_steps: int, seed: int = 0):
    """FusionBench's layer-wise AdaMerging (its own class and default settings), adapting on the
    unlabelled images of ``split`` (FusionBench adapts on the images it evaluates on). Its
    shuffling draws from the global generators, seeded here with ``seed`` (Lightning's
    ``seed_everything``), so a record does not depend on what ran before it in the process."""
    import lightning as L
    from fusion_bench.method.adamerging.clip_layer_wise_adamerging import (
        CLIPLayerWiseAdaMergingAlgorithm,
    )
    from lightning.fabric.loggers import TensorBoardLogger
    from omegaconf import DictConfig

    register_tasks(tasks)
    root = Path(root)
    config = DictConfig(
        {
            "name": "clip_layer_wise_adamerging",
            "optimizer": "adam",
            "lr": 1e-3,
            "init_values": 0.3,
            "clamp_weights": False,
            "tie_weights": True,
            "strict": False,
            "batch_size": 16,
            "num_workers": 0,
            "max_steps": max_steps,
            "fast_dev_run": False,
            "weights": None,
            "save_merging_weights": False,
        }
    )
    pool = modelpool(root, tasks, splits=("test",), test_from=split)
    algorithm = CLIPLayerWiseAdaMergingAlgorithm(config)
    with tempfile.TemporaryDirectory() as logs:  # FusionBench logs hyperparameters and metrics
        logger = TensorBoardLogger(logs, name="adamerging")
        algorithm.fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[logger])
        L.seed_everything(seed, verbose=False)
        return algorithm.run(pool)


def measure_shape(
    root: Path,
    tasks: Sequence[str],
    split: str = "val",
    adamerging_steps: int = ADAMERGING_STEPS,
    progress=functools.partial(print, flush=True),
    free_control_steps: int = FREE_CONTROL_STEPS,
) -> Dict[str, object]:
    """Accuracies on ``split`` of every reference row, the single-task-vector diagnostic and
    (:mod:`.diagnostics`) the confident-half vs unsure-half accuracy of AdaMerging's merged model
    and the range of the free-coefficient control's coefficients (trained on val; 0 steps skip)."""
    from fusion_bench.method import (
        SimpleAverageAlgorithm,
        TaskArithmeticAlgorithm,
        TiesMergingAlgorithm,
    )

    root, tasks = Path(root), list(tasks)
    pool = modelpool(root, tasks, splits=())
    everything = taskpool(root, tasks, split)

    def evaluate(model) -> Dict[str, float]:
        return accuracies(everything.evaluate(model), tasks)

    def done(name: str) -> None:
        progress(f"{name}: {100 * rows[name]['average']:.1f}")

    rows: Dict[str, Dict[str, float]] = {}
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    rows["zero-shot"] = _row(evaluate(pool.load_model("_pretrained_")))
    done("zero-shot")
    alone = {task: taskpool(root, [task], split) for task in tasks}  # each task on its own
    rows["individual"] = _row(
        {
            task: accuracies(alone[task].evaluate(pool.load_model(task)), [task])[task]
            for task in tasks
        }
    )
    done("individual")
    single: Dict[str, Dict[str, float]] = {}
    for task in tasks:  # one task vector at λ = 0.3; its TIES-trimmed version at λ = 1
        accs = evaluate(
            TaskArithmeticAlgorithm(scaling_factor=0.3).run(modelpool(root, [task], ()))
        )
        others = [accs[o] - rows["zero-shot"][o] for o in tasks if o != task]
        trimmed = trimmed_task_model(pool, task, TIES["threshold"])
        own_trimmed = accuracies(alone[task].evaluate(trimmed), [task])[task]
        single[task] = {
            "own": accs[task],
            "others_change": round(sum(others) / len(others), 4),
            "own_trimmed": own_trimmed,
        }
    timings["single"] = round(time.perf_counter() - t, 1)
    progress(f"zero-shot / individual / single vectors: {timings['single']} s")
    rows["simple_average"] = _row(evaluate(SimpleAverageAlgorithm().run(pool)))
    done("simple_average")
    for lam in TA_GRID:
        merged = TaskArithmeticAlgorithm(scaling_factor=lam).run(pool)
        rows[f"task_arithmetic_{lam}"] = _row(evaluate(merged))
        done(f"task_arithmetic_{lam}")
    rows["ties"] = _row(evaluate(TiesMergingAlgorithm(**TIES).run(pool)))
    done("ties")
    diagnostics: Dict[str, object] = {}
    if adamerging_steps > 0:
        t = time.perf_counter()
        merged = adamerging(root, tasks, split, adamerging_steps)
        rows["adamerging"] = _row(evaluate(merged))
        timings["adamerging"] = round(time.perf_counter() - t, 1)
        done("adamerging")
        diagnostics["adamerging_confidence"] = merged_model_confidence(merged, root, tasks, split)
    if free_control_steps > 0:
        t = time.perf_counter()
        from .store import read_manifest

        val_images = 10 * (read_manifest(root) or {}).get("recipe", {}).get("n_val", 0)
        # the leaderboard's 128 images per task, or the whole val split when it is smaller
        per_task = 128 if val_images >= 128 else None
        free = free_control(root, tasks, free_control_steps, per_task)
        clamped = merge_with_coefficients(
            pool, tasks, free["coefficients"].clamp(*COEFFICIENT_RANGE), free["tensor_names"]
        )
        diagnostics["free_control_coefficients"] = {
            **coefficient_range(free["coefficients"]),
            "average": _row(evaluate(free["model"]))["average"],
            "average_clamped": _row(evaluate(clamped))["average"],
        }
        timings["free_control"] = round(time.perf_counter() - t, 1)
        progress(f"free control: {diagnostics['free_control_coefficients']}")
    return {
        "split": split,
        "rows": rows,
        "single_vector": single,
        "diagnostics": diagnostics,
        "timings_seconds": timings,
    }


def shape_checks(
    rows: Dict[str, Dict[str, float]], diagnostics: Optional[Dict[str, object]] = None
) -> List[Tuple[str, bool, str]]:
    """The targets of a miniature that ranks methods like the real benchmark (issues mini-TA8 r2
    and r3; the two diagnostic targets when ``diagnostics`` has them)."""
    avg = {name: 100 * row["average"] for name, row in rows.items()}
    ind, zs = rows["individual"], rows["zero-shot"]
    tasks = [t for t in ind if t != "average"]
    merges = [n for n in avg if n not in ("zero-shot", "individual")]
    checks = [
        ("individual ≥ 88", avg["individual"] >= 88, f"{avg['individual']:.1f}"),
        (
            "every task's individual ≥ 75",
            min(ind[t] for t in tasks) >= 0.75,
            f"min {100 * min(ind[t] for t in tasks):.1f}",
        ),
        ("zero-shot ≤ 60", avg["zero-shot"] <= 60, f"{avg['zero-shot']:.1f}"),
        (
            "zero-shot below individual on every task",
            all(zs[t] < ind[t] for t in tasks),
            "",
        ),
        (
            "SA ≤ individual − 12",
            avg["simple_average"] <= avg["individual"] - 12,
            f"{avg['simple_average'] - avg['individual']:+.1f}",
        ),
        (
            "TA(0.3) ≥ SA + 1",
            avg["task_arithmetic_0.3"] >= avg["simple_average"] + 1,
            f"{avg['task_arithmetic_0.3'] - avg['simple_average']:+.1f}",
        ),
        (
            "TIES ≥ TA(0.3) − 1",
            avg["ties"] >= avg["task_arithmetic_0.3"] - 1,
            f"{avg['ties'] - avg['task_arithmetic_0.3']:+.1f}",
        ),
        (
            "every merge < individual",
            all(avg[m] < avg["individual"] for m in merges),
            "",
        ),
    ]
    if "adamerging" in avg:
        checks.insert(
            7,
            (
                "AdaMerging ≥ TIES + 3",
                avg["adamerging"] >= avg["ties"] + 3,
                f"{avg['adamerging'] - avg['ties']:+.1f}",
            ),
        )
    confidence = (diagnostics or {}).get("adamerging_confidence")
    if confidence:
        low = min(confidence, key=lambda t: confidence[t]["gap"])
        checks.append(
            (
                f"AdaMerging's confident half ≥ unsure half + {100 * CONFIDENCE_GAP:.0f} on every task",
                confidence[low]["gap"] >= CONFIDENCE_GAP,
                f"min {100 * confidence[low]['gap']:+.1f} ({low})",
            )
        )
    free = (diagnostics or {}).get("free_control_coefficients")
    if free:
        lo, hi = COEFFICIENT_RANGE
        checks.append(
            (
                f"free control: ≥ {100 * WITHIN_RANGE:.0f} % of λ in [{lo}, {hi}]",
                free["fraction_within"] >= WITHIN_RANGE,
                f"{100 * free['fraction_within']:.1f} %, max |λ| {free['max_abs']:.2f}",
            )
        )
    return checks


def run_variant(
    overrides: Dict[str, object],
    seed: int = 0,
    root: Optional[Path] = None,
    preset: str = "default",
    adamerging_steps: int = ADAMERGING_STEPS,
    log: Optional[Path] = None,
    name: str = "",
    progress: bool = True,
    split: str = "val",
    free_control_steps: int = FREE_CONTROL_STEPS,
    tasks=None,
) -> Dict[str, object]:
    """Build ``preset``'s recipe with ``overrides`` (without test evaluation) on ``tasks`` (a
    subset as ``build`` takes it; default all eight) and measure its shape on ``split`` (``val`` to
    choose a recipe; ``test`` only to report the chosen one); append the record (recipe, tasks,
    build time, shape) to ``log``."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    from .build import build_mini_benchmark, default_root, normalize_tasks
    from .recipe import get_recipe

    # a search build never evaluates on test (its manifest would show test figures)
    tasks = normalize_tasks(tasks)  # bad names fail here, before any build
    recipe = get_recipe(preset).replace(**dict(overrides, evaluate=split == "test"))
    root = Path(root) if root is not None else default_root()
    t = time.perf_counter()
    manifest = build_mini_benchmark(root, seed, tasks, preset, recipe=recipe, progress=progress)
    build_s = round(time.perf_counter() - t, 1)
    result = measure_shape(
        Path(manifest["path"]),
        tasks,
        split,
        adamerging_steps,
        free_control_steps=free_control_steps,
    )
    record = {
        "name": name,
        "overrides": overrides,
        "seed": seed,
        "tasks": list(tasks),
        "key": manifest["key"],
        "build_seconds_this_run": build_s,
        "build_timings_seconds": manifest.get("timings_seconds"),
        **result,
    }
    log = Path(log) if log is not None else root / "variants.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record
