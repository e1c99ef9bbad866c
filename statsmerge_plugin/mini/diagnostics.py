"""Diagnostics of a build's shape beyond accuracies (issue mini-TA8 r3, item 2).

* **Does entropy mean something?** Entropy minimisation (AdaMerging) helps only where a merged
  model's confident predictions are its correct ones. :func:`confidence_halves` splits a task's
  images by the model's confidence (max softmax probability) into a confident and an unsure half and
  gives each half's accuracy. :func:`merged_model_confidence` does this for every task, with
  FusionBench's own ``HFCLIPClassifier`` on the task pool's images.
* **Do the winning merges need extreme coefficients?** :func:`coefficient_range` gives the fraction
  of learned coefficients in [-0.5, 1.5] and the largest |lambda|. :func:`free_control`
  runs the free-coefficient control of the leaderboard (StatsMerging's ``learner=free``, layer-wise,
  lr 0.03, label-free) on the build's val images; :func:`merge_with_coefficients` re-merges it with
  its coefficients clamped to [-0.5, 1.5]: if that costs nothing, the extreme coefficients are
  drift along directions the objective does not see, not what the merge needs.
* **Does a task vector survive TIES's trim?** TIES keeps each task vector's top 20 % entries by
  magnitude. :func:`trim_task_vector` applies exactly that trim (FusionBench's own
  ``topk_values_mask`` over the flattened state dict); the shape report evaluates θ0 plus the
  trimmed vector of each task on that task. On real models the trimmed vector keeps most of the
  fine-tune's accuracy (Yadav et al. 2023, Sec. 3); where it does not, TIES cannot beat task
  arithmetic on that task.

The pure functions take tensors; the runners only wire the mini build to FusionBench's classes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Sequence

import torch

#: the interval real layer-wise coefficients are reported to stay near
COEFFICIENT_RANGE = (-0.5, 1.5)


def confidence_halves(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Accuracy of the confident and of the unsure half of the predictions.

    The images are ranked by the max softmax probability of ``logits`` ``[N, C]`` (stable: ties in
    image order). The confident half is the top ``N // 2``, the unsure half the other ``N - N // 2``.
    Returns ``{"confident", "unsure", "gap"}`` (accuracies in [0, 1]; gap = confident - unsure).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or len(labels) < 2:
        raise ValueError(
            f"expected logits [N, C] and labels [N] with N >= 2, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    confidence = logits.float().softmax(-1).max(-1).values
    order = torch.sort(confidence, descending=True, stable=True).indices
    correct = (logits.argmax(-1) == labels).float()[order]
    half = len(labels) // 2
    confident, unsure = float(correct[:half].mean()), float(correct[half:].mean())
    return {
        "confident": round(confident, 4),
        "unsure": round(unsure, 4),
        "gap": round(confident - unsure, 4),
    }


def trim_task_vector(
    pretrained: Dict[str, torch.Tensor], finetuned: Dict[str, torch.Tensor], keep: float = 20
) -> Dict[str, torch.Tensor]:
    """θ0 + trim(τ), τ = ``finetuned`` − ``pretrained``: the top ``keep`` % of τ's entries by
    magnitude over the whole flattened vector, every other entry reset to θ0 (TIES step 1, Yadav
    et al. 2023, Sec. 3; ``keep`` as FusionBench's ``threshold``, in %)."""
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        topk_values_mask,
        vector_to_state_dict,
    )

    if set(pretrained) != set(finetuned):
        raise KeyError(
            "pretrained and fine-tuned state dicts differ in keys: "
            f"{sorted(set(pretrained) ^ set(finetuned))[:5]}"
        )
    if not 0 < keep < 100:
        raise ValueError(f"keep is a percentage in (0, 100), got {keep}")
    tau = state_dict_to_vector({k: finetuned[k] - pretrained[k] for k in pretrained})
    trimmed = topk_values_mask(tau[None], K=keep)[0][0]
    delta = vector_to_state_dict(trimmed, pretrained)
    return {k: pretrained[k] + delta[k] for k in pretrained}


def trimmed_task_model(pool, task: str, keep: float = 20):
    """The pool's pretrained model carrying ``task``'s trimmed task vector (:func:`trim_task_vector`)."""
    model = pool.load_model("_pretrained_")
    finetuned = pool.load_model(task).state_dict()
    model.load_state_dict(trim_task_vector(model.state_dict(), finetuned, keep))
    return model


def coefficient_range(
    coefficients: torch.Tensor, interval: Sequence[float] = COEFFICIENT_RANGE
) -> Dict[str, float]:
    """``{"fraction_within", "max_abs"}`` of a coefficient table (any shape)."""
    low, high = interval
    c = coefficients.detach().float().flatten()
    within = ((c >= low) & (c <= high)).float().mean()
    return {"fraction_within": round(float(within), 4), "max_abs": round(float(c.abs().max()), 4)}


@torch.no_grad()
def task_logits(model, root: Path, tasks: Sequence[str], split: str):
    """``{task: (logits [N, C], labels [N])}`` of a CLIP vision ``model`` on ``split``, classified
    with each task's zero-shot head as FusionBench's task pool does (its setup, loaders and
    ``HFCLIPClassifier``)."""
    from fusion_bench.models.hf_clip import HFCLIPClassifier
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates

    from .evaluate import taskpool

    pool = taskpool(root, tasks, split)
    pool.setup()
    pool.clip_model.vision_model = model
    classifier = HFCLIPClassifier(pool.clip_model, processor=pool.processor).eval()
    out = {}
    for task, loader in pool.test_dataloaders.items():
        classifier.set_classification_task(*get_classnames_and_templates(task))
        logits, labels = [], []
        for images, targets in loader:
            logits.append(classifier(images, return_dict=True, task_name=task)["logits"])
            labels.append(targets)
        out[task] = (torch.cat(logits), torch.cat(labels))
    return out


def merged_model_confidence(model, root: Path, tasks: Sequence[str], split: str):
    """:func:`confidence_halves` of ``model`` on every task of ``split``."""
    return {
        task: confidence_halves(logits, labels)
        for task, (logits, labels) in task_logits(model, root, tasks, split).items()
    }


def free_control(
    root: Path, tasks: Sequence[str], max_steps: int = 500, num_unlabelled_per_task=128
) -> Dict[str, object]:
    """The leaderboard's free-coefficient control (``statsmerging_free``: layer-wise StatsMerging
    with a free logit table, lr 0.03, 128 unlabelled images per task; ``None``: the whole split)
    trained on the build's val images (never its test split). Returns a dict: ``coefficients``
    (``[K, L]``), ``tensor_names`` (the L merged tensors, in column order) and ``model`` (the
    merged vision model)."""
    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger

    from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP

    from .evaluate import modelpool
    from .registry import register_tasks

    register_tasks(tasks)
    algorithm = StatsMergingForCLIP(
        learner="free",
        max_steps=max_steps,
        num_unlabelled_per_task=num_unlabelled_per_task,
        optim={"lr": 0.03},
    )
    with tempfile.TemporaryDirectory() as logs:
        logger = TensorBoardLogger(logs, name="free_control")
        algorithm.fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[logger])
        model = algorithm.run(modelpool(root, tasks, splits=("val",)))
        (path,) = Path(logs).glob("**/statsmerging/coefficients.pt")
        saved = torch.load(path)
    return {
        "coefficients": saved["coefficients"],
        "tensor_names": list(saved["tensor_names"]),
        "model": model,
    }


@torch.no_grad()
def merge_with_coefficients(
    pool, tasks: Sequence[str], coefficients: torch.Tensor, names: Sequence[str]
):
    """The pool's pretrained model with ``theta_0^l + sum_k lambda_k^l tau_k^l`` on each tensor
    in ``names`` (StatsMerging's merge rule, ``merge_state``) for given ``[K, L]`` coefficients,
    ``K`` in the order of ``tasks``; every other tensor stays theta_0. Used to re-merge the free
    control with its coefficients clamped to :data:`COEFFICIENT_RANGE`."""
    from statsmerge_plugin.method.statsmerging.merge import merge_state

    model = pool.load_model("_pretrained_")
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"tensors {missing[:5]} are not parameters of the pretrained model")
    theta0 = {n: params[n].detach().clone() for n in names}
    finetuned = [dict(pool.load_model(task).named_parameters()) for task in tasks]
    task_vectors = {n: torch.stack([f[n].detach() - theta0[n] for f in finetuned]) for n in names}
    model.load_state_dict(merge_state(theta0, task_vectors, coefficients, names), strict=False)
    return model
