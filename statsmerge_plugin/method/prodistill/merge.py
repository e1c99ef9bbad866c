R"""Pure tensor functions of ProDistill (spec §1.2, §1.4, §5.2): the element-wise merge rule, task
arithmetic for the parameters outside the encoder blocks, and the block distillation loss.

Nothing here knows about models, pools or devices; every function works on plain ``{name: tensor}``
dictionaries and is unit-tested on its own.
"""

from __future__ import annotations

from typing import Dict, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor

LossReduction = Literal["sum", "mean"]
LOSS_REDUCTIONS = ("sum", "mean")


def task_vectors(
    base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], names: Sequence[str] = None
) -> Dict[str, Tensor]:
    """``τ = θ_i − θ_0`` for every name in ``names`` (default: all names of ``base``)."""
    names = list(base) if names is None else list(names)
    return {n: finetuned[n] - base[n] for n in names}


def stack_task_vectors(per_task: Sequence[Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    """``[{name: τ_i}]_i`` → ``{name: stack_i τ_i}`` of shape ``(T, *param_shape)``."""
    if len(per_task) == 0:
        raise ValueError("stack_task_vectors needs at least one task vector")
    return {n: torch.stack([tv[n] for tv in per_task], dim=0) for n in per_task[0]}


def init_coefficients(
    stacked_task_vectors: Mapping[str, Tensor], init_value: float
) -> Dict[str, Tensor]:
    """Element-wise coefficients ``α_{i,p}``: one tensor per parameter, shaped like its stacked task
    vectors ``(T, *param_shape)``, all set to ``init_value`` (spec §1.1: 0.3)."""
    return {
        n: torch.full_like(tv, float(init_value), dtype=torch.float32)
        for n, tv in stacked_task_vectors.items()
    }


def merge_elementwise(
    base: Mapping[str, Tensor],
    stacked_task_vectors: Mapping[str, Tensor],
    coefficients: Mapping[str, Tensor],
) -> Dict[str, Tensor]:
    """ProDistill's merge rule (spec §1.2): ``θ_p = θ_{0,p} + Σ_i α_{i,p} ⊙ τ_{i,p}``.

    Differentiable in ``coefficients``. ``stacked_task_vectors[p]`` and ``coefficients[p]`` have shape
    ``(T, *base[p].shape)``.
    """
    return {n: base[n] + (coefficients[n] * stacked_task_vectors[n]).sum(dim=0) for n in base}


def task_arithmetic(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    scaling_factor: float,
) -> Dict[str, Tensor]:
    """Task arithmetic ``θ_0 + λ Σ_i (θ_i − θ_0)`` (spec §1.1 "Non-block parameters")."""
    merged = {}
    for n, p0 in base.items():
        delta = torch.zeros_like(p0)
        for ft in finetuned:
            delta += ft[n] - p0
        merged[n] = p0 + scaling_factor * delta
    return merged


def block_loss(
    student: Tensor,
    teacher: Tensor,
    reduction: LossReduction = "sum",
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Squared feature error between student and teacher block outputs (spec §1.4 step 2, §5.2),
    ``[samples, tokens, ...]``. With ``mask`` (``[samples, tokens]``, text) only real tokens count:
    padding never enters the loss (the official NLU/NLG code sums over padding too, spec §5.8).

    ``"sum"`` is the official code's loss: the squared error summed over samples, tokens and hidden
    units. ``"mean"`` is its mean over the samples (summed over tokens and hidden units), the
    paper's ``1 / |D|`` normalisation and the unit of the whole-set losses ProDistill reports: the
    same optimum, and under Adam the same steps as ``"sum"`` up to the batch size's effect on
    Adam's epsilon. A mean over every element would divide by samples x tokens x hidden units
    (about 5 million for a ViT-B/32 batch of 128) and put the coefficients' gradients near Adam's
    epsilon, where its steps shrink.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher outputs differ in shape: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)}"
        )
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(
            f"invalid value {reduction!r} for option `loss_reduction`: {LOSS_REDUCTIONS}"
        )
    diff = student - teacher
    if mask is not None:
        keep = mask.to(torch.bool).reshape(mask.shape + (1,) * (diff.dim() - mask.dim()))
        diff = diff.masked_fill(~keep, 0.0)  # not a product: a non-finite padded value stays out
    if diff.dtype == torch.float32:
        total = diff.pow(2).sum()
    else:  # half-precision features: the squares summed in float32 (no float32 copy of the batch)
        total = torch.sum(diff * diff, dtype=torch.float32)
    return total if reduction == "sum" else total / max(1, student.shape[0])


class _ElementwiseMerge(torch.autograd.Function):
    """``θ = θ_0 + Σ_i α_i ⊙ (θ_i − θ_0)`` from the weights themselves, in float32.

    Only ``θ_0`` and the stacked ``θ_i`` (in their stored dtype, e.g. bfloat16) are kept for the
    backward pass, which recomputes ``τ_i = θ_i − θ_0``; autograd through
    :func:`merge_elementwise` would keep a float32 ``τ`` of every task. Forward and backward do the
    same float32 operations as :func:`merge_elementwise` on ``τ`` (bit for bit when the weights are
    float32).
    """

    @staticmethod
    def forward(ctx, base: Tensor, weights: Tensor, coefficients: Tensor) -> Tensor:
        ctx.save_for_backward(base, weights)
        b = base.to(torch.float32)
        if weights.dtype == torch.float32:
            return b + (coefficients * (weights - b)).sum(dim=0)
        out = b.clone()  # half-precision weights: one task's float32 τ at a time, not T of them
        for i in range(weights.shape[0]):
            out.add_(coefficients[i] * (weights[i].to(torch.float32) - b))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        base, weights = ctx.saved_tensors
        b = base.to(torch.float32)
        if weights.dtype == torch.float32:
            return None, None, grad.unsqueeze(0) * (weights - b)
        out = torch.empty(weights.shape, dtype=torch.float32, device=grad.device)
        for i in range(weights.shape[0]):
            torch.mul(grad, weights[i].to(torch.float32) - b, out=out[i])
        return None, None, out


def merge_from_weights(
    base: Mapping[str, Tensor],
    stacked_weights: Mapping[str, Tensor],
    coefficients: Mapping[str, Tensor],
) -> Dict[str, Tensor]:
    """:func:`merge_elementwise` with ``τ_i = θ_i − θ_0`` recomputed from the stacked fine-tuned
    weights ``stacked_weights[p]`` (``(T, *base[p].shape)``, any float dtype): float32 results,
    differentiable in ``coefficients``, holding no float32 task vectors between forward and
    backward."""
    return {n: _ElementwiseMerge.apply(base[n], stacked_weights[n], coefficients[n]) for n in base}


def adam_in_backward(parameters: Sequence[Tensor], lr: float) -> list:
    """One Adam per tensor, stepped as soon as its gradient is accumulated in ``backward()`` and
    its gradient freed right after (``register_post_accumulate_grad_hook``): only one tensor's
    gradient exists at a time. The same updates as one ``torch.optim.Adam(parameters, lr)`` with
    the per-tensor implementation (the one torch uses on CPU).

    Returns the optimisers (keep them alive while training); each tensor's hook is removed by
    :func:`remove_hooks`.
    """
    optimisers = []
    for p in parameters:
        opt = torch.optim.Adam([p], lr=lr, foreach=False)

        def step(param, opt=opt):
            opt.step()
            param.grad = None

        opt._hook = p.register_post_accumulate_grad_hook(step)
        optimisers.append(opt)
    return optimisers


def remove_hooks(optimisers: Sequence) -> None:
    for opt in optimisers:
        opt._hook.remove()
