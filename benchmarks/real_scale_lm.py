"""Real-scale cost of ProDistill on language models (issue 17), on synthetic pools (no downloads).

Writes a synthetic ``CausalLMPool`` of a published size (random bf16 safetensors checkpoints: a
pretrained model and three task models = theta_0 + noise, a character tokenizer, a few-shot train
set per task) and runs ``fusion_bench method=prodistill/causal_lm`` on it **in its own process**,
with ``taskpool=dummy``, measuring the peak host memory of the process (``ru_maxrss``, the
watchdog of :func:`real_scale.run_child`) and the seconds per decoder layer. Sizes:

* ``qwen2.5-1.5b``: Qwen2.5-1.5B (hidden 1536, MLP 8960, 12 heads / 2 KV heads, 28 layers, vocab
  151,936, tied embeddings), full depth;
* ``llama-7b-d2`` / ``llama-7b-d4``: Llama-2-7B width (hidden 4096, MLP 11008, 32 heads, vocab
  32,000) cut to 2 and 4 layers: the memory must be flat in depth.

The distillation runs ``epochs_per_block`` epochs of ``shots`` prompts per task of ``tokens``
tokens (defaults far below the config's 16 prompts x 256 tokens x 100 epochs, on 2 CPU cores); the
projected full default run scales the measured seconds per optimiser step, see ``docs/real-scale.md``.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/real_scale_lm.py --size llama-7b-d2 --size llama-7b-d4
    OMP_NUM_THREADS=2 python benchmarks/real_scale_lm.py --size qwen2.5-1.5b
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from real_scale import REPO, GiB, code_version, machine, run_child  # noqa: E402

TASKS = ("math", "code", "instruction")
SIZES = {
    "qwen2.5-1.5b": dict(
        arch="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_attention_heads=12,
        num_key_value_heads=2,
        num_hidden_layers=28,
        vocab_size=151936,
        tie_word_embeddings=True,
        full_depth=28,
    ),
    "llama-7b-d2": dict(
        arch="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=2,
        vocab_size=32000,
        tie_word_embeddings=False,
        full_depth=32,
    ),
}
SIZES["llama-7b-d4"] = SIZES["llama-7b-d2"] | {"num_hidden_layers": 4}
FULL_13B = dict(hidden_size=5120, intermediate_size=13824, layers=40, vocab=32000)
LM_BEGIN, LM_END = "<!-- lm-results:begin -->", "<!-- lm-results:end -->"
DEFAULT_RUN = dict(shots=16, tokens=256, epochs=100, batch=16)  # config/method/prodistill/causal_lm


def model_config(size: str):
    from transformers import LlamaConfig, Qwen2Config

    spec = dict(SIZES[size])
    arch = spec.pop("arch")
    spec.pop("full_depth")
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
        max_position_embeddings=4096, torch_dtype="bfloat16", **spec
    )


def write_checkpoint(directory: Path, config, shapes: Dict, seed: int, base: Path = None):
    """Random bf16 weights (N(0, 0.02^2), norms at 1), or ``base`` + N(0, 0.002^2), one tensor at a
    time; sharded at 2 GiB so that no file is a whole model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    g = torch.Generator().manual_seed(seed)
    shard, shard_bytes, index, n = {}, 0, {}, 0
    base_file = None

    def flush():
        nonlocal shard, shard_bytes, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, shard_bytes, n = {}, 0, n + 1

    for name, shape in shapes.items():
        if base is not None:
            if base_file is None or name not in base_file.keys():
                file = json.loads((base / "model.safetensors.index.json").read_text())
                base_file = safe_open(str(base / file["weight_map"][name]), "pt")
            t = base_file.get_tensor(name).float()
            t += 0.002 * torch.randn(shape, generator=g)
        elif name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        shard[name] = t.to(torch.bfloat16)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes > 2 * GiB:
            flush()
    if shard:
        flush()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index})
    )


def build_pool(size: str, work: Path) -> Dict:
    """The synthetic pool of ``size`` under ``work`` (reused if complete)."""
    from accelerate import init_empty_weights
    from datasets import Dataset
    from tiny_lm import char_tokenizer
    from transformers import AutoModelForCausalLM

    root = work / size
    done = root / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    config = model_config(size)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(p.shape) for n, p in meta.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    numel = sum(math.prod(s) for s in shapes.values())
    t0 = time.time()
    char_tokenizer(root / "tokenizer")
    write_checkpoint(root / "pretrained", config, shapes, seed=0)
    for i, task in enumerate(TASKS):
        write_checkpoint(root / task, config, shapes, seed=i + 1, base=root / "pretrained")
        g = torch.Generator().manual_seed(100 + i)
        letters = "abcdefghijklmnopqrstuvwxyz0123456789 +="
        texts = [
            "".join(letters[j] for j in torch.randint(0, len(letters), (400,), generator=g))
            for _ in range(64)
        ]
        Dataset.from_dict({"prompt": texts}).save_to_disk(str(root / f"train_{task}"))
    info = {
        "size": size,
        "root": str(root),
        "params": numel,
        "model_bytes": numel * 2,
        "layers": config.num_hidden_layers,
        "build_s": time.time() - t0,
    }
    done.write_text(json.dumps(info))
    return info


def write_configs(info: Dict, config_dir: Path) -> None:
    import yaml

    root = Path(info["root"])
    (config_dir / "modelpool").mkdir(parents=True, exist_ok=True)
    few = config_dir / "method" / "prodistill" / "few_shot"
    few.mkdir(parents=True, exist_ok=True)
    pool = {
        "_target_": "fusion_bench.modelpool.CausalLMPool",
        "_recursive_": False,
        "enable_lazy_loading": True,  # as FusionBench's Qwen2.5 / Llama-7B pools
        "models": {"_pretrained_": str(root / "pretrained")} | {t: str(root / t) for t in TASKS},
        "model_kwargs": {"torch_dtype": "bfloat16"},
        "tokenizer": str(root / "tokenizer"),
    }
    (config_dir / "modelpool" / "synthetic_lm.yaml").write_text(yaml.safe_dump(pool))
    specs = {
        t: {"dataset": str(root / f"train_{t}"), "split": "train", "text_field": "prompt"}
        for t in TASKS
    }
    (few / "synthetic.yaml").write_text("# @package method.few_shot\n" + yaml.safe_dump(specs))


def run_size(size: str, args) -> Dict:
    info = build_pool(size, Path(args.work))
    config_dir = Path(args.work) / f"configs_{size}"
    write_configs(info, config_dir)
    log_dir = Path(args.work) / f"logs_{size}"
    shutil.rmtree(log_dir, ignore_errors=True)
    scratch = Path(args.work) / f"scratch_{size}"
    shutil.rmtree(scratch, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "fusion_bench",
        "--config-dir",
        str(config_dir),
        "method=prodistill/causal_lm",
        "+method/prodistill/few_shot=synthetic",
        "modelpool=synthetic_lm",
        "taskpool=dummy",
        "fabric.accelerator=cpu",
        "print_config=false",
        f"method.shots_per_task={args.shots}",
        f"method.max_tokens={args.tokens}",
        f"method.batch_size={args.batch}",
        f"method.epochs_per_block={args.epochs}",
        "method.save_loss_curves=false",
        f"method.scratch_dir={scratch}",
        f"path.log_dir={log_dir}",
    ]
    result = run_child([], Path(args.work) / f"{size}.log", args.rss_limit_gb * GiB, command)
    shutil.rmtree(scratch, ignore_errors=True)
    report_file = log_dir / "prodistill_report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    blocks = report.get("blocks", [])
    block_s = [b["seconds"] for b in blocks]
    steps = blocks[0]["steps"] if blocks else None
    steady = sorted(block_s)[len(block_s) // 2] if block_s else None
    out = {
        "size": size,
        "status": result["status"],
        "layers": info["layers"],
        "full_depth": SIZES[size]["full_depth"],
        "params_per_model": info["params"],
        "model_gb": info["model_bytes"] / 1e9,
        "all_models_gb": 4 * info["model_bytes"] / 1e9,
        "peak_rss_gb": result["peak_rss_bytes"] / 1e9,
        "wall_s": result["wall_s"],
        "setup_s": report.get("setup_seconds"),
        "block_s": block_s,
        "steps_per_block": steps,
        "options": dict(shots=args.shots, tokens=args.tokens, batch=args.batch, epochs=args.epochs),
    }
    if steady is not None and steps:
        out["s_per_step"] = steady / steps
        out["projected_full_run_h"] = projection(size, out)
    return out


def projection(size: str, r: Dict) -> float:
    """Hours of a full default run at full depth on this machine: the per-step time scaled by the
    tokens per step (compute is linear in tokens at these lengths) and the default steps per layer.
    """
    o = r["options"]
    tokens_ratio = (DEFAULT_RUN["batch"] * DEFAULT_RUN["tokens"]) / (o["batch"] * o["tokens"])
    steps = DEFAULT_RUN["epochs"] * math.ceil(
        len(TASKS) * DEFAULT_RUN["shots"] / DEFAULT_RUN["batch"]
    )
    return r["s_per_step"] * tokens_ratio * steps * r["full_depth"] / 3600


def render(results: Dict) -> str:
    rows = [
        "| pool | layers run / full | one model (bf16) | four models | peak host memory | s / layer "
        "| s / step | projected full default run (this CPU) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"].values():
        rows.append(
            f"| {r['size']} | {r['layers']} / {r['full_depth']} | {r['model_gb']:.2f} GB "
            f"| {r['all_models_gb']:.2f} GB | **{r['peak_rss_gb']:.2f} GB** "
            f"| {', '.join(f'{s:.0f}' for s in r['block_s'])} | {r.get('s_per_step', float('nan')):.1f} "
            f"| {r.get('projected_full_run_h', float('nan')):.0f} h | {r['status']} |"
        )
    o = next(iter(results["runs"].values()))["options"]
    return "\n".join(
        [
            f"Measured {results['date']} on {results['machine']}, {results['code']}; "
            f"`python benchmarks/real_scale_lm.py` (per run: {o['shots']} prompts per task of "
            f"{o['tokens']} tokens, batch {o['batch']}, {o['epochs']} epoch(s) per layer, three task "
            f"models, bf16 on disk, lazy CausalLMPool).",
            "",
            *rows,
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", action="append", choices=sorted(SIZES), required=True)
    p.add_argument("--work", default="/tmp/real_scale_lm")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rss-limit-gb", type=float, default=20.0)
    p.add_argument("--results", default=str(REPO / "docs" / "real-scale-lm.json"))
    p.add_argument("--doc", default=str(REPO / "docs" / "real-scale.md"))
    args = p.parse_args(argv)
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for size in args.size:
        r = run_size(size, args)
        print(json.dumps(r, indent=1), flush=True)
        results["runs"][size] = r
    results.update(date=time.strftime("%Y-%m-%d"), machine=machine(), code=code_version())
    path.write_text(json.dumps(results, indent=1))
    table = render(results)
    print(table)
    doc = Path(args.doc)
    text = doc.read_text()
    if LM_BEGIN in text and LM_END in text:  # only the measured table is rewritten
        head, rest = text.split(LM_BEGIN)
        doc.write_text(f"{head}{LM_BEGIN}\n{table}\n{LM_END}{rest.split(LM_END)[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
