"""Weight statistics that feed the StatsMergeLearner (StatsMerging, Merugu et al. 2025, §3.2).

For task ``k`` and merged parameter tensor ``l`` the feature vector is

    S_k^l = [mean, variance, L2 norm, sigma_1, ..., sigma_r]

of the task vector ``tau_k^l = theta_k^l - theta_0^l`` (or, with ``source="finetuned"``, of the fine-tuned
weights ``theta_k^l``, as the paper literally writes). The paper does not say how non-matrix tensors get
singular values; we reshape 1-D tensors to ``1 x n`` and tensors of 3 or more dimensions to ``[d0, -1]``,
and zero-pad when the rank is below ``r`` (spec §3, step A).

All functions here work on one tensor at a time and raise errors that name the tensor at fault.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

FeatureNorm = Literal["none", "standardize", "log_abs"]
FEATURE_NORMS = ("none", "standardize", "log_abs")
BASE_FEATURES = ("mean", "variance", "l2_norm")


def feature_names(rank: int) -> list[str]:
    """Column names of a statistics vector with ``rank`` singular values."""
    return list(BASE_FEATURES) + [f"sigma_{i + 1}" for i in range(rank)]


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D view used for singular values: 0-D/1-D -> ``1 x n``, 2-D as is, >=3-D -> ``[d0, -1]``."""
    if tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    if tensor.dim() == 2:
        return tensor
    return tensor.reshape(tensor.shape[0], -1)


def top_singular_values(
    matrix: torch.Tensor,
    rank: int,
    exact_max_numel: int = 4_000_000,
    oversample: int = 10,
    niter: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """The ``rank`` largest singular values of ``matrix``, zero-padded when its rank is smaller.

    Exact ``torch.linalg.svdvals`` for matrices with at most ``exact_max_numel`` elements; above that a
    seeded randomized top-r SVD (``torch.svd_lowrank``, Halko et al.) with ``oversample`` extra columns.
    """
    if rank == 0:
        return matrix.new_zeros(0)
    m = matrix.detach().float()
    n_sv = min(m.shape)
    if m.numel() <= exact_max_numel:
        sv = torch.linalg.svdvals(m)[:rank]
    else:
        q = min(rank + oversample, n_sv)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, sv, _ = torch.svd_lowrank(m, q=q, niter=niter)
        sv = sv[:rank]
    if sv.numel() < rank:
        sv = torch.cat([sv, sv.new_zeros(rank - sv.numel())])
    return sv


def tensor_statistics(
    tensor: torch.Tensor,
    rank: int = 3,
    name: str = "<tensor>",
    exact_max_numel: int = 4_000_000,
) -> torch.Tensor:
    """``[mean, variance, L2 norm, sigma_1..sigma_rank]`` of one tensor (float32, length ``3 + rank``).

    The variance is the population variance (``unbiased=False``), as for numpy's ``var``.
    """
    if tensor.numel() == 0:
        raise ValueError(f"tensor {name!r} is empty: no statistics can be computed")
    t = tensor.detach().float()
    if not torch.isfinite(t).all():
        raise ValueError(f"tensor {name!r} contains NaN or inf values")
    base = torch.stack([t.mean(), t.var(unbiased=False), t.norm()])
    sv = top_singular_values(as_matrix(t), rank, exact_max_numel=exact_max_numel)
    return torch.cat([base, sv.to(base)])


def normalize_features(features: torch.Tensor, mode: FeatureNorm = "none") -> torch.Tensor:
    """Optional feature normalisation over the last dimension's columns (not in the paper; §6 row 7).

    * ``none``: raw statistics (paper default);
    * ``standardize``: each column to zero mean and unit variance over all (task, tensor) entries;
    * ``log_abs``: ``log(|x| + 1e-12)``, which brings variances (~1e-8) and norms (~1) to one scale.
    """
    if mode == "none":
        return features
    if mode == "standardize":
        flat = features.reshape(-1, features.shape[-1])
        mean = flat.mean(0)
        std = flat.std(0, unbiased=False)
        return (features - mean) / torch.where(std > 0, std, torch.ones_like(std))
    if mode == "log_abs":
        return torch.log(features.abs() + 1e-12)
    raise ValueError(f"invalid feature normalisation {mode!r}: expected one of {FEATURE_NORMS}")


def pool_task_wise(features: torch.Tensor) -> torch.Tensor:
    """Task-wise statistics ``[K, 1, D]`` from layer-wise ``[K, L, D]``: the mean over tensors.

    The paper gives no pooling rule for the task-wise mode; averaging per-tensor features follows the
    third-party port (spec §3, step A).
    """
    return features.mean(dim=1, keepdim=True)


def pooled_tensor_statistics(
    task_tensors: Sequence[torch.Tensor], name: str = "<tensor>"
) -> torch.Tensor:
    """The official code's per-tensor features, pooled over tasks (spec §2.2, "official" mode).

    The K task vectors of one tensor (or of several tensors, concatenated) are flattened into a ``K x n``
    matrix and summarised by ``[mean, std, var, norm, sigma_1, rank]`` with ``rank = #{sigma > 1e-3}``.
    Singular values come from the ``K x K`` Gram matrix, so ``n`` may be the size of a whole model.
    """
    stacked = torch.stack([t.detach().double().reshape(-1) for t in task_tensors])
    if not torch.isfinite(stacked).all():
        raise ValueError(f"tensor {name!r} contains NaN or inf values")
    eig = torch.linalg.eigvalsh(stacked @ stacked.T).clamp_min(0)
    sv = eig.flip(0).sqrt()
    return torch.stack(
        [
            stacked.mean(),
            stacked.std(),
            stacked.var(),
            stacked.norm(),
            sv[0],
            (sv > 1e-3).sum().to(stacked.dtype),
        ]
    ).float()


POOLED_FEATURES = ("mean", "std", "variance", "l2_norm", "sigma_1", "rank")
