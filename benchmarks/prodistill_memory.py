"""Peak memory and time of ProDistill versus model depth (not a test; run it by hand).

Builds nine synthetic ``CLIPVisionModel``s of ViT-B width (hidden 768, MLP 3072, 12 heads) — one
pretrained and eight "fine-tuned" (pretrained + noise) — with tiny 32×32 images and 16×16 patches
(5 tokens per image), so that weights, not activations, dominate memory. They are saved as
safetensors in a temporary directory, once with 6 and once with 12 encoder blocks, and ProDistill
is run on each pool (few shots, few epochs, random unlabelled images) in a *separate subprocess*, so
that the peak RSS (``getrusage``) is that run's own.

ProDistill streams one block at a time, so its peak should barely depend on depth; loading the nine
models whole would roughly double the peak from 6 to 12 blocks. The script prints both runs and
the ratio peak(12) / peak(6), and exits with status 1 if the ratio exceeds ``--max-ratio`` (1.1).

Usage::

    python benchmarks/prodistill_memory.py [--blocks 6 12] [--shots 4] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def build(
    root: Path, num_blocks: int, n_images: int, seed: int = 0, image_size: int = 32, tasks=TASKS
) -> None:
    """Write ``pretrained/``, ``ft_<task>/`` (safetensors), ``processor/`` and ``data_<task>/``
    (``image_size`` px images in 16x16 patches)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=num_blocks,
        image_size=image_size,
        patch_size=16,
    )
    model = CLIPVisionModel(config)
    model.save_pretrained(root / "pretrained")
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(root / "processor")
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i, task in enumerate(tasks):
        with torch.no_grad():  # one model in memory at a time
            for n, p in model.named_parameters():
                p.copy_(pretrained[n] + 0.01 * torch.randn_like(p))
        model.save_pretrained(root / f"ft_{task}")
        rng = np.random.default_rng(i)
        images = [
            Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
            for _ in range(n_images)
        ]
        Dataset.from_dict({"image": images, "label": [0] * n_images}).save_to_disk(
            str(root / f"data_{task}")
        )


def rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pool_of(root: Path, tasks=TASKS, torch_dtype=None):
    """FusionBench's ``CLIPVisionModelPool`` of the pool in ``root``; with ``torch_dtype`` (e.g.
    ``"bfloat16"``) every model is loaded in that dtype, as a pool entry's ``torch_dtype`` does."""
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import DictConfig

    def entry(path: Path):
        if torch_dtype is None:
            return str(path)
        return {
            "_target_": "transformers.CLIPVisionModel.from_pretrained",
            "pretrained_model_name_or_path": str(path),
            "torch_dtype": torch_dtype,
        }

    return CLIPVisionModelPool(
        DictConfig(
            {"_pretrained_": entry(root / "pretrained")}
            | {t: entry(root / f"ft_{t}") for t in tasks}
        ),
        processor=DictConfig(
            {
                "_target_": "transformers.CLIPImageProcessor.from_pretrained",
                "pretrained_model_name_or_path": str(root / "processor"),
            }
        ),
        val_datasets=DictConfig(
            {
                t: {"_target_": "datasets.load_from_disk", "dataset_path": str(root / f"data_{t}")}
                for t in tasks
            }
        ),
    )


def measured_run(pool, shots: int, epochs: int, batch_size: int):
    """ProDistill on ``pool`` in this process: ``(algorithm, merged model, peak RSS before run()
    in MiB, seconds of run())``."""
    from statsmerge_plugin.method.prodistill import ProDistillForCLIP

    algorithm = ProDistillForCLIP(
        shots_per_task=shots, epochs_per_block=epochs, batch_size=batch_size
    )
    _ = algorithm.fabric  # create Fabric before measuring
    baseline = rss_peak_mb()
    start = time.perf_counter()
    merged = algorithm.run(pool)
    return algorithm, merged, baseline, time.perf_counter() - start


def run(root: Path, shots: int, epochs: int, batch_size: int) -> dict:
    """Run ProDistill on the pool in ``root`` (in this process) and measure it."""
    import torch

    algorithm, merged, baseline, seconds = measured_run(pool_of(root), shots, epochs, batch_size)
    model_mb = sum(p.numel() * p.element_size() for p in merged.parameters()) / 2**20
    return {
        "blocks": len(merged.vision_model.encoder.layers),
        "peak_rss_mb": rss_peak_mb(),
        "rss_before_run_mb": baseline,
        "seconds": seconds,
        "model_mb": model_mb,
        "all_nine_models_mb": 9 * model_mb,
        "block_seconds": [round(b["seconds"], 2) for b in algorithm.report["blocks"]],
        "block_peak_rss_mb": [round(b["peak_rss_mb"]) for b in algorithm.report["blocks"]],
        "block_end_rss_mb": [round(b["rss_mb"]) for b in algorithm.report["blocks"]],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs=2, default=[6, 12])
    parser.add_argument("--shots", type=int, default=4, help="few-shot images per task")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per block")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-ratio", type=float, default=1.1)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1: steadier on shared CPUs)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    # internal: the per-configuration subprocesses
    parser.add_argument("--_build", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_run", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_num_blocks", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._build is not None:
        build(args._build, args._num_blocks, n_images=args.shots)
        return 0
    if args._run is not None:
        print("RESULT " + json.dumps(run(args._run, args.shots, args.epochs, args.batch_size)))
        return 0

    results = {}
    with tempfile.TemporaryDirectory(prefix="prodistill_bench_", dir=args.workdir) as tmp:
        for num_blocks in args.blocks:
            root = Path(tmp) / f"vitb_{num_blocks}blocks"
            root.mkdir()
            common = [sys.executable, __file__, "--shots", str(args.shots)]
            subprocess.run(
                common + ["--_build", str(root), "--_num_blocks", str(num_blocks)], check=True
            )
            proc = subprocess.run(
                common
                + ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
                + ["--_run", str(root)],
                check=True,
                capture_output=True,
                text=True,
                env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads)),
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            results[num_blocks] = json.loads(line[len("RESULT ") :])
            r = results[num_blocks]
            print(
                f"{num_blocks:>2} blocks: peak RSS {r['peak_rss_mb']:.0f} MiB "
                f"(before run {r['rss_before_run_mb']:.0f} MiB; one model {r['model_mb']:.0f} MiB, "
                f"nine models {r['all_nine_models_mb']:.0f} MiB), time {r['seconds']:.1f} s",
                flush=True,
            )
            shutil_rm(root)
    small, large = args.blocks
    ratio = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
    print(f"ratio peak({large}) / peak({small}) = {ratio:.3f} (limit {args.max_ratio})")
    print("details: " + json.dumps(results))
    return 0 if ratio <= args.max_ratio else 1


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
