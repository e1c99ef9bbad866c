"""A named grid of StatsMerging settings on a mini-TA8 build: val figures to choose, test to report.

Every setting runs :class:`~statsmerge_plugin.method.statsmerging.StatsMergingForCLIP` (FusionBench's
own ``CLIPVisionModelPool``, Fabric on the CPU by default) once per seed, and the merged model is
evaluated with FusionBench's ``CLIPVisionModelTaskPool`` on

* **val-choose**: a fixed, seeded half of each task's val split (``--choose-fraction``) that the
  method never sees. These are the figures to choose settings by (the table's ★);
* **test**: the build's test split, for reporting only (``--no-test`` skips it).

The method's unlabelled images (and its own ``selection``, if a setting asks for it) come from the
other part of val, **val-fit**; the test split is in the model pool only so that the method's guard
can refuse it. Reference rows (simple averaging, task arithmetic λ=0.3, TIES λ=0.3 k=20) are evaluated
on the same splits.

Usage::

    python benchmarks/statsmerging_grid.py --list
    python benchmarks/statsmerging_grid.py --grid optim --seeds 0,1,2 --out docs/grid_optim.md
    python benchmarks/statsmerging_grid.py --grid features --set feature_norm=standardize \\
        --seeds 0,1,2 --out docs/grid_features.md
    STATSMERGE_MINI_ROOT=/tmp/mini STATSMERGE_MINI_PRESET=smoke \\
        python benchmarks/statsmerging_grid.py --grid smoke --seeds 0,1 --max-steps 5 --out /tmp/g.md

The build is ``${mini_clip:}``'s (``STATSMERGE_MINI_PRESET``/``STATSMERGE_MINI_ROOT``/
``STATSMERGE_MINI_SEED``; built on first use, which takes minutes for the default preset), or
``--root BUILD_DIR`` (a directory with ``manifest.json``). A setting's own options take precedence over
``--set``; ``--set`` over the defaults of ``method=statsmerging``. Writes ``OUT`` (markdown: the
table, the settings, the command) and ``OUT.json`` (every run), never over existing files unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

PAPER_YAML = "method/statsmerging/paper.yaml"


def paper_options() -> dict:
    """The keys ``method=statsmerging/paper`` sets (read from its YAML: one source), by their flat
    names as every setting of the grid."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from statsmerge_plugin.method.statsmerging.options import flat_options

    cfg = OmegaConf.to_container(
        OmegaConf.create((files("statsmerge_plugin.config") / PAPER_YAML).read_text())
    )
    return flat_options({k: v for k, v in cfg.items() if k not in ("defaults", "_target_")})


def _optim(mode: str, lrs: Sequence[float]) -> Dict[str, dict]:
    return {
        f"{mode} lr={lr:g} {schedule}": {"learner": mode, "lr": lr, "lr_schedule": schedule}
        for lr in lrs
        for schedule in ("step", "cosine")
    }


def named_grids() -> Dict[str, Dict[str, dict]]:
    """Grid name -> {setting name: options}. ``{}`` is ``method=statsmerging`` as configured."""
    return {
        "smoke": {
            "defaults": {},
            "free lr=0.05 cosine": {"learner": "free", "lr": 0.05, "lr_schedule": "cosine"},
            "relative + best": {"task_weighting": "relative", "selection": "best", "eval_every": 2},
        },
        "paper": {"paper-literal": paper_options(), "defaults": {}},
        "optim": {
            **_optim("shared", (1e-3, 3e-3, 1e-2)),
            **_optim("per_tensor", (1e-3, 3e-3, 1e-2)),
            **_optim("free", (1e-2, 5e-2, 1e-1)),
        },
        "norm": {
            f"{mode} {norm}": {"learner": mode, "feature_norm": norm}
            for mode in ("shared", "per_tensor")
            for norm in ("none", "standardize", "log_abs", "log_standardize")
        },
        "scale": {
            "softmax fixed 1": {"output_norm": "softmax", "scale": "fixed", "init_scale": 1.0},
            "softmax learned from 1": {"output_norm": "softmax", "scale": "learned"},
            "softmax learned from 1.5": {
                "output_norm": "softmax",
                "scale": "learned",
                "init_scale": 1.5,
            },
            "relu fixed 1": {"output_norm": "relu"},
            "none fixed 1": {"output_norm": "none"},
            "none fixed 1.5": {"output_norm": "none", "init_scale": 1.5},
        },
        "objective": {
            "ce sum": {},
            "ce relative": {"task_weighting": "relative"},
            "ce confidence": {"task_weighting": "confidence"},
            "kl T=1 sum": {"loss": "kl_soft", "temperature": 1.0},
            "kl T=2 relative": {
                "loss": "kl_soft",
                "temperature": 2.0,
                "task_weighting": "relative",
            },
            "kl T=4 relative": {
                "loss": "kl_soft",
                "temperature": 4.0,
                "task_weighting": "relative",
            },
            "ce relative, all images": {
                "task_weighting": "relative",
                "num_unlabelled_per_task": None,
            },
            "ce relative, all images, best": {
                "task_weighting": "relative",
                "num_unlabelled_per_task": None,
                "selection": "best",
            },
            "ce relative, all images, early stop": {
                "task_weighting": "relative",
                "num_unlabelled_per_task": None,
                "selection": "early_stop",
            },
        },
        "granularity": {
            f"{granularity} {mode}": {"granularity": granularity, "learner": mode}
            for granularity in ("layer_wise", "task_wise")
            for mode in ("shared", "per_tensor", "free")
        },
        "features": {
            "mean": {"stat_features": ["mean"]},
            "+variance": {"stat_features": ["mean", "variance"]},
            "+norm": {"stat_features": ["mean", "variance", "l2_norm"]},
            "+singular values": {
                "stat_features": ["mean", "variance", "l2_norm", "singular_values"]
            },
        },
    }


REFERENCES = ("simple_average", "task_arithmetic", "ties_merging")


# --- data: the build's splits, val cut into fit / choose --------------------------------------------


def build_root(args) -> Path:
    if args.root:
        root = Path(args.root)
        if not (root / "manifest.json").is_file():
            raise SystemExit(f"--root {str(root)!r}: no manifest.json, not a mini build directory")
        return root
    from statsmerge_plugin.mini.resolver import mini_clip_root

    print("mini build: ${mini_clip:} (built now if missing)", flush=True)
    return Path(mini_clip_root())


def split_val(root: Path, tasks: Sequence[str], fraction: float, out: Path) -> Dict[str, dict]:
    """Save each task's val split cut into ``val_fit`` and ``val_choose`` (a seeded ``fraction``,
    the same for every run); returns their paths and sizes."""
    import torch
    from datasets import load_from_disk

    paths = {}
    generator = torch.Generator().manual_seed(20250604)
    for task in tasks:
        val = load_from_disk(str(root / "data" / task / "val"))
        order = torch.randperm(len(val), generator=generator).tolist()
        n_choose = max(1, round(fraction * len(val)))
        if n_choose >= len(val):
            raise SystemExit(f"task {task}: {len(val)} val images, too few to hold out a part")
        parts = {"val_choose": order[:n_choose], "val_fit": order[n_choose:]}
        paths[task] = {}
        for name, rows in parts.items():
            path = out / task / name
            if not path.exists():
                val.select(sorted(rows)).save_to_disk(str(path))
            paths[task][name] = {"path": str(path), "rows": len(rows)}
    return paths


def dataset(path) -> dict:
    return {"_target_": "datasets.load_from_disk", "dataset_path": str(path)}


def model_pool(root: Path, tasks: Sequence[str], splits: Dict[str, dict]):
    """The method's pool: models, train, val = val-fit, and test (only for the test-split guard)."""
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import DictConfig

    models = {"_pretrained_": str(root / "pretrained")} | {
        t: str(root / "models" / t) for t in tasks
    }
    return CLIPVisionModelPool(
        DictConfig(models),
        processor=str(root / "pretrained"),
        train_datasets=DictConfig({t: dataset(root / "data" / t / "train") for t in tasks}),
        val_datasets=DictConfig({t: dataset(splits[t]["val_fit"]["path"]) for t in tasks}),
        test_datasets=DictConfig({t: dataset(root / "data" / t / "test") for t in tasks}),
    )


def task_pool(root: Path, paths: Dict[str, str], batch_size: int = 500):
    """FusionBench's CLIP task pool over ``{task: dataset dir}`` (accuracy with the true labels)."""
    from fusion_bench.taskpool import CLIPVisionModelTaskPool
    from omegaconf import DictConfig

    from statsmerge_plugin.mini.registry import register_tasks

    register_tasks(list(paths))
    return CLIPVisionModelTaskPool(
        DictConfig({t: dataset(p) for t, p in paths.items()}),
        processor=str(root / "pretrained"),
        clip_model=str(root / "pretrained"),
        dataloader_kwargs={"batch_size": batch_size, "num_workers": 0, "shuffle": False},
        fast_dev_run=False,
    )


def accuracies(report: dict, tasks: Sequence[str]) -> Dict[str, float]:
    accs = {t: 100.0 * float(report[t]["accuracy"]) for t in tasks}
    return accs | {"average": sum(accs.values()) / len(tasks)}


# --- runs ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    setting: str
    seed: Optional[int]
    options: dict
    val: Dict[str, float] = field(default_factory=dict)
    test: Dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: Optional[str] = None


def fabric_with_log_dir(log_dir: Path, accelerator: str):
    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger

    fabric = L.Fabric(
        accelerator=accelerator,
        devices=1,
        loggers=TensorBoardLogger(str(log_dir), name="", version=""),
    )
    fabric.launch()
    return fabric


def run_statsmerging(options: dict, pool, log_dir: Path, accelerator: str):
    """The merged model and ``summary.json`` of one StatsMerging run."""
    import torch

    from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP
    from statsmerge_plugin.method.statsmerging.options import nest_flat_options

    torch.manual_seed(options.get("seed", 0))
    alg = StatsMergingForCLIP(**nest_flat_options(options))
    alg.fabric = fabric_with_log_dir(log_dir, accelerator)
    merged = alg.run(pool)
    summary = json.loads((log_dir / "statsmerging" / "summary.json").read_text())
    return merged, summary


def run_reference(name: str, pool):
    from fusion_bench.method import (
        SimpleAverageAlgorithm,
        TaskArithmeticAlgorithm,
        TiesMergingAlgorithm,
    )

    if name == "simple_average":
        return SimpleAverageAlgorithm().run(pool)
    if name == "task_arithmetic":
        return TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)
    return TiesMergingAlgorithm(
        scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum"
    ).run(pool)


def evaluate(model, pools: Dict[str, object], tasks, run: Run) -> None:
    """Accuracies of ``model`` on every evaluation pool (``val_choose`` -> ``run.val``)."""
    for split, taskpool in pools.items():
        accs = accuracies(taskpool.evaluate(model), tasks)
        setattr(run, "val" if split == "val_choose" else split, accs)


def check_settings(settings: Dict[str, dict], base: dict) -> None:
    """Every setting is a valid option set (constructing the algorithm checks every option): a typo
    stops the grid before any run."""
    from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP
    from statsmerge_plugin.method.statsmerging.options import nest_flat_options

    for name, options in settings.items():
        try:
            StatsMergingForCLIP(**nest_flat_options(base | options))
        except (TypeError, ValueError) as err:
            raise SystemExit(f"setting {name!r}: {err}") from err


# --- the table ------------------------------------------------------------------------------------------


def mean_std(values: List[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def objective_change(summary: dict) -> Optional[float]:
    """Mean over tasks of (training loss at the end / at the start) - 1, in % (negative: improved)."""
    losses = summary.get("training_loss_per_task")
    if not losses:
        return None
    ratios = [losses["end"][t] / losses["start"][t] for t in losses["start"] if losses["start"][t]]
    return 100.0 * (sum(ratios) / len(ratios) - 1.0)


def rows_of(runs: List[Run]) -> List[dict]:
    by_setting: Dict[str, List[Run]] = {}
    for run in runs:
        by_setting.setdefault(run.setting, []).append(run)
    rows = []
    for setting, group in by_setting.items():
        ok = [r for r in group if r.error is None]
        movement = [
            r.summary["coefficient_movement"]["max_abs_from_uniform"] for r in ok if r.summary
        ]
        change = [c for r in ok if (c := objective_change(r.summary)) is not None]
        rows.append(
            {
                "setting": setting,
                "runs": len(ok),
                "failed": len(group) - len(ok),
                "val": [r.val["average"] for r in ok if r.val],
                "test": [r.test["average"] for r in ok if r.test],
                "objective_change_pct": change,
                "max_abs_from_uniform": movement,
                "seconds": [r.seconds for r in ok],
                "error": next((r.error for r in group if r.error), None),
            }
        )
    return rows


def markdown(rows: List[dict], runs: List[Run], settings: dict, header: str, command: str) -> str:
    scored = [r for r in rows if r["val"] and not r["setting"].startswith("[reference]")]
    best = max(scored, key=lambda r: statistics.mean(r["val"]))["setting"] if scored else None
    lines = [
        header,
        "",
        "★ = the StatsMerging setting with the best mean val-choose accuracy (the figure to choose "
        "by). Test: for reporting only.",
        "Objective Δ: mean over tasks of the training loss at the end relative to the start "
        "(negative = the objective improved on its start). Max |λ−1/K|: how far the coefficients "
        "moved from simple averaging.",
        "",
        "| setting | runs | val-choose avg | test avg (report only) | objective Δ % "
        "| max abs(λ−1/K) × 100 | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        star = " ★" if r["setting"] == best else ""
        runs_cell = f"{r['runs']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        movement = [100 * m for m in r["max_abs_from_uniform"]]
        seconds = f"{statistics.mean(r['seconds']):.0f}" if r["seconds"] else "–"
        lines.append(
            f"| {r['setting']}{star} | {runs_cell} | {mean_std(r['val'])} | {mean_std(r['test'])} "
            f"| {mean_std(r['objective_change_pct'])} | {mean_std(movement)} | {seconds} |"
        )
    tasks = [t for t in (runs[0].val if runs and runs[0].val else {}) if t != "average"]
    if tasks:
        lines += ["", "Per task, val-choose accuracy (mean over seeds):", ""]
        lines.append("| setting | " + " | ".join(t.replace("mini_", "") for t in tasks) + " |")
        lines.append("|---" * (len(tasks) + 1) + "|")
        for r in rows:
            group = [x for x in runs if x.setting == r["setting"] and x.val]
            if group:
                cells = [f"{statistics.mean(x.val[t] for x in group):.1f}" for t in tasks]
                lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    failures = [r for r in rows if r["error"]]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {r['setting']}: {r['error']}" for r in failures]
    lines += ["", "Settings (options on top of `method=statsmerging` and `--set`):", ""]
    lines += [f"- {name}: `{json.dumps(opts)}`" for name, opts in settings.items()]
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------


def parse_value(text: str):
    """A ``--set`` value as Hydra would read it (``1e-3`` is a number, YAML 1.1 says a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--grid", default="smoke", help="grid name(s), comma-separated (see --list)")
    p.add_argument("--list", action="store_true", help="print the grids and their settings")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='an extra setting, e.g. --setting \'free lr 0.05={"learner": "free", "lr": 0.05}\' '
        "(repeatable; with --grid none only these run)",
    )
    p.add_argument("--seeds", default="0,1,2", help="method seeds, comma-separated")
    p.add_argument("--root", help="a mini build directory (default: the ${mini_clip:} build)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option for every setting (YAML value), e.g. feature_norm=standardize",
    )
    p.add_argument("--max-steps", type=int, help="shortcut for --set max_steps=N")
    p.add_argument(
        "--choose-fraction",
        type=float,
        default=0.5,
        help="part of each val split held out for the val-choose figures",
    )
    p.add_argument("--no-test", action="store_true", help="do not evaluate on the test split")
    p.add_argument(
        "--no-references",
        action="store_true",
        help="skip simple averaging / task arithmetic / TIES",
    )
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--work-dir", help="splits and run logs (default: a temporary directory)")
    p.add_argument("--out", help="markdown output (OUT and OUT.json)")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT / OUT.json")
    p.add_argument("--header", default="## StatsMerging grid")
    p.add_argument("--verbose", action="store_true", help="keep the progress bars")
    return p.parse_args(argv)


def select_settings(args) -> Dict[str, dict]:
    grids = named_grids()
    settings: Dict[str, dict] = {}
    for name in [g.strip() for g in args.grid.split(",") if g.strip() and g.strip() != "none"]:
        if name not in grids:
            raise SystemExit(f"unknown grid {name!r}; known: {', '.join(grids)}")
        settings |= grids[name]
    for item in args.setting:
        cut = item.find("={")  # the name may itself contain "=" (e.g. "kl T=2")
        name, value = (item[:cut], item[cut + 1 :]) if cut > 0 else (item, "")
        try:
            options = json.loads(value) if value and name.strip() else None
        except json.JSONDecodeError as err:
            raise SystemExit(f"--setting {item!r}: the options are not JSON ({err})")
        if not isinstance(options, dict):
            raise SystemExit(f"--setting {item!r}: expected NAME={{JSON object of options}}")
        settings[name.strip()] = options
    if not settings:
        raise SystemExit("--grid: no setting selected")
    return settings


def base_options(args) -> dict:
    base = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        base[key.strip()] = parse_value(value)
    if args.max_steps is not None:
        base["max_steps"] = args.max_steps
    return base


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, settings in named_grids().items():
            print(f"{name}:")
            for s, opts in settings.items():
                print(f"  {s}: {json.dumps(opts)}")
        return 0
    settings = select_settings(args)
    base = base_options(args)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if not seeds or any(s < 0 for s in seeds):
        raise SystemExit(f"--seeds {args.seeds!r}: expected integers >= 0")
    if not 0 < args.choose_fraction < 1:
        raise SystemExit(f"--choose-fraction {args.choose_fraction}: expected a fraction in (0, 1)")
    out = Path(args.out) if args.out else None
    if out is not None:
        existing = [p for p in (out, out.with_suffix(out.suffix + ".json")) if p.exists()]
        if existing and not args.overwrite:
            raise SystemExit(f"{[str(p) for p in existing]} exist; pass --overwrite to replace")
        out.parent.mkdir(parents=True, exist_ok=True)
    check_settings(settings, base)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])

    if not args.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of every run and evaluation
    from fusion_bench.utils.cache_utils import set_default_cache_dir

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="statsmerging_grid_"))
    work.mkdir(parents=True, exist_ok=True)
    set_default_cache_dir(str(work / "cache"))
    root = build_root(args)
    tasks = json.loads((root / "manifest.json").read_text())["tasks"]
    print(f"build {root}, tasks {tasks}, work dir {work}", flush=True)
    splits = split_val(root, tasks, args.choose_fraction, work / "splits")
    eval_pools = {
        "val_choose": task_pool(root, {t: splits[t]["val_choose"]["path"] for t in tasks})
    }
    if not args.no_test:
        eval_pools["test"] = task_pool(root, {t: root / "data" / t / "test" for t in tasks})

    runs: List[Run] = []
    if not args.no_references:
        for name in REFERENCES:
            run = Run(f"[reference] {name}", None, {})
            start = time.time()
            evaluate(run_reference(name, model_pool(root, tasks, splits)), eval_pools, tasks, run)
            run.seconds = time.time() - start
            runs.append(run)
    jobs = [(name, options, seed) for name, options in settings.items() for seed in seeds]
    for i, (name, options, seed) in enumerate(jobs):
        opts = base | options | {"seed": seed}
        run = Run(name, seed, opts)
        log_dir = work / "runs" / f"{len(runs):03d}"
        start = time.time()
        print(f"[{i + 1}/{len(jobs)}] {name} seed {seed}", flush=True)
        try:
            merged, run.summary = run_statsmerging(
                opts, model_pool(root, tasks, splits), log_dir, args.accelerator
            )
            run.seconds = time.time() - start
            evaluate(merged, eval_pools, tasks, run)
        except Exception as err:  # noqa: BLE001 - one failing setting must not stop the grid
            run.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"  failed: {run.error}", flush=True)
        runs.append(run)
        if run.error is None:
            print(f"  val-choose {run.val['average']:.1f}", flush=True)

    rows = rows_of(runs)
    text = markdown(rows, runs, settings, args.header, command)
    print(text)
    if out is not None:
        out.write_text(text)
        payload = {
            "command": command,
            "build": str(root),
            "splits": splits,
            "base_options": base,
            "settings": settings,
            "runs": [run.__dict__ for run in runs],
        }
        out.with_suffix(out.suffix + ".json").write_text(json.dumps(payload, indent=1, default=str))
        print(f"written: {out}, {out.with_suffix(out.suffix + '.json')}")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
