"""Pure tensor math of StatsMerging: statistics, learner, merge rule, losses (no model pool)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from statsmerge_plugin.method.statsmerging.distillation import distillation_loss
from statsmerge_plugin.method.statsmerging.learner import StatsMergeLearner
from statsmerge_plugin.method.statsmerging.merge import functional_model, merge_state, merge_tensor
from statsmerge_plugin.method.statsmerging.statistics import (
    as_matrix,
    normalize_features,
    pool_task_wise,
    pooled_tensor_statistics,
    tensor_statistics,
    top_singular_values,
)


def numpy_statistics(a: np.ndarray, rank: int) -> np.ndarray:
    m = a.reshape(1, -1) if a.ndim <= 1 else a.reshape(a.shape[0], -1)
    sv = np.linalg.svd(m, compute_uv=False)[:rank]
    sv = np.pad(sv, (0, rank - len(sv)))
    return np.concatenate([[a.mean(), a.var(), np.linalg.norm(a.ravel())], sv])


@pytest.mark.parametrize("shape", [(7, 5), (64, 48), (3, 4, 5), (6, 2, 3, 3), (11,)])
def test_statistics_match_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.normal(size=shape).astype(np.float64) * 0.1 + 0.01
    got = tensor_statistics(torch.tensor(a, dtype=torch.float32), rank=3).numpy()
    np.testing.assert_allclose(got, numpy_statistics(a, 3), rtol=2e-4, atol=1e-6)


def test_one_dimensional_tensor_has_one_singular_value_zero_padded():
    v = torch.tensor([3.0, 4.0])
    stats = tensor_statistics(v, rank=3)
    assert as_matrix(v).shape == (1, 2)
    torch.testing.assert_close(stats[3:], torch.tensor([5.0, 0.0, 0.0]))


def test_randomized_svd_matches_exact_top_values():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(300, 5, generator=g)
    v = torch.randn(5, 200, generator=g)
    m = u @ torch.diag(torch.tensor([50.0, 20.0, 10.0, 5.0, 2.0])) @ v + 0.01 * torch.randn(
        300, 200, generator=g
    )
    exact = top_singular_values(m, 3, exact_max_numel=10**9)
    randomized = top_singular_values(m, 3, exact_max_numel=100)
    torch.testing.assert_close(randomized, exact, rtol=1e-3, atol=1e-3)


def test_statistics_reject_non_finite_and_name_the_tensor():
    with pytest.raises(ValueError, match="encoder.w"):
        tensor_statistics(torch.tensor([1.0, float("nan")]), name="encoder.w")


def test_feature_normalisations():
    feats = torch.rand(4, 6, 5) * torch.tensor([1e-3, 1e-8, 1.0, 10.0, 0.5])
    std = normalize_features(feats, "standardize").reshape(-1, 5)
    torch.testing.assert_close(std.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(std.std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalize_features(feats, "log_abs"), torch.log(feats.abs() + 1e-12))
    assert normalize_features(feats, "none") is feats
    with pytest.raises(ValueError, match="zscore"):
        normalize_features(feats, "zscore")


def test_task_wise_pooling_averages_over_tensors():
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    pooled = pool_task_wise(feats)
    assert pooled.shape == (2, 1, 4)
    torch.testing.assert_close(pooled[:, 0], feats.mean(1))


def test_pooled_statistics_match_numpy():
    rng = np.random.default_rng(1)
    tvs = [rng.normal(size=(6, 4)) for _ in range(3)]
    got = pooled_tensor_statistics([torch.tensor(t) for t in tvs]).numpy()
    stacked = np.stack([t.ravel() for t in tvs])
    sv = np.linalg.svd(stacked, compute_uv=False)
    want = [
        stacked.mean(),
        stacked.std(ddof=1),
        stacked.var(ddof=1),
        np.linalg.norm(stacked),
        sv[0],
        (sv > 1e-3).sum(),
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("mode", ["shared", "per_tensor", "free"])
def test_learner_shapes_and_softmax_over_tasks(mode):
    K, L, D = 4, 7, 6
    torch.manual_seed(0)
    learner = StatsMergeLearner(K, L, D, mode=mode, hidden_dim=16)
    feats = torch.randn(L, D) if mode == "per_tensor" else torch.randn(K, L, D)
    coef = learner(feats)
    assert coef.shape == (K, L)
    torch.testing.assert_close(coef.sum(0), torch.ones(L))
    assert (coef >= 0).all()
    if mode == "free":
        torch.testing.assert_close(coef, torch.full((K, L), 1 / K))


def test_shared_learner_is_equivariant_to_task_order():
    torch.manual_seed(0)
    learner = StatsMergeLearner(3, 5, 6, mode="shared", hidden_dim=16)
    feats = torch.randn(3, 5, 6)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(learner(feats[perm]), learner(feats)[perm])


def test_learner_output_norms_and_bad_shapes():
    torch.manual_seed(0)
    relu = StatsMergeLearner(3, 2, 6, output_norm="relu", hidden_dim=8)
    assert (relu(torch.randn(3, 2, 6)) >= 0).all()
    with pytest.raises(ValueError, match=r"\(3, 2, 6\)"):
        relu(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="sigmoid"):
        StatsMergeLearner(3, 2, 6, output_norm="sigmoid")
    tw = StatsMergeLearner(3, 1, 6, mode="per_tensor", out_bias=0.3, hidden_dim=8)
    torch.testing.assert_close(tw.mlp.biases[-1].flatten(), torch.full((3,), 0.3))


def test_merge_rule_and_task_wise_broadcast():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}
    tvs = {"a": torch.randn(2, 3, 2, generator=g), "b": torch.randn(2, 4, generator=g)}
    coef = torch.tensor([[0.2, 0.9], [0.8, 0.1]])
    merged = merge_state(base, tvs, coef, ["a", "b"])
    torch.testing.assert_close(merged["a"], base["a"] + 0.2 * tvs["a"][0] + 0.8 * tvs["a"][1])
    torch.testing.assert_close(merged["b"], base["b"] + 0.9 * tvs["b"][0] + 0.1 * tvs["b"][1])
    tw = merge_state(base, tvs, torch.tensor([[0.3], [0.7]]), ["a", "b"])
    torch.testing.assert_close(tw["b"], base["b"] + 0.3 * tvs["b"][0] + 0.7 * tvs["b"][1])
    with pytest.raises(ValueError, match="'a'"):
        merge_tensor(base["a"], tvs["b"], coef[:, 0], name="a")
    with pytest.raises(ValueError, match=r"\[K, 2\]"):
        merge_state(base, tvs, torch.ones(2, 3), ["a", "b"])


def test_one_hot_coefficients_reproduce_the_finetuned_model():
    torch.manual_seed(0)
    base_model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    finetuned = [
        torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        for _ in range(2)
    ]
    names = [n for n, _ in base_model.named_parameters()]
    base = dict(base_model.named_parameters())
    tvs = {
        n: torch.stack([dict(m.named_parameters())[n] - base[n] for m in finetuned]).detach()
        for n in names
    }
    x = torch.randn(8, 5)
    merged = functional_model(
        base_model, merge_state(base, tvs, torch.tensor([[0.0], [1.0]]), names)
    )
    torch.testing.assert_close(merged(x), finetuned[1](x), atol=1e-6, rtol=1e-5)


def test_gradients_reach_only_the_learner():
    torch.manual_seed(0)
    base_model = torch.nn.Linear(5, 3).requires_grad_(False)
    names = ["weight", "bias"]
    base = {n: p for n, p in base_model.named_parameters()}
    tvs = {n: torch.randn(2, *p.shape) for n, p in base.items()}
    head = torch.randn(3, 3)
    learner = StatsMergeLearner(2, 2, 6, hidden_dim=8)
    feats = torch.randn(2, 2, 6)
    out = (
        functional_model(base_model, merge_state(base, tvs, learner(feats), names))(
            torch.randn(4, 5)
        )
        @ head
    )
    distillation_loss("ce_hard", out, torch.randn(4, 3)).backward()
    grads = {n: p.grad for n, p in learner.named_parameters()}
    output_bias = (
        "mlp.4.bias"  # softmax over tasks is shift-invariant: the shared output bias gets none
    )
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n != output_bias)
    assert grads[output_bias].abs().max() < 1e-6
    assert all(p.grad is None for p in base_model.parameters())
    assert not any(t.requires_grad for t in [head, *tvs.values()])


def test_distillation_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    torch.testing.assert_close(distillation_loss("ce_hard", s, t), F.cross_entropy(s, t.argmax(-1)))
    assert distillation_loss("kl_soft", t, t, temperature=4.0) < 1e-6
    kl1 = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean")
    torch.testing.assert_close(distillation_loss("kl_soft", s, t, temperature=2.0), 4 * kl1)
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss("ce_hard", s, t[:, :4])
    with pytest.raises(ValueError, match="mse"):
        distillation_loss("mse", s, t)
