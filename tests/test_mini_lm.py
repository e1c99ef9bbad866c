"""The offline language miniature (issue 17): skills, build, exact-match task pool, SFT sets, and
FusionBench's CausalLMPool / CLI on the smoke build (nothing downloaded)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from statsmerge_plugin.mini_lm import skills
from statsmerge_plugin.mini_lm.build import build_mini_lm
from statsmerge_plugin.mini_lm.recipe import build_key, get_recipe
from statsmerge_plugin.mini_lm.train import build_tokenizer, exact_match

SIZES = {"train": 200, "val": 50, "test": 50}


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_lm_root")
    build_mini_lm(root, preset="smoke", progress=False)
    return root


@pytest.fixture(scope="module")
def smoke(smoke_root):
    return build_mini_lm(smoke_root, preset="smoke", progress=False)


@pytest.mark.parametrize("skill", skills.SKILLS)
def test_splits_are_disjoint_deterministic_and_answers_are_right(skill):
    a, b = skills.draw_splits(skill, SIZES, 0), skills.draw_splits(skill, SIZES, 0)
    assert a == b and a != skills.draw_splits(skill, SIZES, 1)
    prompts = {split: {p for p, _ in rows} for split, rows in a.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["val"] & prompts["test"]
    assert not prompts["train"] & prompts["val"]
    assert all(len(prompts[s]) == SIZES[s] for s in SIZES)
    for prompt, answer in a["test"]:
        assert answer.endswith(".") and answer.count(".") == 1
        if skill == "arithmetic":
            x, y = prompt[:-1].split("+")
            assert int(answer[:-1]) == int(x) + int(y)
        if skill == "reverse":
            assert answer[:-1] == prompt[4:-1][::-1]


def test_the_arithmetic_train_split_is_cut_to_its_domain():
    splits = skills.draw_splits("arithmetic", {"train": 5000, "val": 300, "test": 300}, 0)
    assert len(splits["train"]) == skills.CAPACITY["arithmetic"] - 600


def test_pretraining_text_holds_only_the_narrow_format_slice_and_no_held_out_prompt():
    held_out = frozenset(p for p, _ in skills.draw_splits("reverse", SIZES, 0)["test"])
    rng = random.Random(0)
    lines = [skills.pretraining_text(rng, 0.5, 0.5, held_out) for _ in range(3000)]
    rev = [l for l in lines if l.startswith("rev ")]
    assert rev and all(len(l.split("=")[0]) - 4 <= 4 for l in rev)  # words of 3-4 letters only
    assert not any(l.split("=")[0] + "=" in held_out for l in rev)
    sums = [l for l in lines if "+" in l]
    assert sums and all(int(l.split("+")[0]) < 50 for l in sums)
    assert not any("give the" in l or "capitals?" in l for l in lines)  # second phrasings
    assert all(l.endswith(".") and set(l) <= set(skills.ALPHABET) for l in lines)


def test_teacher_forced_exact_match_is_greedy_decoding_cut_at_the_first_period(smoke):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(smoke["path"]) / "models" / "reverse")
    tok = build_tokenizer()
    prompts = [p for p, _ in skills.draw_splits("reverse", SIZES, 0)["test"][:12]]
    examples = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
        text = "".join(tok.convert_ids_to_tokens(out[0, ids.shape[1] :].tolist()))
        if "." in text:
            examples.append((p, text[: text.index(".") + 1]))
    assert examples, "the smoke model never emits a period"
    assert all(exact_match(model, tok, examples))
    wrong = [(p, "x" + a) if not a.startswith("x") else (p, "y" + a) for p, a in examples]
    assert not any(exact_match(model, tok, wrong))
    shorter = [(p, a[:-1] + "..") for p, a in examples]  # the period must come where greedy puts it
    assert not any(exact_match(model, tok, shorter))


def test_the_smoke_build_is_complete_cached_and_deterministic(smoke_root, smoke, tmp_path):
    path = Path(smoke["path"])
    assert path.name == build_key(get_recipe("smoke"), "smoke", 0)
    for part in ("pretrained", "tokenizer", "models/arithmetic", "data/instruct/test"):
        assert (path / part).exists(), part
    stamp = (path / "manifest.json").stat().st_mtime_ns
    again = build_mini_lm(smoke_root, preset="smoke", progress=False)
    assert (path / "manifest.json").stat().st_mtime_ns == stamp and again["key"] == smoke["key"]
    other = build_mini_lm(tmp_path, preset="smoke", progress=False)
    assert other["digests"] == smoke["digests"]
    assert (
        build_mini_lm(tmp_path, seed=1, preset="smoke", progress=False)["digests"]
        != other["digests"]
    )
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        build_mini_lm(tmp_path, seed=-1, preset="smoke")
    with pytest.raises(KeyError, match="unknown mini-lm preset 'tiny'"):
        build_mini_lm(tmp_path, preset="tiny")


def test_the_task_pool_scores_the_models_of_a_fusion_bench_causal_lm_pool(smoke):
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    from statsmerge_plugin.mini_lm import ExactMatchTaskPool

    path = Path(smoke["path"])
    pool = instantiate(
        DictConfig(
            {
                "_target_": "fusion_bench.modelpool.CausalLMPool",
                "_recursive_": False,
                "models": {"_pretrained_": str(path / "pretrained")}
                | {s: str(path / "models" / s) for s in skills.SKILLS},
                "tokenizer": str(path / "tokenizer"),
            }
        ),
        _recursive_=False,
    )
    tests = {
        s: {"_target_": "datasets.load_from_disk", "dataset_path": str(path / "data" / s / "test")}
        for s in skills.SKILLS
    }
    taskpool = ExactMatchTaskPool(DictConfig(tests), tokenizer=str(path / "tokenizer"))
    report = taskpool.evaluate(pool.load_model("reverse"))
    assert set(report) == set(skills.SKILLS) | {"average"}
    expected = smoke["exact_match"]["reverse"]["test"]
    for s in skills.SKILLS:
        assert report[s]["n"] == 20
        assert 100 * report[s]["accuracy"] == pytest.approx(expected[s], abs=0.01)
    bad = ExactMatchTaskPool(DictConfig(tests), tokenizer=str(path / "tokenizer"), answer_field="y")
    with pytest.raises(ValueError, match=r"task 'arithmetic' has no column\(s\) \['y'\]"):
        bad.evaluate(pool.load_model("reverse"))


def test_sft_sets_take_the_loss_on_the_answer_tokens_only(smoke):
    from statsmerge_plugin.mini_lm.sft import sft_dataset

    path = Path(smoke["path"])
    data = sft_dataset(str(path / "data" / "arithmetic" / "train"), str(path / "tokenizer"), 16)
    tok = build_tokenizer()
    from datasets import load_from_disk

    rows = load_from_disk(str(path / "data" / "arithmetic" / "train"))
    for i in range(5):
        row = data[i]
        assert row["input_ids"].shape == (16,)
        kept = row["labels"][row["labels"] != -100].tolist()
        assert "".join(tok.convert_ids_to_tokens(kept)) == rows[i]["answer"]
    with pytest.raises(ValueError, match="exceed max_length=4"):
        sft_dataset(str(path / "data" / "arithmetic" / "train"), str(path / "tokenizer"), 4)


def fusion_bench(tmp_path, smoke_root, *overrides, name="run"):
    env = os.environ | {
        "STATSMERGE_MINI_ROOT": str(smoke_root),
        "STATSMERGE_MINI_LM_PRESET": "smoke",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    log_dir = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "fusion_bench", *overrides, f"path.log_dir={log_dir}"]
        + ["modelpool=CausalLMPool/mini-lm", "print_config=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((log_dir / "program_report.json").read_text())


def test_fusion_bench_methods_and_prodistill_run_on_the_mini_lm_pool(smoke_root, smoke, tmp_path):
    ta = fusion_bench(
        tmp_path,
        smoke_root,
        "method=task_arithmetic",
        "taskpool=ExactMatchTaskPool/mini-lm",
        name="ta",
    )
    assert set(ta) >= set(skills.SKILLS) and 0 <= ta["average"]["accuracy"] <= 1
    pd = fusion_bench(
        tmp_path,
        smoke_root,
        "method=prodistill/causal_lm",
        "+method/prodistill/few_shot=mini-lm",
        "method.epochs_per_block=1",
        "method.shots_per_task=4",
        "taskpool=ExactMatchTaskPool/mini-lm_val",
        name="prodistill",
    )
    assert all(pd[s]["n"] == 20 for s in skills.SKILLS)
    ada = fusion_bench(
        tmp_path,
        smoke_root,
        "method=adamerging/llama_sft",
        "method.max_steps=2",
        "method.save_merged_model=false",
        "method.save_interval=null",
        "method.dataloader_kwargs.batch_size=4",
        "taskpool=ExactMatchTaskPool/mini-lm",
        name="adamerging",
    )
    assert set(ada) >= set(skills.SKILLS)


def test_the_leaderboard_summary_checks_issue_17s_shape_and_renders_every_row(tmp_path):
    from statsmerge_plugin.leaderboard import RunResult
    from statsmerge_plugin.mini_lm import leaderboard as lb

    def run(method, seed, values):
        return RunResult(method, seed, accuracy=dict(zip(skills.SKILLS, values)), wall_time_s=1)

    results = [
        run("individual", 0, (0.99, 0.84, 1.0)),
        run("task_arithmetic_val", 0, (0.6, 0.6, 0.6)),
        run("simple_average", 0, (0.5, 0.5, 0.5)),
        run("prodistill", 0, (0.7, 0.6, 0.6)),
        run("prodistill", 1, (0.6, 0.6, 0.6)),
        RunResult("ties", 0, status="failed", error="ValueError: bad"),
    ]
    methods = ["individual", "simple_average", "task_arithmetic_val", "ties", "prodistill"]
    chosen = {"task_arithmetic_val": (0.7, {0.3: 0.5, 0.7: 0.6})}
    summary = lb.summarize(results, methods, chosen)
    shape = summary["shape"]
    assert not shape["individual_each_at_least_85"] and shape["individual_min"] == 0.84
    assert shape["best_data_free"]["method"] == "task_arithmetic_val"
    assert shape["gap_at_least_10"]  # 94.3 vs 60
    assert shape["prodistill_minus_best_data_free"] == pytest.approx(0.6167 - 0.6, abs=1e-3)
    assert not shape["prodistill_at_least_3_above"]
    assert summary["methods"]["prodistill"]["average_std"] > 0
    assert "λ=0.7, chosen on val" in summary["methods"]["task_arithmetic_val"]["label"]
    text = lb.markdown(summary, "cmd")
    assert "failed: ValueError: bad" in text and "**does not hold**" in text
    assert text.count("\n| ") == len(methods) + 1
    assert lb.bar_chart(summary, tmp_path / "lb.png").stat().st_size > 0


def test_the_leaderboard_refuses_bad_options_and_existing_outputs(tmp_path):
    from statsmerge_plugin.mini_lm import leaderboard as lb

    with pytest.raises(SystemExit):
        lb.parse_args(["--methods", "prodistill,magic"])
    with pytest.raises(SystemExit):
        lb.parse_args(["--seeds", "a"])
    (tmp_path / "lb.md").write_text("earlier table")
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        lb.main(["--out", str(tmp_path / "lb")])
    assert (tmp_path / "lb.md").read_text() == "earlier table"


def test_the_leaderboard_runs_fusion_bench_on_the_smoke_build(
    smoke_root, smoke, tmp_path, monkeypatch
):
    from statsmerge_plugin.mini_lm import leaderboard as lb

    for key, value in {
        "STATSMERGE_MINI_ROOT": str(smoke_root),
        "STATSMERGE_MINI_LM_PRESET": "smoke",
        "OMP_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "board"
    argv = ["--out", str(out), "--methods", "pretrained,task_arithmetic_val,prodistill"]
    argv += ["--seeds", "0", "--grid", "0.3,1.0"]
    argv += ["--method-override", "prodistill:method.epochs_per_block=1"]
    assert lb.main(argv) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["build"]["key"] == smoke["key"]
    rows = summary["methods"]
    assert all(rows[m]["status"] == "ok" for m in rows), rows
    assert set(rows["task_arithmetic_val"]["chosen_on_val"]["val_average"]) == {"0.3", "1.0"}
    commands = [Path(r["log_dir"], "command.txt").read_text() for r in summary["runs"]]
    assert sum("mini-lm_val" in c for c in commands) == 0  # val runs are not reported as runs
    assert all("taskpool=ExactMatchTaskPool/mini-lm " in c + " " for c in commands)
    assert "method.epochs_per_block=1" in commands[-1]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| **ProDistill (ours)** |" in out.with_suffix(".md").read_text()
