"""ProDistill under Lightning Fabric with ``--devices`` CPU processes (gloo): a helper that
``test_prodistill_sharding.py`` runs as a script (Fabric's launcher starts the other ranks by
running this file again). Each rank saves its merged model, its block records and the files it
saw in the scratch directory to ``<out>.rank<r>.pt``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--pool", type=Path, required=True, help="a pool config as JSON")
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--loss-reduction", default="sum")
    args = parser.parse_args()

    import lightning as L
    from hydra.utils import instantiate
    from lightning.fabric.loggers import TensorBoardLogger
    from omegaconf import DictConfig

    from statsmerge_plugin.method.prodistill import ProDistillForCLIP

    torch.set_num_threads(1)
    fabric = L.Fabric(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        loggers=TensorBoardLogger(str(args.log_dir), name="", version=""),
    )
    fabric.launch()
    pool = instantiate(DictConfig(json.loads(args.pool.read_text())), _recursive_=False)
    alg = ProDistillForCLIP(
        shots_per_task=8,
        epochs_per_block=3,
        batch_size=6,  # 16 samples: minibatches of 6, 6, 4 (unequal shares per rank)
        scratch_dir=str(args.scratch),
        loss_reduction=args.loss_reduction,
        overwrite=True,
    )
    alg.fabric = fabric
    merged = alg.run(pool)
    keys = ("samples_this_rank", "rank_max_abs_diff", "loss_before", "loss_after", "steps")
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in merged.state_dict().items()},
            "blocks": [{k: b[k] for k in keys} for b in alg.block_records],
            "scratch": sorted(str(p.relative_to(args.scratch)) for p in args.scratch.iterdir()),
            "world_size": fabric.world_size,
        },
        f"{args.out}.rank{fabric.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
