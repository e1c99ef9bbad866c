"""A tiny random open_clip pool in the ``task_vectors`` checkpoint format, built offline, for tests.

FusionBench's ``OpenCLIPVisionModelPool`` reads the checkpoints of Ilharco et al.'s task vectors:
pickled ``ImageEncoder`` modules (``zeroshot.pt``, ``<Task>/finetuned.pt``) and pickled
``ClassificationHead`` modules (``head_<Task>.pt``). This module writes the same files for a tiny
ViT (2 blocks, width 32, 32x32 images) registered with open_clip under :data:`MODEL_NAME`. The
zero-shot heads are built like the task vectors code's ``build_classification_head``: FusionBench's
class names and templates, tokenized with open_clip's bundled BPE vocabulary, encoded by the tiny
text tower, averaged per class, normalised and scaled by ``logit_scale.exp()``. Nothing is
downloaded. Accuracies of random weights mean nothing: tests assert behaviour, never numbers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from statsmerge_plugin.method.compat import patch_typing_override

patch_typing_override()  # FusionBench 0.2.33's OpenCLIP pool needs typing.override (Python 3.12)

import open_clip  # noqa: E402
from fusion_bench.models.open_clip import ClassificationHead, ImageEncoder  # noqa: E402
from tiny_clip import SPLITS, random_image_dataset  # noqa: E402

MODEL_NAME = "statsmerge-tiny-ViT"
CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_model() -> None:
    """Register :data:`MODEL_NAME` with open_clip (its architecture configs are a module dict)."""
    open_clip.factory._MODEL_CONFIGS[MODEL_NAME] = copy.deepcopy(CONFIG)


def make_sequence_first(encoder: ImageEncoder) -> ImageEncoder:
    """Switch the vision transformer to the sequence-first block layout ``[seq, N, D]`` of the
    open_clip versions the task vectors checkpoints (and the official ProDistill code) were made
    with; current open_clip is batch-first. Outputs are unchanged, only the block I/O layout."""
    transformer = encoder.model.visual.transformer
    transformer.batch_first = False
    for block in transformer.resblocks:
        block.attn.batch_first = False
    return encoder


@torch.no_grad()
def zero_shot_head(model, tokenizer, task: str) -> ClassificationHead:
    """The task vectors code's ``build_classification_head`` with FusionBench's class names."""
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates

    classnames, templates = get_classnames_and_templates(task)
    weights = []
    for name in classnames:
        texts = tokenizer([template(name) for template in templates])
        emb = model.encode_text(texts)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        emb = emb.mean(dim=0)
        weights.append(emb / emb.norm())
    weights = torch.stack(weights) * model.logit_scale.exp()
    return ClassificationHead(normalize=True, weights=weights)


def tiny_image_encoder(seed: int = 0, sequence_first: bool = False) -> tuple:
    """``(ImageEncoder, open_clip CLIP with its text tower)`` of the tiny architecture."""
    register_tiny_model()
    torch.manual_seed(seed)
    model, train_preprocess, val_preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=None
    )
    model.eval()
    encoder = ImageEncoder.__new__(ImageEncoder)  # ImageEncoder(name) would download weights
    nn.Module.__init__(encoder)
    encoder.model = copy.deepcopy(model)
    encoder.train_preprocess, encoder.val_preprocess = train_preprocess, val_preprocess
    encoder.cache_dir = None
    delattr(encoder.model, "transformer")  # keep_lang=False, as in ImageEncoder
    if sequence_first:
        make_sequence_first(encoder)
    return encoder, model


def build_tiny_openclip(
    root: Path,
    tasks: Sequence[str] = ("mnist", "eurosat"),
    n_images: int = 12,
    seed: int = 0,
    noise: float = 0.02,
    sequence_first: bool = False,
) -> dict:
    """Write ``zeroshot.pt``, ``<task>/finetuned.pt`` (the pretrained encoder with every vision
    parameter perturbed by ``noise`` x N(0, 1); fine-tuning never touches the text-side tensors an
    ``ImageEncoder`` keeps), ``head_<task>.pt`` and ``data_<task>_<split>/`` under ``root``."""
    from fusion_bench.tasks.clip_classification import get_num_classes

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    encoder, clip = tiny_image_encoder(seed, sequence_first)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    torch.save(encoder, root / "zeroshot.pt")
    paths = {"root": root, "pretrained": root / "zeroshot.pt", "models": {}, "heads": {}}
    paths["data"] = {}
    generator = torch.Generator().manual_seed(seed + 1)
    for i, task in enumerate(tasks):
        finetuned = copy.deepcopy(encoder)
        with torch.no_grad():
            for p in finetuned.model.visual.parameters():
                p.add_(noise * torch.randn(p.shape, generator=generator))
        (root / task).mkdir(exist_ok=True)
        torch.save(finetuned, root / task / "finetuned.pt")
        torch.save(zero_shot_head(clip, tokenizer, task), root / f"head_{task}.pt")
        paths["models"][task] = root / task / "finetuned.pt"
        paths["heads"][task] = root / f"head_{task}.pt"
        for j, split in enumerate(SPLITS):
            path = root / f"data_{task}_{split}"
            random_image_dataset(n_images, get_num_classes(task), seed=1000 * i + j).save_to_disk(
                str(path)
            )
            paths["data"][(task, split)] = path
    return paths


def openclip_pool_config(paths: dict, splits: Sequence[str] = SPLITS) -> dict:
    """An ``OpenCLIPVisionModelPool`` config in the form of FusionBench's
    ``OpenCLIPVisionModelPool/ViT-L-14_TA8`` (checkpoint paths as model entries)."""
    cfg = {
        "_target_": "fusion_bench.modelpool.OpenCLIPVisionModelPool",
        "_recursive_": False,
        "models": {"_pretrained_": str(paths["pretrained"])}
        | {t: str(p) for t, p in paths["models"].items()},
        "classification_heads": {t: str(p) for t, p in paths["heads"].items()},
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


def openclip_taskpool_config(paths: dict) -> dict:
    """FusionBench's ``OpenCLIPVisionModelTaskPool`` on the tiny pool's test splits."""
    return {
        "_target_": "fusion_bench.taskpool.OpenCLIPVisionModelTaskPool",
        "_recursive_": False,
        "model_name": MODEL_NAME,
        "classification_heads": {t: str(p) for t, p in paths["heads"].items()},
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
