"""A tiny random CLIP pool, built offline in a second, for tests.

Real FusionBench task names (``mnist``, ``eurosat``, ...) are used so that FusionBench's own class names
and templates exist. Accuracies on these random weights mean nothing: tests assert structure and
behaviour, never numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from statsmerge_plugin.mini.tokenizer import bytes_to_unicode

SPLITS = ("train", "val", "test")


def _processor(root: Path) -> CLIPProcessor:
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = root / "tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tok), len(vocab)


def random_image_dataset(n: int, num_classes: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
    labels = [int(x) for x in rng.integers(0, num_classes, n)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=num_classes)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def build_tiny_clip(
    root: Path,
    tasks: Sequence[str] = ("mnist", "eurosat"),
    n_images: int = 12,
    seed: int = 0,
    num_layers: int = 2,
    hidden: int = 32,
    noise: float = 0.02,
) -> dict:
    """Write ``pretrained/`` (CLIPModel + processor), ``ft_<task>/`` and ``data_<task>_<split>/``.

    Returns a dict with the paths, for building pools and configs.
    """
    from fusion_bench.tasks.clip_classification import get_num_classes

    root = Path(root)
    torch.manual_seed(seed)
    proc, vocab_size = _processor(root)
    tc = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vc = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    clip = CLIPModel(
        CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=16)
    )
    clip.save_pretrained(root / "pretrained")
    proc.save_pretrained(root / "pretrained")
    paths = {"root": root, "pretrained": root / "pretrained", "models": {}, "data": {}}
    for i, task in enumerate(tasks):
        ft = CLIPVisionModel.from_pretrained(root / "pretrained")
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(noise * torch.randn_like(p))
        ft.save_pretrained(root / f"ft_{task}")
        paths["models"][task] = root / f"ft_{task}"
        num_classes = get_num_classes(task)
        for j, split in enumerate(SPLITS):
            path = root / f"data_{task}_{split}"
            random_image_dataset(n_images, num_classes, seed=1000 * i + j).save_to_disk(str(path))
            paths["data"][(task, split)] = path
    return paths


def pool_config(paths: dict, splits: Sequence[str] = ("train", "val", "test")) -> dict:
    """A CLIPVisionModelPool config (plain dict) for the tiny pool."""
    cfg = {
        "_target_": "fusion_bench.modelpool.CLIPVisionModelPool",
        "_recursive_": False,
        "processor": str(paths["pretrained"]),
        "models": {"_pretrained_": str(paths["pretrained"])}
        | {t: str(p) for t, p in paths["models"].items()},
    }
    for split in splits:
        cfg[f"{split}_datasets"] = {
            t: {
                "_target_": "datasets.load_from_disk",
                "dataset_path": str(paths["data"][(t, split)]),
            }
            for t in paths["models"]
        }
    return cfg


def taskpool_config(paths: dict) -> dict:
    return {
        "_target_": "fusion_bench.taskpool.CLIPVisionModelTaskPool",
        "_recursive_": False,
        "base_model": str(paths["pretrained"]),
        "clip_model": {
            "_target_": "transformers.CLIPModel.from_pretrained",
            "pretrained_model_name_or_path": str(paths["pretrained"]),
        },
        "processor": {
            "_target_": "transformers.CLIPProcessor.from_pretrained",
            "pretrained_model_name_or_path": str(paths["pretrained"]),
        },
        "dataloader_kwargs": {
            "batch_size": 8,
            "num_workers": 0,
            "pin_memory": False,
            "drop_last": False,
            "shuffle": False,
        },
        "test_datasets": {
            t: {
                "_target_": "datasets.load_from_disk",
                "dataset_path": str(paths["data"][(t, "test")]),
            }
            for t in paths["models"]
        },
    }


def with_noise_split(paths: dict, split: str, root: Path, seed: int = 1) -> dict:
    """A copy of ``paths`` whose ``split`` datasets (every task) are replaced by fresh noise images with
    random labels, of the same sizes: "poisoned" splits for checks that a split is never read."""
    from datasets import load_from_disk
    from fusion_bench.tasks.clip_classification import get_num_classes

    new = dict(paths, data=dict(paths["data"]))
    for i, task in enumerate(paths["models"]):
        n = len(load_from_disk(str(paths["data"][(task, split)])))
        path = Path(root) / f"noise_{task}_{split}_{seed}"
        random_image_dataset(n, get_num_classes(task), seed=10_000 * seed + i).save_to_disk(
            str(path)
        )
        new["data"][(task, split)] = path
    return new
