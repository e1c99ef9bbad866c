"""The `fusion_bench` command line with our configs: from the repo root, from elsewhere, under DDP,
and from a non-editable wheel install."""

from __future__ import annotations

import csv
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO_ROOT, read_json, run_fusion_bench, statsmerging_args, write_tiny_configs

TA8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def check_run(log_dir: Path, tasks=("mnist", "eurosat")):
    report = read_json(log_dir / "program_report.json")
    assert set(tasks) <= set(report) and 0.0 <= report["average"]["accuracy"] <= 1.0
    out = log_dir / "statsmerging"
    rows = list(csv.reader(open(out / "coefficients.csv")))
    assert sorted(r[0] for r in rows[1:]) == sorted(tasks) and len(rows[0]) == 1 + 39
    assert (out / "coefficients.pt").is_file() and (
        out / "coefficients_heatmap.png"
    ).stat().st_size > 1000
    return report


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_cli_run_on_the_tiny_pool(tiny_clip, tmp_path, where):
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg")
    cwd = REPO_ROOT if where == "repo_root" else tmp_path
    log_dir = tmp_path / "run"
    run_fusion_bench(statsmerging_args(config_dir), cwd=cwd, log_dir=log_dir)
    check_run(log_dir)


def test_cli_fast_dev_run_takes_one_step(tiny_clip, tmp_path):
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg")
    run_fusion_bench(
        statsmerging_args(config_dir, "fast_dev_run=true"), cwd=tmp_path, log_dir=tmp_path / "run"
    )
    assert read_json(tmp_path / "run" / "statsmerging" / "summary.json")["steps"] == 1


def test_cli_ddp_two_cpu_processes_agree_and_only_rank_zero_writes(tiny_clip, tmp_path):
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg")
    args = statsmerging_args(config_dir, "fabric.devices=2", "fabric.strategy=ddp")
    run_fusion_bench(args, cwd=tmp_path, timeout=900)
    written = sorted((tmp_path / "outputs").glob("fabric_model_fusion/*/statsmerging*"))
    assert [p.name for p in written] == ["statsmerging"], written
    summary = read_json(written[0] / "summary.json")
    assert summary["world_size"] == 2
    assert summary["rank_max_abs_diff"] == 0.0


def compose_job(cwd: Path, method: str, modelpool: str, python=None) -> str:
    cmd = [
        python or sys.executable,
        "-m",
        "fusion_bench",
        f"method={method}",
        f"modelpool={modelpool}",
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        "--cfg",
        "job",
    ]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
@pytest.mark.parametrize("method", ["statsmerging/clip_layer_wise", "statsmerging/clip_task_wise"])
def test_cfg_job_composes_the_real_ta8_val_pool(tmp_path, where, method):
    from omegaconf import OmegaConf

    out = compose_job(
        REPO_ROOT if where == "repo_root" else tmp_path,
        method,
        "CLIPVisionModelPool/clip-vit-base-patch32_TA8_val",
    )
    cfg = OmegaConf.create(out)
    assert cfg.method._target_ == "statsmerge_plugin.method.statsmerging.StatsMergingForCLIP"
    assert cfg.method.granularity == method.split("clip_")[1]
    assert list(cfg.modelpool.val_datasets) == TA8
    assert all(cfg.modelpool.val_datasets[t].return_split == "val" for t in TA8)
    assert list(cfg.modelpool.test_datasets) == TA8 and list(cfg.taskpool.test_datasets) == TA8
    assert cfg.modelpool.models._pretrained_ == "openai/clip-vit-base-patch32"


@pytest.mark.parametrize("size", ["base-patch16", "large-patch14"])
def test_other_ta8_val_pools_compose(tmp_path, size):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        compose_job(
            tmp_path, "statsmerging/clip_layer_wise", f"CLIPVisionModelPool/clip-vit-{size}_TA8_val"
        )
    )
    assert list(cfg.modelpool.val_datasets) == TA8
    assert cfg.modelpool.models._pretrained_ == f"openai/clip-vit-{size}"


def running_site_packages() -> list:
    """The site-packages directories of the interpreter running pytest, in ``sys.path`` order."""
    import site

    candidates = site.getsitepackages() + [site.getusersitepackages()]
    candidates += [
        p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))
    ]
    dirs = [p for p in sys.path if p in candidates and Path(p).is_dir()]
    return list(dict.fromkeys(dirs))


def test_wheel_install_finds_our_configs(tmp_path):
    """A non-editable wheel in a fresh virtualenv finds our configs. The venv's dependencies are those
    of the interpreter running pytest (``system_site_packages`` would see the *system* Python's, which
    lack them when pytest runs inside a virtualenv)."""
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheel_dir),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(wheel_dir.glob("statsmerge_plugin-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "statsmerge_plugin/config/method/statsmerging/clip_layer_wise.yaml" in names
    assert not any(
        n.startswith("config/") for n in names
    ), "a top-level config/ would hijack FusionBench"
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    py = str(env_dir / "bin" / "python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the dependencies: whatever the interpreter running pytest sees (a virtualenv's or the system's),
    # added after the venv's own site-packages, so the wheel's copy is imported first
    (Path(site) / "_running_interpreter_site_packages.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in running_site_packages())
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-compile",
            "--target",
            site,
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    # what the venv imports is the wheel's copy, not this checkout
    probe = subprocess.run(
        [
            py,
            "-c",
            "import statsmerge_plugin, importlib.resources as r, hydra_plugins.statsmerge_plugin_searchpath as h; "
            "print(statsmerge_plugin.__file__); print(r.files('statsmerge_plugin.config')); print(h.__file__)",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert all(p.startswith(site) for p in probe), probe
    out = compose_job(
        tmp_path,
        "statsmerging/clip_layer_wise",
        "CLIPVisionModelPool/clip-vit-base-patch32_TA8_val",
        python=py,
    )
    assert "statsmerge_plugin.method.statsmerging.StatsMergingForCLIP" in out
