"""Heterogeneous benchmark: distil + StatsMerging vs task arithmetic / TIES on the same students.

    python -m statsmerge_plugin.mini.hetero.compare [--work DIR] [--doc docs/heterogeneous.md]

1. ``fusion_bench method=statsmerging/clip_layer_wise_hetero
   modelpool=CLIPVisionModelPool/mini-clip_TA8_hetero
   taskpool=CLIPVisionModelTaskPool/mini-clip_TA8`` (timed, with a fresh student cache under
   ``--work``: distillation + StatsMerging + FusionBench evaluation, cold);
2. ``fusion_bench method=statsmerging/distill_to_base ...`` with the same cache (cache hits: the
   very same students) writes the students' model pool;
3. on that pool, FusionBench's ``SimpleAverageAlgorithm``, ``TaskArithmeticAlgorithm`` and
   ``TiesMergingAlgorithm`` (FusionBench defaults ``scaling_factor=0.3``, TIES ``threshold=20``, and
   ``scaling_factor`` selected on the **val** split), every model evaluated by FusionBench's
   ``CLIPVisionModelTaskPool`` on the test split;
4. writes ``<work>/comparison.json`` and the table between the ``results`` markers of ``--doc``.

The mini build is ``${mini_clip:}``'s (``STATSMERGE_MINI_PRESET`` / ``STATSMERGE_MINI_ROOT``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def fusion_bench(args: List[str], log_dir: Path, cwd: Path) -> float:
    """Run the CLI; returns its wall time (s). Output goes to ``<log_dir>.log``."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "fusion_bench",
        *args,
        "fabric.accelerator=cpu",
        "print_config=false",
        f"path.log_dir={log_dir}",
    ]
    print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    start = time.time()
    with open(f"{log_dir}.log", "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"fusion_bench failed, see {log_dir}.log")
    return round(time.time() - start, 1)


def accuracies(report: dict, tasks: List[str]) -> Dict[str, float]:
    accs = {t: round(float(report[t]["accuracy"]), 4) for t in tasks}
    accs["average"] = round(sum(accs.values()) / len(tasks), 4)
    return accs


def select_on_val(make, val_pool, test_pool, tasks, lambdas=LAMBDAS):
    """Merge for every lambda, pick the best val average, report its test accuracies."""
    val = {}
    for lam in lambdas:
        val[lam] = accuracies(val_pool.evaluate(make(lam)), tasks)["average"]
    best = max(val, key=val.get)
    return best, val, accuracies(test_pool.evaluate(make(best)), tasks)


def table(rows: Dict[str, Dict[str, float]], tasks: List[str]) -> str:
    head = "| model | " + " | ".join(t.replace("mini_", "") for t in tasks) + " | avg |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for name, accs in rows.items():
        cells = ["–" if accs.get(t) is None else f"{100 * accs[t]:.1f}" for t in tasks]
        avg = accs.get("average")
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {'–' if avg is None else f'**{100 * avg:.1f}**'} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="outputs/hetero_compare", help="work directory")
    parser.add_argument(
        "--doc", default=None, help="markdown file whose results block is rewritten"
    )
    parser.add_argument(
        "--override", action="append", default=[], help="extra override of the hetero run"
    )
    args = parser.parse_args(argv)

    import torch
    from fusion_bench.method import (
        SimpleAverageAlgorithm,
        TaskArithmeticAlgorithm,
        TiesMergingAlgorithm,
    )
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .. import evaluate as mini_eval
    from ..resolver import mini_clip_root
    from .build import ensure_hetero_built

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / f"students-{int(time.time())}"  # fresh: the timed run distils from scratch
    root = Path(mini_clip_root())
    t = time.time()
    hetero_build = ensure_hetero_built(root)
    build_seconds = round(time.time() - t, 1)
    pool_args = [
        "modelpool=CLIPVisionModelPool/mini-clip_TA8_hetero",
        "taskpool=CLIPVisionModelTaskPool/mini-clip_TA8",
    ]
    run = work / "statsmerging_hetero"
    seconds = fusion_bench(
        [
            "method=statsmerging/clip_layer_wise_hetero",
            *pool_args,
            f"method.distillation.cache_dir={cache}",
            *args.override,
        ],
        run,
        work,
    )
    sm_report = json.loads((run / "program_report.json").read_text())
    hetero = json.loads(next(iter(sorted(run.glob("hetero*/report.json")))).read_text())
    distilled = work / "distill_to_base"
    distill_seconds = fusion_bench(
        [
            "method=statsmerging/distill_to_base",
            *pool_args,
            f"method.cache_dir={cache}",
            f"method.output_dir={distilled / 'out'}",
        ]
        + [
            o.replace("method.distillation.", "method.")
            for o in args.override
            if o.startswith("method.distillation.")
        ],
        distilled,
        work,
    )
    pool_cfg = OmegaConf.load(distilled / "out" / "modelpool" / "distilled.yaml")
    tasks = [t for t in pool_cfg.models if t != "_pretrained_"]

    def pool():
        return instantiate(pool_cfg, _recursive_=False)

    test_pool = mini_eval.taskpool(root, tasks, "test")
    val_pool = mini_eval.taskpool(root, tasks, "val")
    rows: Dict[str, Dict[str, float]] = {}
    individual = {}
    for t in tasks:
        rec = hetero["teachers"].get(t)
        individual[t] = rec["teacher_accuracy"] if rec else None
    p = pool()
    for t in tasks:  # same-architecture fine-tuned models on their own task (FusionBench task pool)
        if individual[t] is None:
            individual[t] = accuracies(test_pool.evaluate(p.load_model(t)), tasks)[t]
    rows["individual (teachers: own architecture and head)"] = individual | {
        "average": round(sum(individual.values()) / len(tasks), 4)
    }
    students = {
        t: (
            accuracies(test_pool.evaluate(p.load_model(t)), tasks)[t]
            if t in hetero["teachers"]
            else None
        )
        for t in tasks
    }
    rows["distilled students (label-free)"] = students
    rows["`_pretrained_` (zero-shot)"] = accuracies(
        test_pool.evaluate(p.load_pretrained_model()), tasks
    )
    rows["simple average"] = accuracies(
        test_pool.evaluate(SimpleAverageAlgorithm().run(pool())), tasks
    )
    rows["task arithmetic (λ=0.3, FusionBench default)"] = accuracies(
        test_pool.evaluate(TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool())), tasks
    )
    lam_ta, val_ta, acc = select_on_val(
        lambda lam: TaskArithmeticAlgorithm(scaling_factor=lam).run(pool()),
        val_pool,
        test_pool,
        tasks,
    )
    rows[f"task arithmetic (λ={lam_ta} selected on val)"] = acc

    def ties(lam):
        return TiesMergingAlgorithm(
            scaling_factor=lam, threshold=20, remove_keys=[], merge_func="sum"
        ).run(pool())

    rows["TIES (λ=0.3, k=20, FusionBench default)"] = accuracies(
        test_pool.evaluate(ties(0.3)), tasks
    )
    lam_ties, val_ties, acc = select_on_val(ties, val_pool, test_pool, tasks)
    rows[f"TIES (λ={lam_ties} selected on val)"] = acc
    rows["**StatsMerging LW** (distil + merge, one run)"] = accuracies(sm_report, tasks)
    result = {
        "mini_build": str(root),
        "hetero_build": str(hetero_build),
        "hetero_build_seconds_this_call": build_seconds,
        "statsmerging_hetero_run_seconds": seconds,
        "distill_to_base_run_seconds_cache_hits": distill_seconds,
        "student_vs_teacher": hetero["teachers"],
        "val_selection": {"task_arithmetic": val_ta, "ties": val_ties},
        "rows": rows,
        "tasks": tasks,
    }
    (work / "comparison.json").write_text(json.dumps(result, indent=2, default=str))
    text = render(result)
    print(text)
    if args.doc:
        doc = Path(args.doc)
        old = doc.read_text() if doc.exists() else f"{BEGIN}\n{END}\n"
        if BEGIN not in old:
            old += f"\n{BEGIN}\n{END}\n"
        head, rest = old.split(BEGIN, 1)
        doc.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    return 0


def render(result: dict) -> str:
    tasks = result["tasks"]
    lines = [
        f"Measured on `{Path(result['mini_build']).name}` + `{Path(result['hetero_build']).name}`, "
        "2 CPU cores shared with other jobs.",
        "",
        "* distil + StatsMerging, one `fusion_bench` run from a cold student cache "
        "(distillation of both teachers, StatsMerging, FusionBench evaluation of 8 tasks, "
        "test-split student/teacher report): "
        f"**{result['statsmerging_hetero_run_seconds']:.0f} s**",
        "* `distill_to_base` on the same cache (students reused): "
        f"{result['distill_to_base_run_seconds_cache_hits']:.0f} s",
        "",
        "Student vs teacher (test split):",
        "",
        "| task | teacher | teacher acc. | student acc. | student / teacher | `_pretrained_` acc. "
        "| distil time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, r in result["student_vs_teacher"].items():
        lines.append(
            f"| {t} | {r['teacher_class']} | {100 * r['teacher_accuracy']:.1f} | "
            f"{100 * r['student_accuracy']:.1f} | {100 * r['student_over_teacher']:.1f}% | "
            f"{100 * r['pretrained_accuracy']:.1f} | {r['distill_seconds']} |"
        )
    lines += [
        "",
        "Merged models (test accuracy, %; FusionBench task pool):",
        "",
        table(result["rows"], tasks),
        "",
    ]
    sel = result["val_selection"]
    lines.append(
        "λ grid (val-split average accuracy): task arithmetic "
        + ", ".join(f"{k}: {100 * v:.1f}" for k, v in sel["task_arithmetic"].items())
        + "; TIES "
        + ", ".join(f"{k}: {100 * v:.1f}" for k, v in sel["ties"].items())
        + "."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
