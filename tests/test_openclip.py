"""Both methods on FusionBench's OpenCLIP pools (issue 11, item 3), offline.

A tiny random open_clip ViT is written in the ``task_vectors`` checkpoint format (pickled
``ImageEncoder`` and ``ClassificationHead`` modules, see ``tiny_openclip.py``) and loaded through
FusionBench's own ``OpenCLIPVisionModelPool`` and ``OpenCLIPVisionModelTaskPool``; nothing is
mocked. Accuracies of random weights mean nothing, so the tests assert behaviour: a usable merged
``ImageEncoder``, finite coefficients, each method's merge rule, and that the config composes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_fusion_bench, with_log_dir  # noqa: E402
from tiny_openclip import (  # noqa: E402
    build_tiny_openclip,
    make_sequence_first,
    openclip_pool_config,
    openclip_taskpool_config,
    tiny_image_encoder,
)

from statsmerge_plugin.method.openclip import (  # noqa: E402
    ImageTransformProcessor,
    is_openclip_pool,
    load_classification_heads,
    load_openclip_model,
)
from statsmerge_plugin.method.prodistill import ProDistillForCLIP  # noqa: E402
from statsmerge_plugin.method.prodistill.adapters import block_layout  # noqa: E402
from statsmerge_plugin.method.prodistill.layers import (  # noqa: E402
    OPENCLIP_LAYOUT,
    canonical_parameters,
)
from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP  # noqa: E402

TASKS = ("mnist", "eurosat")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_openclip(tmp_path_factory):
    return build_tiny_openclip(tmp_path_factory.mktemp("tiny_openclip"), TASKS, n_images=12)


def make_pool(paths, **overrides):
    from fusion_bench.utils import instantiate

    return instantiate(DictConfig(openclip_pool_config(paths) | overrides), _recursive_=False)


def load(paths, name: str):
    """Pool entry ``name`` as the methods load it (FusionBench 0.2.33's ``load_model`` cannot
    unpickle a module under current torch, see ``load_openclip_model``)."""
    return load_openclip_model(make_pool(paths), name)


def all_params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def some_images(pool, n: int = 3) -> torch.Tensor:
    from datasets import load_from_disk

    data = load_from_disk(pool._test_datasets["mnist"]["dataset_path"])
    processor = ImageTransformProcessor(pool.test_processor)
    return processor(images=[data[i]["image"] for i in range(n)])["pixel_values"]


def test_the_pool_is_fusion_bench_openclip_pool_and_loads_the_pickles(tiny_openclip):
    import pickle

    pool = make_pool(tiny_openclip)
    assert type(pool).__name__ == "OpenCLIPVisionModelPool" and is_openclip_pool(pool)
    with pytest.raises(
        pickle.UnpicklingError
    ):  # FusionBench 0.2.33 alone (torch.load weights_only)
        pool.load_model("_pretrained_")
    from statsmerge_plugin.model_io import load_pool_model

    encoder = load_pool_model(pool, "_pretrained_")
    assert type(encoder).__name__ == "ImageEncoder"
    assert block_layout(encoder) is OPENCLIP_LAYOUT
    assert "transformer.resblocks.1.attn.in_proj_weight" in canonical_parameters(encoder)
    heads = load_classification_heads(pool, TASKS)
    assert heads["mnist"].weight.shape[0] == 10 and heads["eurosat"].weight.shape[0] == 10


def test_statsmerging_merges_an_openclip_pool(tiny_openclip, tmp_path):
    pool = make_pool(tiny_openclip)
    alg = with_log_dir(
        StatsMergingForCLIP(
            max_steps=3, num_unlabelled_per_task=8, mlp={"hidden_dim": 16}, optim={"lr": 1e-2}
        ),
        tmp_path,
    )
    merged = alg.run(pool)
    assert type(merged).__name__ == "ImageEncoder"
    saved = torch.load(tmp_path / "statsmerging" / "coefficients.pt")
    coef, names = saved["coefficients"], saved["tensor_names"]
    assert saved["tasks"] == list(TASKS)
    assert torch.isfinite(coef).all() and coef.shape == (2, len(names))
    # every ImageEncoder parameter is a merged tensor (the official code's tensor set)
    base = load(tiny_openclip, "_pretrained_")
    assert names == [n for n, _ in base.named_parameters()]
    theta0 = all_params(base)
    theta = [all_params(load(tiny_openclip, t)) for t in TASKS]
    out = all_params(merged)
    for l, name in enumerate(names):  # the merge rule, tensor by tensor
        expected = theta0[name] + sum(coef[k, l] * (theta[k][name] - theta0[name]) for k in (0, 1))
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(out[n], theta0[n]) for n in names if n.startswith("model.visual."))
    # text-side tensors the ImageEncoder keeps have zero task vectors: unchanged
    assert torch.equal(out["model.token_embedding.weight"], theta0["model.token_embedding.weight"])
    # a usable model: features, then the pool's zero-shot head
    with torch.no_grad():
        features = merged(some_images(pool))
        logits = pool.load_classification_head("mnist")(features)
    assert features.shape == (3, 16) and torch.isfinite(logits).all()


def test_prodistill_merges_an_openclip_pool(tiny_openclip):
    pool = make_pool(tiny_openclip)
    alg = ProDistillForCLIP(
        shots_per_task=8, epochs_per_block=4, batch_size=8, save_loss_curves=False
    )
    merged = alg.run(pool)
    assert type(merged).__name__ == "ImageEncoder"
    assert [r["block"] for r in alg.block_records] == [0, 1]
    for record in alg.block_records:
        assert record["loss_after"] < record["loss_before"]
        assert all(torch.isfinite(torch.tensor(v)) for v in record["mean_coefficient"].values())
        assert set(record["mean_coefficient_per_parameter"]) == {
            "attn.in_proj_bias",
            "attn.in_proj_weight",
            "attn.out_proj.bias",
            "attn.out_proj.weight",
            "ln_1.bias",
            "ln_1.weight",
            "ln_2.bias",
            "ln_2.weight",
            "mlp.c_fc.bias",
            "mlp.c_fc.weight",
            "mlp.c_proj.bias",
            "mlp.c_proj.weight",
        }
    theta0 = canonical_parameters(load(tiny_openclip, "_pretrained_"))
    thetas = [canonical_parameters(load(tiny_openclip, t)) for t in TASKS]
    out = canonical_parameters(merged)
    for name, p0 in theta0.items():
        ta = p0 + 0.3 * sum(t[name] - p0 for t in thetas)
        if OPENCLIP_LAYOUT.block_of(name) is None:  # conv1, class/positional embedding, LNs, proj
            torch.testing.assert_close(out[name], ta, rtol=1e-6, atol=1e-7)
    trained = [n for n in theta0 if OPENCLIP_LAYOUT.block_of(n) is not None]
    assert any(
        not torch.allclose(out[n], theta0[n] + 0.3 * sum(t[n] - theta0[n] for t in thetas))
        for n in trained
    )
    with torch.no_grad():
        features = merged(some_images(pool))
    assert features.shape == (3, 16) and torch.isfinite(features).all()


def test_sequence_first_blocks_give_the_same_hidden_states():
    """Older open_clip (the ``task_vectors`` pickles, the official ProDistill code) runs blocks
    sequence-first; the block call and the embedding stage return batch-first states either way,
    equal to what the model itself computes (captured like the official code's pre-resblock hook).
    """
    batch_first, _ = tiny_image_encoder(seed=3)
    seq_first = make_sequence_first(tiny_image_encoder(seed=3)[0])
    pixels = torch.randn(4, 3, 32, 32)
    for encoder in (batch_first, seq_first):
        visual = encoder.model.visual
        captured = []

        def hook(module, inputs, output):
            captured.append((inputs[0], output))

        handles = [b.register_forward_hook(hook) for b in visual.transformer.resblocks]
        with torch.no_grad():
            encoder(pixels)
        for h in handles:
            h.remove()
        params = canonical_parameters(encoder)
        layout = block_layout(encoder)
        emb = {n: p for n, p in params.items() if layout.is_embedding(n)}
        with torch.no_grad():
            hidden = layout.call_embedding_stage(visual, emb, pixels)
            for index, (block_in, block_out) in enumerate(captured):
                as_batch_first = (
                    (lambda x: x) if encoder is batch_first else (lambda x: x.transpose(0, 1))
                )
                torch.testing.assert_close(hidden, as_batch_first(block_in), rtol=0, atol=1e-6)
                prefix = layout.block_prefix(index)
                local = {n[len(prefix) :]: p for n, p in params.items() if n.startswith(prefix)}
                hidden = layout.call_block(layout.blocks(visual)[index], local, hidden)
                torch.testing.assert_close(hidden, as_batch_first(block_out), rtol=0, atol=1e-6)


def test_a_task_without_a_head_is_named_before_training(tiny_openclip):
    """StatsMerging's teachers and merged model need every task's head (ProDistill uses none)."""
    heads = openclip_pool_config(tiny_openclip)["classification_heads"]
    pool = make_pool(tiny_openclip, classification_heads={"mnist": heads["mnist"]})
    alg = StatsMergingForCLIP(max_steps=1, num_unlabelled_per_task=8, mlp={"hidden_dim": 16})
    with pytest.raises(ValueError, match="task 'eurosat': the OpenCLIP model pool has no classif"):
        alg.run(pool)


def test_cli_runs_statsmerging_on_an_openclip_pool_and_evaluates_it(tiny_openclip, tmp_path):
    config_dir = tmp_path / "configs"
    for group, cfg in (
        ("modelpool", openclip_pool_config(tiny_openclip)),
        ("taskpool", openclip_taskpool_config(tiny_openclip)),
    ):
        (config_dir / group).mkdir(parents=True)
        (config_dir / group / "tiny_openclip.yaml").write_text(yaml.safe_dump(cfg))
    args = [
        "--config-dir",
        str(config_dir),
        "method=statsmerging",
        "modelpool=tiny_openclip",
        "taskpool=tiny_openclip",
        "method.max_steps=2",
        "method.num_unlabelled_per_task=8",
        "method.mlp.hidden_dim=16",
        "fabric.accelerator=cpu",
        "print_config=false",
    ]
    run_fusion_bench(args, cwd=tmp_path, log_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "program_report.json").read_text())
    for task in TASKS:
        assert 0.0 <= report[task]["accuracy"] <= 1.0
    assert (tmp_path / "run" / "statsmerging" / "coefficients.pt").is_file()


@pytest.mark.parametrize(
    "method, modelpool",
    [
        ("statsmerging", "OpenCLIPVisionModelPool/ViT-B-32_TA8"),
        ("prodistill", "OpenCLIPVisionModelPool/ViT-L-14_TA8_val"),
    ],
)
def test_fusion_bench_openclip_configs_compose_from_another_directory(tmp_path, method, modelpool):
    """``--cfg job`` with FusionBench's OpenCLIP TA8 pool (or our val-split variant) and its OpenCLIP
    task pool, from a directory that is not the repository (each method with one of them; the
    method configs do not depend on the pool)."""
    model = modelpool.split("/")[1].split("_")[0]
    proc = run_fusion_bench(
        [
            f"method={method}",
            f"modelpool={modelpool}",
            f"taskpool=OpenCLIPVisionModelTaskPool/{model}_TA8",
            "--cfg",
            "job",
        ],
        cwd=tmp_path,
    )
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["method"]["_target_"].startswith(f"statsmerge_plugin.method.{method}.")
    assert cfg["modelpool"]["_target_"] == "fusion_bench.modelpool.OpenCLIPVisionModelPool"
    assert cfg["taskpool"]["_target_"] == "fusion_bench.taskpool.OpenCLIPVisionModelTaskPool"
    assert cfg["modelpool"]["models"]["_pretrained_"]
    if modelpool.endswith("_val"):
        assert sorted(cfg["modelpool"]["val_datasets"]) == sorted(cfg["taskpool"]["test_datasets"])
