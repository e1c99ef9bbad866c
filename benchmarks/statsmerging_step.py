"""Seconds per StatsMerging training step: one merged forward per task (before) vs one merged forward
of all tasks' images (after, issue 9 item 4), same machine, same run.

A step is what ``LearnerTraining.run`` (method/statsmerging/training.py) does per step: the learner's coefficients, the
functional merge of every tensor, the merged encoder on ``batch_size_per_task`` images of every task,
each task's zero-shot head, the distillation loss, backward and an Adam step. Both variants run the
algorithm's own ``distillation_step`` (training.py) (``one_forward=False`` is the old per-task loop) on the same
randomly initialised CLIP vision model, task vectors, images and heads; they are timed in alternating
rounds so that load from other jobs hits both alike, and the median round is reported.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/statsmerging_step.py              # mini-TA8's CLIP (default recipe)
    python benchmarks/statsmerging_step.py --size vit-b-32 --rounds 2 --steps 2   # ViT-B/32 shapes (slow on CPU)

No file is read or written; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time


def sizes() -> dict:
    """CLIP vision-tower shapes: the mini benchmark's (its default recipe) and ViT-B/32's."""
    from statsmerge_plugin.mini.recipe import Recipe

    mini = Recipe()
    return {
        "mini": dict(
            hidden_size=mini.vision_width,
            num_hidden_layers=mini.vision_layers,
            num_attention_heads=mini.heads,
            image_size=32,
            patch_size=mini.patch_size,
            projection_dim=mini.projection_dim,
        ),
        "vit-b-32": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
            projection_dim=512,
        ),
    }


def setup(size: str, num_tasks: int, batch_size_per_task: int, num_classes: int, learner: str):
    """The algorithm with random heads, the merge target, learner, optimiser, images and teachers."""
    import lightning as L
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP
    from statsmerge_plugin.method.statsmerging.learner import build_optimiser
    from statsmerge_plugin.method.statsmerging.merge import TaskVectorMerge
    from statsmerge_plugin.method.statsmerging.statistics import tensor_statistics
    from statsmerge_plugin.validation import trainable_state

    torch.manual_seed(0)
    dims = sizes()[size]
    config = CLIPVisionConfig(intermediate_size=4 * dims["hidden_size"], **dims)
    base = CLIPVisionModel(config).eval().requires_grad_(False)
    state = trainable_state(base)
    tasks = [f"task_{k}" for k in range(num_tasks)]
    task_vectors = {n: 0.01 * torch.randn(num_tasks, *p.shape) for n, p in state.items()}
    features = torch.stack(
        [
            torch.stack([tensor_statistics(tv[k]) for tv in task_vectors.values()])
            for k in range(num_tasks)
        ]
    )
    alg = StatsMergingForCLIP(learner=learner, batch_size_per_task=batch_size_per_task)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    alg.fabric = fabric
    proj = dims["projection_dim"]
    alg.visual_projection = torch.nn.Linear(dims["hidden_size"], proj, bias=False).requires_grad_(
        False
    )
    alg.logit_scale_exp = torch.tensor(100.0)
    alg.zeroshot_weights = {
        t: torch.nn.functional.normalize(torch.randn(num_classes, proj), dim=-1) for t in tasks
    }
    target = TaskVectorMerge(base, state, task_vectors)
    feats = alg.learner_features(task_vectors, features, list(state))
    model = alg.build_learner(num_tasks, feats)
    optimizer, scheduler = build_optimiser(
        model, alg.options.optimiser_settings(), total_steps=10**6
    )
    n_images = 4 * batch_size_per_task
    side = dims["image_size"]
    images = {t: torch.randn(n_images, 3, side, side) for t in tasks}
    teacher = {t: torch.randn(n_images, num_classes) for t in tasks}
    return alg, target, feats, model, optimizer, scheduler, images, teacher


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["mini", "vit-b-32"], default="mini")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch-size-per-task", type=int, default=4)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--learner", default="shared")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per variant")
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    from statsmerge_plugin.method.statsmerging.training import distillation_step
    from statsmerge_plugin.threads import configure_torch_threads

    threads = configure_torch_threads()
    alg, target, feats, learner, optimizer, scheduler, images, teacher = setup(
        args.size, args.tasks, args.batch_size_per_task, args.classes, args.learner
    )
    objective = alg.teacher_distillation()
    generator = torch.Generator().manual_seed(0)

    def step(one_forward: bool) -> None:
        batches = {
            t: torch.randperm(len(x), generator=generator)[: args.batch_size_per_task]
            for t, x in images.items()
        }
        loss = distillation_step(
            learner, feats, target, objective, images, teacher, batches, one_forward=one_forward
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    variants = {"before: one merged forward per task": False, "after: one merged forward": True}
    for one_forward in variants.values():
        for _ in range(args.warmup):
            step(one_forward)
    seconds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, one_forward in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(one_forward)
            seconds[name].append((time.perf_counter() - start) / args.steps)
    params = sum(p.numel() for p in target.pretrained.values())
    print(
        f"StatsMerging training step, {args.size} CLIP vision model ({params / 1e6:.2f} M parameters, "
        f"{len(target.names)} tensors), {args.tasks} tasks x {args.batch_size_per_task} images, "
        f"learner={args.learner}, torch threads {threads}, {args.rounds} rounds x {args.steps} steps"
    )
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    for name, median in medians.items():
        rounds = ", ".join(f"{s:.4f}" for s in seconds[name])
        print(f"  {name}: {median:.4f} s/step (median; rounds {rounds})")
    before, after = medians.values()
    print(f"  speed-up: {before / after:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
