"""Peak memory and time of ProDistill on a float32 pool and on the same pool in bfloat16 (not a
test; run it by hand).

The synthetic pool is one ViT-B/16 block at the paper's settings: hidden 768, MLP 3072, 12 heads,
224 px images in 16 px patches (197 tokens), eight tasks, 64 few-shot images per task, minibatches
of 128. Memory per block is what matters (ProDistill streams one block at a time, see
``benchmarks/prodistill_memory.py``), so one block and one epoch suffice. The same checkpoints
(float32 safetensors) are loaded once as they are and once with ``torch_dtype: bfloat16`` in every
pool entry, as a half-precision FusionBench pool is configured; ProDistill's ``compute_dtype`` is
left at its default (the pool's dtype). Each run is a separate subprocess, so the peak RSS
(``getrusage``) is that run's own; "above baseline" subtracts the RSS before ``run()`` (the
libraries, the pool object).

What stays float32 in both runs (the issue's rule): the coefficients, their Adam moments and the
losses, about 3 x 8 x 7.1 M x 4 B = 0.68 GB for eight tasks; everything else (block weights, merged
block, activation cache, the block passes' activations, the output model) is in the compute dtype.

Usage::

    python benchmarks/prodistill_precision.py [--tasks 8] [--shots 64] [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prodistill_memory import TASKS, build, measured_run, pool_of, rss_peak_mb  # noqa: E402


def run(root: Path, tasks, dtype, shots: int, epochs: int, batch_size: int) -> dict:
    """ProDistill on the pool in ``root`` loaded in ``dtype`` (``None``: as stored), measured."""
    import torch

    pool = pool_of(root, tasks, torch_dtype=dtype)
    algorithm, merged, baseline, seconds = measured_run(pool, shots, epochs, batch_size)
    block = algorithm.report["blocks"][0]
    return {
        "pool_dtype": dtype or "float32",
        "merged_dtype": str(next(merged.parameters()).dtype),
        "dtypes": algorithm._dtype_info,
        "peak_rss_mb": rss_peak_mb(),
        "rss_before_run_mb": baseline,
        "seconds": round(seconds, 1),
        "block_seconds_train": round(block["seconds_train"], 1),
        "activation_cache_mb": round(algorithm.report["activation_cache"]["mb"], 1),
        "loss_before": block["loss_before"],
        "loss_after": block["loss_after"],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--shots", type=int, default=64, help="few-shot images per task")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the block")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--_build", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_run", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_dtype", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tasks = TASKS[: args.tasks]

    if args._build is not None:
        build(args._build, 1, n_images=args.shots, image_size=args.image_size, tasks=tasks)
        return 0
    if args._run is not None:
        result = run(args._run, tasks, args._dtype, args.shots, args.epochs, args.batch_size)
        print("RESULT " + json.dumps(result))
        return 0

    common = [sys.executable, __file__, "--tasks", str(args.tasks), "--shots", str(args.shots)]
    common += ["--image-size", str(args.image_size)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    results = {}
    with tempfile.TemporaryDirectory(prefix="prodistill_precision_", dir=args.workdir) as tmp:
        root = Path(tmp) / "pool"
        root.mkdir()
        subprocess.run(common + ["--_build", str(root)], check=True, env=env)
        for dtype in ("float32", "bfloat16"):
            extra = [] if dtype == "float32" else ["--_dtype", dtype]
            proc = subprocess.run(
                common
                + ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
                + ["--_run", str(root)]
                + extra,
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            r = results[dtype] = json.loads(line[len("RESULT ") :])
            r["above_baseline_mb"] = r["peak_rss_mb"] - r["rss_before_run_mb"]
            print(
                f"{dtype:>8} pool: peak RSS {r['peak_rss_mb']:.0f} MiB, "
                f"{r['above_baseline_mb']:.0f} MiB above the {r['rss_before_run_mb']:.0f} MiB "
                f"before run(); cache {r['activation_cache_mb']:.0f} MiB; {r['seconds']:.1f} s "
                f"(training {r['block_seconds_train']:.1f} s); merged model {r['merged_dtype']}; "
                f"block loss {r['loss_before']:.4g} -> {r['loss_after']:.4g}",
                flush=True,
            )
    a, b = results["float32"], results["bfloat16"]
    print(
        f"bfloat16 / float32: peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}, above baseline "
        f"{b['above_baseline_mb'] / a['above_baseline_mb']:.2f}"
    )
    print("RESULTS " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
