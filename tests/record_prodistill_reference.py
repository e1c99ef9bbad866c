"""Record the vision ProDistill's merged weights (sha256 per tensor) on the tiny CLIP pool, the tiny
OpenCLIP pool and the mini smoke build, as the reference for ``test_prodistill_reference.py``.

Run on the code *before* a refactor of the block engine (the code of 41554c0, before the
language-model adapters) and commit ``tests/data/prodistill_vision_reference.json``; the test then
checks that the refactored engine gives the same bits. The bits depend on the machine's CPU kernels,
so the file holds one reference per kind of machine; this script adds (or replaces) the entry of the
machine it runs on. With the old code importable first:

    git worktree add /tmp/old 41554c0
    PYTHONPATH=/tmp/old python tests/record_prodistill_reference.py \
        tests/data/prodistill_vision_reference.json --machine "what CPU this is"
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

#: the runs whose merged weights are recorded: short, but every part of the loop is exercised
OPTIONS = dict(shots_per_task=8, epochs_per_block=3, batch_size=6, lr=0.05, seed=0)


def digest(model) -> dict:
    return {
        n: hashlib.sha256(p.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()
        for n, p in sorted(model.state_dict().items())
        if p.is_floating_point()
    }


def tiny_clip_pool(root: Path):
    from hydra.utils import instantiate
    from omegaconf import DictConfig
    from tiny_clip import build_tiny_clip, pool_config

    paths = build_tiny_clip(root / "tiny_clip", n_images=16)
    return instantiate(DictConfig(pool_config(paths)), _recursive_=False)


def tiny_openclip_pool(root: Path):
    from hydra.utils import instantiate
    from omegaconf import DictConfig
    from tiny_openclip import build_tiny_openclip, openclip_pool_config, register_tiny_model

    register_tiny_model()
    paths = build_tiny_openclip(root / "tiny_openclip")
    return instantiate(DictConfig(openclip_pool_config(paths)), _recursive_=False)


def smoke_mini_pool(root: Path, mini_root: Path = None):
    """``modelpool=CLIPVisionModelPool/mini-clip_TA8`` on the smoke build in ``mini_root``."""
    import os

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from statsmerge_plugin.mini.build import build_mini_benchmark
    from statsmerge_plugin.mini.recipe import get_recipe
    from statsmerge_plugin.mini.resolver import register_resolver

    mini_root = mini_root or root / "mini"
    build_mini_benchmark(
        root=mini_root,
        preset="smoke",
        recipe=get_recipe("smoke").replace(
            num_threads=1
        ),  # as recorded (the old code's default: 2)
        progress=False,
    )
    os.environ["STATSMERGE_MINI_ROOT"] = str(mini_root)  # read by the pool YAML's resolver
    os.environ["STATSMERGE_MINI_PRESET"] = "smoke"
    register_resolver()
    repo = Path(__file__).resolve().parents[1]
    return instantiate(
        OmegaConf.load(repo / "config/modelpool/CLIPVisionModelPool/mini-clip_TA8.yaml")
    )


POOLS = {
    "tiny_clip": tiny_clip_pool,
    "tiny_openclip": tiny_openclip_pool,
    "smoke_mini": smoke_mini_pool,
}


def run(pool) -> dict:
    import os

    from statsmerge_plugin.method.prodistill import ProDistillForCLIP

    # one thread: the bits of a float32 matmul depend on how many threads split its sums (the
    # methods set torch's thread count from this variable, see statsmerge_plugin/threads.py)
    os.environ["STATSMERGE_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    return digest(ProDistillForCLIP(**OPTIONS).run(pool))


def main(out: str, machine: str, recorded_at: str) -> None:
    import importlib.util

    # this checkout's store.py (it imports nothing else of the package): the old code has no probe
    store = Path(__file__).resolve().parents[1] / "statsmerge_plugin/mini/store.py"
    spec = importlib.util.spec_from_file_location("_store", store)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = {"machine": machine, "numerics": module.numerics_fingerprint(1)}
    entry["torch"] = torch.__version__
    entry["recorded_at"] = recorded_at
    with tempfile.TemporaryDirectory() as tmp:
        entry["pools"] = {}
        for name, build in POOLS.items():
            entry["pools"][name] = run(build(Path(tmp)))
            print(name, len(entry["pools"][name]), "tensors")
    path = Path(out)
    record = json.loads(path.read_text()) if path.exists() else {"references": []}
    if record.setdefault("options", OPTIONS) != OPTIONS:
        raise SystemExit(f"{out} was recorded with other options: {record['options']}")
    record["references"] = [r for r in record["references"] if r["numerics"] != entry["numerics"]]
    record["references"].append(entry)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--machine", required=True, help="the CPU, e.g. 'AMD EPYC, AVX512'")
    parser.add_argument("--recorded-at", default="41554c0", help="the commit of the code that ran")
    args = parser.parse_args()
    main(args.out, args.machine, args.recorded_at)
