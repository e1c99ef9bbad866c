"""Tests of ProDistill for language models (issue 17) on tiny random offline pools.

Real FusionBench classes throughout: ``CausalLMPool`` (Llama, Qwen2, Mistral decoders, eager and
lazy), ``HuggingFaceGPT2ClassificationPool`` (``gpt-2_glue``'s class) and the ``fusion_bench`` CLI;
nothing is mocked. Random weights make accuracy meaningless, so the tests assert behaviour: the
layer losses fall, the outside-block weights are task arithmetic, the merged model keeps the pool's
dtype, padding never enters the loss, Adam inside backward takes plain Adam's steps, and the
test-split guard refuses before any model is read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import run_fusion_bench, with_log_dir
from datasets import load_from_disk
from fusion_bench.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from statsmerge_plugin.method.prodistill import ProDistillForCausalLM, ProDistillForGPT2
from statsmerge_plugin.method.prodistill.adapters import block_layout
from statsmerge_plugin.method.prodistill.layers import block_template
from statsmerge_plugin.method.prodistill.merge import block_loss
from statsmerge_plugin.model_io import canonical_parameters
from statsmerge_plugin.text_data import pad_shots, parse_specs

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import (  # noqa: E402
    build_tiny_causal_lm,
    build_tiny_gpt2,
    causal_lm_pool,
    causal_lm_pool_config,
    gpt2_pool_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = dict(shots_per_task=6, epochs_per_block=4, batch_size=4, lr=0.05)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    """Tiny bf16 Llama, Qwen2 (tied embeddings) and Mistral pools, two task models each."""
    root = tmp_path_factory.mktemp("tiny_lm")
    return {arch: build_tiny_causal_lm(root / arch, arch) for arch in ("llama", "qwen2", "mistral")}


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def run_causal_lm(paths, tmp_path, lazy=False, **options):
    pool = causal_lm_pool(paths, lazy=lazy)
    alg = with_log_dir(
        ProDistillForCausalLM(few_shot=paths["few_shot"], **(FAST | options)), tmp_path
    )
    return alg, alg.run(pool), pool


def state_of(model) -> dict:
    return {n: p.detach().clone() for n, p in canonical_parameters(model).items()}


def task_arithmetic_of(pool, name: str, lam: float) -> torch.Tensor:
    base = dict(pool.load_pretrained_model().named_parameters())[name].float()
    delta = sum(
        dict(pool.load_model(t).named_parameters())[name].float() - base for t in pool.model_names
    )
    return base + lam * delta


# ------------------------------------------------------------------------------------------------
# end to end on every architecture
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_causal_lm_pool_merges_every_decoder_layer(tiny_lms, tmp_path, arch):
    paths = tiny_lms[arch]
    alg, model, pool = run_causal_lm(paths, tmp_path)
    report = alg.report
    assert report["architecture"] == f"transformers decoder ({arch})"
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    for block in report["blocks"]:  # distillation lowers every layer's feature loss
        assert block["loss_after"] < 0.7 * block["loss_before"], block
    assert report["few_shot_samples"] == {"math": 6, "code": 6}
    # the pool's dtype, every tensor real (memory-mapped from the merged checkpoint)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert not any(p.is_meta for p in params.values())
    # outside the layers: task arithmetic with ta_lambda (computed in float32, stored in bf16)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        expected = task_arithmetic_of(pool, name, alg.ta_lambda).to(torch.bfloat16)
        assert torch.equal(params[name], expected), name
    if arch == "qwen2":  # tied embeddings stay one tensor
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        expected = task_arithmetic_of(pool, "lm_head.weight", alg.ta_lambda).to(torch.bfloat16)
        assert torch.equal(params["lm_head.weight"], expected)
    # inside the layers: neither task arithmetic nor any single model
    name = "model.layers.1.mlp.down_proj.weight"
    ta = task_arithmetic_of(pool, name, alg.ta_lambda).to(torch.bfloat16)
    assert not torch.equal(params[name], ta)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()
    written = json.loads((tmp_path / "prodistill_report.json").read_text())
    assert written["few_shot_data"]["math"]["split"] == "train"


def test_lazy_pool_and_adam_in_backward_give_the_same_merge(tiny_lms, tmp_path):
    """FusionBench's lazy CausalLMPool (LazyStateDict) reads the same weights as the eager one, and
    the Adam step inside backward (one tensor's gradient at a time) is plain Adam's step."""
    paths = tiny_lms["llama"]
    _, eager, _ = run_causal_lm(paths, tmp_path / "eager", optimizer_in_backward=True)
    _, lazy, _ = run_causal_lm(paths, tmp_path / "lazy", lazy=True, optimizer_in_backward=True)
    _, plain, _ = run_causal_lm(paths, tmp_path / "plain", optimizer_in_backward=False)
    a, b, c = state_of(eager), state_of(lazy), state_of(plain)
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert torch.allclose(a[name].float(), c[name].float(), atol=1e-2, rtol=0), name


def test_gpt2_glue_pool_merges_backbones_from_train_sentences(tiny_gpt2, tmp_path):
    pool = instantiate(DictConfig(gpt2_pool_config(tiny_gpt2)))
    alg = with_log_dir(ProDistillForGPT2(**FAST, max_tokens=16), tmp_path)
    model = alg.run(pool)
    report = alg.report
    assert report["architecture"] == "transformers GPT2Model"
    assert all(b["loss_after"] < b["loss_before"] for b in report["blocks"])
    assert {t: r["split"] for t, r in report["few_shot_data"].items()} == {
        "cola": "train",
        "sst2": "train",
    }
    params = dict(model.named_parameters())
    assert params["wte.weight"].dtype == torch.float32
    for name in ("wte.weight", "wpe.weight", "ln_f.bias"):
        assert torch.allclose(params[name], task_arithmetic_of(pool, name, alg.ta_lambda)), name
    # FusionBench's task pool puts each task's head on the merged backbone
    clf = pool.load_classifier("cola")
    clf.transformer = model
    ids = torch.tensor([[4, 5, 6, 0, 0]])
    with torch.no_grad():
        out = clf(input_ids=ids, attention_mask=(ids != 0).long()).logits
    assert out.shape == (1, 2) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# padding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_never_reaches_real_tokens_or_the_loss(tiny_lms, tiny_gpt2, arch):
    """The same prompts padded to two lengths: equal block outputs on the real tokens, and an equal
    masked loss even when the padded positions of the features are garbage (inf)."""
    from transformers import AutoModelForCausalLM, GPT2Model

    if arch == "gpt2":
        model = GPT2Model.from_pretrained(tiny_gpt2["pretrained"])
    else:
        model = AutoModelForCausalLM.from_pretrained(
            tiny_lms[arch]["pretrained"], torch_dtype=torch.float32
        )
    layout = block_layout(model)
    params = canonical_parameters(model)
    block_params = {
        n[len(layout.block_prefix(0)) :]: p.detach()
        for n, p in params.items()
        if n.startswith(layout.block_prefix(0))
    }
    stage_params = {
        n: p.detach() for n, p in params.items() if n.startswith(layout.embedding_prefixes)
    }
    template = block_template(layout.blocks(model)[0], "cpu")
    stage = model if arch == "gpt2" else None
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]
    outs, masks = [], []
    for length in (5, 12):
        shots = pad_shots(prompts, length)
        batch = next(shots.batches(2))
        with torch.no_grad():
            hidden = layout.call_embedding_stage(stage, stage_params, batch)
            outs.append(layout.call_block(template, block_params, hidden, batch["attention_mask"]))
        masks.append(batch["attention_mask"])
    for i, seq in enumerate(prompts):
        n = len(seq)
        torch.testing.assert_close(outs[0][i, :n], outs[1][i, :n], rtol=1e-5, atol=1e-5)
    teacher = [o + 0.1 for o in outs]
    garbage = outs[1].clone()
    garbage[~masks[1]] = float("inf")
    short = block_loss(outs[0], teacher[0], mask=masks[0])
    long = block_loss(garbage, teacher[1], mask=masks[1])
    assert torch.isfinite(long)
    torch.testing.assert_close(short, long, rtol=1e-4, atol=1e-4)
    assert not torch.isclose(block_loss(outs[1], teacher[1]), long)  # unmasked would count padding


# ------------------------------------------------------------------------------------------------
# the test-split guard and bad specs: refused before any model is read
# ------------------------------------------------------------------------------------------------


def pool_without_models(paths):
    """The tiny pool with every model path missing: an error other than the guard's would be a
    loading error, so a guard error proves no model was read."""
    cfg = causal_lm_pool_config(paths)
    cfg["models"] = {name: f"/nonexistent/{name}" for name in cfg["models"]}
    return instantiate(DictConfig(cfg), _recursive_=False)


@pytest.mark.parametrize("split", ["test", "train+test[:10%]", "test_matched", "train[:50%]+TEST"])
def test_a_spec_naming_a_test_split_is_refused_naming_the_task(tiny_lms, split):
    paths = tiny_lms["llama"]
    specs = {t: dict(s) for t, s in paths["few_shot"].items()}
    specs["code"]["split"] = split
    alg = ProDistillForCausalLM(few_shot=specs, **FAST)
    with pytest.raises(ValueError, match=r"task 'code'.*test split") as err:
        alg.run(pool_without_models(paths))
    assert "few_shot.code.split" in str(err.value)


def test_a_copy_of_the_task_pools_test_set_is_refused_naming_the_task(tiny_lms, tmp_path):
    paths = tiny_lms["llama"]
    test_dir = paths["root"] / "test_math"
    load_from_disk(str(test_dir)).save_to_disk(str(tmp_path / "renamed_copy"))  # same fingerprint
    specs = {t: dict(s) for t, s in paths["few_shot"].items()}
    specs["math"]["dataset"] = str(tmp_path / "renamed_copy")
    taskpool = OmegaConf.create(
        {
            "_target_": "statsmerge_plugin.mini_lm.ExactMatchTaskPool",
            "test_datasets": {
                "math": {"_target_": "datasets.load_from_disk", "dataset_path": str(test_dir)}
            },
        }
    )
    alg = ProDistillForCausalLM(few_shot=specs, **FAST)
    alg._program = SimpleNamespace(taskpool=taskpool)
    with pytest.raises(ValueError, match=r"task 'math'.*fingerprint.*test set of task 'math'"):
        alg.run(pool_without_models(paths))
    specs["math"]["dataset"] = str(test_dir)  # the test set itself, by path
    with pytest.raises(ValueError, match=r"task 'math'.*test set of task 'math' in the task pool"):
        alg.run(pool_without_models(paths))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("code"), r"no spec for task\(s\) \['code'\]"),
        (
            lambda s: s.update(chat=dict(s["math"])),
            r"task\(s\) \['chat'\] that are not in the pool",
        ),
        (lambda s: s["math"].update(shot=3), r"few_shot.math`: unknown key\(s\) \['shot'\]"),
        (lambda s: s["math"].update(template="{prompt}"), r"few_shot.math`: give exactly one"),
        (lambda s: s["code"].update(shots=0), r"few_shot.code.shots` must be a positive"),
        (lambda s: s["code"].pop("dataset"), r"few_shot.code.dataset` is required"),
    ],
)
def test_bad_specs_name_the_task_and_key(tiny_lms, edit, message):
    specs = {t: dict(s) for t, s in tiny_lms["llama"]["few_shot"].items()}
    edit(specs)
    with pytest.raises(ValueError, match=message):
        ProDistillForCausalLM(few_shot=specs, **FAST).run(pool_without_models(tiny_lms["llama"]))


def test_a_missing_few_shot_option_and_an_unrenderable_template_are_errors(tiny_lms):
    paths = tiny_lms["llama"]
    with pytest.raises(ValueError, match="option `few_shot` is required"):
        ProDistillForCausalLM(**FAST).run(pool_without_models(paths))
    specs = {t: dict(s) for t, s in paths["few_shot"].items()}
    specs["math"] = {"dataset": specs["math"]["dataset"], "template": "Q: {question}"}
    with pytest.raises(ValueError, match=r"task 'math': few-shot row \d+ cannot be rendered"):
        ProDistillForCausalLM(few_shot=specs, **FAST).run(pool_without_models(paths))


# ------------------------------------------------------------------------------------------------
# the CLI and config composition
# ------------------------------------------------------------------------------------------------


def write_lm_configs(tmp_path: Path, lm_paths: dict, gpt2_paths: dict) -> Path:
    config_dir = tmp_path / "configs"
    for sub in ("modelpool", "method/prodistill/few_shot"):
        (config_dir / sub).mkdir(parents=True, exist_ok=True)
    (config_dir / "modelpool" / "tiny_lm.yaml").write_text(
        yaml.safe_dump(causal_lm_pool_config(lm_paths))
    )
    (config_dir / "modelpool" / "tiny_gpt2.yaml").write_text(
        yaml.safe_dump(gpt2_pool_config(gpt2_paths))
    )
    specs = {t: {k: str(v) for k, v in s.items()} for t, s in lm_paths["few_shot"].items()}
    (config_dir / "method" / "prodistill" / "few_shot" / "tiny.yaml").write_text(
        "# @package method.few_shot\n" + yaml.safe_dump(specs)
    )
    return config_dir


def test_cli_runs_both_language_configs_from_another_directory(tiny_lms, tiny_gpt2, tmp_path):
    config_dir = write_lm_configs(tmp_path, tiny_lms["qwen2"], tiny_gpt2)
    common = ["--config-dir", str(config_dir), "taskpool=dummy", "fabric.accelerator=cpu"]
    common += ["fast_dev_run=true", "print_config=false", "method.shots_per_task=4"]
    runs = {
        "causal_lm": [
            "method=prodistill/causal_lm",
            "+method/prodistill/few_shot=tiny",
            "modelpool=tiny_lm",
        ],
        "gpt2": ["method=prodistill/gpt2_glue", "modelpool=tiny_gpt2"],
    }
    for name, args in runs.items():
        log_dir = tmp_path / f"logs_{name}"
        run_fusion_bench(common + args, cwd=tmp_path, log_dir=log_dir)
        report = json.loads((log_dir / "prodistill_report.json").read_text())
        assert [b["steps"] for b in report["blocks"]] == [1, 1], name
        assert all(n == 4 for n in report["few_shot_samples"].values()), name


def compose(tmp_path, *overrides) -> DictConfig:
    proc = run_fusion_bench([*overrides, "--cfg", "job"], cwd=tmp_path)
    return OmegaConf.create(proc.stdout)


@pytest.mark.parametrize(
    "pool, specs, tasks",
    [
        ("Qwen2.5-1.5B_three_models", "qwen2.5-1.5b_three_models", ["math", "code", "instruction"]),
        ("llama-7b_3-models_v1", "llama-7b_3-models_v1", ["chat", "math", "code"]),
    ],
)
def test_causal_lm_config_composes_with_fusionbench_pools(tmp_path, pool, specs, tasks):
    cfg = compose(
        tmp_path,
        "method=prodistill/causal_lm",
        f"+method/prodistill/few_shot={specs}",
        f"modelpool=CausalLMPool/{pool}",
        "taskpool=dummy",
    )
    assert cfg.method._target_ == "statsmerge_plugin.method.prodistill.ProDistillForCausalLM"
    assert cfg.modelpool._target_ == "fusion_bench.modelpool.CausalLMPool"
    assert cfg.modelpool.model_kwargs.torch_dtype == "bfloat16"
    pool_tasks = [m for m in cfg.modelpool.models if m != "_pretrained_"]
    assert sorted(pool_tasks) == sorted(tasks)
    parsed = parse_specs(cfg.method.few_shot, pool_tasks)  # the recommended specs fit the pool
    assert all(spec.split == "train" for spec in parsed.values())


def test_gpt2_glue_config_composes_with_fusionbench_pool_and_taskpool(tmp_path):
    cfg = compose(
        tmp_path, "method=prodistill/gpt2_glue", "modelpool=gpt-2_glue", "taskpool=gpt-2_glue"
    )
    assert cfg.method._target_ == "statsmerge_plugin.method.prodistill.ProDistillForGPT2"
    assert cfg.modelpool._target_ == "fusion_bench.modelpool.HuggingFaceGPT2ClassificationPool"
    assert cfg.method.data_source == "auto" and cfg.method.few_shot is None
    assert all(
        cfg.modelpool.train_datasets[t].split == "train" for t in cfg.modelpool.train_datasets
    )
