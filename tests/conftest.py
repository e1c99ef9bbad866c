"""Shared fixtures: a tiny random CLIP pool and the mini benchmark's smoke build, each built once per
session, and helpers to run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_fusion_bench_cache(tmp_path_factory):
    """FusionBench caches zero-shot heads under ``<cwd>/outputs/cache``; keep tests out of the repo."""
    from fusion_bench.utils.cache_utils import set_default_cache_dir

    set_default_cache_dir(str(tmp_path_factory.mktemp("fusion_bench_cache")))
    # tiny models: one thread each is faster than two threads fighting over two cores
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it (tiny tensors: faster and steadier on shared
    CPUs); modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_log_dir(alg, log_dir: Path):
    """``alg`` with a CPU Fabric whose TensorBoard logger writes to ``log_dir`` (the method's outputs
    go to ``log_dir / <method>``)."""
    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger

    fabric = L.Fabric(
        accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(log_dir), name="", version="")
    )
    fabric.launch()
    alg.fabric = fabric
    return alg


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Tiny random CLIP: ``_pretrained_`` + ``mnist`` and ``eurosat`` models, train/val/test data."""
    from tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), n_images=16)


@pytest.fixture(scope="session")
def smoke_mini_root(tmp_path_factory) -> Path:
    """Root (``STATSMERGE_MINI_ROOT``) of the session's shared smoke build (:func:`smoke_mini`)."""
    return tmp_path_factory.mktemp("mini_smoke")


@pytest.fixture(scope="session")
def smoke_mini(smoke_mini_root) -> dict:
    """The mini benchmark's eight-task smoke build, with its manifest evaluation, built once per
    session in :func:`smoke_mini_root` under the builder's key; its manifest, with ``path`` (shared
    by every test: read it, never change it).

    For tests that only need *a* finished smoke build (pools, task pools, the CLI, derived corrupted
    splits). Tests of the building itself (caching, keys, locks, refactors, bad input) make their
    own builds in their own directories. Tests may add derived data inside the build (corrupted
    splits), never another build or a sibling directory in its root.
    """
    from statsmerge_plugin.mini.build import build_mini_benchmark
    from statsmerge_plugin.mini.recipe import build_key, get_recipe
    from statsmerge_plugin.mini.tasks import TASK_NAMES

    recipe = get_recipe("smoke")
    manifest = build_mini_benchmark(
        root=smoke_mini_root,
        preset="smoke",
        progress=False,
    )
    # where the builder (and ${mini_clip:} with preset smoke, seed 0) looks for the smoke preset
    assert Path(manifest["path"]) == smoke_mini_root / build_key(recipe, "smoke", 0, TASK_NAMES)
    return manifest


@pytest.fixture()
def tiny_pool(tiny_clip):
    from hydra.utils import instantiate
    from omegaconf import DictConfig
    from tiny_clip import pool_config

    return instantiate(DictConfig(pool_config(tiny_clip)), _recursive_=False)


def write_tiny_configs(paths: dict, config_dir: Path, pool_overrides: dict | None = None) -> Path:
    """Write ``modelpool/tiny.yaml`` and ``taskpool/tiny.yaml`` for ``fusion_bench --config-dir``."""
    from tiny_clip import pool_config, taskpool_config

    (config_dir / "modelpool").mkdir(parents=True, exist_ok=True)
    (config_dir / "taskpool").mkdir(parents=True, exist_ok=True)
    pool = pool_config(paths) | (pool_overrides or {})
    (config_dir / "modelpool" / "tiny.yaml").write_text(yaml.safe_dump(pool))
    (config_dir / "taskpool" / "tiny.yaml").write_text(yaml.safe_dump(taskpool_config(paths)))
    return config_dir


def statsmerging_args(config_dir: Path, *extra: str, method="statsmerging/clip_layer_wise"):
    """``fusion_bench`` arguments for a short StatsMerging run on the tiny pool of ``config_dir``."""
    return [
        "--config-dir",
        str(config_dir),
        f"method={method}",
        "modelpool=tiny",
        "taskpool=tiny",
        "method.max_steps=3",
        "method.num_unlabelled_per_task=8",
        "method.mlp.hidden_dim=16",
        "fabric.accelerator=cpu",
        "print_config=false",
        *extra,
    ]


def run_fusion_bench(
    args, cwd: Path, log_dir: Path | None = None, timeout: int = 600, python=None, check=True
):
    """Run the ``fusion_bench`` CLI in a subprocess; returns the CompletedProcess (checked unless
    ``check=False``)."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [python or sys.executable, "-m", "fusion_bench", *args]
    if log_dir is not None:
        cmd.append(f"path.log_dir={log_dir}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fusion_bench failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n"
            f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def damaged_checkpoint_copy(model_dir: Path, tmp_path: Path, damage: str) -> Path:
    """A copy of ``model_dir`` whose ``model.safetensors`` is truncated or garbage; returns the file."""
    import shutil

    weights = Path(shutil.copytree(model_dir, tmp_path / "damaged")) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else b"not safetensors" * 64
    )
    return weights


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
