"""Where task arithmetic's loss lives on a mini build (r3 search diagnosis; not a test, run by hand).

For a built miniature (a directory ``statsmerge-mini shape`` or ``build`` made), prints on its
**val** split only:

1. each task vector's size relative to theta_0 (``|tau_k| / |theta_0|``) and the pairwise cosines of
   the task vectors (real ViT-B/32 task vectors are nearly orthogonal, Ilharco et al. 2023);
2. task arithmetic at ``--lam`` (default 0.3) with the task vectors of one kind of tensor only, every
   other tensor at theta_0: weight matrices, LayerNorms, biases, embeddings (patch, position, class)
   and "all but embeddings". Each row gives every task's accuracy and the average, so one sees which
   tensors cost the tasks that task arithmetic loses.

The merges use StatsMerging's merge rule (``mini.diagnostics.merge_with_coefficients``) and are
evaluated with FusionBench's task pool, like every shape row.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/mini_task_vectors.py <build dir> [--lam 0.3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: tensor kinds of a CLIP vision tower, by parameter name
KINDS = {
    "all": lambda n: True,
    "weight matrices": lambda n: n.endswith("weight") and "norm" not in n and "embed" not in n,
    "layer norms": lambda n: "norm" in n,
    "biases": lambda n: n.endswith("bias") and "norm" not in n,
    "embeddings": lambda n: "embed" in n,
    "patch embedding": lambda n: "patch_embedding" in n,
    "all but embeddings": lambda n: "embed" not in n,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build", type=Path, help="a complete mini build (has manifest.json)")
    parser.add_argument("--lam", type=float, default=0.3, help="task arithmetic's scaling factor")
    args = parser.parse_args(argv)

    import torch
    from fusion_bench.utils.instantiate_utils import set_print_function_call

    from statsmerge_plugin.mini.build import read_manifest
    from statsmerge_plugin.mini.diagnostics import merge_with_coefficients
    from statsmerge_plugin.mini.evaluate import accuracies, modelpool, taskpool
    from statsmerge_plugin.mini.registry import register_tasks

    manifest = read_manifest(args.build)
    if not manifest or "tasks" not in manifest:
        print(
            f"error: {args.build} is not a complete mini build (no manifest.json)", file=sys.stderr
        )
        return 2
    tasks = list(manifest["tasks"])
    register_tasks(tasks)
    pool = modelpool(args.build, tasks, splits=())
    pretrained = pool.load_model("_pretrained_")
    names = [n for n, _ in pretrained.named_parameters()]
    theta0 = torch.cat([p.detach().flatten() for p in pretrained.parameters()])
    vectors = torch.stack(
        [
            torch.cat([p.detach().flatten() for p in pool.load_model(t).parameters()]) - theta0
            for t in tasks
        ]
    )
    norms = vectors.norm(dim=1)
    cosines = (vectors @ vectors.T) / (norms[:, None] * norms[None])
    off = cosines[~torch.eye(len(tasks), dtype=torch.bool)]
    short = [t.removeprefix("mini_") for t in tasks]
    print(f"{args.build.name}: val split, {len(names)} tensors")
    print(
        "|tau| / |theta_0|: "
        + ", ".join(f"{t} {x:.3f}" for t, x in zip(short, norms / theta0.norm()))
    )
    print(f"task-vector cosines: mean {off.mean():.3f}, max {off.max():.3f}, min {off.min():.3f}")
    evaluation = taskpool(args.build, tasks, "val")
    print(f"\ntask arithmetic at λ = {args.lam} with one kind of tensor merged (val accuracy, %):")
    print(f"  {'kind':<20}{'tensors':>8}  " + " ".join(f"{t[:7]:>7}" for t in short) + "  average")
    for kind, keep in KINDS.items():
        chosen = [keep(n) for n in names]
        column = torch.tensor([args.lam if c else 0.0 for c in chosen])
        merged = merge_with_coefficients(pool, tasks, column.expand(len(tasks), -1), names)
        with set_print_function_call(False):  # FusionBench's boxes for every dataset it loads
            acc = accuracies(evaluation.evaluate(merged), tasks)
        cells = " ".join(f"{100 * acc[t]:7.1f}" for t in tasks)
        average = 100 * sum(acc[t] for t in tasks) / len(tasks)
        print(f"  {kind:<20}{sum(chosen):>8}  {cells}  {average:7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
