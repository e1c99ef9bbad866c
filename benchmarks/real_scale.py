"""Real-scale cost of every method, on synthetic ViT-B/32- and ViT-L/14-sized pools (no downloads).

Builds a synthetic pool of the published size (:mod:`statsmerge_plugin.realscale`: random
pretrained CLIP, task models = theta_0 + noise, small 224 px image sets, a ResNet-50-sized teacher
for the heterogeneous mode), loads it through FusionBench's ``CLIPVisionModelPool``, and runs each
method **in its own process** for a few steps:

* StatsMerging layer-wise and task-wise, learners ``shared``, ``per_tensor``, ``free``;
* ProDistill (its first blocks: every block costs the same, and its peak memory does not grow with
  depth, ``docs/prodistill.md``);
* the heterogeneous distillation (``DistillToBaseForCLIP``) at two train split sizes;
* FusionBench's own layer-wise AdaMerging and task arithmetic, as references.

Per method it measures the statistics pass, the time of each training step, the peak host memory of
the process (``ru_maxrss`` from ``os.wait4``; a watchdog kills a process above ``--rss-limit-gb``)
and projects a full default run (formulae in the written doc). Results are stored per size in
``--results`` (JSON) and ``--doc`` is rewritten from all stored sizes.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/real_scale.py                   # ViT-B/32, everything
    OMP_NUM_THREADS=1 python benchmarks/real_scale.py --size vit-l-14   # ViT-L/14 (2 tasks, 1 step)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30

# StatsMerging variants: name -> (granularity, learner)
STATSMERGING = {
    "statsmerging_lw_shared": ("layer_wise", "shared"),
    "statsmerging_tw_shared": ("task_wise", "shared"),
    "statsmerging_lw_per_tensor": ("layer_wise", "per_tensor"),
    "statsmerging_tw_per_tensor": ("task_wise", "per_tensor"),
    "statsmerging_lw_free": ("layer_wise", "free"),
}
REFERENCES = ("adamerging_lw", "task_arithmetic")
# defaults of a full run (the methods' configs)
DEFAULTS = {
    "statsmerging": {"max_steps": 500, "num_unlabelled_per_task": 128, "batch_size_per_task": 4},
    "adamerging": {"max_steps": 1000, "batch_size": 16},
    "prodistill": {"shots_per_task": 64, "epochs_per_block": 100, "batch_size": 128},
    "hetero": {"max_steps": 300, "batch_size": 64},
}


@dataclass
class SizePlan:
    """What is measured at one architecture size."""

    size: str
    tasks: Sequence[str]
    steps: int
    hetero_train_sizes: Sequence[int]
    hetero_batch: int
    methods: List[str] = field(default_factory=list)


def size_plan(size: str, steps: Optional[int], hetero_batch: Optional[int]) -> SizePlan:
    from statsmerge_plugin.realscale.build import TA8

    if size == "vit-l-14":  # memory: theta_0 + 8 task vectors alone are 10.9 GB; see the doc
        plan = SizePlan(size, ("sun397", "eurosat"), steps or 1, (512,), hetero_batch or 4)
    elif size == "tiny":  # a smoke test of this script
        plan = SizePlan(size, ("mnist", "eurosat"), steps or 2, (16, 64), hetero_batch or 8)
    else:
        plan = SizePlan(size, TA8, steps or 2, (512, 4096), hetero_batch or 64)
    plan.methods = (
        ["baseline"]
        + list(STATSMERGING)
        + list(REFERENCES)
        + ["prodistill"]
        + [f"hetero_{n}" for n in plan.hetero_train_sizes]
    )
    return plan


def recipe_of(plan: SizePlan):
    from statsmerge_plugin.realscale.build import PoolRecipe

    images = (("train", 64), ("val", 128), ("test", 64))
    if plan.size == "tiny":
        images = (("train", 16), ("val", 16), ("test", 16))
    return PoolRecipe(
        size=plan.size,
        tasks=tuple(plan.tasks),
        images=images,
        teacher_task="eurosat",
        teacher_train_sizes=tuple(plan.hetero_train_sizes),
    )


# ------------------------------------------------------------------------------------------------
# children: one method each, in its own process
# ------------------------------------------------------------------------------------------------


def _durations(alg) -> Dict[str, List[float]]:
    return {k: list(v) for k, v in alg.profiler.recorded_durations.items()}


def _need(durations: Dict[str, List[float]], action: str) -> List[float]:
    if action not in durations:
        raise KeyError(
            f"profiler action {action!r} not recorded (recorded: {sorted(durations)}); "
            "the method's profiling changed: update benchmarks/real_scale.py"
        )
    return durations[action]


def child_statsmerging(build: Path, plan: SizePlan, method: str) -> Dict:
    from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP
    from statsmerge_plugin.realscale import pools

    granularity, learner = STATSMERGING[method]
    per_task = DEFAULTS["statsmerging"]["batch_size_per_task"]
    alg = StatsMergingForCLIP(
        granularity=granularity,
        learner=learner,
        max_steps=plan.steps,
        num_unlabelled_per_task=per_task,  # one batch: labelling is projected per image
        save_outputs=False,
    )
    start = time.perf_counter()
    alg.run(pools.modelpool(build, plan.tasks))
    d = _durations(alg)
    return {
        "total_s": time.perf_counter() - start,
        "stats_s": sum(_need(d, "task vectors and statistics"))
        + sum(d.get("pooled statistics", [])),
        "pooled_stats_s": sum(d.get("pooled statistics", [])),
        "step_s": _need(d, "train step"),
        "images_per_step": per_task * len(plan.tasks),
        "label_s": sum(_need(d, "teacher labels")),
        "objective_s": sum(d.get("objective at the start", []) + d.get("objective at the end", [])),
        "images_per_task": per_task,
    }


def fabric_with_logger(directory: Path):
    """A one-device Fabric with FusionBench's TensorBoard logger (AdaMerging logs its
    hyper-parameters, as under the CLI)."""
    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger

    fabric = L.Fabric(accelerator="auto", devices=1, loggers=TensorBoardLogger(str(directory)))
    fabric.launch()
    return fabric


def child_adamerging(build: Path, plan: SizePlan, work: Path) -> Dict:
    import fusion_bench
    from fusion_bench.method.adamerging.clip_layer_wise_adamerging import (
        CLIPLayerWiseAdaMergingAlgorithm,
    )
    from omegaconf import OmegaConf

    from statsmerge_plugin.realscale import pools

    per_task = DEFAULTS["statsmerging"]["batch_size_per_task"]  # StatsMerging's images per step
    cfg = OmegaConf.load(
        Path(fusion_bench.__file__).parents[1] / "fusion_bench_config/method/adamerging/clip.yaml"
    )
    cfg.fast_dev_run = False
    cfg.update(batch_size=per_task, num_workers=0, max_steps=plan.steps, save_merging_weights=False)
    alg = CLIPLayerWiseAdaMergingAlgorithm(cfg)
    alg._fabric_instance = fabric_with_logger(work / "logs" / f"adamerging-{plan.size}")
    start = time.perf_counter()
    alg.run(pools.modelpool(build, plan.tasks))
    d = _durations(alg)
    K = len(plan.tasks)
    per_image_part, fixed = [], []
    for k in range(plan.steps):
        per_image_part.append(
            sum(
                sum(_need(d, a)[k * K : (k + 1) * K])
                for a in ("data loading", "forward pass", "backward pass")
            )
        )
        fixed.append(_need(d, "optimizer step")[k] + _need(d, "merging weights")[k])
    return {
        "total_s": time.perf_counter() - start,
        "construct_s": sum(_need(d, "construct the wrapped model")),
        "step_s": [a + b for a, b in zip(per_image_part, fixed)],
        "step_images_part_s": per_image_part,
        "step_fixed_s": fixed,
        "images_per_step": per_task * K,
        "images_per_task": per_task,
    }


def child_task_arithmetic(build: Path, plan: SizePlan) -> Dict:
    from fusion_bench.method import TaskArithmeticAlgorithm

    from statsmerge_plugin.realscale import pools

    start = time.perf_counter()
    TaskArithmeticAlgorithm(scaling_factor=0.3).run(pools.modelpool(build, plan.tasks))
    return {"total_s": time.perf_counter() - start}


class StopAfterBlocks(Exception):
    """Raised by :func:`child_prodistill`'s subclass once the blocks to measure are done."""


def child_prodistill(build: Path, plan: SizePlan, blocks: int) -> Dict:
    from statsmerge_plugin.method.prodistill import ProDistillForCLIP
    from statsmerge_plugin.realscale import pools

    class FirstBlocks(ProDistillForCLIP):
        """ProDistill that stops after ``blocks`` blocks (each block costs the same)."""

        def _distill_block(self, index, *args, **kwargs):
            if index >= blocks:
                raise StopAfterBlocks()
            return super()._distill_block(index, *args, **kwargs)

    from statsmerge_plugin.realscale.build import load_manifest

    batch = DEFAULTS["prodistill"]["batch_size"]
    val_images = dict(load_manifest(build)["recipe"]["images"])["val"]
    shots = min(val_images, max(1, batch // len(plan.tasks)))  # one default batch of samples
    alg = FirstBlocks(shots_per_task=shots, epochs_per_block=plan.steps, batch_size=batch)
    start = time.perf_counter()
    try:
        alg.run(pools.modelpool(build, plan.tasks))
    except StopAfterBlocks:
        pass
    total = time.perf_counter() - start
    d = _durations(alg)
    records = alg.block_records
    train_block = _need(d, "train block")
    steps = [r["steps"] for r in records]
    return {
        "total_s": total,
        "blocks_measured": len(records),
        "samples": shots * len(plan.tasks),
        "step_s": [t / n for t, n in zip(train_block, steps)],
        "images_per_step": min(batch, shots * len(plan.tasks)),
        "block_passes_s": [
            r["seconds_load_and_teacher"] + (r["seconds_train"] - t) + r["seconds_propagate"]
            for r, t in zip(records, train_block)
        ],
        "blocks_s": [r["seconds"] for r in records],
        "cache": getattr(alg, "_cache_info", {}),
    }


def child_hetero(build: Path, plan: SizePlan, train_size: int, work: Path) -> Dict:
    from statsmerge_plugin.method.statsmerging.hetero import DistillToBaseForCLIP
    from statsmerge_plugin.realscale import pools

    cache = work / f"students-{plan.size}-{train_size}-{os.getpid()}"
    alg = DistillToBaseForCLIP(
        max_steps=plan.steps,
        batch_size=plan.hetero_batch,
        evaluate_test=False,
        cache_dir=str(cache),
    )
    pool = pools.modelpool(build, plan.tasks, hetero=True, train_split=f"train_{train_size}")
    start = time.perf_counter()
    try:
        _, report = alg.distill_pool(pool)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # the student itself is not needed
    record = report["teachers"]["eurosat"]
    return {
        "total_s": time.perf_counter() - start,
        "step_s": record["step_seconds"],
        "images_per_step": plan.hetero_batch,
        "train_split_images": record["num_train_images"],
        "images_used": record["images_used"],
        "teacher_labelled": record["teacher_labelled"],
        "teacher": record["teacher_class"],
    }


def child_baseline(build: Path, plan: SizePlan) -> Dict:
    """The floor under every peak: the libraries the runs import, a Fabric and the pool object,
    no model loaded."""
    import fusion_bench.taskpool  # noqa: F401
    from fusion_bench.method.adamerging.clip_layer_wise_adamerging import (  # noqa: F401
        CLIPLayerWiseAdaMergingAlgorithm,
    )

    from statsmerge_plugin.method.prodistill import ProDistillForCLIP  # noqa: F401
    from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP
    from statsmerge_plugin.realscale import pools

    start = time.perf_counter()
    _ = StatsMergingForCLIP().fabric
    pools.modelpool(build, plan.tasks)
    return {"total_s": time.perf_counter() - start}


def child_heads(build: Path, plan: SizePlan) -> Dict:
    """FusionBench's zero-shot heads of every task, into the shared joblib cache (once)."""
    from statsmerge_plugin.method.statsmerging.hetero import DistillToBaseForCLIP
    from statsmerge_plugin.realscale import pools

    alg = DistillToBaseForCLIP()
    alg.modelpool = pools.modelpool(build, plan.tasks)
    start = time.perf_counter()
    alg.setup_zero_shot_classification_head()
    return {"total_s": time.perf_counter() - start}


def child_build(work: Path, plan: SizePlan) -> Dict:
    from statsmerge_plugin.realscale.build import build_pool, load_manifest

    start = time.perf_counter()
    build = build_pool(work / "pools", recipe_of(plan))
    return {"total_s": time.perf_counter() - start, "build": str(build), **load_manifest(build)}


def run_child_inline(args) -> Dict:
    """The ``--_child`` entry point: run one measurement in this process."""
    from fusion_bench.utils.cache_utils import set_default_cache_dir

    plan = size_plan(args.size, args.steps, args.hetero_batch)
    work = Path(args.work)
    set_default_cache_dir(str(work / "fusion_bench_cache"))  # heads shared by every child
    method = args._child
    if method == "build":
        return child_build(work, plan)
    build = Path(args._build)
    if method == "heads":
        return child_heads(build, plan)
    if method == "baseline":
        return child_baseline(build, plan)
    if method in STATSMERGING:
        return child_statsmerging(build, plan, method)
    if method == "adamerging_lw":
        return child_adamerging(build, plan, work)
    if method == "task_arithmetic":
        return child_task_arithmetic(build, plan)
    if method == "prodistill":
        return child_prodistill(build, plan, args.prodistill_blocks)
    if method.startswith("hetero_"):
        return child_hetero(build, plan, int(method.split("_")[1]), work)
    raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------------------------------
# the parent: processes, memory watchdog, projections, the doc
# ------------------------------------------------------------------------------------------------


def run_child(
    argv: List[str], log_file: Path, rss_limit: float, command: Optional[List[str]] = None
) -> Dict:
    """Run one child (this script with ``argv``, or ``command``); returns its RESULT, wall seconds,
    peak RSS (ru_maxrss) and status."""
    import psutil

    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.time()
    killed = False
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            command or [sys.executable, str(Path(__file__).resolve()), *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        watched = psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss = watched.memory_info().rss
            except psutil.Error:
                rss = 0
            if rss > rss_limit and not killed:
                proc.kill()
                killed = True
            time.sleep(0.05)
    wall = time.time() - start
    text = log_file.read_text(errors="replace")
    lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT ") :]) if lines else {}
    code = os.waitstatus_to_exitcode(status)
    if killed:
        state = f"killed: RSS above {rss_limit / GiB:.0f} GiB"
    elif code != 0 or (not lines and command is None):
        errors = [l for l in text.splitlines() if "Error" in l or "error:" in l]
        state = f"failed ({code}): {(errors or ['no RESULT line'])[-1][:200]}"
    else:
        state = "ok"
    return {
        "status": state,
        "wall_s": wall,
        # CPU seconds of the process (user + system): every run is single-threaded and the runs
        # are sequential, so their sum is what the benchmark takes on a machine of its own
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        **result,
    }


def steady(step_s: Sequence[float]) -> Optional[float]:
    """The time of a steady step: the median of the steps after the first (the only one if one)."""
    if not step_s:
        return None
    later = sorted(step_s[1:] or step_s)
    return later[len(later) // 2]


def project(method: str, r: Dict, plan: SizePlan, num_blocks: int) -> Optional[float]:
    """Seconds of a full default run from the measured parts (formulae in :data:`FORMULAE`)."""
    if r.get("status") != "ok":
        return None
    t = steady(r.get("step_s", []))
    if method in STATSMERGING:
        d = DEFAULTS["statsmerging"]
        scale = d["num_unlabelled_per_task"] / r["images_per_task"]
        setup = r["total_s"] - r["stats_s"] - r["label_s"] - r["objective_s"] - sum(r["step_s"])
        return setup + r["stats_s"] + scale * (r["label_s"] + r["objective_s"]) + d["max_steps"] * t
    if method == "adamerging_lw":
        d = DEFAULTS["adamerging"]
        scale = d["batch_size"] / r["images_per_task"]
        t_default = steady(r["step_fixed_s"]) + scale * steady(r["step_images_part_s"])
        return r["total_s"] - sum(r["step_s"]) + d["max_steps"] * t_default
    if method == "task_arithmetic":
        return r["total_s"]
    if method == "prodistill":
        d = DEFAULTS["prodistill"]
        n_default = d["shots_per_task"] * len(plan.tasks)
        steps_per_block = d["epochs_per_block"] * math.ceil(n_default / d["batch_size"])
        passes = steady(r["block_passes_s"]) * n_default / r["samples"]
        setup = r["total_s"] - sum(r["blocks_s"])
        return setup + num_blocks * (passes + steps_per_block * t)
    if method.startswith("hetero_"):
        d = DEFAULTS["hetero"]
        t_default = t * d["batch_size"] / r["images_per_step"]
        return r["total_s"] - sum(r["step_s"]) + d["max_steps"] * t_default
    return None


FORMULAE = """\
Projected full default run, from the measured parts (t_step: the median step after the first, or
the only step; `setup`: the measured run minus the parts named in its formula):

* StatsMerging: `setup + stats + (128 / 4) x (labelling + objective at start and end) + 500 x
  t_step`. The measured run labels and evaluates 4 images per task (one batch); the default labels
  128 per task (`num_unlabelled_per_task`) and evaluates the objective on them twice.
* FusionBench layer-wise AdaMerging: `setup + 1000 x (t_fixed + (16 / 4) x t_images)`, measured at
  4 images per task and step (StatsMerging's), projected to its default 16; `t_images` = data
  loading + forward + backward of the 8 task batches, `t_fixed` = optimiser step + re-merge.
* ProDistill: `setup + L x ((512 / N) x t_passes + 100 x ceil(512 / 128) x t_step)` with `L`
  blocks, `N` the measured samples (one batch of 128), `t_passes` the per-block teacher pass, whole-
  set loss and propagation over `N` samples, 512 = 64 shots x 8 tasks.
* Heterogeneous distillation (one teacher): `setup + 300 x t_step x (64 / measured batch)`.
* Task arithmetic: the measured run.

The statistics pass is StatsMerging's task vectors and per-task statistics (`tau = theta_k -
theta_0`, mean, variance, norm, top-3 singular values of every tensor) plus, for `per_tensor`, the
statistics pooled over tasks (Gram accumulation)."""


def gpu_commands(size: str) -> str:
    pool = {"vit-b-32": "clip-vit-base-patch32", "vit-l-14": "clip-vit-large-patch14"}[size]
    task = {"vit-b-32": "TA8", "vit-l-14": "TA8_L14"}[size]
    mp, tp = (
        f"modelpool=CLIPVisionModelPool/{pool}_TA8_val",
        f"taskpool=CLIPVisionModelTaskPool/clip-vit-classification_{task}",
    )
    return "\n".join(
        [
            f"fusion_bench method=statsmerging/clip_layer_wise {mp} {tp}",
            f"fusion_bench method=statsmerging/clip_task_wise {mp} {tp}",
            f"fusion_bench method=statsmerging/clip_layer_wise method.learner=per_tensor {mp} {tp}",
            f"fusion_bench method=statsmerging/clip_layer_wise method.learner=free {mp} {tp}",
            f"fusion_bench method=prodistill/clip {mp} {tp}",
            "fusion_bench method=adamerging/clip method.name=clip_layer_wise_adamerging "
            f"modelpool=CLIPVisionModelPool/{pool}_TA8 {tp}",
            f"fusion_bench method=task_arithmetic method.scaling_factor=0.3 "
            f"modelpool=CLIPVisionModelPool/{pool}_TA8 {tp}",
        ]
    )


def fmt_s(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v / 3600:.1f} h" if v >= 3600 else f"{v:.0f} s" if v >= 10 else f"{v:.2f} s"


def table(size_result: Dict) -> str:
    manifest = size_result["manifest"]
    ref = manifest["theta0_plus_task_vectors_bytes"]
    lines = [
        "| method | statistics pass | time / step (images) | peak host RSS | / (θ0 + all τ) "
        "| projected default run | stats / projected | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in size_result["methods"].items():
        t = steady(r.get("step_s", []))
        proj = r.get("projected_s")
        stats = r.get("stats_s")
        lines.append(
            f"| {method} | {fmt_s(stats)} | "
            + (f"{fmt_s(t)} ({r.get('images_per_step')})" if t is not None else "–")
            + f" | {r['peak_rss_bytes'] / GiB:.2f} GiB | {r['peak_rss_bytes'] / ref:.2f} | "
            + f"{fmt_s(proj)} | "
            + (f"{100 * stats / proj:.1f} %" if stats is not None and proj else "–")
            + f" | {r['status']} |"
        )
    return "\n".join(lines)


def targets(size_result: Dict) -> List[str]:
    """The issue's done-when checks on these figures (ViT-B/32 only), each held or missed."""
    m = size_result["methods"]
    out = []
    ada = steady(m.get("adamerging_lw", {}).get("step_s", []))
    ref = size_result["manifest"]["theta0_plus_task_vectors_bytes"]
    for name in STATSMERGING:
        r = m.get(name, {})
        t = steady(r.get("step_s", []))
        if r.get("status") != "ok" or t is None or ada is None:
            out.append(f"- {name}: not measured ({r.get('status', 'not run')})")
            continue
        frac = r["stats_s"] / r["projected_s"]
        ratio = r["peak_rss_bytes"] / ref
        out.append(
            f"- {name}: time/step {t:.1f} s vs AdaMerging {ada:.1f} s at "
            f"{r['images_per_step']} images "
            f"(**{'held' if t <= ada else 'missed'}**); statistics pass {100 * frac:.2f} % of the "
            f"projected run (**{'held' if frac < 0.05 else 'missed'}**); peak RSS "
            f"{ratio:.2f} x (θ0 + all τ) (**{'held' if ratio <= 1.5 else 'missed'}** at 1.5 x)"
        )
    hetero = {k: v for k, v in m.items() if k.startswith("hetero_") and v.get("status") == "ok"}
    if len(hetero) >= 2:
        peaks = {v["train_split_images"]: v["peak_rss_bytes"] for v in hetero.values()}
        small, large = min(peaks), max(peaks)
        growth = peaks[large] / peaks[small]
        out.append(
            f"- heterogeneous distillation: peak RSS {peaks[small] / GiB:.2f} GiB with a "
            f"{small}-image train split, {peaks[large] / GiB:.2f} GiB with {large} images "
            f"(x {growth:.3f}; **{'held' if growth <= 1.05 else 'missed'}**: no growth with "
            "the split)"
        )
    return out


def render(results: Dict) -> str:
    parts = [
        "# Real scale without downloads: measured cost on ViT-B/32- and ViT-L/14-sized pools",
        "",
        "Generated by `python benchmarks/real_scale.py` (see its docstring); do not edit between "
        "the markers by hand.",
        "",
        "<!-- results:begin -->",
    ]
    for size, sr in results.items():
        man = sr["manifest"]
        parts += [
            f"## {size}",
            "",
            f"Pool: `{man['key']}` ({len(man['recipe']['tasks'])} task models: "
            f"{', '.join(man['recipe']['tasks'])}), vision tower {man['vision_parameters']:,} "
            f"parameters in {man['vision_tensors']} tensors; **θ0 + all task vectors = "
            f"{man['theta0_plus_task_vectors_bytes'] / GiB:.2f} GiB** (float32); built in "
            f"{sr['build_s']:.0f} s (this call; 0 s when reused), zero-shot heads "
            f"{sr['heads_s']:.0f} s (once, FusionBench's joblib cache, shared by the runs).",
            "",
            f"Measured {sr['when']} ({sr.get('code', '')}) on {sr['machine']}; each method in "
            "its own process, "
            f"{sr['steps']} training step(s) each; whole benchmark {sr['wall_s'] / 60:.1f} min"
            + (
                f" wall, {sr['cpu_s'] / 60:.1f} min of CPU time (every run single-threaded, the runs "
                "one after another: the wall time on a machine of its own)."
                if "cpu_s" in sr
                else "."
            ),
            "",
            table(sr),
            "",
        ]
        if size == "vit-b-32":
            parts += ["Targets (issue 10):", "", *targets(sr), ""]
        for later in sr.get("later_runs", []):
            parts += [
                f"Measured later, on {later['when']} ({later['code']}; {later['machine']}; "
                f"{later.get('steps', '?')} training step(s)): "
                + ", ".join(later["methods"])
                + ".",
                "",
            ]
    parts += ["## Projection formulae", "", FORMULAE, "", "## GPU commands", ""]
    for size in ("vit-b-32", "vit-l-14"):
        parts += [f"{size} (FusionBench's real pools, downloaded by FusionBench):", "", "```bash"]
        parts += [gpu_commands(size), "```", ""]
    parts.append("<!-- results:end -->")
    return "\n".join(parts) + "\n"


def write_doc(doc: Path, results: Dict) -> None:
    text = render(results)
    if doc.exists():
        old = doc.read_text()
        if "<!-- results:begin -->" in old and "<!-- results:end -->" in old:
            head = old.split("<!-- results:begin -->")[0]
            tail = old.split("<!-- results:end -->")[1]
            body = text.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
            text = f"{head}<!-- results:begin -->{body}<!-- results:end -->{tail}"
    doc.write_text(text)


def code_version() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "statsmerge_plugin"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.split()
    except OSError:
        return "unknown"
    changed = [f for f in dirty if f.endswith(".py")]
    return f"commit {head}" + (
        f" with uncommitted changes to {', '.join(changed)}" if changed else ""
    )


def machine() -> str:
    import torch

    load = os.getloadavg()[0]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(load average {load:.1f} at the start: shared with other jobs), torch "
        f"{torch.__version__} with {os.environ.get('OMP_NUM_THREADS', '?')} thread(s), nice "
        f"{os.nice(0)}"
    )


def measure(args) -> Dict:
    import torch  # noqa: F401  (machine description)

    plan = size_plan(args.size, args.steps, args.hetero_batch)
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    limit = args.rss_limit_gb * GiB
    common = ["--size", args.size, "--work", str(work), "--steps", str(plan.steps)]
    common += ["--hetero-batch", str(plan.hetero_batch)]
    common += ["--prodistill-blocks", str(args.prodistill_blocks)]
    t0 = time.time()
    when, code = time.strftime("%Y-%m-%d %H:%M"), code_version()
    built = run_child(
        common + ["--_child", "build"], work / "logs" / f"{args.size}-build.log", limit
    )
    if built["status"] != "ok":
        raise SystemExit(f"building the {args.size} pool failed: {built['status']}")
    build = built["build"]
    print(f"pool {build} ({built['total_s']:.0f} s)", flush=True)
    heads = run_child(
        common + ["--_child", "heads", "--_build", build],
        work / "logs" / f"{args.size}-heads.log",
        limit,
    )
    print(
        f"zero-shot heads: {heads['status']} ({heads['wall_s']:.0f} s, CPU {heads['cpu_s']:.0f} s)",
        flush=True,
    )
    methods = [m for m in plan.methods if not args.methods or m in args.methods]
    results: Dict[str, Dict] = {}
    for method in methods:
        r = run_child(
            common + ["--_child", method, "--_build", build],
            work / "logs" / f"{args.size}-{method}.log",
            limit,
        )
        r["projected_s"] = project(method, r, plan, built["architecture"]["vision_layers"])
        results[method] = r
        t = steady(r.get("step_s", []))
        print(
            f"{method:28s} {r['status']:6s} stats {fmt_s(r.get('stats_s')):>7s} "
            f"step {fmt_s(t):>7s} peak {r['peak_rss_bytes'] / GiB:5.2f} GiB "
            f"projected {fmt_s(r['projected_s'])} (wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s)",
            flush=True,
        )
    cpu = built["cpu_s"] + heads["cpu_s"] + sum(r["cpu_s"] for r in results.values())
    return {
        "manifest": {
            k: v for k, v in built.items() if k not in ("status", "peak_rss_bytes", "cpu_s")
        },
        "build_s": built["total_s"],
        "heads_s": heads.get("total_s", heads["wall_s"]),
        "steps": plan.steps,
        "when": when,
        "machine": machine(),
        "code": code,
        "methods": results,
        "wall_s": time.time() - t0,
        "cpu_s": cpu,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="vit-b-32", choices=("vit-b-32", "vit-l-14", "tiny"))
    p.add_argument("--work", default="/tmp/statsmerge-real-scale", help="pools, logs, caches")
    p.add_argument("--results", default=str(REPO / "docs" / "real-scale.json"))
    p.add_argument("--doc", default=str(REPO / "docs" / "real-scale.md"))
    p.add_argument("--steps", type=int, default=None, help="training steps per method")
    p.add_argument("--hetero-batch", type=int, default=None, help="distillation batch size")
    p.add_argument("--prodistill-blocks", type=int, default=2, help="ProDistill blocks to run")
    p.add_argument("--methods", nargs="*", default=None, help="a subset of the methods")
    p.add_argument("--rss-limit-gb", type=float, default=13.0, help="kill a run above this RSS")
    p.add_argument("--render", action="store_true", help="only rewrite --doc from --results")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child is not None:
        print("RESULT " + json.dumps(run_child_inline(args)), flush=True)
        return 0
    if args.render:
        stored = json.loads(Path(args.results).read_text())
        write_doc(Path(args.doc), {s: stored[s] for s in sorted(stored) if s != "tiny"} or stored)
        return 0
    if os.environ.get("OMP_NUM_THREADS") is None:
        print("note: OMP_NUM_THREADS is not set; set it (e.g. 1) for comparable timings")
    size_result = measure(args)
    results_path = Path(args.results)
    stored = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.methods and args.size in stored:  # a subset measured later: added to the full run
        earlier = stored[args.size]
        earlier["methods"] |= size_result["methods"]
        earlier.setdefault("later_runs", []).append(
            {k: size_result[k] for k in ("when", "code", "machine", "wall_s", "steps")}
            | {"methods": sorted(size_result["methods"])}
        )
        size_result = earlier
    stored[args.size] = size_result
    results_path.write_text(json.dumps(stored, indent=1))
    write_doc(Path(args.doc), {s: stored[s] for s in sorted(stored) if s != "tiny"} or stored)
    print(table(size_result))
    if args.size == "vit-b-32":
        print("\n".join(targets(size_result)))
    print(f"written: {args.doc}, {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
