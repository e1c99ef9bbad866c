"""Tiny random language-model pools for the tests (issue 17): decoder LMs (Llama, Qwen2, Mistral) for
FusionBench's ``CausalLMPool`` and GPT-2 backbones for its ``gpt-2_glue`` pool class, each with a
character-level tokenizer and few-shot / test datasets saved with ``save_to_disk``. Nothing is
downloaded."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from datasets import Dataset

TASKS = ("math", "code")
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789 +=:")


def char_tokenizer(directory: Path):
    """A character-level ``PreTrainedTokenizerFast`` (``<pad>`` = 0), saved to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)
    return fast


def _config(arch: str, vocab: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=arch == "qwen2",
    )
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**common)


def _texts(task: str, n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        out.append(
            f"{a}+{b}="
            if task == "math"
            else "rev:" + "".join(ALPHABET[i] for i in [a % 26, b % 26])
        )
    return out


def perturbed(model, noise: float, generator):
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=generator))
    return ft


def build_tiny_causal_lm(
    root: Path, arch: str = "llama", tasks: Sequence[str] = TASKS, noise: float = 0.05
) -> dict:
    """``pretrained/``, ``<task>/`` (bf16 safetensors), ``tokenizer/``, ``shots_<task>/`` (train)
    and ``test_<task>/`` datasets; returns the paths and a ``few_shot`` spec for every task."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    tokenizer = char_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(arch, len(tokenizer)))
    paths = {"root": root, "tokenizer": root / "tokenizer", "models": {}, "few_shot": {}}
    base.to(torch.bfloat16).save_pretrained(root / "pretrained")
    paths["pretrained"] = root / "pretrained"
    g = torch.Generator().manual_seed(1)
    for i, task in enumerate(tasks):
        perturbed(base.float(), noise, g).to(torch.bfloat16).save_pretrained(root / task)
        paths["models"][task] = root / task
        for split, seed in (("train", 10 + i), ("test", 20 + i)):
            Dataset.from_dict({"prompt": _texts(task, 12, seed)}).save_to_disk(
                str(root / f"{split}_{task}")
            )
        paths["few_shot"][task] = {
            "dataset": str(root / f"train_{task}"),
            "split": "train",
            "text_field": "prompt",
        }
    return paths


def causal_lm_pool_config(paths: dict, lazy: bool = False) -> dict:
    return {
        "_target_": "fusion_bench.modelpool.CausalLMPool",
        "_recursive_": False,
        "enable_lazy_loading": lazy,
        "models": {"_pretrained_": str(paths["pretrained"])}
        | {t: str(p) for t, p in paths["models"].items()},
        "model_kwargs": {"torch_dtype": "bfloat16"},
        "tokenizer": str(paths["tokenizer"]),
    }


def causal_lm_pool(paths: dict, lazy: bool = False):
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    return instantiate(DictConfig(causal_lm_pool_config(paths, lazy)), _recursive_=False)


def build_tiny_gpt2(
    root: Path, tasks: Sequence[str] = ("cola", "sst2"), noise: float = 0.05
) -> dict:
    """``pretrained/`` (GPT2Model) and ``<task>/`` (GPT2ForSequenceClassification checkpoints, as
    ``tanganke/gpt2_<task>``), a tokenizer, and tokenized ``train_<task>`` datasets."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

    root = Path(root)
    tokenizer = char_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    base = GPT2Model(config)
    base.save_pretrained(root / "pretrained")
    paths = {"root": root, "pretrained": root / "pretrained", "tokenizer": root / "tokenizer"}
    paths["models"], paths["train"] = {}, {}
    g = torch.Generator().manual_seed(1)
    for i, task in enumerate(tasks):
        clf = GPT2ForSequenceClassification(GPT2Config(**config.to_dict(), num_labels=2))
        clf.transformer = perturbed(base, noise, g)
        clf.config.pad_token_id = 0
        clf.save_pretrained(root / task)
        paths["models"][task] = root / task
        rows = [tokenizer(t, padding="max_length", max_length=12) for t in _texts("math", 12, i)]
        Dataset.from_dict(
            {
                "input_ids": [r["input_ids"] for r in rows],
                "attention_mask": [r["attention_mask"] for r in rows],
                "label": [j % 2 for j in range(len(rows))],
            }
        ).save_to_disk(str(root / f"train_{task}"))
        paths["train"][task] = root / f"train_{task}"
    return paths


def gpt2_pool_config(paths: dict) -> dict:
    """FusionBench's ``gpt-2_glue`` layout (``GPT2Model.from_pretrained`` entries of classifier
    checkpoints, a tokenizer, tokenized train datasets) on the tiny models."""
    loader = "transformers.GPT2Model.from_pretrained"
    return {
        "_target_": "fusion_bench.modelpool.HuggingFaceGPT2ClassificationPool",
        "_recursive_": False,
        "models": {
            name: {"_target_": loader, "pretrained_model_name_or_path": str(p)}
            for name, p in [("_pretrained_", paths["pretrained"])] + list(paths["models"].items())
        },
        "train_datasets": {
            t: {"_target_": "datasets.load_from_disk", "dataset_path": str(p)}
            for t, p in paths["train"].items()
        },
        "tokenizer": {
            "_target_": "transformers.AutoTokenizer.from_pretrained",
            "pretrained_model_name_or_path": str(paths["tokenizer"]),
        },
    }
