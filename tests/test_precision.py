"""Half-precision pools (issue 19): both methods compute in the pool's dtype, keep float32 only for
what is trained and for accumulators, and return the merged model in the pool's dtype.

The bfloat16 pools here are the float32 tiny pools loaded with ``torch_dtype: bfloat16`` in every
model entry, as a FusionBench pool is configured for half precision. Stated tolerances:

* StatsMerging (20 steps): every coefficient within 0.1 of the run on the same bfloat16
  checkpoints with ``compute_dtype=float32`` (the pool's rounding itself changes the task vectors:
  a LayerNorm weight's task vector, 2 % of the weight, keeps only a few bits in bfloat16);
* ProDistill: every merged tensor within 5 % (relative L2) of that run's, except the key
  projection biases, whose gradient is zero in exact arithmetic (softmax ignores a shift of the
  keys), so Adam turns bfloat16 rounding noise into full-size steps; they do not change the output;
* both: the merged model's output within 2 % (relative L2) of the merge of the float32 pool on
  random images, a small fraction of what merging changes (about 10 %).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import read_json, with_log_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from tiny_clip import pool_config
from transformers import CLIPVisionModel

from statsmerge_plugin.method.prodistill import ProDistillForCausalLM, ProDistillForCLIP
from statsmerge_plugin.method.prodistill.merge import block_loss, merge_from_weights
from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP
from statsmerge_plugin.method.statsmerging.merge import merge_tensor
from statsmerge_plugin.method.statsmerging.options import nest_flat_options
from statsmerge_plugin.precision import module_dtype, resolve_compute_dtype

pytestmark = pytest.mark.usefixtures("one_thread")


def in_dtype(cfg: dict, dtype: str) -> dict:
    """The pool config with every model loaded with ``torch_dtype=dtype``."""
    cfg = copy.deepcopy(cfg)
    cfg["models"] = {
        name: {
            "_target_": "transformers.CLIPVisionModel.from_pretrained",
            "pretrained_model_name_or_path": path,
            "torch_dtype": dtype,
        }
        for name, path in cfg["models"].items()
    }
    return cfg


def make_pool(cfg: dict):
    return instantiate(DictConfig(cfg), _recursive_=False)


def output_error(paths, fp32_model, low_model) -> tuple:
    """Relative L2 distance of the two merges' pooled outputs on random images, and how much the
    float32 merge moves the output away from ``_pretrained_``'s (the scale of merging)."""
    base = CLIPVisionModel.from_pretrained(paths["pretrained"]).eval()
    low = copy.deepcopy(fp32_model).float()
    low.load_state_dict({k: v.float() for k, v in low_model.state_dict().items()})
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, z = (m.float().eval()(pixel_values=x).pooler_output for m in (fp32_model, low, base))
    return float((a - b).norm() / a.norm()), float((a - z).norm() / a.norm())


def test_dtype_rules():
    assert resolve_compute_dtype(None, torch.bfloat16) == torch.bfloat16
    assert resolve_compute_dtype("float32", torch.bfloat16) == torch.float32
    assert module_dtype(torch.nn.Linear(2, 2).to(torch.float16)) == torch.float16
    # a half-precision merge is summed in float32 and rounded once
    g = torch.Generator().manual_seed(0)
    base, tv = torch.randn(64, generator=g), 0.01 * torch.randn(8, 64, generator=g)
    lam = torch.rand(8, generator=g)
    exact = (base.bfloat16().float() + lam @ tv.bfloat16().float()).bfloat16()
    assert torch.equal(merge_tensor(base.bfloat16(), tv.bfloat16(), lam), exact)
    # ProDistill: the merge of bfloat16 weights is float32, so is the loss of bfloat16 features
    merged = merge_from_weights({"w": base.bfloat16()}, {"w": tv.bfloat16()}, {"w": lam[:, None]})
    assert merged["w"].dtype == torch.float32
    loss = block_loss(
        torch.ones(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3, dtype=torch.bfloat16)
    )
    assert loss.dtype == torch.float32 and float(loss) == 6.0


@pytest.mark.parametrize(
    "method, value", [(StatsMergingForCLIP, "half"), (ProDistillForCLIP, "fp8")]
)
def test_compute_dtype_option_is_checked_naming_it(method, value):
    with pytest.raises(ValueError, match="option `compute_dtype`"):
        method(compute_dtype=value)


def test_statsmerging_on_a_bfloat16_pool(tiny_clip, tmp_path):
    options = nest_flat_options(
        dict(max_steps=20, num_unlabelled_per_task=8, batch_size_per_task=4, hidden_dim=16)
    )
    runs = {}
    for pool_dtype, compute in (("float32", None), ("bfloat16", "float32"), ("bfloat16", None)):
        log_dir = tmp_path / f"{pool_dtype}-{compute}"
        alg = with_log_dir(StatsMergingForCLIP(compute_dtype=compute, **options), log_dir)
        merged = alg.run(make_pool(in_dtype(pool_config(tiny_clip), pool_dtype)))
        summary = read_json(log_dir / "statsmerging" / "summary.json")
        coefficients = torch.load(log_dir / "statsmerging" / "coefficients.pt")["coefficients"]
        runs[pool_dtype, compute] = (merged, summary, coefficients, alg)
    merged, summary, coefficients, alg = runs["bfloat16", None]
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}  # the pool's dtype
    assert summary["dtypes"] == {"pool": "torch.bfloat16", "compute": "torch.bfloat16"}
    assert coefficients.dtype == torch.float32  # what is trained stays float32
    assert alg.visual_projection.weight.dtype == torch.float32  # and the heads
    assert alg.options.memory.merge_in_place is False  # no in-place merge undone in bfloat16
    # the same bfloat16 checkpoints computed in float32: returned in the pool's dtype too
    high, high_summary, high_coefficients, _ = runs["bfloat16", "float32"]
    assert high_summary["dtypes"] == {"pool": "torch.bfloat16", "compute": "torch.float32"}
    assert {p.dtype for p in high.parameters()} == {torch.bfloat16}
    assert (coefficients - high_coefficients).abs().max() < 0.1
    error, scale = output_error(tiny_clip, runs["float32", None][0], merged)
    assert error < 0.02 and scale > 5 * error, (error, scale)


def test_prodistill_on_a_bfloat16_pool(tiny_clip):
    runs = {}
    for pool_dtype, compute in (("float32", None), ("bfloat16", "float32"), ("bfloat16", None)):
        alg = ProDistillForCLIP(
            shots_per_task=8, epochs_per_block=4, batch_size=8, compute_dtype=compute
        )
        runs[pool_dtype, compute] = (
            alg.run(make_pool(in_dtype(pool_config(tiny_clip), pool_dtype))),
            alg,
        )
    (a, fp32), (h, high), (b, low) = (
        runs[k] for k in [("float32", None), ("bfloat16", "float32"), ("bfloat16", None)]
    )
    assert (
        {p.dtype for p in b.parameters()} == {p.dtype for p in h.parameters()} == {torch.bfloat16}
    )
    assert low._dtype_info == {"pool": "torch.bfloat16", "compute": "torch.bfloat16"}
    assert high._dtype_info == {"pool": "torch.bfloat16", "compute": "torch.float32"}
    assert fp32._dtype_info["compute"] == "torch.float32"
    assert low.report["activation_cache"]["mb"] == pytest.approx(
        high.report["activation_cache"]["mb"] / 2
    )
    for block_h, block_b in zip(high.report["blocks"], low.report["blocks"]):
        assert block_b["loss_after"] < block_b["loss_before"]  # bfloat16 distillation still learns
        assert block_b["loss_after"] == pytest.approx(block_h["loss_after"], rel=0.1)
    sh, sb = h.state_dict(), b.state_dict()
    for name, x in sh.items():
        if not x.is_floating_point() or "k_proj.bias" in name:
            continue
        x = x.float()
        rel = float((x - sb[name].float()).norm() / x.norm().clamp_min(1e-12))
        assert rel < 0.05, (name, rel)
    error, scale = output_error(tiny_clip, a, b)
    assert error < 0.02 and scale > 5 * error, (error, scale)


def test_prodistill_causal_lm_computes_in_the_pools_bfloat16(tmp_path):
    """FusionBench's LLM pools are bfloat16: the layer passes run in it by default (half the
    activation cache of ``compute_dtype=float32``), with a merge close to the float32 one."""
    from tiny_lm import build_tiny_causal_lm, causal_lm_pool

    paths = build_tiny_causal_lm(tmp_path / "llama", "llama")
    runs = {}
    for compute in (None, "float32"):
        alg = ProDistillForCausalLM(
            few_shot=paths["few_shot"],
            shots_per_task=6,
            epochs_per_block=4,
            batch_size=4,
            compute_dtype=compute,
        )
        runs[compute] = (alg.run(causal_lm_pool(paths)), alg)
    (low, alg_low), (high, alg_high) = runs[None], runs["float32"]
    assert alg_low._dtype_info == {"pool": "torch.bfloat16", "compute": "torch.bfloat16"}
    assert alg_high._dtype_info == {"pool": "torch.bfloat16", "compute": "torch.float32"}
    for model in (low, high):  # the output is in the pool's dtype either way
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert alg_low.report["activation_cache"]["mb"] == pytest.approx(
        alg_high.report["activation_cache"]["mb"] / 2
    )
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = (m.float()(ids).logits for m in (high, low))
    assert float((a - b).norm() / a.norm()) < 0.02
