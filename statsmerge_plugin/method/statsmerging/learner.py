"""StatsMergeLearner: weight statistics -> merging coefficients (StatsMerging §3.2, Algorithm 1).

Three parameterisations share one interface, ``coefficients = learner(features)`` with ``features`` of
shape ``[K, L, D]`` (tasks x merged tensors x statistics) and coefficients of shape ``[K, L]``:

* ``shared`` (default, the paper's equations): ONE MLP ``D -> H -> H -> 1`` (ReLU) maps every S_k^l to a
  logit z_k^l, so the statistics are what distinguishes tasks and tensors;
* ``per_tensor`` (the official code, spec §2.3): one MLP per tensor mapping that tensor's statistics
  pooled over tasks ``[L, D']`` to K logits; Xavier-uniform weights, zero biases. The L MLPs are evaluated
  as one batched computation (``torch.baddbmm``) rather than L modules;
* ``free``: a free ``[K, L]`` logit table, zero-initialised; the control that shows what the statistics
  add under the same loss.

Logits are turned into coefficients over tasks (dim 0) and multiplied by an overall scale ``s``:

    lambda^l = s * g(z^l),   g = softmax_k (paper Fig. 3, official code) | relu(z + 1/K) | z + 1/K

The ``1/K`` offset makes zero logits mean simple averaging for every ``g`` (a free table starts there;
without it ``relu`` would start with zero gradients and ``none`` at theta_0). ``s`` is ``init_scale``
(``scale="fixed"``; 1 with softmax is the paper's convex merge) or a learned scalar starting there
(``scale="learned"``, parameterised as ``log s``).

The optimiser (Adam and a learning-rate schedule, :class:`OptimiserSettings`) is part of a fair
comparison: Adam moves each parameter by about ``lr`` per step, so a free table at the paper's
lr 1e-3 with StepLR(100, 0.1) moves its logits by at most ~0.11 in 500 steps and stays at simple
averaging, while an MLP moves its outputs through many weights. :data:`DEFAULT_LR` gives every mode a
learning rate under which it can reach any coefficient table in 500 steps (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Literal, Tuple

import torch
from torch import nn

LearnerMode = Literal["shared", "per_tensor", "free"]
OutputNorm = Literal["softmax", "relu", "none"]
LEARNER_MODES = ("shared", "per_tensor", "free")
OUTPUT_NORMS = ("softmax", "relu", "none")
SCALE_MODES = ("fixed", "learned")
LR_SCHEDULES = ("step", "cosine", "constant")
#: Adam learning rate of each mode when ``lr`` is not given: the paper's 1e-3 for the MLPs; the free
#: table needs a larger one to move as far as they can (see the module docstring).
DEFAULT_LR: Dict[str, float] = {"shared": 1e-3, "per_tensor": 1e-3, "free": 5e-2}


def normalize_over_tasks(logits: torch.Tensor, mode: OutputNorm) -> torch.Tensor:
    """Turn ``[K, L]`` logits into coefficients over tasks (dim 0); zero logits give ``1/K``."""
    if mode == "softmax":
        return torch.softmax(logits, dim=0)
    offset = 1.0 / logits.shape[0]
    if mode == "relu":
        return torch.relu(logits + offset)
    if mode == "none":
        return logits + offset
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
        scale: ``fixed`` (coefficients times ``init_scale``) or ``learned`` (a learned overall scale
            starting at ``init_scale``).
        init_scale: the overall scale s (> 0); 1 with softmax is the paper's convex merge.
        zero_init_output: zero the output layer's weights of the ``shared`` / ``per_tensor`` MLP (and
            the ``shared`` bias), so that every logit starts at 0 (``per_tensor``: at ``out_bias``)
            and the learner starts exactly at the base merge the free table starts at (simple
            averaging times ``s``); training still moves the logits through the output weights. Off: the
            default initialisation (the paper leaves it open; the official code's Xavier weights),
            under which the first merge is a random function of the statistics.
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
        scale: str = "fixed",
        init_scale: float = 1.0,
        zero_init_output: bool = False,
    ):
        super().__init__()
        for option, value, choices in (
            ("learner", mode, LEARNER_MODES),
            ("output_norm", output_norm, OUTPUT_NORMS),
            ("scale", scale, SCALE_MODES),
        ):
            if value not in choices:
                raise ValueError(f"invalid value {value!r} for option `{option}`: {choices}")
        if not (
            isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0
        ):
            raise ValueError(f"invalid value {init_scale!r} for option `init_scale`: expected > 0")
        self.num_tasks, self.num_tensors, self.in_features = num_tasks, num_tensors, in_features
        self.mode, self.output_norm, self.init_scale = mode, output_norm, float(init_scale)
        if mode == "shared":
            self.mlp = shared_mlp(in_features, hidden_dim)
        elif mode == "per_tensor":
            self.mlp = PerTensorMLPs(num_tensors, in_features, hidden_dim, num_tasks, out_bias)
        else:
            zero_init_output = False  # the free table starts at zero logits anyway
            self.logits = nn.Parameter(torch.zeros(num_tasks, num_tensors))
        self.log_scale = (
            nn.Parameter(torch.tensor(math.log(init_scale))) if scale == "learned" else None
        )
        if zero_init_output:
            with torch.no_grad():
                if mode == "shared":
                    self.mlp[-1].weight.zero_()
                    self.mlp[-1].bias.zero_()
                else:
                    self.mlp.weights[-1].zero_()

    def expected_feature_shape(self) -> tuple[int, ...]:
        if self.mode == "per_tensor":
            return (self.num_tensors, self.in_features)
        return (self.num_tasks, self.num_tensors, self.in_features)

    def overall_scale(self) -> torch.Tensor:
        """The overall scale s (a tensor; learned or fixed)."""
        if self.log_scale is None:
            return torch.tensor(self.init_scale)
        return self.log_scale.exp()

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
        coefficients = normalize_over_tasks(logits, self.output_norm)
        if self.log_scale is not None:
            return coefficients * self.log_scale.exp()
        return coefficients if self.init_scale == 1.0 else coefficients * self.init_scale


@dataclass(frozen=True)
class OptimiserSettings:
    """Adam and its learning-rate schedule, stepped once per optimiser step.

    Args:
        lr: learning rate of the learner's parameters.
        schedule: ``step`` (StepLR(step_size, gamma), the paper), ``cosine`` (to 0 over the run) or
            ``constant``.
        step_size, gamma: of ``step``.
        scale_lr: learning rate of a learned overall scale (its own parameter group, same schedule).
    """

    lr: float
    schedule: str = "step"
    step_size: int = 100
    gamma: float = 0.1
    scale_lr: float = 0.01


def build_optimiser(
    learner: StatsMergeLearner, settings: OptimiserSettings, total_steps: int
) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam over the learner (the learned scale in its own group) and the schedule of ``settings``."""
    scale = [learner.log_scale] if learner.log_scale is not None else []
    others = [p for p in learner.parameters() if all(p is not s for s in scale)]
    groups = [{"params": others, "lr": settings.lr}]
    if scale:
        groups.append({"params": scale, "lr": settings.scale_lr})
    optimizer = torch.optim.Adam(groups)
    if settings.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, settings.step_size, settings.gamma)
    elif settings.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps))
    elif settings.schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    else:
        raise ValueError(
            f"invalid value {settings.schedule!r} for option `lr_schedule`: {LR_SCHEDULES}"
        )
    return optimizer, scheduler


def coefficient_movement(coefficients: torch.Tensor, start: torch.Tensor) -> Dict[str, float]:
    """How far ``[K, L]`` coefficients are from simple averaging (``1/K``) and from ``start``."""
    uniform = (coefficients - 1.0 / coefficients.shape[0]).abs()
    moved = (coefficients - start).abs()
    return {
        "max_abs_from_uniform": round(float(uniform.max()), 6),
        "mean_abs_from_uniform": round(float(uniform.mean()), 6),
        "max_abs_from_start": round(float(moved.max()), 6),
        "mean_abs_from_start": round(float(moved.mean()), 6),
        "min": round(float(coefficients.min()), 6),
        "max": round(float(coefficients.max()), 6),
        "column_sum_min": round(float(coefficients.sum(0).min()), 6),
        "column_sum_max": round(float(coefficients.sum(0).max()), 6),
    }


SELECTION_MODES = ("none", "best", "early_stop")


class ModelSelector:
    """Model selection on held-out images: keeps the coefficients of the best evaluation.

    ``best`` trains every step and returns the best evaluated coefficients; ``early_stop`` also
    stops once ``patience`` evaluations in a row have not improved on the best. Higher metrics are
    better; ties keep the earlier step (the start is evaluated too, so the selected merge is never
    worse than the start on the selection metric).
    """

    def __init__(self, mode: str = "best", patience: int = 4):
        if mode not in SELECTION_MODES[1:]:
            raise ValueError(f"invalid value {mode!r} for option `selection`: {SELECTION_MODES}")
        self.mode, self.patience = mode, patience
        self.best_metric = -math.inf
        self.best_step = -1
        self.best_coefficients: torch.Tensor | None = None
        self.best_info: dict = {}
        self.history: list[dict] = []
        self.since_best = 0

    def update(self, step: int, metric: float, coefficients: torch.Tensor, **info: float) -> bool:
        """Record the evaluation of ``step`` (and ``info``, kept with the step); returns ``True``
        when training should stop."""
        self.history.append({"step": step, "metric": round(float(metric), 6), **info})
        if metric > self.best_metric:
            self.best_metric, self.best_step = float(metric), step
            self.best_coefficients = coefficients.detach().clone()
            self.best_info = dict(info)
            self.since_best = 0
        else:
            self.since_best += 1
        return self.mode == "early_stop" and self.since_best >= self.patience
