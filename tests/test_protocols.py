"""The paper's other protocols: unseen tasks (FusionBench's generalization exp1/exp2) and robustness
(FusionBench's seven corruptions), on FusionBench's configs and on the mini benchmark.

The corruption functions are tested as pure functions; the corrupted splits, the mini pools and the
leaderboard's seen/unseen and clean/corrupted reporting run for real on a smoke build (accuracies of a
smoke build are near chance: the tests assert structure and behaviour, never accuracy levels).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, run_fusion_bench
from omegaconf import OmegaConf

from statsmerge_plugin.leaderboard import (
    RunResult,
    individual_runs,
    main,
    markdown,
    summarize,
    task_groups,
)
from statsmerge_plugin.mini import corruptions as C
from statsmerge_plugin.mini.data import load_split
from statsmerge_plugin.mini.store import build_digests

ROBUST = ["mini_stanford_cars", "mini_eurosat", "mini_resisc45", "mini_gtsrb"]
RANDOM = ("motion_blur", "impulse_noise", "gaussian_noise", "spatter")


def image(seed: int = 0) -> np.ndarray:
    """A 32x32 RGB image with edges and flat regions (a bright square on a noisy gradient)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(40, 200, 32)[None, :, None] * np.ones((32, 1, 3))
    x = x + rng.normal(0, 8, x.shape)
    x[8:24, 10:22] = [230, 60, 40]
    return np.clip(x, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# corruption functions


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_each_corruption_is_seeded_shape_preserving_and_changes_the_image(name):
    x = image()
    for severity in C.SEVERITIES:
        a = C.corrupt(x, name, severity, np.random.default_rng(7))
        b = C.corrupt(x, name, severity, np.random.default_rng(7))
        assert a.shape == x.shape and a.dtype == np.uint8
        assert np.array_equal(a, b), "same generator state, same output"
    strong = C.corrupt(x, name, 5, np.random.default_rng(7))
    assert np.abs(strong.astype(int) - x).mean() > 1.0
    from PIL import Image

    assert np.array_equal(C.corrupt(Image.fromarray(x), name, 5, np.random.default_rng(7)), strong)
    if name in RANDOM:
        other = C.corrupt(x, name, 5, np.random.default_rng(8))
        assert not np.array_equal(other, strong), "the generator is the source of randomness"
    else:
        assert np.array_equal(C.corrupt(x, name, 5, np.random.default_rng(8)), strong)


def test_severity_follows_fusionbenchs_parameter_tables():
    x = image()
    flat = np.full((32, 32, 3), 128, np.uint8)
    noise = [
        np.std(C.corrupt(flat, "gaussian_noise", s, np.random.default_rng(0)) / 255.0)
        for s in (1, 5)
    ]
    assert noise[0] == pytest.approx(0.04, rel=0.1) and noise[1] == pytest.approx(0.10, rel=0.1)
    hit = C.corrupt(flat, "impulse_noise", 5, np.random.default_rng(0)) != 128
    assert hit.mean() == pytest.approx(0.07, abs=0.015)  # every value, channel by channel
    spread = [C.corrupt(x, "contrast", s).std(axis=(0, 1)) for s in C.SEVERITIES]
    assert all(np.all(a > b) for a, b in zip(spread, spread[1:]))
    assert spread[-1] == pytest.approx(0.15 * x.std(axis=(0, 1)), rel=0.1)  # per channel
    # pixelate: box-downsample to int(32 * 0.65) = 20 pixels and back
    from PIL import Image

    small = Image.fromarray(x).resize((20, 20), Image.BOX).resize((32, 32), Image.BOX)
    assert np.array_equal(C.corrupt(x, "pixelate", 5), np.asarray(small))
    jpeg = [np.abs(C.corrupt(x, "jpeg_compression", s).astype(int) - x).mean() for s in (1, 5)]
    assert jpeg[0] < jpeg[1]
    mud = C.corrupt(x, "spatter", 5, np.random.default_rng(3))
    changed = np.any(mud != x, axis=2)
    assert changed.any() and np.allclose(mud[changed].mean(0), [63, 42, 20], atol=60)


def test_motion_blur_kernel_is_imagemagicks_one_sided_gaussian():
    weights, dx, dy = C.motion_kernel(6, 1.0, 0.0)
    assert len(weights) == 13 and weights.sum() == pytest.approx(1.0)
    assert np.all(np.diff(weights) < 0)  # heaviest at the pixel itself
    assert list(dx) == list(range(13)) and not dy.any()
    _, dx, dy = C.motion_kernel(6, 1.0, 90.0)
    assert not dx.any() and list(dy) == list(range(13))
    # a vertical edge blurred along x stays sharp along y
    x = np.zeros((32, 32, 3), np.uint8)
    x[:, 16:] = 255
    rng = np.random.default_rng(0)
    y = C.motion_blur(x, 5, rng)
    assert np.array_equal(y[0], y[-1]) and 0 < y[0, 14, 0] < 255


def test_spatter_helpers_port_opencv():
    gray = np.zeros((16, 16), np.uint8)
    gray[4:12, 4:12] = 200
    edges = C.canny(gray)
    assert edges[4:12, 3:5].any() and edges[4:12, 11:13].any()  # both vertical borders
    assert not edges[7:9, 7:9].any() and not edges[0, 0]  # neither inside nor far away
    u8 = np.array([[0, 0, 0, 1], [1, 2, 2, 2]], np.uint8)
    # OpenCV: lut[first] = 0, lut[i] = round(255 * (cdf(i) - hist[first]) / (N - hist[first]))
    assert C.equalize_hist(u8).tolist() == [[0, 0, 0, 102], [102, 255, 255, 255]]
    assert C.equalize_hist(np.full((3, 3), 9, np.uint8)).tolist() == [[9] * 3] * 3


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: C.corrupt(image(), "fog"), "unknown corruption 'fog'; known: motion_blur"),
        (lambda: C.corrupt(image(), "spatter", 0), "severity must be an integer in 1..5, got 0"),
        (lambda: C.corrupt(image(), "spatter", 6), "got 6"),
        (lambda: C.corrupt(image(), "spatter", True), "got True"),
        (lambda: C.corrupt(image()[..., 0], "contrast"), "shape (32, 32) and dtype uint8"),
        (lambda: C.corrupt(image().astype(float), "contrast"), "dtype float64"),
    ],
)
def test_bad_corruption_arguments_name_the_culprit(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


# ------------------------------------------------------------------------------------------------
# corrupted splits of a smoke build


@pytest.fixture()
def smoke_root(smoke_mini_root) -> Path:
    return smoke_mini_root


@pytest.fixture()
def smoke(smoke_mini) -> Path:
    """The eight-task smoke build (the session's, ``conftest.smoke_mini``), where ``${mini_clip:}``
    with preset smoke and ``STATSMERGE_MINI_ROOT=smoke_root`` finds it."""
    return Path(smoke_mini["path"])


def test_corrupted_split_is_derived_once_seeded_and_leaves_the_build_alone(smoke, tmp_path):
    manifest_before = (smoke / "manifest.json").read_bytes()
    path = C.ensure_corrupted(smoke, "mini_gtsrb", "spatter", severity=3)
    assert path == smoke / "corrupted" / f"v{C.CORRUPTED_VERSION}" / "s3/spatter/mini_gtsrb/test"
    record = json.loads((path / "corruption.json").read_text())
    assert record["complete"] and record["severity"] == 3 and record["build_key"] == smoke.name
    clean, dirty = load_split(smoke / "data/mini_gtsrb/test"), load_split(path)
    assert np.array_equal(clean.labels, dirty.labels)
    assert not np.array_equal(clean.images, dirty.images)
    # written once: a second call reuses it
    stamp = (path / "corruption.json").stat().st_mtime_ns
    assert C.ensure_corrupted(smoke, "mini_gtsrb", "spatter", severity=3) == path
    assert (path / "corruption.json").stat().st_mtime_ns == stamp
    # deterministic: regenerating from scratch gives the same images; an interrupted one is redone
    shutil.rmtree(path)
    (path.parent / f".tmp-test-{os.getpid()}").mkdir()  # a stale temp dir of a killed writer
    path.mkdir()  # a target without its corruption.json is not complete
    again = load_split(C.ensure_corrupted(smoke, "mini_gtsrb", "spatter", severity=3))
    assert np.array_equal(again.images, dirty.images)
    assert not list(path.parent.glob(".tmp-*"))
    # other severities / corruptions are other images; the build itself is untouched
    mild = load_split(C.ensure_corrupted(smoke, "mini_gtsrb", "spatter", severity=1))
    assert not np.array_equal(mild.images, dirty.images)
    assert (smoke / "manifest.json").read_bytes() == manifest_before
    ds = C.load_corrupted_split(smoke, "mini_gtsrb", "spatter", 3)
    assert set(ds.features) == {"image", "label"} and len(ds) == len(clean.labels)
    with pytest.raises(ValueError, match="is not a complete mini benchmark build"):
        C.ensure_corrupted(tmp_path, "mini_gtsrb", "spatter")
    with pytest.raises(ValueError, match="task 'gtsrb' is not in the mini build"):
        C.ensure_corrupted(smoke, "gtsrb", "spatter")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        C.ensure_corrupted(smoke, "mini_gtsrb", "spatter", split="dev")


def test_robustness_task_pool_is_clean_plus_every_corruption_of_fusionbenchs_four_tasks():
    cfg = OmegaConf.load(
        REPO_ROOT / "config/taskpool/CLIPVisionModelTaskPool/mini-clip_robustness.yaml"
    )
    keys = list(cfg.test_datasets)
    assert keys == ROBUST + [f"{t}__{c}" for c in C.CORRUPTIONS for t in ROBUST]
    for key in keys[len(ROBUST) :]:
        entry = cfg.test_datasets[key]
        assert entry._target_ == "statsmerge_plugin.mini.corruptions.load_corrupted_split"
        assert C.corrupted_key(entry.task, entry.corruption) == key
    groups = task_groups(keys, ROBUST)
    assert groups["clean"] == ROBUST and len(groups["corrupted"]) == 28
    assert groups["spatter"] == [f"{t}__spatter" for t in ROBUST]
    assert individual_runs(keys, ROBUST)["mini_eurosat"] == [
        "mini_eurosat",
        *(f"mini_eurosat__{c}" for c in C.CORRUPTIONS),
    ]


# ------------------------------------------------------------------------------------------------
# leaderboard: seen / unseen and clean / corrupted


def test_summary_reports_group_averages_and_individual_over_seen_tasks():
    tasks = ["a", "b", "c"]  # c is unseen: no model
    results = [
        RunResult("individual", 0, accuracy={"a": 0.9, "b": 0.8}),
        RunResult("task_arithmetic", 0, accuracy={"a": 0.6, "b": 0.4, "c": 0.2}),
    ]
    summary = summarize(results, tasks, ["individual", "task_arithmetic"], ["a", "b"])
    assert summary["groups"] == {"seen": ["a", "b"], "unseen": ["c"]}
    ta, ind = summary["methods"]["task_arithmetic"], summary["methods"]["individual"]
    assert ta["group_average"] == pytest.approx({"seen": 0.5, "unseen": 0.2})
    assert ind["status"] == "ok" and ind["group_average"] == pytest.approx({"seen": 0.85})
    assert ta["normalized"] == pytest.approx((0.6 / 0.9 + 0.4 / 0.8) / 2)
    text = markdown(summary, "cmd")
    assert "| Task Arithmetic (λ=0.3) | 50.0 | 20.0 |" in text
    assert "| Individual (fine-tuned) | 85.0 | – |" in text and "Unseen tasks (no model" in text
    assert task_groups(tasks, ["a", "b", "c"]) == {}  # the eight-task protocol has no groups


def leaderboard(tmp_path, modelpool, taskpool, methods, *extra):
    out = tmp_path / "lb"
    argv = ["--modelpool", modelpool, "--taskpool", taskpool, "--methods", methods]
    argv += ["--override", "fabric.accelerator=cpu", "--out", str(out), "--cwd", str(tmp_path)]
    assert main(argv + list(extra)) == 0
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def test_both_methods_run_on_the_mini_generalization_pool_and_report_seen_unseen(
    smoke, smoke_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("STATSMERGE_MINI_ROOT", str(smoke_root))
    monkeypatch.setenv("STATSMERGE_MINI_PRESET", "smoke")
    summary, md = leaderboard(
        tmp_path,
        "CLIPVisionModelPool/mini-clip_generalization_exp1",
        "CLIPVisionModelTaskPool/mini-clip_generalization_exp1",
        "statsmerging_lw,prodistill",
        *("--method-override", "statsmerging_lw:method.max_steps=2"),
        *("--method-override", "statsmerging_lw:method.num_unlabelled_per_task=8"),
        *("--method-override", "statsmerging_lw:method.mlp.hidden_dim=16"),
        *("--method-override", "prodistill:method.shots_per_task=8"),
        *("--method-override", "prodistill:method.epochs_per_block=1"),
        *("--method-override", "prodistill:method.batch_size=8"),
    )
    assert summary["groups"]["unseen"] == ["mini_mnist", "mini_eurosat"]
    assert len(summary["groups"]["seen"]) == 6 and "mini_eurosat" not in summary["model_names"]
    for method in ("statsmerging_lw", "prodistill"):
        row = summary["methods"][method]
        assert row["status"] == "ok", row["errors"]
        assert set(row["group_average"]) == {"seen", "unseen"}
        seen = np.mean([row["accuracy"][t] for t in summary["groups"]["seen"]])
        assert row["group_average"]["seen"] == pytest.approx(seen)
    # StatsMerging read the six seen tasks' val splits, nothing of the unseen tasks, no test split
    (record,) = (tmp_path / "lb_runs" / "statsmerging_lw_seed0").glob("**/summary.json")
    read = json.loads(record.read_text())["unlabelled_data"]
    assert sorted(read) == sorted(summary["groups"]["seen"])
    for task, entry in read.items():
        assert entry["split"] == "val" and f"/data/{task}/val" in json.dumps(entry), entry
    assert "| Method | Seen tasks | Unseen tasks |" in md


def test_clean_vs_corrupted_accuracy_on_the_mini_robustness_task_pool(
    smoke, smoke_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("STATSMERGE_MINI_ROOT", str(smoke_root))
    monkeypatch.setenv("STATSMERGE_MINI_PRESET", "smoke")
    summary, md = leaderboard(
        tmp_path,
        "CLIPVisionModelPool/mini-clip_robustness_clean",
        "CLIPVisionModelTaskPool/mini-clip_robustness",
        "task_arithmetic",
    )
    row = summary["methods"]["task_arithmetic"]
    assert row["status"] == "ok", row["errors"]
    assert list(row["group_average"]) == ["clean", *C.CORRUPTIONS, "corrupted"]
    assert len(row["accuracy"]) == 32
    corrupted = [row["accuracy"][t] for t in summary["groups"]["corrupted"]]
    assert row["group_average"]["corrupted"] == pytest.approx(np.mean(corrupted))
    assert "| Method | Clean | Motion blur |" in md and "Corrupted (mean) |" in md
    # the JSON and the table name the build they ran on, with the digests of its weights and data
    build = summary["build"]
    assert build["path"] == str(smoke.resolve()) and build["key"] == smoke.name
    assert build["digests"] == build_digests(smoke) and build["digests_recorded"]
    assert (
        f"Build: `{smoke.name}` (sha256 of its pretrained `{build['digests']['pretrained'][:12]}`"
        in md
    )
    # the task pool generated the 28 corrupted splits inside the build, at severity 1
    made = sorted((smoke / "corrupted" / f"v{C.CORRUPTED_VERSION}" / "s1").glob("*/*/test"))
    assert {(p.parts[-3], p.parts[-2]) for p in made} >= {
        (c, t) for c in C.CORRUPTIONS for t in ROBUST
    }


def test_test_time_adaptation_runs_once_per_condition_on_the_sets_it_is_evaluated_on(
    tmp_path, monkeypatch
):
    """FusionBench's robustness protocol for AdaMerging: one run on the clean pool for the clean
    keys, one per corruption on the corrupted twin (adapting on those test images) for that
    corruption's keys; each part's overrides compose with the real configs, and its model pool's
    test sets are the corruption it is evaluated on. Methods without test-time adaptation run once.
    """
    from statsmerge_plugin import leaderboard as L

    clean_pool = "CLIPVisionModelPool/mini-clip_robustness_clean"
    taskpool = "CLIPVisionModelTaskPool/mini-clip_robustness"
    args = L.parse_args(
        ["--modelpool", clean_pool, "--taskpool", taskpool, "--out", str(tmp_path / "lb")]
        + ["--override", "taskpool.severity=2"]
    )
    board = L.Leaderboard(args)
    tasks, _ = board.composed_pools()  # fusion_bench --cfg job
    assert len(tasks) == 32 and board.severity == 2
    calls = []

    def run_one(method, seed, overrides, tag, modelpool=None):
        calls.append((method, overrides, modelpool or clean_pool))
        keys = [t for t in tasks if f"~taskpool.test_datasets.{t}" not in overrides]
        return RunResult(method, seed, accuracy={k: 0.5 for k in keys}, wall_time_s=1.0)

    monkeypatch.setattr(board, "run_one", run_one)
    result = board.run_method("adamerging_lw", 0, tasks)
    assert result.conditions == ["clean", *C.CORRUPTIONS]
    assert sorted(result.accuracy) == sorted(tasks) and result.wall_time_s == 8.0
    groups = task_groups(tasks)
    for (method, overrides, modelpool), condition in zip(calls, result.conditions):
        cfg = _compose(
            "fabric_model_fusion",
            [f"modelpool={modelpool}", f"taskpool={taskpool}", "taskpool.severity=2", *overrides],
        )
        assert sorted(cfg.taskpool.test_datasets) == sorted(groups[condition])
        if condition == "clean":
            assert modelpool == clean_pool and "corruption" not in cfg
            continue
        assert modelpool == "CLIPVisionModelPool/mini-clip_robustness_corrupted"
        for key in groups[condition]:  # adapts on the very test sets it is evaluated on
            task = key.split("__")[0]
            node = f"modelpool.test_datasets.{task}"
            assert OmegaConf.select(cfg, f"{node}.corruption") == condition
            assert OmegaConf.select(cfg, f"{node}.severity") == 2
            assert cfg.taskpool.test_datasets[key].corruption == condition
    summary = summarize([result], tasks, ["adamerging_lw"])
    assert "adapted once per test condition" in summary["methods"]["adamerging_lw"]["note"]
    calls.clear()
    assert board.run_method("task_arithmetic", 0, tasks).conditions == []
    assert len(calls) == 1 and calls[0][2] == clean_pool


# ------------------------------------------------------------------------------------------------
# FusionBench's own generalization / robustness configs compose with both methods


def _compose(config_name, overrides):
    from fusion_bench.utils.hydra_utils import get_default_config_path
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=get_default_config_path(), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


@pytest.mark.parametrize("method", ["statsmerging", "prodistill"])
def test_fusionbench_generalization_and_robustness_configs_compose_from_elsewhere(
    method, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # not the repository root
    seen = {
        "exp1": ["sun397", "stanford-cars", "resisc45", "dtd", "svhn", "gtsrb"],
        "exp2": ["sun397", "stanford-cars", "gtsrb", "eurosat", "dtd", "mnist"],
    }
    ta8 = "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8"
    for exp, tasks in seen.items():
        for suffix in ("", "_val"):
            pool = (
                f"modelpool=CLIPVisionModelPool/clip-vit-base-patch32_generalization_{exp}{suffix}"
            )
            cfg = _compose("fabric_model_fusion", [f"method={method}", pool, ta8])
            assert cfg.method._target_.startswith("statsmerge_plugin.method.")
            assert [m for m in cfg.modelpool.models if m != "_pretrained_"] == tasks
            assert len(cfg.taskpool.test_datasets) == 8
            if suffix:  # the val variant: FusionBench's pool plus the seen tasks' val splits
                assert list(cfg.modelpool.val_datasets) == tasks
                assert {v.return_split for v in cfg.modelpool.val_datasets.values()} == {"val"}
                plain = _compose(
                    "fabric_model_fusion",
                    [pool.replace("_val", ""), ta8],
                ).modelpool
                for key in ("models", "train_datasets", "test_datasets"):
                    assert cfg.modelpool[key] == plain[key], key
    cfg = _compose(
        "clip-vit-base-patch32_robustness_corrupted",
        [
            f"method={method}",
            "corruption=pixelate",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_robustness_corrupted_val",
        ],
    )
    test = OmegaConf.to_container(cfg.modelpool.test_datasets, resolve=True)
    assert {v["split"] for v in test.values()} == {"pixelate"}
    assert list(cfg.modelpool.val_datasets) == ["stanford-cars", "eurosat", "resisc45", "gtsrb"]


def test_fusion_bench_cli_composes_the_robustness_config_with_statsmerging_elsewhere(tmp_path):
    proc = run_fusion_bench(
        [
            "--config-name",
            "clip-vit-base-patch32_robustness_corrupted",
            "corruption=motion_blur",
            "method=statsmerging",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_robustness_corrupted_val",
            "--cfg",
            "job",
        ],
        cwd=tmp_path,
    )
    job = OmegaConf.create(proc.stdout)
    assert job.method._target_ == "statsmerge_plugin.method.statsmerging.StatsMergingForCLIP"
    assert job.corruption == "motion_blur" and "val_datasets" in job.modelpool


# ------------------------------------------------------------------------------------------------
# method pages and example scripts


@pytest.mark.parametrize(
    "page, method", [("statsmerging.md", "statsmerging"), ("prodistill.md", "prodistill")]
)
def test_algorithm_pages_document_every_config_key_and_embed_the_config(page, method):
    import re

    text = (REPO_ROOT / "docs" / "algorithms" / page).read_text()
    from statsmerge_plugin.method.statsmerging.options import FLAT_KEYS

    cfg = OmegaConf.to_container(_compose("fabric_model_fusion", [f"method={method}"]).method)
    options = set()  # every key, a group's as group.key; not the old flat names (all null)
    for key, value in cfg.items():
        if key == "_target_" or (method == "statsmerging" and key in FLAT_KEYS and value is None):
            continue
        is_group = method == "statsmerging" and isinstance(value, dict)
        options |= {f"{key}.{k}" for k in value} if is_group else {key}
    documented = re.findall(r"^\| `([\w.]+)` \| `", text, flags=re.M)
    assert sorted(documented) == sorted(options)
    (snippet,) = re.findall(r'^--8<-- "(config/method/[^"]+)"$', text, flags=re.M)
    assert (REPO_ROOT / snippet).is_file()
    for section in ("## Merging rule", "## Configuration", "## Examples", "## Results", "@"):
        assert section in text
    assert "docs/leaderboard.md" in text or "(../leaderboard.md)" in text


def _reports_written_by(run_dir: Path) -> list:
    """The ``report_save_path`` of every FusionBench run under ``run_dir`` (Hydra's saved configs)."""
    import yaml

    paths = []
    for config in sorted(run_dir.glob("outputs/**/config.yaml")):
        value = yaml.safe_load(config.read_text()).get("report_save_path")
        if value:
            paths.append(value)
    return paths


@pytest.mark.parametrize(
    "script", sorted(p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.glob("examples/*/*.sh"))
)
def test_example_scripts_can_be_rerun_for_another_seed(script, tmp_path):
    """Each example script, dry-run with SEED=0, then (as if that run had written its reports) with
    SEED=1: both exit 0, with reports named by the seed; SEED=0 again stops at the output guard."""

    def run(seed: int, where: Path, *extra: str):
        where.mkdir(exist_ok=True)
        env = dict(os.environ, SEED=str(seed), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        env.pop("RUN_TAG", None)
        return subprocess.run(
            ["bash", str(REPO_ROOT / script), "dry_run=true", *extra],
            cwd=where,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    first = run(0, tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    reports = _reports_written_by(tmp_path / "a")
    assert reports and all(r.endswith("/seed0.json") for r in reports), reports
    assert len(set(reports)) == len(reports)  # every run of the script has its own report
    b = tmp_path / "b"
    b.mkdir()
    for report in reports:  # what the real run would have left behind
        (b / report).parent.mkdir(parents=True, exist_ok=True)
        (b / report).write_text("{}")
    shutil.rmtree(tmp_path / "a")
    second = run(1, b)
    assert second.returncode == 0, second.stderr[-2000:]
    again = _reports_written_by(b)
    assert sorted(again) == sorted(r.replace("/seed0.json", "/seed1.json") for r in reports)
    if script.endswith("_TA8.sh"):  # the same seed again must refuse to overwrite (exit 1)
        refused = run(0, b)
        assert refused.returncode == 1 and "already exists" in refused.stdout + refused.stderr
    wrong = run(1, b, "method.seed=3")  # the seed names the report: only through SEED
    assert wrong.returncode == 2 and "SEED=N" in wrong.stderr


def test_example_scripts_compose_with_fusionbenchs_pools(tmp_path, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    scripts = sorted((REPO_ROOT / "examples").glob("*/clip_vit_*_TA8.sh"))
    assert len(scripts) == 6
    for script in scripts:
        text = script.read_text()
        overrides = re.findall(r"^\s+((?:method|modelpool|taskpool)=\S+)", text, flags=re.M)
        assert len(overrides) == 3, script
        cfg = _compose("fabric_model_fusion", overrides)
        assert cfg.method._target_.startswith("statsmerge_plugin.method.")
        assert len(cfg.modelpool.val_datasets) == 8 and len(cfg.taskpool.test_datasets) == 8
        assert "Time and memory:" in text
