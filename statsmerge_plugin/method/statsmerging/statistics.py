"""Weight statistics that feed the StatsMergeLearner (StatsMerging, Merugu et al. 2025, §3.2).

For task ``k`` and merged parameter tensor ``l`` the feature vector is

    S_k^l = [mean, variance, L2 norm, sigma_1, ..., sigma_r]

of the task vector ``tau_k^l = theta_k^l - theta_0^l`` (or, with ``source="finetuned"``, of the fine-tuned
weights ``theta_k^l``, as the paper literally writes). The paper does not say how non-matrix tensors get
singular values; we reshape 1-D tensors to ``1 x n`` and tensors of 3 or more dimensions to ``[d0, -1]``,
and zero-pad when the rank is below ``r`` (spec §3, step A). For a 1-D tensor sigma_1 is its norm and
sigma_2.. are 0.

The official code's features are pooled over tasks instead (:class:`PooledStatistics`): one row
``[mean, std, variance, norm, sigma_1, rank]`` of the ``K x n`` matrix of the K task vectors, whose
singular values come from the ``K x K`` Gram matrix accumulated tensor by tensor, so a whole-model row
never concatenates the model's task vectors.

Features span many orders of magnitude (variances ~1e-7 next to norms ~1), so :class:`FeatureNormalizer`
offers per-feature normalisations fitted on the layer-wise table (every task and tensor) and applied to
whatever rows the learner gets (layer-wise or task-wise). All functions work on tensors only and raise
errors that name the tensor or option at fault.
"""

from __future__ import annotations

from typing import Iterable, List, Literal, Optional, Sequence

import torch

FeatureNorm = Literal["none", "standardize", "log_abs", "log_standardize"]
FEATURE_NORMS = ("none", "standardize", "log_abs", "log_standardize")
BASE_FEATURES = ("mean", "variance", "l2_norm")
POOLED_FEATURES = ("mean", "std", "variance", "l2_norm", "sigma_1", "rank")
#: The paper's feature groups (its Table 5 ablation adds them in this order).
FEATURE_GROUPS = ("mean", "variance", "l2_norm", "singular_values")
#: Columns of each group in the pooled (official-code) features.
POOLED_GROUP_COLUMNS = {
    "mean": ("mean",),
    "variance": ("std", "variance"),
    "l2_norm": ("l2_norm",),
    "singular_values": ("sigma_1", "rank"),
}
LOG_EPS = 1e-12


def feature_names(rank: int) -> list[str]:
    """Column names of a statistics vector with ``rank`` singular values."""
    return list(BASE_FEATURES) + [f"sigma_{i + 1}" for i in range(rank)]


def check_feature_groups(groups: Sequence[str], option: str = "stat_features") -> List[str]:
    """A non-empty list of distinct names from :data:`FEATURE_GROUPS` (error names ``option``)."""
    groups = list(groups) if isinstance(groups, (list, tuple)) else groups
    if (
        not isinstance(groups, list)
        or not groups
        or any(g not in FEATURE_GROUPS for g in groups)
        or len(set(groups)) != len(groups)
    ):
        raise ValueError(
            f"invalid value {groups!r} for option `{option}`: expected a non-empty list of distinct "
            f"names from {FEATURE_GROUPS}"
        )
    return groups


def feature_columns(groups: Sequence[str], rank: int, pooled: bool = False) -> List[int]:
    """Indices of the columns of ``groups`` in per-task features (``pooled=False``, rank ``rank``)
    or in the pooled features (:data:`POOLED_FEATURES`), in column order."""
    groups = check_feature_groups(groups)
    if pooled:
        wanted = {c for g in groups for c in POOLED_GROUP_COLUMNS[g]}
        return [i for i, c in enumerate(POOLED_FEATURES) if c in wanted]
    names = feature_names(rank)
    return [i for i, c in enumerate(names) if (c if i < 3 else "singular_values") in groups]


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D view used for singular values: 0-D/1-D -> ``1 x n``, 2-D as is, >=3-D -> ``[d0, -1]``."""
    if tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    if tensor.dim() == 2:
        return tensor
    return tensor.reshape(tensor.shape[0], -1)


#: the Gram matrix's eigenvalues are computed in float32 when the r-th is at least this fraction of
#: the largest (sigma_r >= 0.1 sigma_1: then they are as accurate as float32 ``svdvals``), else in
#: float64 (tested against a float64 SVD)
GRAM_FLOAT32_MIN_RATIO = 1e-2


def gram_singular_values(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` largest singular values of ``matrix`` (fewer if its smaller side is shorter),
    exactly, from the eigenvalues of its Gram matrix on the smaller side.

    ``sigma_i = sqrt(eig_i(A A^T))``: one matrix product and a symmetric eigensolver of the smaller
    side, several times faster than ``torch.linalg.svdvals`` of a ViT-B/32 MLP matrix (768 x 3072:
    0.07 s against 0.48 s on one CPU core). Squaring the matrix loses relative accuracy on singular
    values far below the largest, so when ``sigma_r < 0.1 sigma_1`` (:data:`GRAM_FLOAT32_MIN_RATIO`)
    the Gram matrix is recomputed in float64.
    """
    a = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    k = min(rank, a.shape[0])
    eig = torch.linalg.eigvalsh(a @ a.T).flip(0)[:k]
    if k and eig[0] > 0 and eig[k - 1] < GRAM_FLOAT32_MIN_RATIO * eig[0]:
        a = a.double()
        eig = torch.linalg.eigvalsh(a @ a.T).flip(0)[:k]
    return eig.clamp_min(0).sqrt().to(matrix.dtype)


def top_singular_values(
    matrix: torch.Tensor,
    rank: int,
    exact_max_numel: int = 4_000_000,
    oversample: int = 10,
    niter: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """The ``rank`` largest singular values of ``matrix``, zero-padded when its rank is smaller.

    Exact (:func:`gram_singular_values`) for matrices with at most ``exact_max_numel`` elements;
    above that a seeded randomized top-r SVD (``torch.svd_lowrank``, Halko et al.) with
    ``oversample`` extra columns.
    """
    if rank == 0:
        return matrix.new_zeros(0)
    m = matrix.detach().float()
    n_sv = min(m.shape)
    if m.numel() <= exact_max_numel:
        sv = gram_singular_values(m, rank)
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


class FeatureNormalizer:
    """A per-feature normalisation fitted on a reference table and applied to any rows.

    Modes (not in the paper, spec §6 row 7):

    * ``none``: raw statistics (paper);
    * ``standardize``: each feature to zero mean, unit variance over the reference rows;
    * ``log_abs``: ``log(|x| + 1e-12)``, which brings variances (~1e-8) and norms (~1) to one scale;
    * ``log_standardize``: ``log_abs``, then ``standardize``.

    Fitting on the layer-wise table (every task and tensor, ``[..., D]``) and applying the fitted map
    to task-wise rows makes every normalisation meaningful for every granularity: a single pooled row
    standardised over itself would be all zeros. Features that are constant over the reference
    (e.g. sigma_2 = 0 everywhere) are centred and left unscaled.

    Args:
        reference: ``[..., D]``, the rows the per-feature statistics are taken over.
        mode: one of :data:`FEATURE_NORMS`.
    """

    def __init__(self, reference: torch.Tensor, mode: FeatureNorm = "none"):
        if mode not in FEATURE_NORMS:
            raise ValueError(
                f"invalid value {mode!r} for option `feature_norm`: expected one of {FEATURE_NORMS}"
            )
        self.mode = mode
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        if mode in ("standardize", "log_standardize"):
            flat = self._pre(reference.double()).reshape(-1, reference.shape[-1])
            self.mean = flat.mean(0)
            std = flat.std(0, unbiased=False)
            constant = std <= 1e-6 * self.mean.abs()  # up to rounding (e.g. log of zeros)
            self.std = torch.where(constant | (std == 0), torch.ones_like(std), std)

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.abs() + LOG_EPS) if self.mode.startswith("log") else x

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return features
        if self.mean is None:
            return self._pre(features)
        x = self._pre(features.double())
        return ((x - self.mean.to(x)) / self.std.to(x)).to(features.dtype)


def normalize_features(features: torch.Tensor, mode: FeatureNorm = "none") -> torch.Tensor:
    """``features`` normalised per feature over all of its own rows (see :class:`FeatureNormalizer`)."""
    return FeatureNormalizer(features, mode)(features)


def pool_task_wise(features: torch.Tensor) -> torch.Tensor:
    """Task-wise statistics ``[K, 1, D]`` from layer-wise ``[K, L, D]``: the mean over tensors.

    The paper gives no pooling rule for the task-wise mode; averaging per-tensor features follows the
    third-party port (spec §3, step A).
    """
    return features.mean(dim=1, keepdim=True)


class PooledStatistics:
    """The official code's statistics of K task vectors pooled over tasks (spec §2.2).

    ``add`` one tensor's task vectors ``[K, *shape]`` at a time (several calls for a whole model);
    :meth:`result` gives ``[mean, std, var, norm, sigma_1, rank]`` (:data:`POOLED_FEATURES`) of the
    ``K x n`` matrix of all of them (std and var unbiased, ``rank = #{sigma > 1e-3}``). Memory stays
    at the ``K x K`` Gram matrix and a bounded float64 slice of one tensor: mean and variance are
    combined chunk by chunk (Chan et al.), the singular values are those of the accumulated Gram
    matrix ``sum_chunks X X^T``.

    Args:
        name: named in errors.
        chunk_elements: float64 elements converted at once (``K x columns``).
    """

    def __init__(self, name: str = "<tensor>", chunk_elements: int = 1 << 23):
        self.name = name
        self.chunk_elements = chunk_elements
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.gram: Optional[torch.Tensor] = None

    def add(self, task_tensors: torch.Tensor, name: Optional[str] = None) -> "PooledStatistics":
        """Accumulate one tensor's task vectors, ``[K, *shape]``."""
        flat = task_tensors.detach().reshape(task_tensors.shape[0], -1)
        if flat.numel() == 0:
            raise ValueError(
                f"tensor {name or self.name!r} is empty: no statistics can be computed"
            )
        self._start(flat.shape[0], flat.device, name or self.name)
        step = max(1, self.chunk_elements // flat.shape[0])
        for chunk in flat.split(step, dim=1):
            if not torch.isfinite(chunk).all():
                raise ValueError(f"tensor {name or self.name!r} contains NaN or inf values")
            x = chunk.double()
            gram = x @ x.T
            n = x.numel()
            mean = float(x.sum()) / n
            # the chunk's sum of squared deviations from its sum of squares (the Gram trace), in
            # float64: no deviation tensor; chunks are combined by Chan et al.'s update
            m2 = max(float(gram.diagonal().sum()) - n * mean * mean, 0.0)
            self._combine(n, mean, m2, gram)
        return self

    def merge(self, other: "PooledStatistics") -> "PooledStatistics":
        """Accumulate everything ``other`` has accumulated (same K)."""
        if other.gram is None:
            return self
        self._start(other.gram.shape[0], other.gram.device, other.name)
        self._combine(other.count, other.mean, other.m2, other.gram)
        return self

    def _start(self, K: int, device, name: str) -> None:
        if self.gram is None:
            self.gram = torch.zeros(K, K, dtype=torch.float64, device=device)
        elif self.gram.shape[0] != K:
            raise ValueError(
                f"tensor {name!r}: {K} task vectors, earlier tensors had {self.gram.shape[0]}"
            )

    def _combine(self, n: int, mean: float, m2: float, gram: torch.Tensor) -> None:
        """Chan et al.'s pairwise update of count, mean and sum of squared deviations."""
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total
        self.gram += gram

    def result(self) -> torch.Tensor:
        """``[mean, std, var, norm, sigma_1, rank]`` (float32)."""
        if self.gram is None or self.count == 0:
            raise ValueError(f"tensor {self.name!r} is empty: no statistics can be computed")
        var = self.m2 / (self.count - 1) if self.count > 1 else 0.0
        sv = torch.linalg.eigvalsh(self.gram).clamp_min(0).flip(0).sqrt()
        norm = float(self.gram.diagonal().sum().clamp_min(0).sqrt())
        return torch.tensor(
            [self.mean, var**0.5, var, norm, float(sv[0]), float((sv > 1e-3).sum())],
            dtype=torch.float32,
        )


def pooled_tensor_statistics(task_tensors, name: str = "<tensor>") -> torch.Tensor:
    """:class:`PooledStatistics` of one tensor's task vectors (``[K, *shape]`` or a list of K)."""
    if not isinstance(task_tensors, torch.Tensor):
        task_tensors = torch.stack([t.detach().reshape(-1) for t in task_tensors])
    return PooledStatistics(name).add(task_tensors).result()


def pooled_model_statistics(
    per_tensor: Iterable[torch.Tensor], names: Optional[Sequence[str]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled statistics of every tensor (``[L, 6]``) and of all of them together (``[6]``), in one
    pass over the ``[K, *shape]`` task-vector tensors; nothing is concatenated."""
    whole = PooledStatistics("<all tensors>")
    rows = []
    for l, tensor in enumerate(per_tensor):
        one = PooledStatistics(names[l] if names is not None else f"<tensor {l}>").add(tensor)
        rows.append(one.result())
        whole.merge(one)
    return torch.stack(rows), whole.result()
