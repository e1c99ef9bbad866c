"""The language miniature's leaderboard (issue 17): FusionBench's methods and ProDistill through the
``fusion_bench`` command line on ``CausalLMPool/mini-lm``, one process per run.

Every row is a ``fusion_bench`` process evaluated by ``ExactMatchTaskPool``; seeded methods run
with every seed. Scaling factors of task arithmetic and TIES are either FusionBench's default
(0.3) or chosen on the val split (``taskpool=ExactMatchTaskPool/mini-lm_val``) over a grid, so
that "the best data-free merge" is the best a user could pick without test prompts. Writes
``<out>.md``, ``<out>.json`` (every run, with its command and log dir) and ``<out>.png``::

    statsmerge-mini-lm leaderboard --out docs/leaderboard_lm
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..leaderboard import (  # the mini-TA8 leaderboard's process runner and bar chart
    RunResult,
    bar_chart,
    fusion_bench_command,
    last_error_line,
    run_process,
)
from .skills import SKILLS

FEW_SHOT = "+method/prodistill/few_shot=mini-lm"
TEST_POOL = "taskpool=ExactMatchTaskPool/mini-lm"
VAL_POOL = "taskpool=ExactMatchTaskPool/mini-lm_val"
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# name -> (label, overrides, note, seeded)
METHODS: Dict[str, tuple] = {
    "pretrained": ("Pretrained", ["method=dummy"], "", False),
    "individual": ("Individual (fine-tuned)", ["method=dummy"], "each skill's own model", False),
    "simple_average": ("Simple Averaging", ["method=simple_average"], "", False),
    "task_arithmetic": (
        "Task Arithmetic (λ=0.3)",
        ["method=task_arithmetic", "method.scaling_factor=0.3"],
        "FusionBench's default λ",
        False,
    ),
    "task_arithmetic_val": (
        "Task Arithmetic (λ chosen on val)",
        ["method=task_arithmetic"],
        "λ by val exact match",
        False,
    ),
    "ties": (
        "TIES-Merging (λ=0.3, k=20)",
        ["method=ties_merging", "method.scaling_factor=0.3", "method.threshold=20"],
        "FusionBench's defaults",
        False,
    ),
    "ties_val": (
        "TIES-Merging (k=20, λ chosen on val)",
        ["method=ties_merging", "method.threshold=20"],
        "λ by val exact match",
        False,
    ),
    "adamerging_sft": (
        "Layer-wise AdaMerging for LMs (FusionBench)",
        [
            "method=adamerging/llama_sft",
            "method.save_merged_model=false",
            "method.save_interval=null",
        ],
        "FusionBench's LayerWiseAdaMergingForLlamaSFT: supervised next-token loss on the train "
        "splits (labels), 1000 steps",
        True,
    ),
    "prodistill": (
        "ProDistill (ours)",
        ["method=prodistill/causal_lm", FEW_SHOT],
        "unlabelled train-split prompts per skill",
        True,
    ),
}
DATA_FREE = ("simple_average", "task_arithmetic", "task_arithmetic_val", "ties", "ties_val")
OURS = {"prodistill"}
# the λ grid's methods: the option it sets
GRID_OPTION = {"task_arithmetic_val": "method.scaling_factor", "ties_val": "method.scaling_factor"}


class LanguageLeaderboard:
    """Runs the methods on the miniature and writes the tables (see the module docstring)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.runs_dir = Path(args.runs_dir or self.out.parent / f"{self.out.name}_runs")
        self.common = ["modelpool=CausalLMPool/mini-lm", "print_config=false", *args.override]
        self.extra: Dict[str, List[str]] = {}
        for item in args.method_override:
            name, _, override = item.partition(":")
            self.extra.setdefault(name, []).append(override)

    def run_one(self, method: str, seed: int, overrides: List[str], tag: str) -> RunResult:
        log_dir = (self.runs_dir / tag).resolve()
        log_dir.mkdir(parents=True, exist_ok=False)
        cmd = fusion_bench_command(
            sys.executable,
            [*self.common, *overrides, f"seed={seed}", f"path.log_dir={log_dir}"],
            None,
        )
        (log_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
        code, wall, rss = run_process(cmd, Path.cwd(), log_dir / "stdout.log", self.args.timeout)
        result = RunResult(method, seed, wall_time_s=round(wall, 1), peak_rss_mb=round(rss, 1))
        result.log_dir = str(log_dir)
        report = log_dir / "program_report.json"
        if code != 0 or not report.exists():
            result.status = "failed" if code != -9 else "timeout"
            result.error = last_error_line(log_dir / "stdout.log")
        else:
            data = json.loads(report.read_text())
            result.accuracy = {t: float(data[t]["accuracy"]) for t in SKILLS if t in data}
        return result

    def overrides(self, method: str, seed: int) -> List[str]:
        out = list(METHODS[method][1]) + self.extra.get(method, [])
        if METHODS[method][3]:  # seeded: the method's own seed too
            out.append(f"method.seed={seed}")
        return out

    def choose_on_val(self, method: str) -> tuple:
        """(best grid value by mean val exact match, {value: val mean})."""
        option, scores = GRID_OPTION[method], {}
        for value in self.args.grid:
            run = self.run_one(
                method,
                0,
                self.overrides(method, 0) + [f"{option}={value}", VAL_POOL],
                f"val_{method}_{value}",
            )
            if run.status == "ok":
                scores[value] = statistics.mean(run.accuracy.values())
        if not scores:
            raise SystemExit(f"{method}: every val run failed; see {self.runs_dir}")
        return max(scores, key=lambda v: (scores[v], -v)), scores

    def run(self) -> dict:
        from tqdm.auto import tqdm

        results, chosen = [], {}
        for method in tqdm(self.args.methods, desc="mini-lm leaderboard"):
            seeds = self.args.seeds if METHODS[method][3] else self.args.seeds[:1]
            for seed in seeds:
                extra = []
                if method in GRID_OPTION:
                    if method not in chosen:
                        chosen[method] = self.choose_on_val(method)
                    extra = [f"{GRID_OPTION[method]}={chosen[method][0]}"]
                if method == "individual":
                    results.append(self.individual(seed))
                    continue
                overrides = self.overrides(method, seed) + extra + [TEST_POOL]
                results.append(self.run_one(method, seed, overrides, f"{method}_seed{seed}"))
        return summarize(results, self.args.methods, chosen)

    def individual(self, seed: int) -> RunResult:
        """Each skill's fine-tuned model on its own skill's test prompts."""
        merged = RunResult("individual", seed)
        for skill in SKILLS:
            part = self.run_one(
                "individual",
                seed,
                self.overrides("individual", seed)
                + [f"modelpool.models._pretrained_=${{modelpool.models.{skill}}}", TEST_POOL],
                f"individual_{skill}_seed{seed}",
            )
            if part.status != "ok":
                return part
            merged.accuracy[skill] = part.accuracy[skill]
            merged.wall_time_s += part.wall_time_s
            merged.peak_rss_mb = max(merged.peak_rss_mb, part.peak_rss_mb)
        return merged


def summarize(results: List[RunResult], methods: Sequence[str], chosen: dict) -> dict:
    """Mean and std over seeds per method, the val choices, and the shape checks of issue 17."""
    rows = {}
    for method in methods:
        runs = [r for r in results if r.method == method]
        ok = [r for r in runs if r.status == "ok" and set(r.accuracy) == set(SKILLS)]
        label, _, note, _ = METHODS[method]
        row = {
            "label": label,
            "note": note,
            "seeds": [r.seed for r in runs],
            "status": "ok" if ok and len(ok) == len(runs) else "failed",
            "errors": [r.error for r in runs if r.error],
            "wall_time_s": round(statistics.mean(r.wall_time_s for r in runs), 1) if runs else None,
        }
        if method in chosen:
            value, scores = chosen[method]
            row["chosen_on_val"] = {"value": value, "val_average": scores}
            row["note"] = f"{note} over {{{', '.join(map(str, scores))}}}"
            row["label"] = label.replace("λ chosen on val", f"λ={value}, chosen on val")
        if ok:
            row["accuracy"] = {s: statistics.mean(r.accuracy[s] for r in ok) for s in SKILLS}
            averages = [statistics.mean(r.accuracy.values()) for r in ok]
            row["average"] = statistics.mean(averages)
            row["average_std"] = statistics.stdev(averages) if len(averages) > 1 else 0.0
            row["per_seed_average"] = averages
        rows[method] = row
    return {
        "skills": list(SKILLS),
        "methods": rows,
        "shape": shape(rows),
        "runs": [asdict(r) for r in results],
    }


def shape(rows: dict) -> dict:
    """Issue 17's targets: individual >= 85 % per skill, best data-free merge >= 10 points below
    individual, ProDistill >= 3 points above every data-free merge (means over seeds)."""
    avg = {m: r["average"] for m, r in rows.items() if "average" in r}
    out: dict = {}
    if "individual" in rows and "accuracy" in rows["individual"]:
        ind = rows["individual"]["accuracy"]
        out["individual_min"] = min(ind.values())
        out["individual_each_at_least_85"] = min(ind.values()) >= 0.85
    free = {m: avg[m] for m in DATA_FREE if m in avg}
    if free:
        best = max(free, key=free.get)
        out["best_data_free"] = {"method": best, "average": free[best]}
        if "individual" in avg:
            out["gap_individual_minus_best_data_free"] = avg["individual"] - free[best]
            out["gap_at_least_10"] = avg["individual"] - free[best] >= 0.10
        if "prodistill" in avg:
            out["prodistill_minus_best_data_free"] = avg["prodistill"] - free[best]
            out["prodistill_at_least_3_above"] = avg["prodistill"] - free[best] >= 0.03
    return out


def pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(summary: dict, command: str, header: str = "") -> str:
    lines = [header, f"Command: `{command}`", ""] if header else [f"Command: `{command}`", ""]
    lines.append("| method | " + " | ".join(SKILLS) + " | average | s / run | note |")
    lines.append("|---|" + "---:|" * (len(SKILLS) + 2) + "---|")
    for method, row in summary["methods"].items():
        if "accuracy" not in row:
            cells = ["—"] * len(SKILLS) + [f"{row['status']}: {'; '.join(row['errors'])[:120]}", ""]
        else:
            avg = pct(row["average"])
            if len(row["seeds"]) > 1:
                avg += f" ± {100 * row['average_std']:.1f}"
            cells = [pct(row["accuracy"][s]) for s in SKILLS] + [avg, f"{row['wall_time_s']:.0f}"]
        name = f"**{row['label']}**" if method in OURS else row["label"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['note']} |")
    s = summary["shape"]
    lines.append("")
    if s:
        lines.append("Shape (issue 17's targets, test split):")
        if "individual_min" in s:
            ok = "holds" if s["individual_each_at_least_85"] else "**does not hold**"
            lines.append(
                f"- every individual model ≥ 85 %: {ok} (lowest {pct(s['individual_min'])})"
            )
        if "gap_individual_minus_best_data_free" in s:
            ok = "holds" if s["gap_at_least_10"] else "**does not hold**"
            best = s["best_data_free"]
            lines.append(
                f"- best data-free merge ≥ 10 points below individual: {ok} ({best['method']}, "
                f"{pct(best['average'])}; gap {pct(s['gap_individual_minus_best_data_free'])})"
            )
        if "prodistill_minus_best_data_free" in s:
            ok = "holds" if s["prodistill_at_least_3_above"] else "**does not hold**"
            lines.append(
                f"- ProDistill ≥ 3 points above every data-free merge: {ok} "
                f"(+{pct(s['prodistill_minus_best_data_free'])})"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="statsmerge-mini-lm leaderboard", description=__doc__)
    p.add_argument("--out", default="leaderboard_lm", help="output stem (.md, .json, .png)")
    p.add_argument("--runs-dir", default=None, help="log dirs of the runs (default: <out>_runs)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the seeded methods")
    p.add_argument(
        "--grid",
        default=",".join(map(str, GRID)),
        help="λ values tried on val for the *_val methods (default 0.1, ..., 1.0)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    p.add_argument("--override", action="append", default=[], help="for every run (repeatable)")
    p.add_argument(
        "--method-override",
        action="append",
        default=[],
        metavar="METHOD:OVERRIDE",
        help="for one method's runs, e.g. prodistill:method.lr=0.05 (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        p.error("--seeds names no seed")
    try:
        args.grid = [float(v) for v in args.grid.split(",") if v]
    except ValueError:
        p.error(f"--grid must be comma-separated numbers, got {args.grid!r}")
    if not args.grid:
        p.error("--grid names no value")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    runs_dir = Path(args.runs_dir or out.parent / f"{out.name}_runs")
    targets = [out.with_suffix(s) for s in (".md", ".json", ".png")] + [runs_dir]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"refusing to overwrite {existing}; pass --overwrite or another --out")
    if args.overwrite and runs_dir.exists():
        import shutil

        shutil.rmtree(runs_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    from .build import build_mini_lm
    from .resolver import ENV_PRESET, ENV_SEED

    manifest = build_mini_lm(
        seed=int(os.environ.get(ENV_SEED, 0)), preset=os.environ.get(ENV_PRESET) or "default"
    )
    board = LanguageLeaderboard(args)
    summary = board.run()
    summary["build"] = {k: manifest[k] for k in ("key", "path", "digests", "exact_match")}
    command = shlex.join(
        ["statsmerge-mini-lm", "leaderboard", *(sys.argv[2:] if argv is None else argv)]
    )
    summary["command"] = command
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    out.with_suffix(".md").write_text(markdown(summary, command))
    bar_chart(summary, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0
