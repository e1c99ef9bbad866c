"""ProDistill on several devices (issue 19): the few-shot samples of every block sharded across
ranks, the coefficients' gradients all-reduced, rank-local scratch, one report (rank 0).

Two CPU processes under Lightning Fabric's DDP strategy (gloo), started by Fabric's own launcher
from ``prodistill_ddp.py``, against one process on the same tiny pool: the same merged weights (up
to float32 summation order), identical weights on both ranks, half the samples per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_clip import pool_config

from statsmerge_plugin.method.prodistill.sharding import SampleShard

HELPER = Path(__file__).with_name("prodistill_ddp.py")


def test_sample_shard_splits_every_minibatch_without_overlap():
    shards = [SampleShard(16, r, 3) for r in range(3)]
    assert sorted(torch.cat([s.owned for s in shards]).tolist()) == list(range(16))
    assert [len(s) for s in shards] == [6, 5, 5]
    epochs = [list(s.epoch(6, torch.Generator().manual_seed(0))) for s in shards]
    one = list(SampleShard(16).epoch(6, torch.Generator().manual_seed(0)))
    for step, (rows, size) in enumerate(one):  # each global minibatch, split across the ranks
        parts = [shard.owned[epoch[step][0]] for shard, epoch in zip(shards, epochs)]
        assert sorted(torch.cat(parts).tolist()) == sorted(rows.tolist())
        assert all(epoch[step][1] == size for epoch in epochs)
    # the rows of an input batch a rank embeds in stage 0
    assert shards[1].positions_in(offset=4, size=6).tolist() == [0, 3]  # samples 4 and 7
    with pytest.raises(ValueError, match="rank 3"):
        SampleShard(4, 3, 3)


def run_helper(tmp_path: Path, devices: int, pool: Path, reduction: str) -> list:
    tag = f"{devices}-{reduction}"
    out = tmp_path / f"out{tag}"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HELPER.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HELPER), "--devices", str(devices), "--pool", str(pool)]
        + ["--scratch", str(tmp_path / f"scratch{tag}"), "--log-dir", str(tmp_path / f"log{tag}")]
        + ["--out", str(out), "--loss-reduction", reduction],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt") for r in range(devices)]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_processes_give_the_merge_of_one_with_half_the_samples_each(
    tiny_clip, tmp_path, reduction
):
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(pool_config(tiny_clip), default=str))
    (single,) = run_helper(tmp_path, 1, pool, reduction)
    rank0, rank1 = run_helper(tmp_path, 2, pool, reduction)
    assert single["world_size"] == 1 and rank0["world_size"] == 2
    # half the per-rank work: 2 tasks x 8 shots = 16 samples, 8 on each rank, in every block
    assert [b["samples_this_rank"] for b in single["blocks"]] == [16, 16]
    assert [b["samples_this_rank"] for b in rank0["blocks"]] == [8, 8]
    assert [b["samples_this_rank"] for b in rank1["blocks"]] == [8, 8]
    assert [b["steps"] for b in rank0["blocks"]] == [b["steps"] for b in single["blocks"]]
    # identical coefficients on both ranks, checked by the method itself after every block
    assert all(b["rank_max_abs_diff"] == 0.0 for b in rank0["blocks"] + rank1["blocks"])
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name
        if "k_proj.bias" in name:  # its gradient is 0 in exact arithmetic (softmax ignores a
            continue  # shift of the keys): Adam turns the summation-order noise into steps
        # the merge of one process, up to float32 summation order
        torch.testing.assert_close(value, single["state"][name], rtol=1e-5, atol=1e-6)
    for a, b in zip(single["blocks"], rank0["blocks"]):  # whole-set losses of all ranks' samples
        assert b["loss_after"] == pytest.approx(a["loss_after"], rel=1e-4)
    # each rank in its own scratch directory; only rank 0 writes the report
    assert rank0["scratch"] == rank1["scratch"] == ["rank0", "rank1"]
    assert (tmp_path / f"log2-{reduction}" / "prodistill_report.json").is_file()
