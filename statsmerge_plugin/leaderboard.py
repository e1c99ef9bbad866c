"""`statsmerge-leaderboard`: FusionBench's methods and ours, side by side on one model pool.

Every method runs as its own ``fusion_bench`` process on the same model pool and task pool, so that each
gets FusionBench's exact evaluation and its own wall time and peak memory (``ru_maxrss`` of that process,
from ``os.wait4``). A method that fails is reported as failed; the others still run. The result is a
markdown table (per task, average, normalized accuracy = merged / individual, per task then averaged),
a JSON file and a bar chart PNG, written side by side.

Protocols with task groups are detected from the composed configs, and each group's average is reported
next to the per-task accuracies:

* generalization (FusionBench's ``clip-vit-base-patch32_generalization_exp1/2`` pools, the mini
  ``mini-clip_generalization_exp1/2`` pools and task pools): task-pool tasks with a model in the model
  pool are *seen*, the others *unseen* (evaluated with their zero-shot heads);
* robustness (the mini task pool ``mini-clip_robustness``): keys ``<task>__<corruption>`` are the test
  sets under that corruption; *clean*, one group per corruption, and *corrupted* (all corrupted sets).

"Individual" runs each task's own model on its own task pool keys (clean and corrupted); unseen tasks
have no model, so its average and the normalized accuracy are over the seen tasks. Methods that adapt to
the unlabelled test images of their model pool (layer-wise AdaMerging) follow FusionBench's robustness
protocol when the model pool is a ``*_robustness_clean`` pool: one run on the clean pool for the clean
keys, and one per corruption on its ``*_robustness_corrupted`` twin (``+corruption=<name>``) for that
corruption's keys, so each adapts to the images it is evaluated on.

Example::

    statsmerge-leaderboard --methods pretrained,individual,simple_average,task_arithmetic,ties,\\
        adamerging_lw,statsmerging_lw --seeds 0 --out docs/leaderboard
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from statsmerge_plugin.mini.corruptions import CORRUPTIONS, split_key

# name -> (label, fusion_bench overrides, note). Our methods take `method.seed`; all take `seed`.
METHODS: Dict[str, tuple] = {
    "pretrained": ("Pretrained (zero-shot)", ["method=dummy"], ""),
    "individual": (
        "Individual (fine-tuned)",
        ["method=dummy"],
        "each task's own model on its own task",
    ),
    "simple_average": ("Simple Averaging", ["method=simple_average"], ""),
    "task_arithmetic": (
        "Task Arithmetic (λ=0.3)",
        ["method=task_arithmetic", "method.scaling_factor=0.3"],
        "",
    ),
    "ties": (
        "TIES-Merging (λ=0.3, k=20)",
        ["method=ties_merging", "method.scaling_factor=0.3", "method.threshold=20"],
        "",
    ),
    "fisher": (
        "Fisher Merging",
        ["method=fisher_merging/clip_fisher_merging"],
        "Fisher information on train images",
    ),
    "regmean": (
        "RegMean",
        ["method=regmean/clip_regmean"],
        "Gram matrices on train images",
    ),
    "adamerging_lw": (
        "Layer-wise AdaMerging",
        [
            "method=adamerging/clip",
            "method.name=clip_layer_wise_adamerging",
            "method.num_workers=0",
            "method.save_merging_weights=false",
        ],
        "FusionBench's test-time adaptation: entropy on unlabelled *test* images",
    ),
    "statsmerging_tw": (
        "StatsMerging task-wise (ours)",
        ["method=statsmerging/clip_task_wise"],
        "label-free, val images",
    ),
    "statsmerging_lw": (
        "StatsMerging layer-wise (ours)",
        ["method=statsmerging/clip_layer_wise"],
        "label-free, val images",
    ),
    "statsmerging_free": (
        "Free coefficients, same loss (control)",
        ["method=statsmerging/clip_layer_wise", "method.learner=free", "method.lr=0.03"],
        "label-free, val images; free table's lr 3e-2 (chosen on val)",
    ),
    "prodistill": (
        "ProDistill (ours)",
        ["method=prodistill/clip"],
        "64 unlabelled val images per task",
    ),
}
OUR_METHODS = {"statsmerging_tw", "statsmerging_lw", "statsmerging_free", "prodistill"}
# methods whose result depends on the seed (learned coefficients, sampled images); the others are run
# once, with the first seed, since every seed gives the same model
SEEDED_METHODS = OUR_METHODS | {"adamerging_lw", "fisher", "regmean"}
# methods that adapt to the unlabelled test images of the model pool (test-time adaptation)
TEST_TIME_METHODS = {"adamerging_lw"}


def seeds_for(method: str, seeds: Sequence[int]) -> List[int]:
    """The seeds ``method`` is run with: all of them if it is seeded, else the first."""
    return list(seeds) if method in SEEDED_METHODS else list(seeds)[:1]


DEFAULT_METHODS = [
    "pretrained",
    "individual",
    "simple_average",
    "task_arithmetic",
    "ties",
    "regmean",
    "adamerging_lw",
    "statsmerging_tw",
    "statsmerging_lw",
    "statsmerging_free",
    "prodistill",
]


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


@dataclass
class Part:
    """One process of a method that is run in parts: the task-pool keys it evaluates, its extra
    overrides, its log dir's name, its model pool (``None``: ``--modelpool``) and the test condition
    it adapted to (test-time adaptation, else empty)."""

    keys: List[str]
    overrides: List[str]
    tag: str
    modelpool: Optional[str] = None
    condition: str = ""


def fusion_bench_command(
    python: str, overrides: Sequence[str], config_dir: Optional[str]
) -> List[str]:
    cmd = [python, "-m", "fusion_bench"]
    if config_dir:
        cmd += ["--config-dir", str(config_dir)]
    return cmd + list(overrides)


def run_process(cmd: List[str], cwd: Path, log_file: Path, timeout: float) -> tuple:
    """Run ``cmd``; return (returncode, wall seconds, peak RSS MB of that process)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.time()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                return -9, time.time() - start, usage.ru_maxrss / 1024
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - start, usage.ru_maxrss / 1024


def corrupted_modelpool(modelpool: str) -> Optional[str]:
    """The ``*_robustness_corrupted`` twin of a ``*_robustness_clean`` model pool (FusionBench's
    pairs, and the mini ones), whose test sets are those under ``${corruption}``; else ``None``."""
    if "_robustness_clean" not in modelpool:
        return None
    return modelpool.replace("_robustness_clean", "_robustness_corrupted")


def last_error_line(log_file: Path) -> str:
    lines = [l.strip() for l in log_file.read_text(errors="replace").splitlines() if l.strip()]
    errors = [l for l in lines if "Error" in l or "Exception" in l]
    return (errors or lines or ["no output"])[-1][:300]


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


class Leaderboard:
    """Runs the methods and writes ``<out>.md``, ``<out>.json`` and ``<out>.png``."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.runs_dir = Path(args.runs_dir or self.out.parent / f"{self.out.name}_runs")
        self.common = [
            f"modelpool={args.modelpool}",
            f"taskpool={args.taskpool}",
            "print_config=false",
            *args.override,
        ]
        self.severity = 1  # of the task pool's corrupted sets (read when the pools are composed)
        self.method_overrides: Dict[str, List[str]] = {}
        for item in args.method_override:
            name, _, override = item.partition(":")
            self.method_overrides.setdefault(name, []).append(override)

    def tasks(self) -> List[str]:
        """Task names of the task pool (see :meth:`composed_pools`)."""
        return self.composed_pools()[0]

    def composed_pools(self) -> tuple:
        """(task pool keys, model pool model names), from Hydra's composed config (no model is
        loaded, no interpolation resolved)."""
        cmd = fusion_bench_command(
            self.args.python, [*self.common, "--cfg", "job"], self.args.config_dir
        )
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=self.args.cwd,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
        )
        if proc.returncode != 0:
            raise SystemExit(
                f"cannot compose the task pool {self.args.taskpool!r}:\n{proc.stderr[-2000:]}"
            )
        from omegaconf import OmegaConf

        job = OmegaConf.create(proc.stdout)
        models = (job.modelpool.get("models") or {}) if "modelpool" in job else {}
        names = [m for m in models if not (str(m).startswith("_") and str(m).endswith("_"))]
        self.severity = job.taskpool.get("severity", 1)
        return list(job.taskpool.test_datasets.keys()), names

    def run_one(
        self,
        method: str,
        seed: int,
        overrides: List[str],
        tag: str,
        modelpool: Optional[str] = None,
    ) -> RunResult:
        """One ``fusion_bench`` process (``modelpool``: instead of ``--modelpool``)."""
        common = self.common
        if modelpool is not None:
            common = [f"modelpool={modelpool}"] + [
                o for o in common if not o.startswith("modelpool=")
            ]
        log_dir = (self.runs_dir / tag).resolve()
        if log_dir.exists():
            i = 1
            while (self.runs_dir / f"{tag}_{i}").exists():
                i += 1
            log_dir = (self.runs_dir / f"{tag}_{i}").resolve()
        log_dir.mkdir(parents=True)
        cmd = fusion_bench_command(
            self.args.python,
            [*common, *overrides, f"seed={seed}", f"path.log_dir={log_dir}"],
            self.args.config_dir,
        )
        (log_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
        code, wall, rss = run_process(
            cmd, Path(self.args.cwd), log_dir / "stdout.log", self.args.timeout
        )
        result = RunResult(
            method,
            seed,
            wall_time_s=round(wall, 1),
            peak_rss_mb=round(rss, 1),
            log_dir=str(log_dir),
        )
        report_file = log_dir / "program_report.json"
        if code != 0 or not report_file.exists():
            result.status = "failed" if code != -9 else "timeout"
            result.error = last_error_line(log_dir / "stdout.log")
        else:
            result.accuracy = task_accuracies(json.loads(report_file.read_text()))
        return result

    def run_method(
        self, method: str, seed: int, tasks: List[str], model_names: Sequence[str] = ()
    ) -> RunResult:
        _, overrides, _ = METHODS[method]
        overrides = list(overrides) + self.method_overrides.get(method, [])
        if method in OUR_METHODS:
            overrides.append(f"method.seed={seed}")
        if method in TEST_TIME_METHODS and self.adapts_per_corruption(tasks):
            return self.run_per_condition(method, seed, overrides, tasks)
        if method != "individual":
            return self.run_one(method, seed, overrides, f"{method}_seed{seed}")
        # each fine-tuned model, evaluated on its own task only (clean and corrupted test sets)
        parts = [
            Part(
                keys,
                [f"modelpool.models._pretrained_=${{modelpool.models.{task}}}"],
                f"individual_{task}_seed{seed}",
            )
            for task, keys in individual_runs(tasks, model_names).items()
        ]
        return self.run_parts(method, seed, overrides, tasks, parts)

    def adapts_per_corruption(self, tasks: Sequence[str]) -> bool:
        """Whether a test-time adaptation method runs once per test condition: corrupted keys in the
        task pool and a clean robustness pool with a corrupted twin."""
        if not any(split_key(t)[1] for t in tasks):
            return False
        if corrupted_modelpool(self.args.modelpool) is None:
            print(
                f"[leaderboard] warning: {self.args.modelpool!r} is not a *_robustness_clean pool; "
                "test-time adaptation methods adapt on its test sets only",
                flush=True,
            )
            return False
        return True

    def run_per_condition(
        self, method: str, seed: int, overrides: List[str], tasks: List[str]
    ) -> RunResult:
        """FusionBench's robustness protocol for test-time adaptation: the clean keys from a run on the
        clean pool, each corruption's keys from a run on the corrupted twin under that corruption
        (adapting on those test images)."""
        groups = task_groups(tasks)
        corrupted = corrupted_modelpool(self.args.modelpool)
        parts = [Part(groups["clean"], [], f"{method}_clean_seed{seed}", condition="clean")]
        for c in CORRUPTIONS:
            if c in groups:
                extra = [f"+corruption={c}", f"+corruption_severity={self.severity}"]
                parts.append(Part(groups[c], extra, f"{method}_{c}_seed{seed}", corrupted, c))
        return self.run_parts(method, seed, overrides, tasks, parts)

    def run_parts(
        self, method: str, seed: int, overrides: List[str], tasks: List[str], parts: List["Part"]
    ) -> RunResult:
        """One process per part, each evaluating only its task-pool keys; their accuracies, summed
        wall times and largest peak memory as one result (the first failure, if any)."""
        total = RunResult(method, seed)
        for part in parts:
            others = [f"~taskpool.test_datasets.{t}" for t in tasks if t not in part.keys]
            one = self.run_one(
                method, seed, overrides + part.overrides + others, part.tag, part.modelpool
            )
            total.wall_time_s += one.wall_time_s
            total.peak_rss_mb = max(total.peak_rss_mb, one.peak_rss_mb)
            if one.status != "ok":
                return one
            total.accuracy.update({k: one.accuracy[k] for k in part.keys})
            if part.condition:
                total.conditions.append(part.condition)
        return total

    def run(self) -> dict:
        tasks, model_names = self.composed_pools()
        results: List[RunResult] = []
        for method in self.args.methods:
            for seed in seeds_for(method, self.args.seeds):
                print(f"[leaderboard] {method} (seed {seed}) ...", flush=True)
                r = self.run_method(method, seed, tasks, model_names)
                msg = (
                    f"avg {100 * statistics.mean(r.accuracy.values()):.1f}"
                    if r.status == "ok"
                    else r.error
                )
                print(
                    f"[leaderboard] {method} (seed {seed}): {r.status}, {r.wall_time_s:.0f} s, {r.peak_rss_mb:.0f} MB, {msg}",
                    flush=True,
                )
                results.append(r)
        return summarize(results, tasks, self.args.methods, model_names)


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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="statsmerge-leaderboard", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from: {', '.join(METHODS)}",
    )
    p.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds (program `seed` and our methods' `method.seed`)",
    )
    p.add_argument("--modelpool", default="CLIPVisionModelPool/mini-clip_TA8")
    p.add_argument("--taskpool", default="CLIPVisionModelTaskPool/mini-clip_TA8")
    p.add_argument(
        "--config-dir", default=None, help="extra Hydra config dir (fusion_bench --config-dir)"
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="a Hydra override for every run (repeatable)",
    )
    p.add_argument(
        "--method-override",
        action="append",
        default=[],
        help="METHOD:KEY=VALUE, a Hydra override for one method's runs (repeatable)",
    )
    p.add_argument(
        "--out", default="docs/leaderboard", help="output stem: writes OUT.md, OUT.json, OUT.png"
    )
    p.add_argument(
        "--runs-dir", default=None, help="where each run's log dir goes (default: OUT_runs)"
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per fusion_bench process")
    p.add_argument("--cwd", default=".", help="working directory of the fusion_bench processes")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--header", default="", help="markdown placed above the table")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing OUT.md, OUT.json, OUT.png (without it the run stops before any work)",
    )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        p.error(f"--methods: no method given; choose from {list(METHODS)}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.timeout > 0:
        p.error(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    for item in args.method_override:
        name, sep, _ = item.partition(":")
        if not sep or name not in METHODS:
            p.error(
                f"--method-override {item!r}: expected METHOD:KEY=VALUE with METHOD in {list(METHODS)}"
            )
    return args


OUTPUT_SUFFIXES = (".md", ".json", ".png")


def check_outputs(out: Path, runs_dir: Path, overwrite: bool) -> None:
    """Before any run: ``OUT.*`` and the runs dir can be written, and no earlier table is replaced
    unless ``overwrite``.

    Raises:
        ValueError: naming the option and the path.
    """
    from statsmerge_plugin.validation import check_writable_dir

    check_writable_dir(out.parent, "--out: directory")
    for suffix in OUTPUT_SUFFIXES:
        target = out.with_suffix(suffix)
        if target.is_dir():
            raise ValueError(f"--out: {str(target)!r} is a directory")
        if target.exists() and not overwrite:
            raise ValueError(
                f"--out: {str(target)!r} already exists; refusing to overwrite it (pass --overwrite, "
                "or choose another --out)"
            )
    check_writable_dir(runs_dir, "--runs-dir")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    runs_dir = Path(args.runs_dir or out.parent / f"{out.name}_runs")
    try:
        check_outputs(out, runs_dir, args.overwrite)
    except ValueError as err:
        raise SystemExit(f"statsmerge-leaderboard: error: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["statsmerge-leaderboard", *(sys.argv[1:] if argv is None else argv)])
    start = time.time()
    summary = Leaderboard(args).run()
    summary["command"] = command
    summary["total_wall_time_s"] = round(time.time() - start, 1)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    bar_chart(summary, out.with_suffix(".png"))
    text = markdown(summary, command, args.header) + "\n" + shape_markdown(summary["shape"])
    text += f"\n![leaderboard]({out.with_suffix('.png').name})\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    failed = [m for m, r in summary["methods"].items() if r["status"] != "ok"]
    return 1 if failed and len(failed) == len(summary["methods"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
