"""Reliability (issue 12): test sets never used as training data, whatever the path says; outputs never
clobbered; output locations checked before any work; torch's thread count.

Per-method cases (non-finite options and training, unreadable checkpoints, poisoned splits) are in
test_statsmerging.py and test_prodistill.py; the leaderboard's in test_leaderboard.py.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_json, run_fusion_bench, statsmerging_args, write_tiny_configs
from datasets import load_from_disk
from hydra.utils import instantiate
from omegaconf import DictConfig
from tiny_clip import pool_config, taskpool_config

from statsmerge_plugin import data
from statsmerge_plugin.data import held_out_images
from statsmerge_plugin.threads import (
    ENV_VAR,
    FEW_CORES,
    configure_torch_threads,
    torch_num_threads,
)
from statsmerge_plugin.validation import check_output_locations

# ---------------------------------------------------------------------------------------------------
# the test-split guard: real paths, hub ids and splits, fingerprints; model pool and task pool


def _test_path(paths, task="mnist") -> str:
    return str(paths["data"][(task, "test")])


def _disk(path) -> dict:
    return {"_target_": "datasets.load_from_disk", "dataset_path": str(path)}


def trailing_slash(paths, tmp_path):
    return _disk(_test_path(paths) + "/")


def dot_segments(paths, tmp_path):
    test = Path(_test_path(paths))
    return _disk(f"{test}/../{test.name}")


def symlink(paths, tmp_path):
    (tmp_path / "link").symlink_to(_test_path(paths), target_is_directory=True)
    return _disk(tmp_path / "link")


def copied_directory(paths, tmp_path):
    return _disk(shutil.copytree(_test_path(paths), tmp_path / "copy_of_test"))


def resaved_copy(paths, tmp_path):
    load_from_disk(_test_path(paths)).save_to_disk(str(tmp_path / "resaved_test"))
    return _disk(tmp_path / "resaved_test")


def other_tasks_test_set(paths, tmp_path):
    return _disk(_test_path(paths, "eurosat"))


def task_pool_test_set(paths, tmp_path):
    return _disk(_test_path(paths))


def slice_of_the_hub_test_split(paths, tmp_path):
    return {"_target_": "datasets.load_dataset", "path": "some/hub_dataset", "split": "test[:10%]"}


@pytest.mark.parametrize(
    "val, test_task, owner",
    [
        (trailing_slash, "mnist", "model"),
        (dot_segments, "mnist", "model"),
        (symlink, "mnist", "model"),
        (copied_directory, "mnist", "model"),
        (resaved_copy, "mnist", "model"),
        (other_tasks_test_set, "eurosat", "model"),
        (task_pool_test_set, "mnist", "task"),  # the model pool has no test sets
        (slice_of_the_hub_test_split, "mnist", "model"),
    ],
)
def test_a_val_split_that_is_a_test_set_is_refused(tiny_clip, tmp_path, val, test_task, owner):
    cfg = pool_config(tiny_clip)
    cfg["val_datasets"]["mnist"] = val(tiny_clip, tmp_path)
    if val is slice_of_the_hub_test_split:
        cfg["test_datasets"]["mnist"] = {
            "_target_": "datasets.load_dataset",
            "path": "some/hub_dataset",
            "split": "test",
        }
    taskpool = None
    if owner == "task":  # common in FusionBench: the test sets live in the task pool only
        cfg.pop("test_datasets")
        taskpool = instantiate(DictConfig(taskpool_config(tiny_clip)), _recursive_=False)
    pool = instantiate(DictConfig(cfg), _recursive_=False)
    with pytest.raises(
        ValueError,
        match=f"task 'mnist': its 'val' dataset .*, which is the test set of task '{test_task}' in "
        f"the {owner} pool; refusing to train on test data",
    ):
        held_out_images(
            pool, "mnist", pool.load_processor(), 4, guard=data.TestSplitGuard(pool, taskpool)
        )


def test_a_held_out_val_split_passes_and_records_what_was_read(tiny_clip):
    pool = instantiate(DictConfig(pool_config(tiny_clip)), _recursive_=False)
    taskpool = instantiate(DictConfig(taskpool_config(tiny_clip)), _recursive_=False)
    images = held_out_images(
        pool, "mnist", pool.load_processor(), 4, guard=data.TestSplitGuard(pool, taskpool)
    )
    val = tiny_clip["data"][("mnist", "val")]
    assert images.source == {
        "split": "val",
        "paths": [os.path.realpath(val)],
        "fingerprint": load_from_disk(str(val))._fingerprint,
        "num_rows": 16,
        "num_images": 4,
    }


def test_cli_refuses_a_val_split_that_is_the_task_pools_test_set(tiny_clip, tmp_path):
    """The issue's case end to end: the pool has no test sets, the val path is the task pool's test
    path. The run stops before training, naming the task and the task pool."""
    val = {"dataset_path": _test_path(tiny_clip) + "/", "_target_": "datasets.load_from_disk"}
    overrides = {
        "test_datasets": None,
        "val_datasets": pool_config(tiny_clip)["val_datasets"] | {"mnist": val},
    }
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg", pool_overrides=overrides)
    log_dir = tmp_path / "run"
    proc = run_fusion_bench(statsmerging_args(config_dir), tmp_path, log_dir, check=False)
    assert proc.returncode != 0
    assert (
        "task 'mnist': its 'val' dataset reads " in proc.stderr
        and "which is the test set of task 'mnist' in the task pool" in proc.stderr
    ), proc.stderr[-3000:]
    assert (
        not (log_dir / "statsmerging").exists() and not (log_dir / "program_report.json").exists()
    )


# ---------------------------------------------------------------------------------------------------
# outputs: never clobbered, checked before any work


def test_rerun_into_a_log_dir_is_refused_and_overwrite_allows_it(tiny_clip, tmp_path):
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg")
    log_dir = tmp_path / "run"
    run_fusion_bench(statsmerging_args(config_dir, "method.max_steps=1"), tmp_path, log_dir)
    files = ["config.yaml", "hydra.yaml", "overrides.yaml", "program_report.json"]
    before = {f: (log_dir / f).read_bytes() for f in files}
    again = statsmerging_args(config_dir, "method.max_steps=2")
    proc = run_fusion_bench(again, tmp_path, log_dir, check=False)
    assert proc.returncode != 0
    assert (
        f"log dir '{log_dir}' already holds the outputs of an earlier run (['config.yaml', "
        "'hydra.yaml', 'overrides.yaml', 'program_report.json'," in proc.stderr
    ), proc.stderr[-3000:]
    assert "pass `method.overwrite=true` to replace them" in proc.stderr
    assert {f: (log_dir / f).read_bytes() for f in files} == before
    assert not (log_dir / "statsmerging_1").exists()
    # explicitly allowed: FusionBench's and Hydra's files are replaced, ours go next to the old ones
    run_fusion_bench(again + ["method.overwrite=true"], tmp_path, log_dir)
    assert (log_dir / "overrides.yaml").read_bytes() != before["overrides.yaml"]
    assert read_json(log_dir / "statsmerging_1" / "summary.json")["steps"] == 2
    assert read_json(log_dir / "statsmerging" / "summary.json")["steps"] == 1


@pytest.mark.parametrize(
    "method", ["statsmerging/clip_layer_wise", "statsmerging/clip_task_wise", "prodistill/clip"]
)
def test_every_method_config_refuses_a_log_dir_with_an_earlier_report(tiny_clip, tmp_path, method):
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg")
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    (log_dir / "program_report.json").write_text('{"earlier": 1}')
    args = ["--config-dir", str(config_dir), f"method={method}", "modelpool=tiny", "taskpool=tiny"]
    proc = run_fusion_bench(args, tmp_path, log_dir, check=False)
    assert proc.returncode != 0
    assert "already holds the outputs of an earlier run (['program_report.json'])" in proc.stderr
    assert sorted(p.name for p in log_dir.iterdir()) == ["program_report.json"]  # nothing written


def a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


def under_a_file(tmp_path):
    return a_file(tmp_path) / "merged"


def non_empty_dir(tmp_path):
    (tmp_path / "earlier_model").mkdir()
    (tmp_path / "earlier_model" / "model.safetensors").write_text("earlier")
    return tmp_path / "earlier_model"


@pytest.mark.parametrize(
    "make_path, message",
    [
        (a_file, "`merged_model_save_path` '{p}' is an existing file, not a directory"),
        (under_a_file, "`merged_model_save_path` '{p}' cannot be created: '{t}/a_file' is a file"),
        (non_empty_dir, "`merged_model_save_path` '{p}' already exists and is not empty; refusing"),
    ],
)
def test_cli_checks_the_merged_model_path_before_any_work(tiny_clip, tmp_path, make_path, message):
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg")
    path = make_path(tmp_path)
    log_dir = tmp_path / "run"
    args = statsmerging_args(config_dir, f"merged_model_save_path={path}")
    proc = run_fusion_bench(args, tmp_path, log_dir, check=False)
    assert proc.returncode != 0
    assert message.format(p=path, t=tmp_path) in proc.stderr, proc.stderr[-3000:]
    assert not log_dir.exists()  # stopped before Hydra or FusionBench wrote anything


@pytest.mark.parametrize(
    "log_dir, merged, report, overwrite, message",
    [
        ("a_file/run", None, None, False, "log dir (`path.log_dir`) '{t}/a_file/run' cannot be"),
        ("old", None, None, False, "log dir '{t}/old' already holds the outputs of an earlier"),
        ("old", None, None, True, None),
        (None, None, "old/config.yaml", False, "`report_save_path` '{t}/old/config.yaml' already"),
        (None, None, "old", False, "`report_save_path` '{t}/old' is a directory"),
        ("new", "{log_dir}/merged", "{log_dir}/report.json", False, None),
        ("old", "{log_dir}/config.yaml", None, True, "'{t}/old/config.yaml' is an existing file"),
    ],
)
def test_check_output_locations(tmp_path, log_dir, merged, report, overwrite, message):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("earlier")
    kwargs = dict(
        log_dir=log_dir and tmp_path / log_dir,
        merged_model_save_path=merged,
        report_save_path=report and (report if "{" in report else str(tmp_path / report)),
        overwrite=overwrite,
    )
    if message is None:
        check_output_locations(**kwargs)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "old"]  # nothing created
    else:
        with pytest.raises(ValueError, match=re.escape(message.format(t=tmp_path))):
            check_output_locations(**kwargs)


# ---------------------------------------------------------------------------------------------------
# torch threads


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({ENV_VAR: "3", "OMP_NUM_THREADS": "1"}, 3),
        ({"OMP_NUM_THREADS": "1"}, 1),
        ({}, "default"),
        ({ENV_VAR: "0"}, f"environment variable {ENV_VAR}='0': expected a positive integer"),
        ({"OMP_NUM_THREADS": "many"}, "environment variable OMP_NUM_THREADS='many'"),
    ],
)
def test_torch_thread_count(environ, expected):
    from statsmerge_plugin.threads import usable_cores

    if isinstance(expected, str) and expected != "default":
        with pytest.raises(ValueError, match=expected):
            torch_num_threads(environ)
        return
    cores = usable_cores()
    default = min(2, cores) if cores <= FEW_CORES else None
    assert torch_num_threads(environ) == (default if expected == "default" else expected)


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (4, 2), (16, None), (64, None)])
def test_thread_cap_only_on_machines_with_few_cores(cores, expected):
    assert torch_num_threads({}, cores=cores) == expected
    # a variable still wins on a large machine
    assert torch_num_threads({"OMP_NUM_THREADS": "3"}, cores=cores) == 3


def test_a_large_machine_keeps_torchs_default_thread_count(monkeypatch):
    """With 16 usable cores and no thread variable, a method's run() leaves torch's threads alone."""
    from statsmerge_plugin import threads

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(5)  # stands for torch's default on that machine
        assert configure_torch_threads() == 5 and torch.get_num_threads() == 5
        monkeypatch.setattr(threads, "usable_cores", lambda: 2)  # a small machine: capped
        assert configure_torch_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_methods_set_the_thread_count(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(ENV_VAR, "2")
    try:
        assert configure_torch_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
