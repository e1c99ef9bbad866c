"""StatsMergeLearner: weight statistics -> merging coefficients (StatsMerging §3.2, Algorithm 1).

Three parameterisations share one interface, ``coefficients = learner(features)`` with ``features`` of
shape ``[K, L, D]`` (tasks x merged tensors x statistics) and coefficients of shape ``[K, L]``:

* ``shared`` (default, the paper's equations): ONE MLP ``D -> H -> H -> 1`` (ReLU) maps every S_k^l to a
  logit z_k^l, so the statistics are what distinguishes tasks and tensors;
* ``per_tensor`` (the official code, spec §2.3): one MLP per tensor mapping that tensor's statistics
  pooled over tasks ``[L, D']`` to K logits; Xavier-uniform weights, zero biases. The L MLPs are evaluated
  as one batched computation (``torch.baddbmm``) rather than L modules;
* ``free``: a free ``[K, L]`` logit table, zero-initialised; the control that shows what the statistics
  add under the same loss and optimiser.

Logits are normalised over tasks (dim 0): ``softmax`` (paper Fig. 3, official code), ``relu``
(the official "without softmax" script) or ``none``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

LearnerMode = Literal["shared", "per_tensor", "free"]
OutputNorm = Literal["softmax", "relu", "none"]
LEARNER_MODES = ("shared", "per_tensor", "free")
OUTPUT_NORMS = ("softmax", "relu", "none")


def normalize_over_tasks(logits: torch.Tensor, mode: OutputNorm) -> torch.Tensor:
    """Turn ``[K, L]`` logits into coefficients, normalising over tasks (dim 0)."""
    if mode == "softmax":
        return torch.softmax(logits, dim=0)
    if mode == "relu":
        return torch.relu(logits)
    if mode == "none":
        return logits
    raise ValueError(f"invalid output normalisation {mode!r}: expected one of {OUTPUT_NORMS}")


def shared_mlp(in_features: int, hidden_dim: int, num_hidden_layers: int = 2) -> nn.Sequential:
    """``in -> H -> ... -> H -> 1`` with ReLU between layers ("a two-layer MLP", §3.2)."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(num_hidden_layers):
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
        width = hidden_dim
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class PerTensorMLPs(nn.Module):
    """L independent MLPs ``D -> H -> H -> K``, evaluated together: input ``[L, D]``, output ``[L, K]``."""

    def __init__(
        self, num_tensors: int, in_features: int, hidden_dim: int, num_tasks: int, out_bias: float
    ):
        super().__init__()
        sizes = [in_features, hidden_dim, hidden_dim, num_tasks]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            w = torch.empty(num_tensors, fan_in, fan_out)
            bound = (6.0 / (fan_in + fan_out)) ** 0.5  # Xavier-uniform, per tensor's MLP
            nn.init.uniform_(w, -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_tensors, 1, fan_out)))
        with torch.no_grad():
            self.biases[-1].fill_(out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)  # [L, 1, D]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h.squeeze(1)


class StatsMergeLearner(nn.Module):
    """Predicts the ``[K, L]`` merging coefficients lambda_k^l from weight statistics.

    Args:
        num_tasks: K, the number of task models.
        num_tensors: L, the number of coefficient columns (merged tensors for layer-wise merging, 1 for
            task-wise merging).
        in_features: D, the statistics per (task, tensor) (``shared``) or per tensor (``per_tensor``).
        mode: ``shared``, ``per_tensor`` or ``free`` (see the module docstring).
        hidden_dim: width of the hidden layers (256, as in the official code).
        output_norm: ``softmax`` / ``relu`` / ``none`` over tasks.
        out_bias: initial bias of the ``per_tensor`` output layer (official: 0 layer-wise, 0.3 task-wise).
    """

    def __init__(
        self,
        num_tasks: int,
        num_tensors: int,
        in_features: int,
        mode: LearnerMode = "shared",
        hidden_dim: int = 256,
        output_norm: OutputNorm = "softmax",
        out_bias: float = 0.0,
    ):
        super().__init__()
        if mode not in LEARNER_MODES:
            raise ValueError(f"invalid learner mode {mode!r}: expected one of {LEARNER_MODES}")
        if output_norm not in OUTPUT_NORMS:
            raise ValueError(
                f"invalid output normalisation {output_norm!r}: expected one of {OUTPUT_NORMS}"
            )
        self.num_tasks, self.num_tensors, self.in_features = num_tasks, num_tensors, in_features
        self.mode, self.output_norm = mode, output_norm
        if mode == "shared":
            self.mlp = shared_mlp(in_features, hidden_dim)
        elif mode == "per_tensor":
            self.mlp = PerTensorMLPs(num_tensors, in_features, hidden_dim, num_tasks, out_bias)
        else:
            self.logits = nn.Parameter(torch.zeros(num_tasks, num_tensors))

    def expected_feature_shape(self) -> tuple[int, ...]:
        if self.mode == "per_tensor":
            return (self.num_tensors, self.in_features)
        return (self.num_tasks, self.num_tensors, self.in_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.mode == "free":
            logits = self.logits
        else:
            if tuple(features.shape) != self.expected_feature_shape():
                raise ValueError(
                    f"StatsMergeLearner({self.mode}) expects features of shape "
                    f"{self.expected_feature_shape()}, got {tuple(features.shape)}"
                )
            if self.mode == "shared":
                logits = self.mlp(features).squeeze(-1)
            else:
                logits = self.mlp(features).transpose(0, 1)
        return normalize_over_tasks(logits, self.output_norm)
