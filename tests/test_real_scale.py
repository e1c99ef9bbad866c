"""Synthetic full-size pools (``statsmerge_plugin.realscale``) and the real-scale benchmark's
formulae, at CI-small shapes (the ``tiny`` size); real FusionBench classes, no mocks.

The full-size builds and measurements are ``benchmarks/real_scale.py``'s job (docs/real-scale.md);
here the published sizes are checked on the ``meta`` device, and every code path of a build, its
pools and the heterogeneous data path run on the ``tiny`` size.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_json, run_fusion_bench
from datasets import load_from_disk
from safetensors.torch import load_file

from statsmerge_plugin.realscale import pools
from statsmerge_plugin.realscale.build import PoolRecipe, build_pool, load_manifest, noise_scale
from statsmerge_plugin.realscale.specs import SIZES, get_size, vision_parameter_count

REPO = Path(__file__).resolve().parents[1]
TASKS = ("mnist", "eurosat")
RECIPE = PoolRecipe(
    size="tiny",
    tasks=TASKS,
    images=(("train", 8), ("val", 8), ("test", 8)),
    relative_size=0.05,
    teacher_task="eurosat",
    teacher_train_sizes=(16, 48),
)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return build_pool(tmp_path_factory.mktemp("realscale"), RECIPE)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("real_scale", REPO / "benchmarks/real_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# the published sizes


@pytest.mark.parametrize(
    "size, tensors, parameters", [("vit-b-32", 199, 87_456_000), ("vit-l-14", 391, 303_179_776)]
)
def test_sizes_are_fusion_bench_checkpoints(size, tensors, parameters):
    """The vision towers of FusionBench's ViT-B/32 and ViT-L/14 checkpoints (fusionbench-notes
    §3.1), counted on the meta device."""
    counts = vision_parameter_count(get_size(size))
    assert counts == {"tensors": tensors, "parameters": parameters}


@pytest.mark.parametrize("size, name", [("vit-b-32", "ViT-B-32"), ("vit-l-14", "ViT-L-14")])
def test_sizes_agree_with_open_clip_model_configs(size, name):
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "model_configs" / f"{name}.json"
    cfg = json.loads(path.read_text())  # read, not imported
    s = SIZES[size]
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    assert (s.vision_width, s.vision_layers, s.patch_size, s.image_size) == (
        vision["width"],
        vision["layers"],
        vision["patch_size"],
        vision["image_size"],
    )
    assert (s.text_width, s.text_heads, s.text_layers, s.vocab_size, s.context_length) == (
        text["width"],
        text["heads"],
        text["layers"],
        text["vocab_size"],
        text["context_length"],
    )
    assert s.embed_dim == cfg["embed_dim"]


def test_bad_recipes_name_the_culprit():
    with pytest.raises(ValueError, match="unknown architecture size 'vit-h-14'"):
        PoolRecipe(size="vit-h-14")
    with pytest.raises(ValueError, match="teacher task 'svhn' is not one of"):
        PoolRecipe(size="tiny", tasks=TASKS, teacher_task="svhn")
    with pytest.raises(ValueError, match="relative_size"):
        PoolRecipe(size="tiny", relative_size=0.0)
    with pytest.raises(ValueError, match="split 'val'"):
        PoolRecipe(size="tiny", images=(("val", 0),))


# ------------------------------------------------------------------------------------------------
# a build


def test_task_vectors_have_the_requested_relative_size(build):
    theta_0 = {
        k: v
        for k, v in load_file(str(build / "pretrained" / "model.safetensors")).items()
        if k.startswith("vision_model.")
    }
    for task in TASKS:
        state = load_file(str(build / "models" / task / "model.safetensors"))
        assert state.keys() == theta_0.keys()
        big = [n for n, t in theta_0.items() if t.numel() >= 1000]
        for name in big:
            tau = state[name] - theta_0[name]
            rms = float(tau.pow(2).mean().sqrt())
            assert rms == pytest.approx(noise_scale(theta_0[name], 0.05), rel=0.1), name
    # zero tensors (biases) still move, at relative_size x the initialiser's scale
    assert noise_scale(torch.zeros(4), 0.05) == pytest.approx(0.05 * 0.02)


def test_build_loads_through_fusion_bench_pools(build):
    from transformers import CLIPVisionModel, ResNetForImageClassification

    manifest = load_manifest(build)
    params = vision_parameter_count(get_size("tiny"))["parameters"]
    assert manifest["theta0_plus_task_vectors_bytes"] == (1 + len(TASKS)) * 4 * params
    pool = pools.modelpool(build)
    assert pool.model_names == list(TASKS)
    assert isinstance(pool.load_model("mnist"), CLIPVisionModel)
    processor = pool.load_processor()
    assert len(processor.tokenizer) == 49408  # CLIP's full BPE vocabulary, offline
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}
    from fusion_bench.tasks.clip_classification import get_classnames

    for task in TASKS:
        for split, n in RECIPE.images:
            data = getattr(pool, f"load_{split}_dataset")(task)
            assert len(data) == n
            assert data.features["label"].names == list(get_classnames(task))
    hetero = pools.modelpool(build, hetero=True, train_split="train_48")
    teacher = hetero.load_model("eurosat")
    assert isinstance(teacher, ResNetForImageClassification)
    assert [teacher.config.id2label[i] for i in range(10)] == list(get_classnames("eurosat"))
    assert len(hetero.load_train_dataset("eurosat")) == 48
    with pytest.raises(ValueError, match="no split 'train_7'"):
        pools.pool_config(build, hetero=True, train_split="train_7")
    report = pools.taskpool(build).evaluate(pool.load_model("eurosat"))
    assert set(TASKS) <= set(report) and 0 <= report["average"]["accuracy"] <= 1


def test_a_build_is_made_once_per_recipe(build):
    stamp = (build / "manifest.json").stat().st_mtime_ns
    assert build_pool(build.parent, RECIPE) == build
    assert (build / "manifest.json").stat().st_mtime_ns == stamp
    assert RECIPE.replace(relative_size=0.02).key() != RECIPE.key()
    assert RECIPE.replace(seed=1).key() != RECIPE.key()
    assert not list(build.parent.glob(".tmp-*"))


def test_written_configs_run_a_fusion_bench_method(build, tmp_path):
    config_dir = pools.write_configs(build, tmp_path / "cfg")
    assert (config_dir / "modelpool" / "realscale_hetero.yaml").is_file()
    log_dir = tmp_path / "run"
    run_fusion_bench(
        [
            "--config-dir",
            str(config_dir),
            "method=task_arithmetic",
            "modelpool=realscale",
            "taskpool=realscale",
            "fabric.accelerator=cpu",
            "print_config=false",
        ],
        cwd=tmp_path,
        log_dir=log_dir,
    )
    assert set(TASKS) <= set(read_json(log_dir / "program_report.json"))


# ------------------------------------------------------------------------------------------------
# the heterogeneous data path does not depend on the split's size


def test_distillation_reads_the_same_images_from_a_small_and_a_large_split(build, tmp_path):
    from statsmerge_plugin.method.statsmerging.hetero import DistillToBaseForCLIP

    records = {}
    for n in (16, 48):
        alg = DistillToBaseForCLIP(
            max_steps=2, batch_size=4, evaluate_test=False, cache_dir=str(tmp_path / f"c{n}")
        )
        pool = pools.modelpool(build, hetero=True, train_split=f"train_{n}")
        _, report = alg.distill_pool(pool)
        records[n] = report["teachers"]["eurosat"]
    for n, r in records.items():
        assert r["num_train_images"] == n == len(load_from_disk(r["train_data"]["paths"][0]))
        # two steps of four: eight images read, processed and labelled, whatever the split
        assert r["images_used"] == r["teacher_labelled"] == 8 and len(r["step_seconds"]) == 2


# ------------------------------------------------------------------------------------------------
# the benchmark's formulae


def test_projection_formulae():
    bench = load_benchmark()
    plan = bench.size_plan("vit-b-32", None, None)
    assert bench.steady([9.0, 2.0, 4.0, 3.0]) == 3.0 and bench.steady([5.0]) == 5.0
    sm = {
        "status": "ok",
        "total_s": 100.0,
        "stats_s": 30.0,
        "label_s": 2.0,
        "objective_s": 3.0,
        "step_s": [6.0, 5.0],
        "images_per_task": 4,
    }
    setup = 100 - 30 - 2 - 3 - 11
    expected = setup + 30 + 32 * (2 + 3) + 500 * 5.0
    assert bench.project("statsmerging_lw_shared", sm, plan, 12) == pytest.approx(expected)
    ada = {
        "status": "ok",
        "total_s": 50.0,
        "step_s": [7.0, 6.0],
        "step_fixed_s": [1.0, 1.0],
        "step_images_part_s": [6.0, 5.0],
        "images_per_task": 4,
    }
    assert bench.project("adamerging_lw", ada, plan, 12) == pytest.approx(37 + 1000 * (1 + 4 * 5))
    pd = {
        "status": "ok",
        "total_s": 70.0,
        "blocks_s": [20.0, 20.0],
        "block_passes_s": [8.0, 8.0],
        "samples": 128,
        "step_s": [6.0, 6.0],
    }
    assert bench.project("prodistill", pd, plan, 12) == pytest.approx(30 + 12 * (4 * 8 + 400 * 6))
    het = {"status": "ok", "total_s": 40.0, "step_s": [10.0, 8.0], "images_per_step": 16}
    assert bench.project("hetero_512", het, plan, 12) == pytest.approx(22 + 300 * 8 * 4)
    assert bench.project("hetero_512", {"status": "killed"}, plan, 12) is None


def test_targets_say_held_or_missed():
    bench = load_benchmark()
    GiB = 2**30
    result = {
        "manifest": {"theta0_plus_task_vectors_bytes": 4 * GiB},
        "methods": {
            "adamerging_lw": {"status": "ok", "step_s": [10.0, 10.0]},
            "statsmerging_lw_shared": {
                "status": "ok",
                "step_s": [9.0, 9.0],
                "images_per_step": 32,
                "stats_s": 10.0,
                "projected_s": 1000.0,
                "peak_rss_bytes": 7 * GiB,
            },
            "hetero_512": {"status": "ok", "train_split_images": 512, "peak_rss_bytes": GiB},
            "hetero_4096": {"status": "ok", "train_split_images": 4096, "peak_rss_bytes": 2 * GiB},
        },
    }
    lines = "\n".join(bench.targets(result))
    assert "vs AdaMerging 10.0 s at 32 images (**held**)" in lines
    assert "1.00 % of the projected run (**held**)" in lines
    assert "1.75 x (θ0 + all τ) (**missed** at 1.5 x)" in lines
    assert "statsmerging_tw_shared: not measured (not run)" in lines
    assert "(x 2.000; **missed**: no growth with the split)" in lines
