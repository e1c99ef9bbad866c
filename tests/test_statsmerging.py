"""StatsMerging on a tiny random CLIP pool, through FusionBench's real pool and Fabric (no mocks)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import damaged_checkpoint_copy, read_json, with_log_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from tiny_clip import pool_config, with_noise_split

from statsmerge_plugin.data import stack_images
from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP
from statsmerge_plugin.method.statsmerging.images import split_for_selection
from statsmerge_plugin.method.statsmerging.options import FLAT_KEYS, nest_flat_options
from statsmerge_plugin.method.statsmerging.training import distillation_step


def make_pool(cfg: dict):
    return instantiate(DictConfig(cfg), _recursive_=False)


def fast(**kw):
    opts = dict(max_steps=3, num_unlabelled_per_task=8, batch_size_per_task=4, hidden_dim=16)
    return StatsMergingForCLIP(**nest_flat_options(opts | kw))


# the paper's learner and coefficient rule (method=statsmerging/paper), for tests about those
PAPER_RULE = dict(
    learner="shared",
    feature_norm="none",
    output_norm="softmax",
    init_scale=1.0,
    zero_init_output=False,
    lr_schedule="step",
)


def test_run_writes_outputs_and_returns_the_merge_of_its_coefficients(
    tiny_clip, tiny_pool, tmp_path
):
    alg = with_log_dir(fast(), tmp_path)
    merged = alg.run(tiny_pool)
    out = tmp_path / "statsmerging"
    for name in [
        "coefficients.pt",
        "coefficients.csv",
        "statistics.csv",
        "loss.csv",
        "loss.png",
        "coefficients_heatmap.png",
        "summary.json",
    ]:
        assert (out / name).is_file(), name
    saved = torch.load(out / "coefficients.pt")
    coef, names, tasks = saved["coefficients"], saved["tensor_names"], saved["tasks"]
    assert tasks == ["mnist", "eurosat"] and coef.shape == (2, len(names))
    # the default starts every coefficient at init_scale / K (output_norm none, zero-initialised
    # output layer) and three steps move it
    assert torch.isfinite(coef).all()
    assert not torch.allclose(
        coef, torch.full_like(coef, alg.options.coefficients.init_scale / len(tasks))
    )
    assert_is_the_merge_of(merged, tiny_pool, coef, names)
    rows = list(csv.reader(open(out / "coefficients.csv")))
    assert rows[0] == ["task", *names] and [r[0] for r in rows[1:]] == tasks
    stats_rows = list(csv.reader(open(out / "statistics.csv")))
    assert stats_rows[0] == [
        "task",
        "tensor",
        "mean",
        "variance",
        "l2_norm",
        "sigma_1",
        "sigma_2",
        "sigma_3",
    ]
    assert len(stats_rows) == 1 + 2 * len(names)
    summary = read_json(out / "summary.json")
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    # what was actually read: the val split's real path and its Hugging Face fingerprint
    from datasets import load_from_disk

    val = tiny_clip["data"][("mnist", "val")]
    read = summary["unlabelled_data"]["mnist"]
    assert read["split"] == "val" and read["num_images"] == 8 and read["num_rows"] == 16
    assert read["paths"] == [str(Path(val).resolve())]
    assert read["fingerprint"] == load_from_disk(str(val))._fingerprint


def assert_is_the_merge_of(merged, pool, coef, names):
    """``merged`` is theta_0 + sum_k coef[k, l] tau_k for every tensor ``names[l]``."""
    base = pool.load_pretrained_model()
    fts = [pool.load_model(t) for t in pool.model_names]
    for l, name in enumerate(names):
        b = base.get_parameter(name)
        want = b + sum(coef[k, l] * (ft.get_parameter(name) - b) for k, ft in enumerate(fts))
        torch.testing.assert_close(merged.get_parameter(name), want, atol=1e-6, rtol=1e-5)


def test_outputs_are_never_overwritten(tiny_pool, tmp_path):
    with_log_dir(fast(max_steps=1), tmp_path).run(tiny_pool)
    first = (tmp_path / "statsmerging" / "coefficients.csv").read_bytes()
    with_log_dir(fast(max_steps=2, seed=1), tmp_path).run(tiny_pool)
    assert (tmp_path / "statsmerging" / "coefficients.csv").read_bytes() == first
    assert (tmp_path / "statsmerging_1" / "coefficients.csv").is_file()


@pytest.mark.parametrize("granularity", ["layer_wise", "task_wise"])
@pytest.mark.parametrize("learner", ["shared", "per_tensor", "free"])
def test_every_variant_trains(tiny_pool, tmp_path, granularity, learner):
    alg = with_log_dir(fast(granularity=granularity, learner=learner, lr=1e-2), tmp_path)
    alg.run(tiny_pool)
    coef = torch.load(tmp_path / "statsmerging" / "coefficients.pt")["coefficients"]
    assert coef.shape[1] == (1 if granularity == "task_wise" else 39)
    assert torch.isfinite(coef).all()
    if learner == "free":  # starts uniform; training must move it
        assert (coef - 0.5).abs().max() > 1e-3
    losses = [
        float(r[1]) for r in list(csv.reader(open(tmp_path / "statsmerging" / "loss.csv")))[1:]
    ]
    assert len(losses) == 3 and all(np.isfinite(losses))


def prepared(tiny_pool):
    """The algorithm's state just before training: heads, base model, images, task models loaded."""
    from statsmerge_plugin.data import held_out_images
    from statsmerge_plugin.method.statsmerging.merge import TaskVectorMerge
    from statsmerge_plugin.validation import trainable_state

    alg = fast()
    alg.modelpool = tiny_pool
    tasks = tiny_pool.model_names
    alg.setup_zero_shot_classification_head(task_names=tasks)
    base = tiny_pool.load_pretrained_model().requires_grad_(False)
    images = {t: stack_images(held_out_images(tiny_pool, t, alg.clip_processor, 8)) for t in tasks}
    tvs, feats, teacher = alg.load_task_models(tasks, trainable_state(base), images)
    return alg, tasks, TaskVectorMerge(base, trainable_state(base), tvs), images, feats, teacher


def test_algorithm_gradients_reach_the_learner_only(tiny_pool):
    alg, tasks, target, images, feats, teacher = prepared(tiny_pool)
    features = alg.learner_features(target.task_vectors, feats, target.names)
    learner = alg.build_learner(len(tasks), features)
    batches = {t: torch.arange(4) for t in tasks}
    objective = alg.teacher_distillation()
    distillation_step(learner, features, target, objective, images, teacher, batches).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    assert all(p.grad is None for p in target.base.parameters())
    assert all(p.grad is None for p in alg.visual_projection.parameters())
    frozen = [*target.task_vectors.values(), *teacher.values(), *alg.zeroshot_weights.values()]
    assert not any(t.requires_grad for t in frozen)


def test_teacher_labels_come_from_each_tasks_own_finetuned_model(tiny_pool):
    alg, tasks, _, images, _, teacher = prepared(tiny_pool)
    for t in tasks:
        with torch.no_grad():
            want = alg.compute_logits(tiny_pool.load_model(t), images[t], t)
        torch.testing.assert_close(teacher[t], want)


@pytest.fixture(scope="module")
def reference_run(tiny_clip, tmp_path_factory):
    """Coefficients and merged weights of one run on the unmodified tiny pool."""
    return coefficients_and_weights(
        make_pool(pool_config(tiny_clip)), tmp_path_factory.mktemp("ref")
    )


def coefficients_and_weights(pool, log_dir: Path):
    merged = with_log_dir(fast(max_steps=4), log_dir).run(pool)
    coef = torch.load(log_dir / "statsmerging" / "coefficients.pt")["coefficients"]
    return coef, {n: p.detach().clone() for n, p in merged.named_parameters()}


@pytest.mark.parametrize("split, identical", [("test", True), ("val", False)])
def test_poisoned_split_changes_training_outputs_only_if_it_is_read(
    tiny_clip, tmp_path, reference_run, split, identical
):
    """Every test image and label replaced by noise: coefficients and merged weights bit-identical.
    The same poisoning of the val split (the training data) changes them: the check can fail."""
    poisoned = make_pool(pool_config(with_noise_split(tiny_clip, split, tmp_path)))
    coef, weights = coefficients_and_weights(poisoned, tmp_path / "run")
    ref_coef, ref_weights = reference_run
    same = torch.equal(coef, ref_coef) and all(
        torch.equal(weights[n], ref_weights[n]) for n in weights
    )
    assert same is identical


def test_test_split_is_never_read(tiny_clip):
    cfg = pool_config(tiny_clip)
    for task in cfg["test_datasets"]:
        cfg["test_datasets"][task]["dataset_path"] = "/nonexistent/test/split/must/not/be/read"
    fast(max_steps=1).run(
        make_pool(cfg)
    )  # would raise FileNotFoundError if any test split were loaded


def test_train_slice_is_used_when_the_pool_has_no_val_split(tiny_clip, tmp_path):
    cfg = pool_config(tiny_clip, splits=("train", "test"))
    with_log_dir(fast(max_steps=1), tmp_path).run(make_pool(cfg))
    summary = read_json(tmp_path / "statsmerging" / "summary.json")
    assert summary["unlabelled_data"]["eurosat"]["split"] == "train"


# ---------------------------------------------------------------------------------------------------
# bad input: one clear error naming the culprit, before any training


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def test_svd_rank_zero_is_refused_while_singular_values_are_features():
    with pytest.raises(ValueError, match=r"`features.svd_rank=0` leaves no singular values"):
        StatsMergingForCLIP(features={"svd_rank": 0})
    # without singular values among the features, rank 0 is valid (no sigma columns)
    alg = StatsMergingForCLIP(features={"svd_rank": 0, "stat_features": ["mean", "l2_norm"]})
    assert alg.options.features.svd_rank == 0


@pytest.mark.parametrize(
    "option, value",
    [
        ("granularity", "block_wise"),
        ("learner", "mlp"),
        ("loss", "mse"),
        ("data_source", "test"),
        ("feature_norm", "zscore"),
        ("svd_rank", -1),
        ("max_steps", 0),
        ("lr", -1.0),
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("temperature", float("inf")),
        ("lr_gamma", float("nan")),
        ("output_norm", "tanh"),
        ("batch_size_per_task", 2.5),
        ("teacher_batch_size", 0.5),
        ("num_unlabelled_per_task", 7.5),
        ("hidden_dim", 16.0),
        ("svd_rank", 1.5),
        ("seed", -1),
        ("overwrite", "yes"),
        ("feature_norm", "robust"),
        ("scale", "both"),
        ("init_scale", 0.0),
        ("init_scale", float("nan")),
        ("scale_lr", -0.1),
        ("lr", 0.0),
        ("lr_schedule", "linear"),
        ("task_weighting", "max"),
        ("selection", "last"),
        ("selection_fraction", 1.0),
        ("selection_fraction", 0.0),
        ("selection_metric", "accuracy"),
        ("eval_every", 0),
        ("patience", 0),
        ("stat_features", ["mean", "kurtosis"]),
        ("stat_features", []),
    ],
)
def test_invalid_options_name_the_option(option, value):
    """Named by its key, in its group (the flat names of the parametrisation are the old ones)."""
    key = ".".join(FLAT_KEYS[option]) if option in FLAT_KEYS else option
    with pytest.raises(ValueError, match=f"invalid value .* for option `{key}`"):
        StatsMergingForCLIP(**nest_flat_options({option: value}))


@pytest.mark.parametrize(
    "max_steps, message",
    [
        # one huge Adam step: the learner's weights overflow, so do the coefficients
        (1, r"StatsMerging: \d+ learned coefficient\(s\) are NaN or inf \(first: task 'mnist', "),
        # the next step's loss is not finite: training stops there, naming the step
        (3, r"StatsMerging: the training loss is (nan|inf) at step 2 of 3; stopping before"),
    ],
)
def test_non_finite_training_stops_before_anything_is_saved(
    tiny_pool, tmp_path, max_steps, message
):
    alg = with_log_dir(fast(**PAPER_RULE | dict(max_steps=max_steps, lr=1e30)), tmp_path)
    with pytest.raises(FloatingPointError, match=message):
        alg.run(tiny_pool)
    assert not (tmp_path / "statsmerging").exists()


def test_pool_without_pretrained_model(tiny_clip):
    cfg = pool_config(tiny_clip)
    cfg["models"] = without(cfg["models"], "_pretrained_")
    with pytest.raises(ValueError, match="_pretrained_"):
        fast().run(make_pool(cfg))


def test_fewer_than_two_task_models(tiny_clip):
    cfg = pool_config(tiny_clip)
    cfg["models"] = without(cfg["models"], "eurosat")
    with pytest.raises(ValueError, match=r"at least 2 task models.*\['mnist'\]"):
        fast().run(make_pool(cfg))


def test_task_without_unlabelled_data(tiny_clip):
    cfg = pool_config(tiny_clip)
    cfg["val_datasets"] = without(cfg["val_datasets"], "eurosat")
    cfg["train_datasets"] = without(cfg["train_datasets"], "eurosat")
    with pytest.raises(ValueError, match="'eurosat' has no unlabelled data"):
        fast().run(make_pool(cfg))


def test_val_split_that_is_the_test_split_is_refused_before_training(tiny_clip):
    """The trailing-slash case; the other ways a val split can be a test set: test_reliability.py."""
    cfg = pool_config(tiny_clip)
    cfg["val_datasets"]["mnist"]["dataset_path"] = (
        cfg["test_datasets"]["mnist"]["dataset_path"] + "/"
    )
    alg = fast()
    with pytest.raises(
        ValueError,
        match="task 'mnist': its 'val' dataset reads .*data_mnist_test', which is the test",
    ):
        alg.run(make_pool(cfg))
    assert not hasattr(alg, "rank_max_abs_diff")  # never trained


def test_fewer_unlabelled_images_than_asked(tiny_pool):
    with pytest.raises(ValueError, match="'mnist': asked for 1000 unlabelled images"):
        fast(num_unlabelled_per_task=1000).run(tiny_pool)


def test_task_without_class_names(tiny_clip):
    cfg = pool_config(tiny_clip)
    cfg["models"]["no_such_task_xyz"] = cfg["models"].pop("eurosat")
    with pytest.raises(ValueError, match="'no_such_task_xyz' has no class names"):
        fast().run(make_pool(cfg))


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"hidden": 48}, "model 'eurosat': parameter '.*' has shape .*'_pretrained_' has"),
        ({"num_layers": 3}, "model 'eurosat' does not have the parameters.*layers.2"),
    ],
)
def test_mismatched_models_name_model_and_parameter(tiny_clip, tmp_path, variant, message):
    from tiny_clip import build_tiny_clip

    other = build_tiny_clip(tmp_path / "other", tasks=("mnist",), n_images=4, **variant)
    cfg = pool_config(tiny_clip)
    cfg["models"]["eurosat"] = str(other["models"]["mnist"])
    with pytest.raises(ValueError, match=message):
        fast().run(make_pool(cfg))


def test_nan_weights_name_model_and_parameter(tiny_clip, tmp_path):
    from transformers import CLIPVisionModel

    broken = CLIPVisionModel.from_pretrained(tiny_clip["models"]["eurosat"])
    with torch.no_grad():
        broken.vision_model.post_layernorm.weight[0] = float("nan")
    broken.save_pretrained(tmp_path / "nan_model")
    cfg = pool_config(tiny_clip)
    cfg["models"]["eurosat"] = str(tmp_path / "nan_model")
    with pytest.raises(ValueError, match="model 'eurosat': parameter 'post_layernorm.weight'.*NaN"):
        fast().run(make_pool(cfg))


def test_task_models_are_validated_before_any_data_is_loaded(tiny_clip, tmp_path):
    """A bad *last* task model is found before data loading (here the data would fail to load)."""
    from transformers import CLIPVisionModel

    broken = CLIPVisionModel.from_pretrained(tiny_clip["models"]["eurosat"])
    with torch.no_grad():
        broken.vision_model.encoder.layers[1].mlp.fc2.bias[0] = float("inf")
    broken.save_pretrained(tmp_path / "inf_model")
    cfg = pool_config(tiny_clip)
    cfg["models"]["eurosat"] = str(tmp_path / "inf_model")
    for split in ("val", "train"):
        cfg[f"{split}_datasets"]["mnist"]["dataset_path"] = str(tmp_path / "no_such_dataset")
    with pytest.raises(
        ValueError, match="model 'eurosat': parameter 'encoder.layers.1.mlp.fc2.bias'"
    ):
        fast().run(make_pool(cfg))


@pytest.mark.parametrize("model", ["eurosat", "_pretrained_"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_checkpoint_names_model_and_file(tiny_clip, tmp_path, model, damage):
    src = tiny_clip["pretrained"] if model == "_pretrained_" else tiny_clip["models"][model]
    weights = damaged_checkpoint_copy(src, tmp_path, damage)
    cfg = pool_config(tiny_clip)
    cfg["models"][model] = str(weights.parent)
    with pytest.raises(ValueError, match=f"model '{model}'.*{weights}"):
        fast().run(make_pool(cfg))


# ---------------------------------------------------------------------------------------------------
# issue 9: one forward per step, a control that moves, the objective's options, model selection


def test_one_merged_forward_gives_the_loss_and_gradients_of_one_forward_per_task(tiny_pool):
    alg, tasks, target, images, feats, teacher = prepared(tiny_pool)
    features = alg.learner_features(target.task_vectors, feats, target.names)
    batches = {t: torch.tensor([3, 0, 5, 1]) for t in tasks}
    objective = alg.teacher_distillation()
    results = []
    for one_forward in (True, False):
        torch.manual_seed(0)
        learner = alg.build_learner(len(tasks), features)
        loss = distillation_step(
            learner, features, target, objective, images, teacher, batches, one_forward=one_forward
        )
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in learner.parameters()]))
    (loss1, grads1), (loss2, grads2) = results
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads1)


class LiveSavedBytes:
    """The largest total size of the tensors autograd holds for backward at any one time (each
    storage once), while active: a saved tensor counts until autograd releases it."""

    def __init__(self):
        self.live, self.peak, self.counted = 0, 0, {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.counted:
            self.counted[ptr] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        return Holder(tensor, self, ptr)

    def release(self, ptr):
        self.live -= self.counted.pop(ptr, 0)

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda h: h.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class Holder:
    def __init__(self, tensor, owner, ptr):
        self.tensor, self.owner, self.ptr = tensor, owner, ptr

    def __del__(self):
        self.owner.release(self.ptr)


def test_backward_task_by_task_gives_the_gradient_of_one_backward_and_holds_one_tasks_activations(
    tiny_pool, monkeypatch
):
    """The training step (``distillation_backward``) back-propagates task by task through merged
    tensors built once: the same objective and learner gradient as one backward of the summed
    objective through the differentiable merge, with the saved activations of one task at a time
    (one backward of all tasks holds all of them), whatever the grouping; no merged tensor keeps
    a gradient."""
    alg, tasks, target, images, feats, teacher = prepared(tiny_pool)
    features = alg.learner_features(target.task_vectors, feats, target.names)
    batches = {t: torch.tensor([3, 0, 5, 1]) for t in tasks}
    start = {t: 0.5 + k for k, t in enumerate(tasks)}
    alg.options.objective.task_weighting = "relative"  # each task's part over its start loss
    training = alg.learner_training()

    import statsmerge_plugin.method.statsmerging.training as module

    tracker = LiveSavedBytes()

    class Tracked(module.SavedActivations):  # the method's own (inner) hooks report to tracker
        def _pack(self, tensor):
            super()._pack(tensor)
            return tracker.pack(tensor)

        def _unpack(self, holder):
            return holder.tensor

    monkeypatch.setattr(module, "SavedActivations", Tracked)

    def learner_and_grads(step):
        torch.manual_seed(0)
        learner = alg.build_learner(len(tasks), features)
        tracker.live, tracker.peak = 0, 0
        with tracker:
            loss = step(learner)
        return loss, [p.grad.clone() for p in learner.parameters()], tracker.peak

    def one_backward(learner):
        objective = training.objective
        loss = distillation_step(
            learner, features, target, objective, images, teacher, batches, start
        )
        loss.backward()
        return loss.detach()

    def by_groups(per_image):
        def step(learner):
            training.activation_bytes_per_image = per_image
            return training.backward(learner, features, target, images, teacher, batches, start)

        return step

    ref_loss, ref_grads, ref_peak = learner_and_grads(one_backward)
    assert any(g.abs().sum() > 0 for g in ref_grads)
    runs = {
        "measured": by_groups(None),  # first task alone, measured; then by the budget
        "one task at a time": by_groups(float("inf")),
        "all tasks together": by_groups(0.0),
    }
    peaks = {}
    for name, step in runs.items():
        loss, grads, peaks[name] = learner_and_grads(step)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=name)
        for g, want in zip(grads, ref_grads):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-7, msg=name)
        if name == "measured":
            assert training.activation_bytes_per_image > 0
    # one task's activations at a time: about 1 / K of one backward over every task's images
    # (K = 2 here); no backward holds more than one through the differentiable merge (which also
    # keeps the task vectors for the merge's own backward)
    assert peaks["one task at a time"] < 0.65 * peaks["all tasks together"], peaks
    assert peaks["all tasks together"] <= ref_peak, (peaks, ref_peak)
    assert all(p.grad is None for p in target.base.parameters())


def test_leaf_merge_folds_each_tensors_gradient_into_the_coefficients():
    from statsmerge_plugin.method.statsmerging.merge import LeafMerge, TaskVectorMerge

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    base.requires_grad_(False)
    pretrained = dict(base.named_parameters())
    tvs = {n: 0.1 * torch.randn(2, *p.shape) for n, p in pretrained.items()}
    target = TaskVectorMerge(base, pretrained, tvs)
    x = torch.randn(6, 5)
    for coefficients in (torch.rand(2, 4), torch.rand(2, 1)):  # layer-wise, task-wise
        c = coefficients.clone().requires_grad_(True)
        target.model(c)(x).pow(2).sum().backward()
        with LeafMerge(target, coefficients) as merge:
            for half in (x[:3], x[3:]):  # two backward passes accumulate
                merge.model()(half).pow(2).sum().backward()
                assert all(w.grad is None for w in merge.state.values())
            torch.testing.assert_close(merge.grad, c.grad)
            leaves = list(merge.state.values())
        assert merge.state == {} and all(not w._post_accumulate_grad_hooks for w in leaves)
    with pytest.raises(ValueError, match=r"coefficients must have shape \[K, 4\]"):
        LeafMerge(target, torch.rand(2, 3))


def test_in_place_merge_gives_the_same_gradients_and_restores_theta_0():
    """``in_place``: the step's leaves are theta_0's own storage holding the merge (no second
    model-sized tensor), the coefficients' gradient is the one of the differentiable merge, and
    leaving the block (also by an error) gives theta_0 back up to float rounding."""
    from statsmerge_plugin.method.statsmerging.merge import LeafMerge, TaskVectorMerge

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    base.requires_grad_(False)
    pretrained = {n: p.detach() for n, p in base.named_parameters()}
    original = {n: p.clone() for n, p in pretrained.items()}
    tvs = {n: 0.1 * torch.randn(2, *p.shape) for n, p in pretrained.items()}
    target = TaskVectorMerge(base, pretrained, tvs)
    x = torch.randn(6, 5)
    for coefficients in (torch.rand(2, 4), torch.rand(2, 1)):  # layer-wise, task-wise
        want = target.state(coefficients)
        c = coefficients.clone().requires_grad_(True)
        target.model(c)(x).pow(2).sum().backward()
        with LeafMerge(target, coefficients, in_place=True) as merge:
            for name, leaf in merge.state.items():
                assert leaf.data_ptr() == pretrained[name].data_ptr(), name
                torch.testing.assert_close(leaf.detach(), want[name])
            with pytest.raises(RuntimeError, match="holds a merge in place"):
                target.state(coefficients)  # theta_0 is the merge now: no merge on top of it
            merge.model()(x).pow(2).sum().backward()
            torch.testing.assert_close(merge.grad, c.grad)
        for name in pretrained:
            torch.testing.assert_close(pretrained[name], original[name], rtol=0, atol=1e-6)
    with pytest.raises(ZeroDivisionError):
        with target.merged_model(torch.rand(2, 4), in_place=True):
            1 / 0
    for name in pretrained:
        torch.testing.assert_close(pretrained[name], original[name], rtol=0, atol=1e-6)
    assert torch.equal(target.state(torch.zeros(2, 1))["0.weight"], pretrained["0.weight"])


@pytest.mark.parametrize("in_place", [True, False])
def test_final_merge_is_exactly_theta_0_plus_the_coefficients_merge(tiny_pool, tmp_path, in_place):
    """The in-place merges of training round theta_0; the returned model starts again from theta_0
    as loaded: bit for bit the merge rule applied to the pool's models with the saved
    coefficients."""
    from statsmerge_plugin.method.statsmerging.merge import merge_tensor

    alg = with_log_dir(fast(merge_in_place=in_place), tmp_path)
    merged = alg.run(tiny_pool)
    saved = torch.load(tmp_path / "statsmerging" / "coefficients.pt")
    base = tiny_pool.load_pretrained_model()
    fts = [tiny_pool.load_model(t) for t in tiny_pool.model_names]
    for l, name in enumerate(saved["tensor_names"]):
        b = base.get_parameter(name).detach()
        tvs = torch.stack([ft.get_parameter(name).detach() - b for ft in fts])
        want = merge_tensor(b, tvs, saved["coefficients"][:, l], name)
        assert torch.equal(merged.get_parameter(name).detach(), want), name


def summary_and_coefficients(log_dir: Path):
    out = log_dir / "statsmerging"
    return read_json(out / "summary.json"), torch.load(out / "coefficients.pt")["coefficients"]


@pytest.mark.parametrize("lr, moves", [(None, True), (1e-3, False)])
def test_free_control_moves_with_its_default_learning_rate(tiny_pool, tmp_path, lr, moves):
    alg = with_log_dir(fast(**PAPER_RULE | dict(learner="free", lr=lr, max_steps=5)), tmp_path)
    alg.run(tiny_pool)
    summary, coef = summary_and_coefficients(tmp_path)
    moved = summary["coefficient_movement"]
    assert moved["max_abs_from_uniform"] == pytest.approx(float((coef - 0.5).abs().max()), abs=1e-6)
    assert moved["max_abs_from_start"] == pytest.approx(moved["max_abs_from_uniform"], abs=1e-6)
    assert summary["optimiser"]["lr"] == (0.05 if lr is None else lr)
    assert (moved["max_abs_from_uniform"] > 0.05) is moves  # 5 Adam steps at 5e-2 vs at 1e-3


def test_relative_weighting_starts_at_one_per_task(tiny_pool, tmp_path):
    """Each task's loss is divided by its value at the start on all its training images: with a batch
    that is all of them, the first step's objective is the number of tasks."""
    alg = with_log_dir(
        fast(task_weighting="relative", batch_size_per_task=8, max_steps=2), tmp_path
    )
    alg.run(tiny_pool)
    summary = read_json(tmp_path / "statsmerging" / "summary.json")
    losses = [
        float(r[1]) for r in list(csv.reader(open(tmp_path / "statsmerging" / "loss.csv")))[1:]
    ]
    assert losses[0] == pytest.approx(2.0, rel=1e-4)
    start = summary["training_loss_per_task"]["start"]
    assert set(start) == {"mnist", "eurosat"} and all(v > 0 for v in start.values())


def test_confidence_weighting_lowers_the_objective(tiny_pool, tmp_path):
    alg = with_log_dir(fast(max_steps=1), tmp_path / "sum")
    alg.run(tiny_pool)
    plain = read_json(tmp_path / "sum" / "statsmerging" / "summary.json")
    alg = with_log_dir(fast(max_steps=1, task_weighting="confidence"), tmp_path / "conf")
    alg.run(tiny_pool)
    weighted = read_json(tmp_path / "conf" / "statsmerging" / "summary.json")
    for task, loss in plain["training_loss_per_task"]["start"].items():
        assert 0 < weighted["training_loss_per_task"]["start"][task] < loss


def test_selection_images_are_held_out_of_training():
    alg = fast(selection="best", selection_fraction=0.25)
    images = {"a": torch.arange(12.0)[:, None], "b": torch.arange(100.0, 108.0)[:, None]}
    teacher = {t: x.clone() for t, x in images.items()}
    read = {"a": {}, "b": {}}
    (train, train_teacher), (held, held_teacher) = split_for_selection(
        ["a", "b"], images, teacher, read, alg.options
    )
    for t in images:
        kept, out = set(train[t].flatten().tolist()), set(held[t].flatten().tolist())
        assert not kept & out and kept | out == set(images[t].flatten().tolist())
        torch.testing.assert_close(train_teacher[t], train[t])  # labels follow their images
        torch.testing.assert_close(held_teacher[t], held[t])
    assert read["a"] == {"num_training_images": 9, "num_selection_images": 3}
    assert read["b"] == {"num_training_images": 6, "num_selection_images": 2}


@pytest.mark.parametrize("selection", ["best", "early_stop"])
def test_model_selection_returns_the_best_evaluated_step(tiny_pool, tmp_path, selection):
    alg = with_log_dir(
        fast(
            selection=selection,
            eval_every=1,
            patience=1,
            max_steps=6,
            learner="free",
            # loss improves at every step here; agreement on two images mostly ties (no improvement)
            selection_metric="loss" if selection == "best" else "agreement",
        ),
        tmp_path,
    )
    merged = alg.run(tiny_pool)
    summary, coef = summary_and_coefficients(tmp_path)
    chosen = summary["selection"]
    metrics = [h["metric"] for h in chosen["history"]]
    assert chosen["history"][0]["step"] == 0  # the start is a candidate: never worse than it
    assert chosen["selected_metric"] == max(metrics) >= metrics[0]
    assert chosen["selected_step"] == chosen["history"][metrics.index(max(metrics))]["step"]
    assert summary["unlabelled_data"]["mnist"]["num_selection_images"] == 2
    assert summary["unlabelled_data"]["mnist"]["num_training_images"] == 6
    if selection == "early_stop":  # stopped at the first evaluation that did not improve
        assert summary["steps"] == chosen["history"][-1]["step"]
        assert summary["steps"] < 6 and metrics[-1] <= max(metrics[:-1])
    # the returned model is the merge of the selected coefficients
    names = torch.load(tmp_path / "statsmerging" / "coefficients.pt")["tensor_names"]
    assert_is_the_merge_of(merged, tiny_pool, coef, names)


@pytest.mark.parametrize("granularity", ["layer_wise", "task_wise"])
@pytest.mark.parametrize("learner", ["shared", "per_tensor"])
@pytest.mark.parametrize("norm", ["standardize", "log_standardize"])
def test_feature_normalisation_works_for_every_granularity(tiny_pool, granularity, learner, norm):
    alg, tasks, target, images, feats, teacher = prepared(tiny_pool)
    o = alg.options
    o.granularity, o.learner, o.features.feature_norm = granularity, learner, norm
    features = alg.learner_features(target.task_vectors, feats, target.names)
    assert torch.isfinite(features).all()
    assert features.abs().sum() > 0  # a single task-wise row used to standardise to all zeros
    rows = 1 if granularity == "task_wise" else len(target.names)
    assert features.shape[-2] == rows
    if learner == "shared" and granularity == "task_wise":  # the tasks stay distinguishable
        assert (features[0] - features[1]).abs().max() > 1e-3


def test_stat_features_choose_the_learners_inputs(tiny_pool):
    alg, tasks, target, images, feats, teacher = prepared(tiny_pool)
    o = alg.options
    o.learner, o.features.feature_norm = "shared", "none"
    o.features.stat_features = ["mean", "l2_norm"]
    shared = alg.learner_features(target.task_vectors, feats, target.names)
    torch.testing.assert_close(shared, feats[..., [0, 2]])
    o.learner = "per_tensor"
    assert alg.learner_features(target.task_vectors, feats, target.names).shape[-1] == 2


def test_learned_scale_is_reported(tiny_pool, tmp_path):
    alg = with_log_dir(
        fast(output_norm="softmax", scale="learned", init_scale=1.5, scale_lr=0.1), tmp_path
    )
    alg.run(tiny_pool)
    summary, coef = summary_and_coefficients(tmp_path)
    assert summary["overall_scale"] != 1.5 and summary["optimiser"]["scale_lr"] == 0.1
    torch.testing.assert_close(coef.sum(0), torch.full((coef.shape[1],), summary["overall_scale"]))


def test_whole_split_is_streamed_a_batch_at_a_time_never_stacked(tiny_pool, tmp_path, monkeypatch):
    """``num_unlabelled_per_task: null`` reads the whole held-out split: its images are processed
    when used (the values stacking gives), never held as one tensor."""
    import statsmerge_plugin.method.statsmerging.images as module
    from statsmerge_plugin.data import held_out_images

    alg = fast()
    alg.modelpool = tiny_pool
    unlabelled = held_out_images(tiny_pool, "mnist", alg.clip_processor, None)
    streamed = module.StreamedImages(unlabelled)
    stacked = stack_images(unlabelled)
    assert len(streamed) == len(stacked) == 16
    torch.testing.assert_close(torch.cat(list(streamed.split(5))), stacked)
    idx = torch.tensor([7, 2, 11])
    torch.testing.assert_close(module.take(streamed, idx), stacked[idx])
    part = module.select(streamed, idx)
    assert isinstance(part, module.StreamedImages)
    torch.testing.assert_close(module.take(part, torch.tensor([2, 0])), stacked[[11, 7]])

    def refuse(images, *args, **kwargs):
        raise AssertionError(f"stacked {len(images)} images")

    monkeypatch.setattr(module, "stack_images", refuse)
    for selection in ("none", "best"):
        run = with_log_dir(
            fast(num_unlabelled_per_task=None, max_steps=2, selection=selection, eval_every=1),
            tmp_path / selection,
        )
        run.run(tiny_pool)
        summary = read_json(tmp_path / selection / "statsmerging" / "summary.json")
        assert summary["steps"] == 2
        assert summary["unlabelled_data"]["mnist"]["num_images"] == 16
