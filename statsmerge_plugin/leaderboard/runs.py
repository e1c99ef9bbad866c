"""Running the leaderboard: one ``fusion_bench`` process per method, seed and part, each with its
own log dir, wall time and peak memory (``ru_maxrss`` from ``os.wait4``); a failure is recorded,
the other methods still run."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from statsmerge_plugin.mini.corruptions import CORRUPTIONS, split_key

from .methods import METHODS, OUR_METHODS, TEST_TIME_METHODS, seeds_for
from .summary import RunResult, individual_runs, summarize, task_accuracies, task_groups


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

    def composed_job(self, resolve: bool = False) -> subprocess.CompletedProcess:
        """``fusion_bench <pools and overrides> --cfg job`` (``--resolve``: with interpolations
        resolved, which builds a mini pool on first use), run as the methods' processes are."""
        flags = ["--cfg", "job"] + (["--resolve"] if resolve else [])
        cmd = fusion_bench_command(self.args.python, [*self.common, *flags], self.args.config_dir)
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=self.args.cwd,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
        )

    def composed_pools(self) -> tuple:
        """(task pool keys, model pool model names), from Hydra's composed config (no model is
        loaded, no interpolation resolved)."""
        proc = self.composed_job()
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
        summary = summarize(results, tasks, self.args.methods, model_names)
        summary["build"] = self.build_record()
        return summary

    def build_record(self) -> Optional[dict]:
        """The mini build the model pool's ``_pretrained_`` lives in (``None`` for a pool that is
        not one, e.g. FusionBench's hub models): key, path and the digests of its weights and data,
        as its manifest recorded them at build time, else computed now (builds made before
        digests were recorded)."""
        proc = self.composed_job(resolve=True)
        if proc.returncode != 0:
            return None
        from omegaconf import OmegaConf

        job = OmegaConf.create(proc.stdout)
        entry = OmegaConf.select(job, "modelpool.models._pretrained_")
        if OmegaConf.is_config(entry):
            entry = entry.get("pretrained_model_name_or_path")
        return mini_build_record(entry)


def mini_build_record(path) -> Optional[dict]:
    """``{"key", "path", "digests", "digests_recorded"}`` of the mini build holding ``path`` (its
    nearest ancestor with a complete manifest), else ``None``."""
    from statsmerge_plugin.mini.store import build_digests, read_manifest

    if not isinstance(path, str) or not Path(path).exists():
        return None
    for directory in [Path(path).resolve(), *Path(path).resolve().parents]:
        manifest = read_manifest(directory)
        if manifest is not None:
            recorded = manifest.get("digests")
            return {
                "key": manifest.get("key", directory.name),
                "path": str(directory),
                "digests": recorded or build_digests(directory),
                "digests_recorded": recorded is not None,
            }
    return None
