"""The StatsMerging merge rule (Algorithm 1, line 19; spec §3 step C), one tensor at a time.

    theta^l = theta_0^l + sum_k lambda_k^l * tau_k^l

With coefficients that sum to one over tasks (softmax) this equals the paper's sum_k lambda_k^l theta_k^l.
Everything here is functional, so gradients reach the coefficients (and through them the learner) only;
theta_0 and the task vectors are constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call


def merge_tensor(
    pretrained: torch.Tensor,
    task_vectors: torch.Tensor,
    coefficients: torch.Tensor,
    name: str = "<tensor>",
) -> torch.Tensor:
    """``pretrained + sum_k coefficients[k] * task_vectors[k]`` for one tensor.

    Args:
        pretrained: theta_0^l, any shape S.
        task_vectors: ``[K, *S]``.
        coefficients: ``[K]``.
    """
    if task_vectors.shape[1:] != pretrained.shape or task_vectors.shape[0] != coefficients.shape[0]:
        raise ValueError(
            f"tensor {name!r}: cannot merge task vectors of shape {tuple(task_vectors.shape)} with "
            f"coefficients {tuple(coefficients.shape)} into a tensor of shape {tuple(pretrained.shape)}"
        )
    return pretrained + torch.tensordot(coefficients.to(task_vectors.dtype), task_vectors, dims=1)


def merge_state(
    pretrained: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, torch.Tensor],
    coefficients: torch.Tensor,
    names: Sequence[str],
) -> Dict[str, torch.Tensor]:
    """Merge every tensor in ``names``; ``coefficients`` is ``[K, L]`` with ``L == len(names)`` or 1."""
    if coefficients.dim() != 2 or coefficients.shape[1] not in (1, len(names)):
        raise ValueError(
            f"coefficients must have shape [K, {len(names)}] (layer-wise) or [K, 1] (task-wise), "
            f"got {tuple(coefficients.shape)}"
        )
    column = (lambda l: 0) if coefficients.shape[1] == 1 else (lambda l: l)
    return {
        name: merge_tensor(pretrained[name], task_vectors[name], coefficients[:, column(l)], name)
        for l, name in enumerate(names)
    }


def functional_model(base: nn.Module, state: Mapping[str, torch.Tensor]) -> Callable:
    """``base`` run with ``state`` in place of its parameters (buffers and the rest from ``base``)."""

    def forward(*args, **kwargs):
        return functional_call(base, dict(state), args, kwargs, strict=False)

    return forward


@dataclass
class TaskVectorMerge:
    """Everything the merge rule needs: the frozen base module, its parameters theta_0 (the merged
    tensors, in order) and the task vectors stacked per tensor (name -> ``[K, *shape]``)."""

    base: nn.Module
    pretrained: Dict[str, torch.Tensor]
    task_vectors: Dict[str, torch.Tensor]

    @property
    def names(self) -> List[str]:
        return list(self.pretrained)

    def state(self, coefficients: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The merged parameters for ``[K, L]`` (or ``[K, 1]``) coefficients."""
        return merge_state(self.pretrained, self.task_vectors, coefficients, self.names)

    def model(self, coefficients: torch.Tensor) -> Callable:
        """The base module run functionally with the merged parameters."""
        return functional_model(self.base, self.state(coefficients))
