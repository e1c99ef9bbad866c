"""StatsMerging on a tiny random CLIP pool, through FusionBench's real pool and Fabric (no mocks)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import read_json
from hydra.utils import instantiate
from lightning.fabric.loggers import TensorBoardLogger
from omegaconf import DictConfig
from tiny_clip import pool_config, with_noise_split

from statsmerge_plugin.data import stack_images
from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP


def make_pool(cfg: dict):
    return instantiate(DictConfig(cfg), _recursive_=False)


def with_log_dir(alg, log_dir: Path):
    fabric = L.Fabric(
        accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(log_dir), name="", version="")
    )
    fabric.launch()
    alg.fabric = fabric
    return alg


def fast(**kw):
    opts = dict(max_steps=3, num_unlabelled_per_task=8, batch_size_per_task=4, hidden_dim=16)
    return StatsMergingForCLIP(**(opts | kw))


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
    torch.testing.assert_close(coef.sum(0), torch.ones(len(names)))
    base = tiny_pool.load_pretrained_model()
    fts = [tiny_pool.load_model(t) for t in tasks]
    for l, name in enumerate(names):
        b = base.get_parameter(name)
        want = b + sum(coef[k, l] * (ft.get_parameter(name) - b) for k, ft in enumerate(fts))
        torch.testing.assert_close(merged.get_parameter(name), want, atol=1e-6, rtol=1e-5)
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
    alg.distillation_step(learner, features, target, images, teacher, batches).backward()
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
    ],
)
def test_invalid_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=f"invalid value .* for option `{option}`"):
        StatsMergingForCLIP(**{option: value})


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
    alg = with_log_dir(fast(max_steps=max_steps, lr=1e30), tmp_path)
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
    import shutil

    src = tiny_clip["pretrained"] if model == "_pretrained_" else tiny_clip["models"][model]
    copy = Path(shutil.copytree(src, tmp_path / "damaged"))
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else b"not safetensors" * 64
    )
    cfg = pool_config(tiny_clip)
    cfg["models"][model] = str(copy)
    with pytest.raises(ValueError, match=f"model '{model}'.*{weights}"):
        fast().run(make_pool(cfg))
