"""Tests of ProDistill (``statsmerge_plugin.method.prodistill``) on the tiny random CLIP pool.

Real FusionBench classes throughout (``CLIPVisionModelPool``, ``CLIPVisionModelTaskPool``, the
``fusion_bench`` CLI); nothing is mocked. Accuracies of random weights mean nothing, so the tests
assert behaviour: the merge rule, decreasing block losses, exact recovery of a single fine-tuned
model, equivalence of the weight-reading paths, that the test split is never read, and the errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import damaged_checkpoint_copy, write_tiny_configs
from fusion_bench.utils import instantiate
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from statsmerge_plugin.data import held_out_images, stack_images
from statsmerge_plugin.method.prodistill import ProDistillForCLIP
from statsmerge_plugin.method.prodistill.activations import (
    DualStreamCache,
    _StagingRing,
    block_working_bytes,
    cache_placement,
    stack_task_ids,
    staged_gather,
)
from statsmerge_plugin.method.prodistill.merge import (
    block_loss,
    init_coefficients,
    merge_elementwise,
    stack_task_vectors,
    task_arithmetic,
    task_vectors,
)
from statsmerge_plugin.model_io import make_reader

sys.path.insert(0, str(Path(__file__).parent))
from tiny_clip import build_tiny_clip, pool_config, with_noise_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = dict(shots_per_task=8, epochs_per_block=4, batch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def tiny(tiny_clip):
    """The session's tiny CLIP pool (conftest.py): 16 images per task and split."""
    return tiny_clip


def make_pool(cfg: dict):
    return instantiate(DictConfig(cfg))


def copy_model(src: Path, dst: Path, edit=None) -> Path:
    """Copy a saved CLIPVisionModel directory, optionally editing its state dict."""
    shutil.copytree(src, dst)
    if edit is not None:
        state = load_file(str(dst / "model.safetensors"))
        edit(state)
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def block_state(model, index):
    prefix = f"vision_model.encoder.layers.{index}."
    return {
        n[len(prefix) :]: p.detach() for n, p in model.named_parameters() if n.startswith(prefix)
    }


# ------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------


def test_merge_rule_is_elementwise_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    taus = [task_vectors(base, ft) for ft in fts]
    stacked = stack_task_vectors(taus)
    assert stacked["w"].shape == (2, 3, 4)
    coef = init_coefficients(stacked, 0.3)
    assert all(torch.all(c == 0.3) for c in coef.values())
    # element-wise: a different coefficient at every position and for every task
    coef = {k: torch.rand(v.shape, generator=g).requires_grad_(True) for k, v in stacked.items()}
    merged = merge_elementwise(base, stacked, coef)
    for k in base:
        expected = base[k] + coef[k][0] * taus[0][k] + coef[k][1] * taus[1][k]
        torch.testing.assert_close(merged[k], expected)
    # d merged / d alpha_i = tau_i
    merged["w"].sum().backward()
    torch.testing.assert_close(coef["w"].grad, stacked["w"])
    # uniform coefficients == task arithmetic
    uniform = {k: torch.full_like(v, 0.3) for k, v in stacked.items()}
    ta = task_arithmetic(base, fts, 0.3)
    for k in base:
        torch.testing.assert_close(merge_elementwise(base, stacked, uniform)[k], ta[k])
        torch.testing.assert_close(ta[k], base[k] + 0.3 * (taus[0][k] + taus[1][k]))


def test_block_loss_is_sum_of_squared_feature_error():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[0.0, 2.0], [5.0, 4.0]]])
    assert block_loss(s, t).item() == pytest.approx(1.0 + 4.0)
    assert block_loss(s, t, "mean").item() == pytest.approx(5.0)  # one sample
    two = torch.cat([s, s + 1.0])  # the second sample: 2^2 + 1 + 1 + 1 = 7
    assert block_loss(two, torch.cat([t, t]), "mean").item() == pytest.approx((5.0 + 7.0) / 2)
    with pytest.raises(ValueError, match="shape"):
        block_loss(s, t[:, :1])
    with pytest.raises(ValueError, match="loss_reduction"):
        block_loss(s, t, "max")


# ------------------------------------------------------------------------------------------------
# the algorithm
# ------------------------------------------------------------------------------------------------


def test_mean_loss_takes_the_steps_of_the_sum_under_adam():
    """``loss_reduction=mean`` trains like ``sum`` (the config's "same optimum, different scale"):
    the coefficients' gradients stay far above Adam's epsilon. A mean over every element (samples x
    tokens x hidden) would put them below it here, and the coefficients would barely move."""
    g = torch.Generator().manual_seed(0)
    n, tokens, hidden = 16, 50, 64
    base = {"w": torch.randn(hidden, hidden, generator=g) / hidden**0.5}
    tau = {"w": 1e-3 * torch.randn(2, hidden, hidden, generator=g)}
    x = torch.randn(n, tokens, hidden, generator=g)
    target = x @ (base["w"] + 0.9 * tau["w"].sum(0)).T
    moved = {}
    for reduction in ("sum", "mean"):
        alpha = {k: v.requires_grad_(True) for k, v in init_coefficients(tau, 0.3).items()}
        optimizer = torch.optim.Adam(list(alpha.values()), lr=0.01)
        for _ in range(20):
            merged = merge_elementwise(base, tau, alpha)
            loss = block_loss(x @ merged["w"].T, target, reduction)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        moved[reduction] = alpha["w"].detach() - 0.3
    assert moved["sum"].abs().mean() > 0.1
    # measured: 0.3 % of the movement (a mean over every element: 49 %, it moves half as far)
    assert (moved["mean"] - moved["sum"]).abs().mean() < 0.02 * moved["sum"].abs().mean()


def test_block_losses_decrease_and_test_split_is_never_read(tiny, tmp_path):
    cfg = pool_config(tiny)
    # the test split points at paths that do not exist: reading it would raise
    cfg["test_datasets"] = {
        t: {"_target_": "datasets.load_from_disk", "dataset_path": str(tmp_path / f"missing_{t}")}
        for t in cfg["test_datasets"]
    }
    pool = make_pool(cfg)
    alg = ProDistillForCLIP(shots_per_task=12, epochs_per_block=25, batch_size=8, lr=0.05)
    merged = alg.run(pool)
    assert isinstance(merged, CLIPVisionModel)
    assert len(alg.report["blocks"]) == 2
    for record in alg.report["blocks"]:
        assert record["steps"] == 25 * 3  # 24 samples, batches of 8
        assert record["loss_after"] < 0.8 * record["loss_before"], record
        curve = [r["loss"] for r in alg.loss_curves.of_block(record["block"])]
        assert sum(curve[-3:]) < sum(curve[:3])
    assert alg.report["few_shot_images"] == {"mnist": 12, "eurosat": 12}
    # on a CPU the cache is host memory: 24 samples x 17 tokens x 32 floats, two streams
    assert alg.report["activation_cache"] == {
        "placement": "memory",
        "mb": 2 * 24 * 17 * 32 * 4 / 2**20,
    }
    # what was read: each task's val split (real path, fingerprint), never a test set
    read = alg.report["few_shot_data"]["eurosat"]
    assert read["split"] == "val" and read["num_images"] == 12 and read["fingerprint"]
    assert read["paths"] == [str(Path(tiny["data"][("eurosat", "val")]).resolve())]
    json.dumps(alg.report)  # JSON-safe
    # non-block parameters are task arithmetic with lambda 0.3; blocks moved away from it
    pre = CLIPVisionModel.from_pretrained(tiny["pretrained"])
    fts = [CLIPVisionModel.from_pretrained(tiny["models"][t]) for t in ("mnist", "eurosat")]
    sd = dict(merged.named_parameters())
    for name, p0 in pre.named_parameters():
        ta = p0 + 0.3 * sum(dict(ft.named_parameters())[name] - p0 for ft in fts)
        if ".encoder.layers." in name:
            continue
        torch.testing.assert_close(sd[name], ta)
    w = "vision_model.encoder.layers.1.mlp.fc1.weight"
    ta_w = dict(pre.named_parameters())[w] + 0.3 * sum(
        dict(ft.named_parameters())[w] - dict(pre.named_parameters())[w] for ft in fts
    )
    assert not torch.allclose(sd[w], ta_w)
    for p in merged.parameters():
        assert torch.isfinite(p).all()


def test_single_task_distillation_reproduces_finetuned_model(tmp_path):
    """One task whose fine-tuned model differs from the pretrained one only inside the blocks.

    ProDistill refuses single-model pools unless ``allow_single_task=True`` (checked below); with
    it, the task-arithmetic stage leaves embeddings and LayerNorms equal to the fine-tuned model,
    and distillation must recover the blocks: the optimum is alpha = 1 everywhere.
    """
    paths = build_tiny_clip(tmp_path, tasks=("mnist",), n_images=64)
    pre = CLIPVisionModel.from_pretrained(paths["pretrained"])
    ft = CLIPVisionModel.from_pretrained(paths["pretrained"])
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            p.copy_(dict(pre.named_parameters())[n])
            if ".encoder.layers." in n:
                p.add_(0.05 * torch.randn_like(p))
    ft.save_pretrained(paths["models"]["mnist"])
    pool = make_pool(pool_config(paths))
    with pytest.raises(ValueError, match="at least 2 task models"):
        ProDistillForCLIP().run(pool)

    alg = ProDistillForCLIP(
        shots_per_task=64, epochs_per_block=150, batch_size=64, lr=0.1, allow_single_task=True
    )
    merged = alg.run(pool)
    for record in alg.report["blocks"]:
        assert record["loss_after"] < 5e-3 * record["loss_before"], record
    # effective coefficient of each block: <theta - theta0, tau> / <tau, tau>  (TA start: 0.3)
    for index in range(2):
        m, p0, p1 = (block_state(x, index) for x in (merged, pre, ft))
        num = sum(((m[n] - p0[n]) * (p1[n] - p0[n])).sum() for n in p0)
        den = sum(((p1[n] - p0[n]) ** 2).sum() for n in p0)
        assert 0.85 < float(num / den) < 1.15
    # features on the few-shot images: the merge matches the fine-tuned model, TA(0.3) does not
    x = stack_images(held_out_images(pool, "mnist", pool.load_processor(), 64))
    with torch.no_grad():
        f_merged = merged(x).last_hidden_state
        f_ft = ft(x).last_hidden_state
        f_pre = pre(x).last_hidden_state
    assert (f_merged - f_ft).norm() < 0.1 * (f_pre - f_ft).norm()


def test_reading_paths_and_disk_cache_give_the_same_merge(tiny, tmp_path):
    """safetensors streaming (paths), in-memory modules and the load-once fallback (DictConfig)
    yield identical merges; so do the host-memory and on-disk activation caches."""
    cfg = pool_config(tiny)
    ref = ProDistillForCLIP(**FAST).run(make_pool(cfg))

    from fusion_bench.modelpool import CLIPVisionModelPool

    bin_only = tmp_path / "eurosat_bin"
    CLIPVisionModel.from_pretrained(tiny["models"]["eurosat"]).save_pretrained(
        bin_only, safe_serialization=False
    )

    models = {
        "_pretrained_": str(tiny["pretrained"]),
        "mnist": CLIPVisionModel.from_pretrained(tiny["models"]["mnist"]),  # in memory
        "eurosat": DictConfig(  # only pytorch_model.bin, not streamable: loaded once, converted
            {
                "_target_": "transformers.CLIPVisionModel.from_pretrained",
                "pretrained_model_name_or_path": str(bin_only),
            }
        ),
    }
    pool = CLIPVisionModelPool(
        models,
        processor=cfg["processor"],
        train_datasets=DictConfig(cfg["train_datasets"]),
        val_datasets=DictConfig(cfg["val_datasets"]),
    )
    scratch = tmp_path / "scratch"
    alg = ProDistillForCLIP(**FAST, activation_cache="disk", scratch_dir=str(scratch))
    other = alg.run(pool)
    sources = alg.report["weight_sources"]
    assert sources["_pretrained_"].endswith("model.safetensors")  # streamed
    assert sources["mnist"] == "in-memory nn.Module"
    assert sources["eurosat"] == str(scratch / "converted" / "eurosat.safetensors")  # fallback
    # a `from_pretrained` config of a safetensors checkpoint is streamed like a path (gpt-2_glue and
    # CausalLMPool entries are such configs)
    entry = DictConfig({"pretrained_model_name_or_path": str(tiny["models"]["eurosat"])})
    assert make_reader(
        CLIPVisionModelPool({"_pretrained_": entry}, processor=cfg["processor"]),
        "_pretrained_",
        tmp_path / "unused",
    ).source.endswith("ft_eurosat/model.safetensors")
    assert not any(scratch.rglob("*.safetensors")) and not any(scratch.rglob("*.bin"))  # cleaned
    for (n, a), (_, b) in zip(ref.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------------
# where the activation cache lives (issue 10)
# ------------------------------------------------------------------------------------------------


def test_cache_placement_keeps_the_cache_on_a_gpu_only_when_it_fits():
    GiB = 2**30
    place = cache_placement
    assert place("auto", "cpu", 10 * GiB, GiB, None) == "memory"  # the host is the device
    assert place("device", "cpu", 10 * GiB, GiB, None) == "memory"
    assert place("auto", "cuda:0", GiB, GiB, 8 * GiB) == "device"
    assert place("auto", "cuda:0", 6 * GiB, 2 * GiB, 8 * GiB) == "memory"  # 8 > 0.9 x 8
    assert place("memory", "cuda:0", GiB, GiB, 80 * GiB) == "memory"
    assert place("disk", "cuda:0", GiB, GiB, 80 * GiB) == "disk"
    assert place("disk", "cpu", GiB, GiB, None) == "disk"
    with pytest.raises(ValueError, match=r"`activation_cache=device`: the cache \(6.00 GiB\)"):
        place("device", "cuda:0", 6 * GiB, 2 * GiB, 8 * GiB)
    with pytest.raises(ValueError, match="activation_cache"):
        place("gpu", "cpu", GiB, GiB, None)


def test_block_working_set_estimate():
    # ViT-B/32 block (7,087,872 parameters), 8 tasks, batches of 128 x 50 tokens
    weights = (3 + 5 * 8) * 7_087_872
    activations = 128 * 50 * (16 * 768 + 4 * 3072) + 3 * 128 * 12 * 50**2
    assert block_working_bytes(7_087_872, 8, 128, 50, 768, 3072, 12) == 4 * (weights + activations)
    assert 1.3e9 < 4 * (weights + activations) < 2e9  # spec §4: "< 2 GB" on the device


def test_staged_gather_rotates_two_buffers_and_never_hands_one_out():
    source = torch.arange(60.0).view(10, 3, 2)
    ring = _StagingRing(pin=False)
    a = staged_gather(source, torch.tensor([4, 1]), ring, "cpu")
    b = staged_gather(source, torch.tensor([0, 9, 3]), ring, "cpu")
    torch.testing.assert_close(a, source[[4, 1]])
    torch.testing.assert_close(b, source[[0, 9, 3]])
    first, second = ring.buffers
    assert first.shape[0] == 2 and second.shape[0] == 3  # one buffer per gather, in turn
    c = staged_gather(source, torch.tensor([7, 8]), ring, "cpu")  # reuses the first buffer
    assert ring.buffers[0] is first and torch.equal(c, source[[7, 8]])
    torch.testing.assert_close(a, source[[4, 1]])  # what was handed out is not the buffer
    d = staged_gather(source, torch.tensor([2, 5, 6, 1]), ring, "cpu")  # grows the second one
    assert ring.buffers[1].shape[0] == 4 and torch.equal(d, source[[2, 5, 6, 1]])


def test_dual_stream_cache_round_trip_on_every_placement(tmp_path):
    ids = stack_task_ids([3, 2])
    values = torch.randn(5, 4, 6)
    for placement in ("device", "memory", "disk"):
        cache = DualStreamCache(5, 4, 6, ids, placement, "cpu", tmp_path / placement)
        cache.scatter("student", torch.tensor([4, 0, 2, 1, 3]), values)
        assert not cache.staged and cache.nbytes == 2 * 5 * 4 * 6 * 4
        torch.testing.assert_close(cache.gather("student", torch.tensor([0, 4])), values[[1, 0]])
        assert torch.equal(cache.indices_of_task(1), torch.tensor([3, 4]))
        cache.close()
    assert not any((tmp_path / "disk").iterdir())  # backing files deleted


# ------------------------------------------------------------------------------------------------
# bad input: one clear error, before any training
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("lr", -0.1),
        ("epochs_per_block", 0),
        ("batch_size", 1.5),
        ("shots_per_task", True),
        ("data_source", "test"),
        ("loss_reduction", "max"),
        ("activation_cache", "gpu"),
        ("init_lambda", float("nan")),
        ("lr", float("inf")),
        ("ta_lambda", float("-inf")),
        ("shots_per_task", 8.5),
        ("allow_single_task", "yes"),
        ("overwrite", 1),
    ],
)
def test_invalid_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=f"option `{option}`"):
        ProDistillForCLIP(**{option: value})


def _expect_error(pool, match, **kwargs):
    alg = ProDistillForCLIP(**(FAST | kwargs))
    with pytest.raises(ValueError, match=match):
        alg.run(pool)
    assert alg.loss_curves.rows == []  # nothing was trained


def test_pool_without_pretrained_or_with_one_task_model(tiny):
    cfg = pool_config(tiny)
    del cfg["models"]["_pretrained_"]
    _expect_error(make_pool(cfg), "no `_pretrained_` model")
    cfg = pool_config(tiny)
    del cfg["models"]["eurosat"]
    _expect_error(make_pool(cfg), "at least 2 task models, the pool has 1")


def test_mismatched_parameter_shape_names_model_and_parameter(tiny, tmp_path):
    def edit(state):
        state["vision_model.post_layernorm.weight"] = torch.ones(33)

    cfg = pool_config(tiny)
    cfg["models"]["eurosat"] = str(copy_model(tiny["models"]["eurosat"], tmp_path / "bad", edit))
    _expect_error(make_pool(cfg), r"model 'eurosat': parameter 'post_layernorm.weight' has shape")


def test_missing_parameter_names_model_and_parameter(tiny, tmp_path):
    def edit(state):
        del state["vision_model.pre_layrnorm.bias"]

    cfg = pool_config(tiny)
    cfg["models"]["mnist"] = str(copy_model(tiny["models"]["mnist"], tmp_path / "bad", edit))
    _expect_error(make_pool(cfg), r"model 'mnist' .*missing \['pre_layrnorm.bias'\]")


def test_block_with_different_parameter_names_names_model_and_block(tiny, tmp_path):
    def edit(state):
        state["vision_model.encoder.layers.1.mlp.fc3.weight"] = state.pop(
            "vision_model.encoder.layers.1.mlp.fc1.weight"
        )

    cfg = pool_config(tiny)
    cfg["models"]["eurosat"] = str(copy_model(tiny["models"]["eurosat"], tmp_path / "bad", edit))
    _expect_error(
        make_pool(cfg),
        r"model 'eurosat', block 1: parameter names differ .*missing \['mlp.fc1.weight'\], "
        r"unexpected \['mlp.fc3.weight'\]",
    )


def test_nan_weights_name_model_and_parameter(tiny, tmp_path):
    def edit(state):
        state["vision_model.encoder.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")

    cfg = pool_config(tiny)
    cfg["models"]["mnist"] = str(copy_model(tiny["models"]["mnist"], tmp_path / "bad", edit))
    _expect_error(
        make_pool(cfg),
        r"model 'mnist': parameter 'encoder.layers.1.self_attn.q_proj.weight' contains NaN or inf",
    )


def test_too_few_images_names_the_task(tiny):
    cfg = pool_config(tiny)
    _expect_error(
        make_pool(cfg), r"task 'mnist': asked for 17 unlabelled images", shots_per_task=17
    )


@pytest.mark.parametrize("model", ["mnist", "_pretrained_"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_checkpoint_names_model_and_file(tiny, tmp_path, model, damage):
    src = tiny["pretrained"] if model == "_pretrained_" else tiny["models"][model]
    weights = damaged_checkpoint_copy(src, tmp_path, damage)
    cfg = pool_config(tiny)
    cfg["models"][model] = str(weights.parent)
    _expect_error(make_pool(cfg), f"model '{model}'.*{weights}")


def test_val_split_that_is_the_test_split_is_refused_before_training(tiny):
    cfg = pool_config(tiny)
    cfg["val_datasets"]["eurosat"]["dataset_path"] = (
        cfg["test_datasets"]["eurosat"]["dataset_path"] + "/"
    )
    _expect_error(
        make_pool(cfg),
        "task 'eurosat': its 'val' dataset reads .*data_eurosat_test', which is the test set",
    )


def test_non_finite_loss_stops_training_naming_block_and_step(tiny):
    # one huge Adam step makes the coefficients, and so the next step's loss, overflow
    alg = ProDistillForCLIP(**(FAST | {"lr": 1e30}))
    with pytest.raises(
        FloatingPointError,
        match=r"ProDistill: the training loss is (nan|inf) at step 2 of 8 of block 0; stopping",
    ):
        alg.run(make_pool(pool_config(tiny)))
    assert alg.block_records == []  # no block was kept


@pytest.fixture(scope="module")
def reference_merge(tiny_clip):
    merged = ProDistillForCLIP(**FAST).run(make_pool(pool_config(tiny_clip)))
    return {n: p.detach().clone() for n, p in merged.named_parameters()}


@pytest.mark.parametrize("split, identical", [("test", True), ("val", False)])
def test_poisoned_split_changes_the_merge_only_if_it_is_read(
    tiny, tmp_path, reference_merge, split, identical
):
    """Every test image and label replaced by noise: merged weights bit-identical. The same
    poisoning of the val split (the few-shot data) changes them: the check can fail."""
    poisoned = make_pool(pool_config(with_noise_split(tiny, split, tmp_path)))
    merged = dict(ProDistillForCLIP(**FAST).run(poisoned).named_parameters())
    same = all(torch.equal(merged[n], w) for n, w in reference_merge.items())
    assert same is identical


# ------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["repo_root", "tmp_dir"])
def test_cli_fast_dev_run(tiny, tmp_path, where):
    config_dir = write_tiny_configs(tiny, tmp_path / "configs")
    log_dir = tmp_path / "logs"
    cwd = REPO_ROOT if where == "repo_root" else tmp_path
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        FUSION_BENCH_PROJECT_ROOT=str(tmp_path),
        OMP_NUM_THREADS="1",  # tiny model on a shared CPU: avoid thread oversubscription
    )
    cmd = [
        "fusion_bench",
        "--config-dir",
        str(config_dir),
        "method=prodistill/clip",
        "method.shots_per_task=8",
        "modelpool=tiny",
        "taskpool=tiny",
        "fabric.accelerator=cpu",
        "fast_dev_run=true",
        "print_config=false",
        f"path.log_dir={log_dir}",
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((log_dir / "program_report.json").read_text())
    for task in ("mnist", "eurosat"):
        assert 0.0 <= report[task]["accuracy"] <= 1.0
    assert report["model_info"]["all_params"] > 0
    run = json.loads((log_dir / "prodistill_report.json").read_text())
    assert [b["steps"] for b in run["blocks"]] == [1, 1]  # fast_dev_run: one step per block
    assert run["peak_rss_mb"] > 0 and all(b["seconds"] >= 0 for b in run["blocks"])
    assert run["options"]["shots_per_task"] == 8
    csv_lines = (log_dir / "prodistill_loss_curves.csv").read_text().splitlines()
    assert csv_lines[0] == "block,step,epoch,loss" and len(csv_lines) == 3
    assert (log_dir / "prodistill_loss_curves" / "block_01.png").stat().st_size > 0
