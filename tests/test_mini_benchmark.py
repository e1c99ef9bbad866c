"""Tests of the embedded offline mini-TA8 benchmark (``statsmerge_plugin.mini``).

Everything runs the real code paths (builder, FusionBench pools, the ``fusion_bench`` CLI) on the
``smoke`` preset in temporary directories. Accuracies of smoke builds are near chance: the tests
assert structure and behaviour, never accuracy levels.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from statsmerge_plugin.mini import tokenizer as mini_tok
from statsmerge_plugin.mini.build import build_mini_benchmark, ensure_built, read_manifest
from statsmerge_plugin.mini.data import load_split
from statsmerge_plugin.mini.recipe import build_key, get_recipe
from statsmerge_plugin.mini.store import build_digests
from statsmerge_plugin.mini.tasks import TASK_NAMES, caption_corpus

REPO = Path(__file__).resolve().parents[1]
PAIR = ("mini_mnist", "mini_dtd")


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture()
def smoke_root(smoke_mini_root) -> Path:
    return smoke_mini_root


@pytest.fixture()
def smoke_build(smoke_mini) -> dict:
    """The full eight-task smoke build (the session's, ``conftest.smoke_mini``), shared by the
    manifest / pool / task pool / CLI tests."""
    return smoke_mini


# ------------------------------------------------------------------------------------------
# builder


def test_manifest_describes_a_complete_build(smoke_build):
    path = Path(smoke_build["path"])
    assert smoke_build["complete"] and smoke_build["preset"] == "smoke"
    assert tuple(smoke_build["tasks"]) == TASK_NAMES
    assert smoke_build["key"] == path.name
    assert (path / "pretrained" / "config.json").exists()
    for task in TASK_NAMES:
        assert (path / "models" / task / "model.safetensors").exists()
        for split in ("train", "val", "test"):
            assert (path / "data" / task / split / "dataset_info.json").exists()
    acc = smoke_build["test_accuracy"]
    assert set(acc) == {"pretrained", "individual", "simple_average", "task_arithmetic_0.3"}
    for row in acc.values():
        assert set(row) == set(TASK_NAMES) | {"average"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert smoke_build["timings_seconds"]["total"] > 0
    assert not list(path.parent.glob(".tmp-*"))


def test_saved_splits_have_image_and_classlabel_features(smoke_build):
    from datasets import load_from_disk

    ds = load_from_disk(str(Path(smoke_build["path"]) / "data" / "mini_gtsrb" / "test"))
    assert set(ds.features) == {"image", "label"}
    assert ds.features["label"].num_classes == 10
    recipe = get_recipe("smoke")
    assert len(ds) == 10 * recipe.n_test
    assert ds[0]["image"].size == (32, 32)
    assert sorted(set(ds["label"])) == list(range(10))


def test_build_is_deterministic_reused_and_rebuilt_on_changes(tmp_path):
    one = PAIR[:1]
    a = build_mini_benchmark(root=tmp_path / "a", preset="smoke", tasks=one, progress=False)
    b = build_mini_benchmark(root=tmp_path / "b", preset="smoke", tasks=one, progress=False)
    pa, pb = Path(a["path"]), Path(b["path"])
    assert pa.name == pb.name
    for sub in ["pretrained", f"models/{one[0]}"]:
        wa, wb = weights(pa / sub), weights(pb / sub)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for split in ("train", "test"):
        sa, sb = load_split(pa / "data" / one[0] / split), load_split(pb / "data" / one[0] / split)
        assert np.array_equal(sa.images, sb.images) and np.array_equal(sa.labels, sb.labels)
    assert a["test_accuracy"] == b["test_accuracy"]
    # the manifest records the digests of the weights and data it holds: equal for the two builds
    assert a["digests"] == b["digests"] == build_digests(pa) == build_digests(pb)
    assert set(a["digests"]) == {"pretrained", "models", "data"}

    stamp = (pa / "manifest.json").stat().st_mtime_ns
    again = build_mini_benchmark(root=tmp_path / "a", preset="smoke", tasks=one, progress=False)
    assert again["path"] == a["path"]
    assert (pa / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt

    other = build_mini_benchmark(
        root=tmp_path / "a", preset="smoke", tasks=one, seed=1, progress=False
    )
    assert other["path"] != a["path"] and other["seed"] == 1
    assert read_manifest(pa) is not None  # the seed-0 build is kept
    w0, w1 = weights(pa / "models" / one[0]), weights(Path(other["path"]) / "models" / one[0])
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)

    forced = build_mini_benchmark(
        root=tmp_path / "a", preset="smoke", tasks=one, force=True, progress=False
    )
    assert (pa / "manifest.json").stat().st_mtime_ns != stamp
    assert forced["test_accuracy"] == a["test_accuracy"]


def test_build_key_tracks_recipe_seed_and_tasks():
    recipe = get_recipe("smoke")
    key = build_key(recipe, "smoke", 0, PAIR)
    assert build_key(recipe, "smoke", 0, PAIR) == key
    assert build_key(recipe.replace(ft_lr=recipe.ft_lr / 2), "smoke", 0, PAIR) != key
    assert build_key(recipe, "smoke", 1, PAIR) != key
    assert build_key(recipe, "smoke", 0, PAIR[:1]) != key
    assert key.startswith("mini-clip-r") and "-smoke-s0-t2-" in key


def test_build_key_ignores_run_knobs_but_not_the_effective_thread_count():
    from statsmerge_plugin.mini.recipe import key_fields
    from statsmerge_plugin.mini.store import effective_threads

    recipe = get_recipe("default")
    key = build_key(recipe, "default", 0, PAIR)
    assert (
        build_key(recipe.replace(evaluate=False, evaluate_merges=False), "default", 0, PAIR) == key
    )
    assert "num_threads" not in key_fields(recipe) and "ft_lr" in key_fields(recipe)
    # torch's kernels reduce in a thread-dependent order: another effective count, another key
    one = build_key(recipe.replace(num_threads=1), "default", 0, PAIR)
    assert (one == key) == (effective_threads(2) == 1)
    many = recipe.replace(num_threads=10_000)  # capped at this machine's cores
    assert build_key(many, "default", 0, PAIR) == build_key(
        recipe.replace(num_threads=effective_threads(10_000)), "default", 0, PAIR
    )


def test_smoke_builds_at_another_thread_count_get_their_own_key(tmp_path):
    """Same key, same bytes: a smoke build at one thread (the preset's) and at two threads never
    share a directory; each build records the thread count it ran with."""
    from statsmerge_plugin.mini.store import effective_threads

    one = PAIR[:1]
    recipe = get_recipe("smoke")
    a = build_mini_benchmark(root=tmp_path, preset="smoke", tasks=one, progress=False)
    b = build_mini_benchmark(
        root=tmp_path,
        preset="smoke",
        tasks=one,
        recipe=recipe.replace(num_threads=2),
        progress=False,
    )
    if effective_threads(2) == 1:  # one core: both ran with one thread, the same build
        assert a["path"] == b["path"]
        return
    assert a["path"] != b["path"] and a["torch_threads"] == 1 and b["torch_threads"] == 2
    assert read_manifest(Path(a["path"])) is not None  # the one-thread build is kept
    assert a["digests"]["data"] == b["digests"]["data"]  # the data never depend on threads
    assert b["digests"] == build_digests(Path(b["path"]))


def test_domain_knobs_are_keyed_only_when_set():
    """The domain-shift knobs (added for r3) leave every earlier key as it was at their neutral
    values, and change it when set."""
    from statsmerge_plugin.mini.recipe import key_fields

    recipe = get_recipe("default")
    knobs = {"domain_shift", "rare_frac", "common_shift", "shift_grey", "common_grey", "rare_zoom"}
    assert not knobs & set(key_fields(recipe))
    key = build_key(recipe, "default", 0, TASK_NAMES)
    for knob, value in (
        ("domain_shift", 1.0),
        ("rare_frac", 0.3),
        ("common_shift", 0.5),
        ("shift_grey", 0.0),
        ("common_grey", 0.0),
        ("rare_zoom", 1.0),
    ):
        changed = recipe.replace(**{knob: value})
        assert key_fields(changed)[knob] == value
        assert build_key(changed, "default", 0, TASK_NAMES) != key


def test_pretraining_domain_of_rare_and_common_tasks():
    from PIL import Image

    from statsmerge_plugin.mini.data import generate_split
    from statsmerge_plugin.mini.domain import (
        RARE_DOMAIN_TASKS,
        check_domain_knobs,
        pretrain_pool,
        render_shifted,
        render_zoomed,
    )

    rare = generate_split("mini_svhn", "pretrain", 4, seed=0)
    common = generate_split("mini_sun397", "pretrain", 4, seed=0)
    assert "mini_svhn" in RARE_DOMAIN_TASKS and "mini_sun397" not in RARE_DOMAIN_TASKS
    for split, task in ((rare, "mini_svhn"), (common, "mini_sun397")):  # neutral: unchanged
        same = pretrain_pool(task, split, 0.0, 1.0, 0.0)
        assert np.array_equal(same.images, split.images)
        assert np.array_equal(same.labels, split.labels)
    shifted = pretrain_pool("mini_svhn", rare, 1.0, 0.5, 0.0)
    assert len(shifted.labels) == 20 and np.array_equal(shifted.labels, rare.labels[:20])
    grey = shifted.images.astype(int)  # full shift: grey (equal channels) thumbnails
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 1
    assert np.array_equal(pretrain_pool("mini_sun397", common, 1.0, 0.5, 0.0).images, common.images)
    assert not np.array_equal(
        pretrain_pool("mini_sun397", common, 0.0, 1.0, 0.5).images, common.images
    )
    assert render_shifted(rare.images, 0.5).shape == rare.images.shape
    # shift_grey: 1.0 is the default rendering; 0 keeps the colours of a low-resolution thumbnail
    assert np.array_equal(render_shifted(rare.images, 0.7, 1.0), render_shifted(rare.images, 0.7))
    thumb = render_shifted(rare.images, 1.0, 0.0).astype(int)
    assert np.abs(thumb[..., 0] - thumb[..., 1]).max() > 10
    assert not np.array_equal(thumb, rare.images.astype(int))
    assert thumb.shape == rare.images.shape
    assert np.array_equal(thumb[:, 0::2, 0::2], thumb[:, 1::2, 1::2])  # 2x2 blocks of one colour
    with pytest.raises(ValueError, match="shift_grey"):
        check_domain_knobs(0.5, 1.0, 0.0, 1.5)
    # common_grey scales the colour loss of the common tasks only: at 0 they keep their colours
    # (still thumbnails) while the rare tasks stay grey; at 1.0 nothing changes
    for grey_scale in (1.0, 0.0):
        rare_out = pretrain_pool("mini_svhn", rare, 1.0, 0.5, 1.0, 1.0, grey_scale).images
        assert np.array_equal(rare_out, shifted.images)
    assert np.array_equal(
        pretrain_pool("mini_sun397", common, 0.0, 1.0, 0.7, 1.0, 1.0).images,
        pretrain_pool("mini_sun397", common, 0.0, 1.0, 0.7).images,
    )
    coloured = pretrain_pool("mini_sun397", common, 0.0, 1.0, 0.7, 1.0, 0.0).images
    assert np.array_equal(coloured, render_shifted(common.images, 0.7, 0.0))
    assert np.abs(coloured[..., 0].astype(int) - coloured[..., 1]).max() > 10
    with pytest.raises(ValueError, match="common_grey"):
        check_domain_knobs(0.5, 1.0, 0.0, 1.0, -0.1)
    # rare_zoom: the rare tasks' images shrunk into a corner of a canvas of their mean colour, the
    # corner turning once per round of classes; the common tasks and the colours are untouched
    zoomed = pretrain_pool("mini_svhn", rare, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0)
    assert np.array_equal(zoomed.labels, rare.labels[:20])
    assert np.array_equal(
        pretrain_pool("mini_sun397", common, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0).images, common.images
    )
    first, second = zoomed.images[0].astype(int), zoomed.images[10].astype(int)  # rounds 0 and 1
    assert np.array_equal(
        first[:16, :16], np.asarray(Image.fromarray(rare.images[0]).resize((16, 16), Image.BOX))
    )
    assert (first[16:, 16:] == first[31, 31]).all() and (second[:16, :16] == second[0, 0]).all()
    assert np.abs(first[31, 31] - rare.images[0].reshape(-1, 3).mean(0)).max() <= 0.5
    assert np.array_equal(render_zoomed(rare.images, 0.0, 10), rare.images)
    with pytest.raises(ValueError, match="rare_zoom"):
        check_domain_knobs(0.5, 1.0, 0.0, 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="domain_shift"):
        check_domain_knobs(1.5, 1.0)
    with pytest.raises(ValueError, match="rare_frac"):
        check_domain_knobs(0.5, 0.0)
    with pytest.raises(ValueError, match="common_shift"):
        check_domain_knobs(0.5, 1.0, -0.1)


def test_build_made_before_a_pure_refactor_is_reused_after_it(tmp_path):
    """Rename a function in a copy of ``mini/`` (a pure refactor): the old build is found."""
    import shutil

    built = ensure_built(root=tmp_path / "root", preset="smoke", tasks=PAIR[:1], progress=False)
    stamp = (built / "manifest.json").stat().st_mtime_ns
    copy = tmp_path / "src"
    shutil.copytree(REPO / "statsmerge_plugin", copy / "statsmerge_plugin")
    renamed = 0
    for path in (copy / "statsmerge_plugin" / "mini").glob("*.py"):
        text = path.read_text()
        if "cosine_lr" in text:
            path.write_text(text.replace("cosine_lr", "cosine_schedule"))
            renamed += 1
    assert renamed, "the refactor must touch the builder's code"
    code = (
        "import statsmerge_plugin.mini.train as t; assert hasattr(t, 'cosine_schedule');"
        "from statsmerge_plugin.mini.build import ensure_built;"
        f"print(ensure_built(root={str(tmp_path / 'root')!r}, preset='smoke',"
        f" tasks={list(PAIR[:1])!r}, progress=False))"
    )
    env = dict(os.environ, PYTHONPATH=str(copy))
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,  # the working directory would come before PYTHONPATH
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(built)
    assert (built / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_finetuning_variants_share_one_pretraining(tmp_path):
    one = PAIR[:1]
    base = get_recipe("smoke").replace(evaluate=False)
    a = build_mini_benchmark(tmp_path, 0, one, "smoke", recipe=base, progress=False)
    b = build_mini_benchmark(
        tmp_path, 0, one, "smoke", recipe=base.replace(ft_lr=base.ft_lr / 2), progress=False
    )
    c = build_mini_benchmark(
        tmp_path, 0, one, "smoke", recipe=base.replace(pretrain_steps=3), progress=False
    )
    assert len({a["key"], b["key"], c["key"]}) == 3
    assert len(list((tmp_path / ".stages").glob("pretrain-*"))) == 2
    pa, pb, pc = (Path(m["path"]) / "pretrained" for m in (a, b, c))
    wa, wb, wc = weights(pa), weights(pb), weights(pc)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    fa, fb = weights(Path(a["path"]) / "models" / one[0]), weights(
        Path(b["path"]) / "models" / one[0]
    )
    assert any(not torch.equal(fa[k], fb[k]) for k in fa)
    assert b["pretrain_loss"] == a["pretrain_loss"]


def test_interrupted_build_is_not_taken_as_complete(tmp_path):
    code = (
        "from statsmerge_plugin.mini.build import build_mini_benchmark as b;"
        f"b(root={str(tmp_path)!r}, preset='smoke', tasks={list(PAIR)!r}, progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".tmp-*/pretrained")):  # killed in the middle of the build
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    key = build_key(get_recipe("smoke"), "smoke", 0, PAIR)
    assert list(tmp_path.glob(".tmp-*")), "the half-written build stays in its temp dir"
    assert not (tmp_path / key).exists()
    assert read_manifest(tmp_path / key) is None

    path = ensure_built(root=tmp_path, preset="smoke", tasks=PAIR, progress=False)
    assert path == tmp_path / key and read_manifest(path)["complete"]
    assert not list(tmp_path.glob(".tmp-*")), "stale temp dirs are cleaned up"


def test_incomplete_target_without_manifest_is_rebuilt(tmp_path):
    key = build_key(get_recipe("smoke"), "smoke", 0, PAIR[:1])
    (tmp_path / key / "models").mkdir(parents=True)  # e.g. copied by hand, no manifest
    path = ensure_built(root=tmp_path, preset="smoke", tasks=PAIR[:1], progress=False)
    assert read_manifest(path) is not None
    assert (path / "models" / PAIR[0] / "model.safetensors").exists()


def test_cli_builds_and_prints_path(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "statsmerge_plugin.mini",
            "build",
            "--root",
            str(tmp_path),
            "--preset",
            "smoke",
            "--tasks",
            "mnist",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path and read_manifest(path)["tasks"] == ["mini_mnist"]


# ------------------------------------------------------------------------------------------
# tokenizer and registry


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["build", "--seed", "-1"], "seed"),
        (["build", "--tasks", ","], "names no task"),
        (["build", "--tasks", "mnist,imagenet"], "mini_imagenet"),
        (["build", "--root", "{file}"], "is not a directory"),
        (["shape", "--set", "ft_lr"], "KNOB=VALUE"),
        (["shape", "--set", "warp=9"], "warp"),
        (["shape", "--set", "ft_steps=many"], "ft_steps"),
    ],
)
def test_cli_bad_input_fails_fast_naming_the_culprit(tmp_path, args, culprit):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    args = [a.replace("{file}", str(a_file)) for a in args]
    env = dict(os.environ, STATSMERGE_MINI_ROOT=str(tmp_path / "root"))
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "statsmerge_plugin.mini", *args, "--preset", "smoke"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert culprit in out.stderr and "Traceback" not in out.stderr
    assert time.perf_counter() - start < 60  # before any build work
    assert a_file.read_text() == "keep me"
    assert not list((tmp_path / "root").glob("mini-clip-*"))


def test_pruned_tokenizer_matches_full_clip_bpe(tmp_path):
    merges = mini_tok.load_merges()
    assert len(merges) == mini_tok.NUM_MERGES
    full = mini_tok.load_tokenizer(mini_tok.write_tokenizer_files(tmp_path / "full", merges))
    assert len(full) == 49408
    pruned = mini_tok.load_tokenizer(mini_tok.copy_assets(tmp_path / "pruned"))
    assert len(pruned) < 2000
    for text in caption_corpus():
        tokens = full.tokenize(text)
        assert pruned.tokenize(text) == tokens
        ids = pruned(text)["input_ids"]
        decoded = pruned.decode(ids, skip_special_tokens=True)  # CLIP decodes "</w>" as a space
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    # committed assets are exactly what the pruning produces from the current corpus
    regenerated = mini_tok.write_assets(caption_corpus(), tmp_path / "work", tmp_path / "assets")
    for name in ("vocab.json", "merges.txt"):
        assert (regenerated / name).read_text() == (mini_tok.ASSETS / name).read_text()
    # unseen text never becomes <|endoftext|> / unknown
    ids = pruned("zebra crossing Überweg 42")["input_ids"][1:-1]
    assert pruned.eos_token_id not in ids and len(ids) > 4


def test_registry_workaround_resolves_through_fusion_bench():
    from fusion_bench.tasks.clip_classification import (
        CLIPTemplateFactory,
        get_classnames_and_templates,
        get_num_classes,
    )

    from statsmerge_plugin.mini.registry import register_tasks
    from statsmerge_plugin.mini.tasks import get_task

    CLIPTemplateFactory._dataset_mapping.pop("mini_eurosat", None)
    with pytest.raises(ValueError):
        get_classnames_and_templates("mini_eurosat")
    register_tasks(["mini_eurosat"])
    classnames, templates = get_classnames_and_templates("mini_eurosat")
    spec = get_task("mini_eurosat")
    assert list(classnames) == list(spec.classnames) and get_num_classes("mini_eurosat") == 10
    assert [t("forest") for t in templates] == [p.format("forest") for p in spec.template_patterns]


# ------------------------------------------------------------------------------------------
# FusionBench pools and the CLI


def test_modelpool_yaml_and_taskpool_evaluate(smoke_root, smoke_build, monkeypatch):
    from hydra.utils import instantiate

    from statsmerge_plugin.mini.evaluate import taskpool
    from statsmerge_plugin.mini.resolver import register_resolver

    monkeypatch.setenv("STATSMERGE_MINI_ROOT", str(smoke_root))
    monkeypatch.setenv("STATSMERGE_MINI_PRESET", "smoke")
    register_resolver()
    cfg = OmegaConf.load(REPO / "config/modelpool/CLIPVisionModelPool/mini-clip_TA8.yaml")
    assert cfg.models.mini_mnist == f"{smoke_build['path']}/models/mini_mnist"
    pool = instantiate(cfg)
    assert type(pool).__name__ == "CLIPVisionModelPool"
    assert list(pool.model_names) == list(TASK_NAMES)
    assert set(pool.val_dataset_names) == set(TASK_NAMES)
    model = pool.load_model("mini_mnist")
    ref = weights(Path(smoke_build["path"]) / "models" / "mini_mnist")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
    assert len(pool.load_test_dataset("mini_dtd")) == 10 * get_recipe("smoke").n_test

    report = taskpool(smoke_build["path"], ["mini_mnist", "mini_dtd"]).evaluate(model)
    assert set(report) >= {"mini_mnist", "mini_dtd", "average", "model_info"}
    assert report["mini_mnist"]["accuracy"] == pytest.approx(
        smoke_build["test_accuracy"]["individual"]["mini_mnist"], abs=1e-4
    )


def test_fusion_bench_cli_simple_average_on_mini_pool(tmp_path, smoke_root, smoke_build):
    env = dict(
        os.environ,
        STATSMERGE_MINI_ROOT=str(smoke_root),
        STATSMERGE_MINI_PRESET="smoke",
        HF_HUB_OFFLINE="1",
    )
    cmd = [
        "fusion_bench",
        "method=simple_average",
        "modelpool=CLIPVisionModelPool/mini-clip_TA8",
        "taskpool=CLIPVisionModelTaskPool/mini-clip_TA8",
        "fabric.accelerator=cpu",
        "print_config=false",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = list(tmp_path.glob("outputs/**/program_report.json"))
    assert reports, out.stdout[-2000:]
    report = json.loads(reports[0].read_text())
    assert set(TASK_NAMES) <= set(report)
    assert report["mini_svhn"]["accuracy"] == pytest.approx(
        smoke_build["test_accuracy"]["simple_average"]["mini_svhn"], abs=1e-4
    )
    # the CLI resolved ${mini_clip:} to the existing build instead of building another one
    assert [p.name for p in smoke_root.iterdir() if not p.name.startswith(".")] == [
        Path(smoke_build["path"]).name
    ]


# ------------------------------------------------------------------------------------------
# the recipe loop


def _rows(**averages):
    tasks = {t: 0.0 for t in PAIR}
    return {name: dict({t: avg for t in tasks}, average=avg) for name, avg in averages.items()}


def test_shape_checks_state_the_real_benchmarks_ordering():
    from statsmerge_plugin.mini.shape import shape_checks

    like_real = _rows(
        **{
            "zero-shot": 0.48,
            "individual": 0.90,
            "simple_average": 0.665,
            "task_arithmetic_0.3": 0.69,
            "ties": 0.722,
            "adamerging": 0.826,
        }
    )
    assert all(ok for _, ok, _ in shape_checks(like_real))
    r1 = dict(like_real, **{"task_arithmetic_0.3": _rows(x=0.47)["x"]})  # r1's TA below SA
    failed = {name for name, ok, _ in shape_checks(r1) if not ok}
    assert failed == {"TA(0.3) ≥ SA + 1"}


def test_recipe_loop_measures_a_variant_on_val_and_logs_it(tmp_path):
    from statsmerge_plugin.mini.shape import run_variant, shape_checks
    from statsmerge_plugin.mini.shape_report import format_shape, format_variants

    log = tmp_path / "variants.jsonl"
    record = run_variant(
        {"ft_steps": 4},
        root=tmp_path / "root",
        preset="smoke",
        adamerging_steps=2,
        log=log,
        name="tiny",
        progress=False,
        free_control_steps=2,
    )
    rows = record["rows"]
    assert record["split"] == "val" and record["overrides"] == {"ft_steps": 4}
    assert {"zero-shot", "individual", "simple_average", "ties", "adamerging"} <= set(rows)
    assert {f"task_arithmetic_{lam}" for lam in (0.1, 0.2, 0.3)} <= set(rows)
    assert set(record["single_vector"]) == set(TASK_NAMES)
    assert all(0 <= s["own_trimmed"] <= 1 for s in record["single_vector"].values())
    manifest = read_manifest(tmp_path / "root" / record["key"])
    assert manifest["recipe"]["ft_steps"] == 4
    assert "test_accuracy" not in manifest  # a search build never evaluates on test
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["key"] == record["key"]
    table = format_variants([json.loads(lines[0])])
    assert "trimmed" in format_shape(record) and "individual ≥ 88" in format_shape(record)
    assert "| tiny | ft_steps=4 | 0 |" in table
    # the r3 diagnostics: AdaMerging's confident vs unsure half per task, the free control's range
    confidence = record["diagnostics"]["adamerging_confidence"]
    assert set(confidence) == set(TASK_NAMES)
    for c in confidence.values():
        assert 0 <= c["unsure"] <= 1 and c["gap"] == pytest.approx(
            c["confident"] - c["unsure"], abs=1e-4
        )
    free = record["diagnostics"]["free_control_coefficients"]
    assert 0 < free["fraction_within"] <= 1 and free["max_abs"] > 0
    assert 0 <= free["average_clamped"] <= 1 and 0 <= free["average"] <= 1
    delta = 100 * (free["average_clamped"] - free["average"])
    assert f"clamped to [-0.5, 1.5]: {100 * free['average_clamped']:.1f}" in format_shape(record)
    assert f"; clamped {delta:+.1f} |" in table
    names = [name for name, _, _ in shape_checks(record["rows"], record["diagnostics"])]
    assert names[-2].startswith("AdaMerging's confident half") and names[-1].startswith("free")
    gap = min(c["gap"] for c in confidence.values())
    assert f"| {100 * gap:+.1f} | {100 * free['fraction_within']:.0f} %," in table


def test_shape_adamerging_is_seeded(smoke_build):
    """Two short AdaMerging runs of the shape report give the same merged model even when the global
    generator was used in between (a cached build versus one built in the same process)."""
    from statsmerge_plugin.mini.shape import adamerging

    root, tasks = Path(smoke_build["path"]), list(TASK_NAMES)
    first = adamerging(root, tasks, "val", max_steps=2).state_dict()
    torch.rand(1000)  # what a build in the same process would do to the generator
    second = adamerging(root, tasks, "val", max_steps=2).state_dict()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=0, msg=name)


def test_free_control_remerged_with_its_own_coefficients_is_its_model(smoke_build):
    """merge_with_coefficients (the clamped re-merge of the shape report) rebuilds the free
    control's merged model exactly from its coefficients; clamping changes exactly the tensors
    with a coefficient out of range; a tensor name the model lacks is named in the error."""
    from statsmerge_plugin.mini.diagnostics import (
        COEFFICIENT_RANGE,
        free_control,
        merge_with_coefficients,
    )
    from statsmerge_plugin.mini.evaluate import modelpool

    root, tasks = Path(smoke_build["path"]), list(TASK_NAMES)
    free = free_control(root, tasks, max_steps=3, num_unlabelled_per_task=None)
    coefficients, names = free["coefficients"], free["tensor_names"]
    assert coefficients.shape == (len(tasks), len(names))
    pool = modelpool(root, tasks, splits=())
    again = merge_with_coefficients(pool, tasks, coefficients, names).state_dict()
    for name, tensor in free["model"].state_dict().items():
        torch.testing.assert_close(again[name], tensor, msg=name)
    wild = coefficients.clone()
    wild[:, 0] = 9.0  # the first tensor's coefficients out of range
    clamped = merge_with_coefficients(pool, tasks, wild.clamp(*COEFFICIENT_RANGE), names)
    unclamped = merge_with_coefficients(pool, tasks, wild, names)
    assert not torch.equal(clamped.state_dict()[names[0]], unclamped.state_dict()[names[0]])
    with pytest.raises(KeyError, match="no_such.weight"):
        merge_with_coefficients(pool, tasks, coefficients[:, :1], ["no_such.weight"])


def test_task_vector_benchmark_on_the_smoke_build(smoke_build, tmp_path, capsys):
    """benchmarks/mini_task_vectors.py: its "all" row is task arithmetic at λ = 0.3 (FusionBench's
    TaskArithmeticAlgorithm on the same val split, within one image per task: summation order), one
    row per tensor kind with its count; a directory that is no build exits 2 naming it."""
    import importlib.util

    from fusion_bench.method import TaskArithmeticAlgorithm

    from statsmerge_plugin.mini.evaluate import accuracies, modelpool, taskpool

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mini_task_vectors.py"
    spec = importlib.util.spec_from_file_location("mini_task_vectors", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root, tasks = Path(smoke_build["path"]), list(TASK_NAMES)
    assert script.main([str(root)]) == 0
    out = capsys.readouterr().out
    rows = {
        line[2:22].strip(): line[22:].split()
        for line in out.splitlines()
        if line.startswith("  ") and line[2:22].strip() in script.KINDS
    }
    assert set(rows) == set(script.KINDS)
    merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(modelpool(root, tasks, ()))
    expected = accuracies(taskpool(root, tasks, "val").evaluate(merged), tasks)
    sizes = {t: len(load_split(root / "data" / t / "val").labels) for t in tasks}
    count, *cells, average = rows["all"]
    assert int(count) == len(list(merged.parameters()))
    for task, cell in zip(tasks, cells):
        assert abs(float(cell) - 100 * expected[task]) <= 100 / sizes[task] + 0.05, task
    assert int(rows["patch embedding"][0]) == 1
    assert "task-vector cosines: mean" in out
    assert script.main([str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_recipe_loop_on_a_task_subset_and_a_bad_task_name(tmp_path):
    """The robustness check's subset: ``shape --tasks`` builds and measures only those tasks, and
    records them; an unknown task name fails before anything is built."""
    from statsmerge_plugin.mini.__main__ import main
    from statsmerge_plugin.mini.shape import run_variant
    from statsmerge_plugin.mini.shape_report import format_variants

    root, log = tmp_path / "root", tmp_path / "variants.jsonl"
    record = run_variant(
        {"ft_steps": 4},
        seed=3,
        root=root,
        preset="smoke",
        adamerging_steps=2,
        log=log,
        name="pair",
        progress=False,
        free_control_steps=0,
        tasks="dtd,mnist",
    )
    assert record["tasks"] == ["mini_mnist", "mini_dtd"]  # TA8 order
    assert set(record["rows"]["individual"]) == {"mini_mnist", "mini_dtd", "average"}
    assert set(record["diagnostics"]["adamerging_confidence"]) == {"mini_mnist", "mini_dtd"}
    assert read_manifest(root / record["key"])["tasks"] == ["mini_mnist", "mini_dtd"]
    assert "| pair | ft_steps=4 | 3 (2 tasks) |" in format_variants([json.loads(log.read_text())])
    before = sorted(p.name for p in root.iterdir())
    assert main(["shape", "--preset", "smoke", "--root", str(root), "--tasks", "mnist,mnsit"]) == 2
    assert sorted(p.name for p in root.iterdir()) == before
    assert len(log.read_text().splitlines()) == 1


def test_confidence_halves_and_coefficient_range():
    from statsmerge_plugin.mini.diagnostics import coefficient_range, confidence_halves

    # four images: the two most confident are right, the two least confident wrong
    logits = torch.tensor([[9.0, 0.0], [0.0, 5.0], [0.2, 0.0], [0.0, 0.1]])
    labels = torch.tensor([0, 1, 1, 0])
    assert confidence_halves(logits, labels) == {"confident": 1.0, "unsure": 0.0, "gap": 1.0}
    # confidence that means nothing: right and wrong alike in both halves
    assert confidence_halves(logits, torch.tensor([0, 0, 0, 0]))["gap"] == 0.0
    with pytest.raises(ValueError, match="expected logits"):
        confidence_halves(logits, labels[:3])
    c = torch.tensor([[0.3, 1.5, -0.5], [2.0, -3.0, 0.0]])
    assert coefficient_range(c) == {"fraction_within": 0.6667, "max_abs": 3.0}


def test_trim_task_vector_keeps_the_largest_entries_and_resets_the_rest():
    """TIES's trim as the shape report applies it: the largest |τ| entries over the whole state
    dict keep the fine-tuned value, every other entry is θ0's."""
    from statsmerge_plugin.mini.diagnostics import trim_task_vector

    gen = torch.Generator().manual_seed(0)
    theta0 = {
        "a.weight": torch.randn(6, 5, generator=gen),
        "b.bias": torch.randn(10, generator=gen),
    }
    theta = {k: v + torch.randn(v.shape, generator=gen) for k, v in theta0.items()}
    out = trim_task_vector(theta0, theta, keep=20)
    tau = torch.cat([(theta[k] - theta0[k]).flatten() for k in sorted(theta0)])
    moved = torch.cat([(out[k] != theta0[k]).flatten() for k in sorted(theta0)])
    assert 8 <= int(moved.sum()) <= 9  # 20 % of 40 (FusionBench's topk_values_mask keeps k + 1)
    assert tau.abs()[moved].min() > tau.abs()[~moved].max()  # the largest ones, across tensors
    for k in theta0:
        kept = out[k] != theta0[k]
        assert torch.allclose(out[k][kept], theta[k][kept])
    with pytest.raises(KeyError, match="c.weight"):
        trim_task_vector(theta0, dict(theta, **{"c.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="keep"):
        trim_task_vector(theta0, theta, keep=100)


def test_build_command_honours_the_resolvers_seed_and_preset_variables(tmp_path):
    """``STATSMERGE_MINI_SEED=3 statsmerge-mini build`` builds seed 3, the build the first
    ``fusion_bench`` run then resolves (``${mini_clip:}``), not seed 0; ``--seed`` still wins."""
    from statsmerge_plugin.mini.resolver import mini_clip_root

    env = dict(
        os.environ,
        STATSMERGE_MINI_SEED="3",
        STATSMERGE_MINI_PRESET="smoke",
        STATSMERGE_MINI_ROOT=str(tmp_path),
    )
    cmd = [sys.executable, "-m", "statsmerge_plugin.mini", "build", "--quiet"]
    cmd += ["--tasks", PAIR[0]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    built = Path(out.stdout.strip().splitlines()[-1])
    manifest = read_manifest(built)
    assert manifest["seed"] == 3 and manifest["preset"] == "smoke"
    explicit = subprocess.run(
        [*cmd, "--seed", "4"], env=env, capture_output=True, text=True, timeout=600, check=True
    )
    assert read_manifest(Path(explicit.stdout.strip().splitlines()[-1]))["seed"] == 4
    bad = subprocess.run(
        cmd, env=env | {"STATSMERGE_MINI_SEED": "x"}, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "$STATSMERGE_MINI_SEED='x'" in bad.stderr
    with pytest.raises(ValueError, match="STATSMERGE_MINI_SEED"):
        mini_clip_root("smoke", "three")


def test_mini_pool_banner_states_the_recipes_split_sizes():
    """The pool YAML's banner gives each split's images per class as the default recipe builds them."""
    import re

    recipe = get_recipe("default")
    path = Path(__file__).parents[1] / "config/modelpool/CLIPVisionModelPool/mini-clip_TA8.yaml"
    banner = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"#\s+(\w+)_datasets\s.*?\((\d+) images/class\)", path.read_text())
    }
    assert banner == {"train": recipe.n_train, "val": recipe.n_val, "test": recipe.n_test}


def test_build_key_names_this_machine_numerics(monkeypatch):
    """Same key, same bytes across machines: the key holds the fingerprint of this machine's float32
    kernels (another CPU kind builds other weights), recomputed identically on every call."""
    from statsmerge_plugin.mini import store

    recipe = get_recipe("default")
    key = build_key(recipe, "default", 0, PAIR)
    probe = store.numerics_fingerprint.__wrapped__  # uncached: computed again from scratch
    assert probe(2) == probe(2) == store.numerics_fingerprint(2)
    if store.effective_threads(2) == 2:
        assert probe(1) != probe(2)  # thread-dependent reduction order, as in the builds
    monkeypatch.setattr(store, "numerics_fingerprint", lambda n: "another-cpu")
    assert build_key(recipe, "default", 0, PAIR) != key
