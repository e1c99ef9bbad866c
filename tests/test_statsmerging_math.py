"""Pure tensor math of StatsMerging: statistics, learner, merge rule, losses (no model pool)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from statsmerge_plugin.method.statsmerging.distillation import (
    combine_task_losses,
    distillation_loss,
    per_image_distillation_loss,
    task_logits,
    task_loss,
    teacher_confidence,
)
from statsmerge_plugin.method.statsmerging.learner import (
    DEFAULT_LR,
    LEARNER_MODES,
    ModelSelector,
    OptimiserSettings,
    StatsMergeLearner,
    build_optimiser,
    coefficient_movement,
)
from statsmerge_plugin.method.statsmerging.merge import functional_model, merge_state, merge_tensor
from statsmerge_plugin.method.statsmerging.statistics import (
    FeatureNormalizer,
    PooledStatistics,
    as_matrix,
    feature_columns,
    gram_singular_values,
    normalize_features,
    pool_task_wise,
    pooled_model_statistics,
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


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (40, 40)])
@pytest.mark.parametrize("ratio", [1.0, 0.3, 0.01, 1e-4, 0.0])
def test_exact_singular_values_from_the_gram_matrix_match_a_float64_svd(shape, ratio):
    """sigma_3 / sigma_1 = ``ratio``: flat and steep spectra, and rank 2 (ratio 0), as accurate as
    float32 ``svdvals`` (the float64 fallback takes over below sigma_r = 0.1 sigma_1)."""
    g = torch.Generator().manual_seed(0)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, 8, generator=g, dtype=torch.float64))
    s = torch.tensor([1.0, ratio**0.5, ratio, *[ratio / 2] * 5], dtype=torch.float64)
    a = ((u * s) @ v.T).float()
    want = torch.linalg.svdvals(a.double())[:3]
    got = gram_singular_values(a, 3).double()
    float32_svd = torch.linalg.svdvals(a)[:3].double()
    assert (got - want).abs().max() <= 4 * (float32_svd - want).abs().max() + 1e-7
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(top_singular_values(a, 3), got.float())


def test_gram_singular_values_of_short_and_zero_matrices():
    torch.testing.assert_close(
        gram_singular_values(torch.tensor([[3.0, 4.0]]), 3), torch.tensor([5.0])
    )
    torch.testing.assert_close(gram_singular_values(torch.zeros(4, 6), 2), torch.zeros(2))
    torch.testing.assert_close(
        top_singular_values(torch.tensor([[3.0, 4.0]]), 3), torch.tensor([5.0, 0.0, 0.0])
    )


def test_statistics_reject_non_finite_and_name_the_tensor():
    with pytest.raises(ValueError, match="encoder.w"):
        tensor_statistics(torch.tensor([1.0, float("nan")]), name="encoder.w")


def test_feature_normalisations():
    feats = torch.rand(4, 6, 5) * torch.tensor([1e-3, 1e-8, 1.0, 10.0, 0.5])
    std = normalize_features(feats, "standardize").reshape(-1, 5)
    torch.testing.assert_close(std.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(std.std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalize_features(feats, "log_abs"), torch.log(feats.abs() + 1e-12))
    log_std = normalize_features(feats, "log_standardize").reshape(-1, 5)
    torch.testing.assert_close(log_std.std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    assert normalize_features(feats, "none") is feats
    with pytest.raises(ValueError, match="option `feature_norm`"):
        normalize_features(feats, "zscore")


def test_task_wise_pooling_averages_over_tensors():
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    pooled = pool_task_wise(feats)
    assert pooled.shape == (2, 1, 4)
    torch.testing.assert_close(pooled[:, 0], feats.mean(1))


@pytest.mark.parametrize("mode", ["standardize", "log_abs", "log_standardize"])
def test_normaliser_fitted_on_all_rows_gives_task_wise_rows_a_scale(mode):
    """A single task-wise row standardised over itself is all zeros (the old bug); fitted over every
    task and tensor it keeps the information, for the shared rows and for one pooled row."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-4, 1e-8, 1.0, 3.0, 0.5, 0.1])
    table = (torch.rand(3, 20, 6, generator=g) + 0.1) * scales  # [K, L, D]
    table[1] *= 2.0  # one task with larger task vectors
    fitted = FeatureNormalizer(table, mode)
    rows = pool_task_wise(table)  # [K, 1, D]
    out = fitted(rows)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert (out[1] - out[0]).abs().max() > 0.1  # the tasks stay distinguishable
    if mode == "standardize":  # affine: normalising then pooling == pooling then normalising
        torch.testing.assert_close(out, pool_task_wise(fitted(table)))
    one_row = table.pow(2).sum((0, 1)).sqrt()[None]  # like a whole-model row: larger than all
    assert fitted(one_row).abs().min() > 0.1
    if mode == "standardize":
        assert normalize_features(one_row, mode).abs().sum() == 0  # what fitting on all rows avoids


def test_normaliser_leaves_constant_features_finite():
    table = torch.rand(2, 5, 4)
    table[..., 3] = 0.0  # e.g. sigma_2 of 1-D tensors
    for mode in ("standardize", "log_standardize"):
        out = FeatureNormalizer(table, mode)(table)
        assert torch.isfinite(out).all() and out[..., 3].abs().max() == 0


def test_feature_columns_select_the_paper_groups():
    assert feature_columns(["mean"], 3) == [0]
    assert feature_columns(["singular_values", "mean"], 3) == [0, 3, 4, 5]
    assert feature_columns(["mean", "variance", "l2_norm", "singular_values"], 2) == list(range(5))
    assert feature_columns(["variance"], 3, pooled=True) == [1, 2]  # std, variance
    assert feature_columns(["singular_values"], 3, pooled=True) == [4, 5]  # sigma_1, rank
    for bad in (["mean", "kurtosis"], [], ["mean", "mean"], "mean"):
        with pytest.raises(ValueError, match="option `stat_features`"):
            feature_columns(bad, 3)


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


def test_pooled_statistics_accumulate_tensor_by_tensor():
    """A whole-model row from K x K Gram matrices, in chunks, equals the statistics of the
    concatenated K x n matrix (what the official code builds, and what we never build)."""
    rng = np.random.default_rng(2)
    parts = [
        rng.normal(size=(4, *shape)) * s
        for shape, s in [((7, 3), 0.1), ((5,), 2.0), ((2, 3, 3), 0.01)]
    ]
    rows, whole = pooled_model_statistics([torch.tensor(p) for p in parts])
    concat = np.concatenate([p.reshape(4, -1) for p in parts], axis=1)
    np.testing.assert_allclose(
        whole.numpy(), pooled_tensor_statistics(torch.tensor(concat)), rtol=1e-5
    )
    sv = np.linalg.svd(concat, compute_uv=False)
    want = [concat.mean(), concat.std(ddof=1), concat.var(ddof=1), np.linalg.norm(concat), sv[0], 4]
    np.testing.assert_allclose(whole.numpy(), want, rtol=1e-5)
    for l, p in enumerate(parts):
        np.testing.assert_allclose(rows[l].numpy(), pooled_tensor_statistics(list(torch.tensor(p))))
    chunked = PooledStatistics(chunk_elements=8)  # 2 columns of 4 tasks at a time
    for p in parts:
        chunked.add(torch.tensor(p))
    np.testing.assert_allclose(chunked.result().numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError, match="'b': 3 task vectors, earlier tensors had 4"):
        chunked.add(torch.zeros(3, 2), name="b")
    with pytest.raises(ValueError, match="'c' contains NaN"):
        PooledStatistics().add(torch.tensor([[1.0], [float("nan")]]), name="c")


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


@pytest.mark.parametrize("mode", ["shared", "per_tensor"])
@pytest.mark.parametrize("output_norm", ["softmax", "none"])
def test_zero_init_output_starts_at_the_free_tables_merge_and_still_learns(mode, output_norm):
    K, L, D = 4, 7, 6
    torch.manual_seed(0)
    feats = torch.randn(L, D) if mode == "per_tensor" else torch.randn(K, L, D) * 10
    kwargs = dict(hidden_dim=16, output_norm=output_norm, init_scale=2.4)
    free = StatsMergeLearner(K, L, D, mode="free", **kwargs)(feats)
    zero = StatsMergeLearner(K, L, D, mode=mode, zero_init_output=True, **kwargs)
    torch.testing.assert_close(zero(feats), free)  # 2.4 / K everywhere
    assert not torch.allclose(StatsMergeLearner(K, L, D, mode=mode, **kwargs)(feats), free)
    reference = StatsMergeLearner(K, L, D, mode="free", **kwargs)
    with torch.no_grad():
        reference.logits.normal_()
        target = reference(feats)  # a table this parameterisation can reach
    opt = torch.optim.Adam(zero.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = (zero(feats) - target).pow(2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first  # the zeroed output layer does not freeze the learner


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


# --- the optimiser: every learner mode can reach any coefficient table ---------------------------


def fit_table(learner, features, target, settings, steps=500):
    """Train ``learner`` with the algorithm's optimiser to output ``target``; returns the result."""
    optimizer, scheduler = build_optimiser(learner, settings, steps)
    for _ in range(steps):
        loss = (learner(features) - target).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        return learner(features)


def random_table_problem(mode, K=4, L=10, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = (
        torch.randn(L, D, generator=g)
        if mode == "per_tensor"
        else torch.randn(K, L, D, generator=g)
    )
    target = torch.softmax(1.5 * torch.randn(K, L, generator=g), dim=0)
    torch.manual_seed(seed)
    return StatsMergeLearner(K, L, D, mode=mode), features, target


@pytest.mark.parametrize("mode", LEARNER_MODES)
def test_every_mode_reaches_a_random_coefficient_table_with_its_default_optimiser(mode):
    learner, features, target = random_table_problem(mode)
    assert (target - 0.25).abs().max() > 0.3  # far from simple averaging
    got = fit_table(learner, features, target, OptimiserSettings(lr=DEFAULT_LR[mode]))
    assert (got - target).abs().max() < 0.05


def test_a_free_table_at_the_papers_learning_rate_stays_at_simple_averaging():
    """Why the free control has its own learning rate: at Adam lr 1e-3 with StepLR(100, 0.1) each
    logit moves by at most ~0.11 in 500 steps."""
    learner, features, target = random_table_problem("free")
    got = fit_table(learner, features, target, OptimiserSettings(lr=1e-3))
    assert (got - 0.25).abs().max() < 0.06
    assert (got - target).abs().max() > 0.25


@pytest.mark.parametrize("schedule", ["step", "cosine", "constant"])
def test_learned_scale_reaches_a_table_that_is_not_convex(schedule):
    learner, features, target = random_table_problem("free")
    learner = StatsMergeLearner(4, 10, 6, mode="free", scale="learned", init_scale=1.0)
    settings = OptimiserSettings(lr=DEFAULT_LR["free"], schedule=schedule)
    got = fit_table(learner, features, 1.6 * target, settings)
    assert (got - 1.6 * target).abs().max() < 0.06
    torch.testing.assert_close(
        learner.overall_scale().detach(), torch.tensor(1.6), atol=0.05, rtol=0
    )
    fixed = StatsMergeLearner(4, 10, 6, mode="free")  # the paper's convex merge cannot
    torch.testing.assert_close(
        fit_table(fixed, features, 1.6 * target, settings).sum(0), torch.ones(10)
    )


def test_schedules_and_the_scale_parameter_group():
    learner = StatsMergeLearner(3, 2, 6, mode="free", scale="learned", init_scale=2.0)
    settings = OptimiserSettings(lr=0.1, schedule="step", step_size=2, gamma=0.5, scale_lr=0.01)
    optimizer, scheduler = build_optimiser(learner, settings, total_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]
    assert optimizer.param_groups[1]["params"][0] is learner.log_scale
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.005]
    cosine = build_optimiser(learner, OptimiserSettings(lr=0.1, schedule="cosine"), 4)
    for _ in range(4):
        cosine[0].step()
        cosine[1].step()
    assert cosine[0].param_groups[0]["lr"] < 1e-12
    with pytest.raises(ValueError, match="option `lr_schedule`"):
        build_optimiser(learner, OptimiserSettings(lr=0.1, schedule="linear"), 4)


@pytest.mark.parametrize("output_norm", ["softmax", "relu", "none"])
def test_zero_logits_are_simple_averaging_and_can_train(output_norm):
    learner = StatsMergeLearner(4, 3, 6, mode="free", output_norm=output_norm, init_scale=1.5)
    coef = learner(None)
    torch.testing.assert_close(coef, torch.full((4, 3), 1.5 / 4))
    coef[0, 0].backward()
    assert learner.logits.grad.abs().sum() > 0  # relu at 0 would give no gradient without the 1/K


def test_invalid_learner_options_name_the_option():
    with pytest.raises(ValueError, match="option `scale`"):
        StatsMergeLearner(2, 2, 6, scale="both")
    with pytest.raises(ValueError, match="option `init_scale`"):
        StatsMergeLearner(2, 2, 6, init_scale=0.0)


def test_coefficient_movement():
    coef = torch.tensor([[0.5, 0.2], [0.5, 0.8]])
    start = torch.tensor([[0.4, 0.5], [0.6, 0.5]])
    moved = coefficient_movement(coef, start)
    assert moved["max_abs_from_uniform"] == pytest.approx(0.3)
    assert moved["mean_abs_from_uniform"] == pytest.approx(0.15)
    assert moved["max_abs_from_start"] == pytest.approx(0.3)
    assert moved["column_sum_min"] == pytest.approx(1.0) and moved["max"] == pytest.approx(0.8)


def test_model_selector_keeps_the_best_and_stops_early():
    best = ModelSelector("best")
    for step, metric in [(0, 0.5), (5, 0.7), (10, 0.7), (15, 0.6)]:
        assert not best.update(step, metric, torch.full((2, 1), float(step)), overall_scale=1.0)
    assert best.best_step == 5 and best.best_coefficients[0, 0] == 5  # ties keep the earlier step
    early = ModelSelector("early_stop", patience=2)
    stops = [early.update(s, m, torch.zeros(1, 1)) for s, m in [(0, 0.5), (1, 0.4), (2, 0.3)]]
    assert stops == [False, False, True] and early.best_step == 0
    with pytest.raises(ValueError, match="option `selection`"):
        ModelSelector("none")


# --- the objective ---------------------------------------------------------------------------------


def test_per_image_losses_average_to_the_batch_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g)
    for kind, T in [("ce_hard", 1.0), ("kl_soft", 1.0), ("kl_soft", 3.0)]:
        per = per_image_distillation_loss(kind, s, t, T)
        assert per.shape == (6,) and (per >= 0).all()
        torch.testing.assert_close(per.mean(), distillation_loss(kind, s, t, T))
    conf = teacher_confidence(t)
    assert ((conf > 0.2) & (conf <= 1)).all()
    weighted = task_loss("ce_hard", s, t, weighting="confidence")
    torch.testing.assert_close(
        weighted, (conf * F.cross_entropy(s, t.argmax(-1), reduction="none")).mean()
    )
    assert weighted < task_loss("ce_hard", s, t, weighting="sum")


def test_relative_weighting_divides_by_the_start():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    assert float(combine_task_losses(losses, "sum")) == 2.5
    assert float(combine_task_losses(losses, "relative", {"a": 4.0, "b": 0.25})) == 2.5
    assert float(combine_task_losses(losses, "relative", {"a": 2.0, "b": 0.5})) == 2.0
    with pytest.raises(ValueError, match="loss at the start"):
        combine_task_losses(losses, "relative", {"a": 1.0})
    with pytest.raises(ValueError, match="option `task_weighting`"):
        combine_task_losses(losses, "max")


def test_one_forward_of_all_tasks_equals_one_forward_per_task():
    """Same logits, loss and gradients: the encoder treats every image on its own (LayerNorm over
    features, not over the batch)."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.GELU())
    heads = {"a": torch.randn(3, 8), "b": torch.randn(4, 8), "c": torch.randn(2, 8)}
    images = {"a": torch.randn(4, 5), "b": torch.randn(2, 5), "c": torch.randn(3, 5)}
    teacher = {t: torch.randn(len(images[t]), len(heads[t])) for t in heads}
    results = []
    for one_forward in (True, False):
        encoder.zero_grad()
        calls = []

        def encode(x):
            calls.append(len(x))
            return encoder(x)

        logits = task_logits(encode, lambda t, f: f @ heads[t].T, images, one_forward)
        loss = combine_task_losses(
            {t: distillation_loss("ce_hard", logits[t], teacher[t]) for t in heads}
        )
        loss.backward()
        results.append((calls, loss.detach(), [p.grad.clone() for p in encoder.parameters()]))
    (calls1, loss1, grads1), (calls2, loss2, grads2) = results
    assert calls1 == [9] and calls2 == [4, 2, 3]
    torch.testing.assert_close(loss1, loss2)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2)


# ---------------------------------------------------------------------------------------------------
# the training loop on plain inputs (method/statsmerging/training.py): no model pool, no CLIP


def toy_training(task_weighting: str = "sum", mode: str = "none", steps: int = 60):
    """A linear "encoder" theta_0 = 0 with one task vector per task; task k's teacher is the model
    with task vector k alone, so the loss falls as lambda_k grows towards 1."""
    from lightning.fabric import Fabric

    from statsmerge_plugin.method.statsmerging.learner import StatsMergeLearner
    from statsmerge_plugin.method.statsmerging.merge import TaskVectorMerge
    from statsmerge_plugin.method.statsmerging.options import nest_flat_options, resolve_options
    from statsmerge_plugin.method.statsmerging.training import LearnerTraining, TeacherDistillation

    torch.manual_seed(0)
    tasks, dim, classes = ["a", "b"], 6, 4
    base = torch.nn.Linear(dim, classes, bias=False).requires_grad_(False)
    base.weight.zero_()
    vectors = {"weight": torch.randn(len(tasks), classes, dim)}
    target = TaskVectorMerge(base, {"weight": base.weight}, vectors)
    images = {t: torch.randn(16, dim) for t in tasks}
    teacher = {t: images[t] @ vectors["weight"][k].T for k, t in enumerate(tasks)}
    groups = nest_flat_options(
        dict(
            lr=0.05,
            init_scale=0.6,
            task_weighting=task_weighting,
            selection=mode,
            eval_every=10,
        )
    )
    top = {"learner": "free", "max_steps": steps, "batch_size_per_task": 4}
    options = resolve_options(top, groups, {})  # validated, as the algorithm's
    objective = TeacherDistillation(
        logits=lambda model, x, t: model(x),
        embeds=lambda model, x: model(x),
        head=lambda t, embeds: embeds,
        to_device=lambda x: x,
        options=options.objective,
    )
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    learner = StatsMergeLearner(len(tasks), 1, 1, mode="free", output_norm="none", init_scale=0.6)
    training = LearnerTraining(fabric, options, objective)
    held = (images, teacher) if mode != "none" else None
    return training.run(tasks, target, learner, torch.zeros(1, 1), (images, teacher), held)


@pytest.mark.parametrize("task_weighting", ["sum", "relative"])
def test_training_loop_runs_on_plain_inputs_and_lowers_the_objective(task_weighting):
    coefficients, losses, report = toy_training(task_weighting)
    assert len(losses) == 60 and all(np.isfinite(losses))
    start, end = report["training_loss_per_task"]["start"], report["training_loss_per_task"]["end"]
    weight = {t: 1 / start[t] if task_weighting == "relative" else 1.0 for t in start}
    assert sum(weight[t] * end[t] for t in end) < sum(weight[t] * start[t] for t in start)
    assert coefficients.shape == (2, 1)
    assert coefficients.sum() > 0.6  # from 0.3 each (0.6 / K) towards the teachers' 1
    assert report["optimiser"]["lr"] == 0.05 and report["selection"] is None


def test_training_loop_selects_on_the_held_out_images():
    coefficients, losses, report = toy_training(mode="best", steps=30)
    selection = report["selection"]
    assert selection["mode"] == "best" and [h["step"] for h in selection["history"]] == [
        0,
        10,
        20,
        30,
    ]
    best = max(selection["history"], key=lambda h: h["metric"])
    assert selection["selected_step"] == best["step"]


def test_backward_groups_follow_the_activation_budget():
    from statsmerge_plugin.method.statsmerging.training import (
        ACTIVATION_BUDGET_BYTES,
        LearnerTraining,
        activation_budget,
    )

    training = LearnerTraining(None, None, None)
    tasks = ["a", "b", "c", "d"]
    batches = {t: torch.arange(4) for t in tasks}
    assert training.backward_group(tasks, batches) == ["a"]  # not measured yet: one task
    training.activation_bytes_per_image = ACTIVATION_BUDGET_BYTES / 8  # two tasks' images fit
    assert training.backward_group(tasks, batches) == ["a", "b"]
    training.activation_bytes_per_image = 0.0
    assert training.backward_group(tasks, batches) == tasks
    # a GPU budget (half of its free memory) takes all four tasks' 16 images in one pass
    training.activation_budget = activation_budget("cuda:0", free_bytes=8 * ACTIVATION_BUDGET_BYTES)
    training.activation_bytes_per_image = ACTIVATION_BUDGET_BYTES / 8
    assert training.backward_group(tasks, batches) == tasks


def test_activation_budget_is_the_host_rule_on_cpu_and_free_memory_on_cuda():
    from statsmerge_plugin.method.statsmerging.training import (
        ACTIVATION_BUDGET_BYTES,
        CUDA_BUDGET_FRACTION,
        activation_budget,
    )

    assert activation_budget("cpu") == ACTIVATION_BUDGET_BYTES
    assert activation_budget(torch.device("cpu"), free_bytes=10**12) == ACTIVATION_BUDGET_BYTES
    free = 20 * 2**30  # 20 GiB free on a 24 GB GPU
    assert activation_budget("cuda:1", free_bytes=free) == int(CUDA_BUDGET_FRACTION * free)
    assert activation_budget("cuda", free_bytes=2**20) < ACTIVATION_BUDGET_BYTES  # a full GPU
