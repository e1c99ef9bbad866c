"""Record the vision ProDistill's merged weights (sha256 per tensor) on the tiny CLIP pool, the tiny
OpenCLIP pool and the mini smoke build, as the reference for ``test_prodistill_reference.py``.

Run once on the code *before* a refactor of the block engine (it was run at commit 41554c0, before the
language-model adapters) and commit ``tests/data/prodistill_vision_reference.json``; the test then
checks that the refactored engine gives the same bits:

    python tests/record_prodistill_reference.py tests/data/prodistill_vision_reference.json
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
        recipe=get_recipe("smoke").replace(num_threads=1),
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


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        record = {"options": OPTIONS, "torch": torch.__version__, "pools": {}}
        for name, build in POOLS.items():
            record["pools"][name] = run(build(Path(tmp)))
            print(name, len(record["pools"][name]), "tensors")
    Path(out).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
