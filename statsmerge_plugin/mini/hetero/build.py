"""Mixed-architecture variant of the mini eight-task benchmark (``mini-clip_TA8_hetero``).

Two of the eight tasks get a model of another architecture, fine-tuned *with labels on the task's
train split* (this is the teachers' own training, like the fine-tuned CLIP models of the base
build):

* ``mini_gtsrb``: a small CNN, transformers ``ResNetForImageClassification`` (tiny config), with its
  own ``ViTImageProcessor`` (ImageNet normalisation, 32 px);
* ``mini_eurosat``: a wider tiny CLIP (vision width 192 instead of 128) with its own text tower,
  briefly contrastively pretrained on the task's separate ``pretrain`` pool, then its vision tower
  fine-tuned against its own zero-shot head (the mini builder's recipe,
  :mod:`statsmerge_plugin.mini.train`).

The other six tasks keep the base build's fine-tuned CLIP models. The base build (data,
``_pretrained_``, same-architecture models) comes from
:func:`statsmerge_plugin.mini.build.ensure_built`; this module adds ``<mini
build>-hetero-<digest>/teachers/<task>/`` next to it, with the same conventions: a key that changes
with the base build, this recipe, this module's code (its AST) and the library versions; a build
in a ``.tmp-*`` directory moved into place with ``os.replace``; ``manifest.json`` written last; an ``fcntl`` lock
against concurrent builders.

The pool config loads teachers with ``_target_: ...mini_benchmark.load_teacher`` (which builds on
first use, like ``${mini_clip:}``). This module lives outside ``statsmerge_plugin/mini/`` on
purpose: the base builder's key hashes every ``*.py`` file of that directory, so a file added there
  would
invalidate every base build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Union

TEACHERS: Dict[str, str] = {"mini_gtsrb": "resnet", "mini_eurosat": "wide_clip"}
HETERO_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HeteroRecipe:
    """Knobs of the teachers' training."""

    # ResNet teacher
    resnet_embedding: int = 32
    resnet_hidden: tuple = (32, 64, 128)
    resnet_depths: tuple = (1, 1, 1)
    resnet_steps: int = 400
    resnet_batch: int = 64
    resnet_lr: float = 2e-3
    resnet_wd: float = 1e-4
    # wider CLIP teacher (its own text tower)
    clip_width: int = 192
    clip_layers: int = 4
    clip_heads: int = 4
    clip_n_pretrain: int = 100  # images per class of the task's separate pretraining pool
    clip_pretrain_steps: int = 150
    clip_pretrain_batch: int = 128
    clip_ft_steps: int = 300
    clip_ft_batch: int = 64
    clip_ft_lr: float = 2e-4
    num_threads: int = 2


HETERO_PRESETS: Dict[str, HeteroRecipe] = {
    "default": HeteroRecipe(),
    "smoke": HeteroRecipe(
        resnet_embedding=8,
        resnet_hidden=(8, 16),
        resnet_depths=(1, 1),
        resnet_steps=10,
        resnet_batch=16,
        clip_width=48,
        clip_layers=2,
        clip_heads=2,
        clip_n_pretrain=6,
        clip_pretrain_steps=5,
        clip_pretrain_batch=32,
        clip_ft_steps=5,
        clip_ft_batch=16,
    ),
}


def source_digest() -> str:
    """Hash of this module's code, blind to docstrings, comments and formatting (its AST)."""
    import ast

    tree = ast.parse(Path(__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def hetero_dir(mini_root: Path, preset: str) -> Path:
    """Where the teachers of base build ``mini_root`` live (a sibling directory)."""
    from statsmerge_plugin.mini.recipe import library_versions

    mini_root = Path(mini_root)
    payload = {
        "version": HETERO_VERSION,
        "base": mini_root.name,
        "preset": preset,
        "recipe": asdict(HETERO_PRESETS[preset]),
        "teachers": TEACHERS,
        "source": source_digest(),
        "libraries": library_versions(),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
    return mini_root.parent / f"{mini_root.name}-hetero-{digest}"


def base_manifest(mini_root: Path) -> dict:
    from statsmerge_plugin.mini.build import read_manifest

    manifest = read_manifest(Path(mini_root))
    if manifest is None:
        raise FileNotFoundError(f"{mini_root} is not a complete mini benchmark build")
    return manifest


def ensure_hetero_built(
    mini_root: Union[None, str, Path] = None, preset: Optional[str] = None, progress: bool = True
) -> Path:
    """Path of the teachers' build for base build ``mini_root`` (default: ``${mini_clip:}``'s).

    ``preset`` defaults to the base build's preset (``default`` or ``smoke``).
    """
    from statsmerge_plugin.mini.build import MANIFEST, file_lock, read_manifest, torch_threads

    if mini_root is None:
        from statsmerge_plugin.mini.resolver import mini_clip_root

        mini_root = mini_clip_root()
    mini_root = Path(mini_root)
    preset = preset or base_manifest(mini_root).get("preset", "default")
    target = hetero_dir(mini_root, preset)
    if read_manifest(target) is not None:
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if read_manifest(target) is None:
            for stale in target.parent.glob(f".tmp-{target.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
            try:
                recipe = HETERO_PRESETS[preset]
                with torch_threads(recipe.num_threads):
                    manifest = build_teachers(tmp, mini_root, recipe, progress)
                manifest.update(preset=preset, base=str(mini_root), complete=True)
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_teacher(task: str, mini_root: Union[None, str, Path] = None, preset: Optional[str] = None):
    """Model-pool loader (``_target_``) of the teacher of ``task``, building the teachers if needed.

    Returns a ``ResNetForImageClassification`` or a ``CLIPVisionModel`` loaded with
    ``from_pretrained`` from ``<hetero build>/teachers/<task>``, which also holds its processor
    (and, for the CLIP teacher, the full ``CLIPModel`` with its text tower).
    """
    if task not in TEACHERS:
        raise KeyError(
            f"the mini hetero benchmark has no teacher for {task!r}; teachers: {sorted(TEACHERS)}"
        )
    path = ensure_hetero_built(mini_root, preset) / "teachers" / task
    if TEACHERS[task] == "resnet":
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(str(path))
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------------
def imagenet_pixels(images):
    """uint8 ``(N, 32, 32, 3)`` -> ImageNet-normalised ``(N, 3, 32, 32)``, as the processor does."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def train_resnet(
    out: Path, task: str, splits, recipe: HeteroRecipe, seed: int, progress: bool
) -> dict:
    """Fine-tune a tiny ``ResNetForImageClassification`` with labels on the train split; save it."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    from statsmerge_plugin.mini import train as mini_train
    from statsmerge_plugin.mini.tasks import get_task

    classnames = list(get_task(task).classnames)
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=recipe.resnet_embedding,
        hidden_sizes=list(recipe.resnet_hidden),
        depths=list(recipe.resnet_depths),
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=len(classnames),
        id2label=dict(enumerate(classnames)),
        label2id={c: i for i, c in enumerate(classnames)},
    )
    model = ResNetForImageClassification(config)
    processor = ViTImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    train, val = splits["train"], splits["val"]
    # the processor must give exactly the training pixels
    check = processor(images=[Image.fromarray(a) for a in train.images[:4]], return_tensors="pt")
    assert torch.allclose(check["pixel_values"], imagenet_pixels(train.images[:4]), atol=1e-5)
    labels = torch.from_numpy(train.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.resnet_lr, weight_decay=recipe.resnet_wd)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: mini_train.cosine_lr(s, recipe.resnet_steps)
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(
        range(recipe.resnet_steps), desc=f"teacher {task} (ResNet)", disable=not progress
    ):
        idx = torch.randint(len(labels), (recipe.resnet_batch,), generator=gen)
        loss = F.cross_entropy(
            model(pixel_values=imagenet_pixels(train.images[idx.numpy()])).logits, labels[idx]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():

        def acc(split):
            pred = model(pixel_values=imagenet_pixels(split.images)).logits.argmax(-1).numpy()
            return round(float((pred == split.labels).mean()), 4)

        accs = {"train": acc(train), "val": acc(val)}
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {
        "kind": "resnet",
        "params": sum(p.numel() for p in model.parameters()),
        "accuracy": accs,
    }


def train_wide_clip(
    out: Path, task: str, splits, base_recipe, recipe: HeteroRecipe, seed: int, progress: bool
) -> dict:
    """A wider tiny CLIP: brief contrastive pretraining on the task's pretraining pool, then its
    vision tower fine-tuned with labels against its own zero-shot head (the mini builder's recipe).
    """
    from statsmerge_plugin.mini import data as mini_data
    from statsmerge_plugin.mini import train as mini_train

    r = base_recipe.replace(
        vision_width=recipe.clip_width,
        vision_layers=recipe.clip_layers,
        heads=recipe.clip_heads,
        pretrain_steps=recipe.clip_pretrain_steps,
        pretrain_batch=recipe.clip_pretrain_batch,
        ft_steps=recipe.clip_ft_steps,
        ft_batch=recipe.clip_ft_batch,
        ft_lr=recipe.clip_ft_lr,
    )
    mini_train.seed_everything(seed)
    pool = mini_data.generate_split(task, "pretrain", recipe.clip_n_pretrain, seed)
    processor = mini_train.make_processor(out)
    clip = mini_train.make_clip(r, processor.tokenizer)
    mini_train.pretrain(clip, processor.tokenizer, {task: pool}, r, seed, progress)
    head = mini_train.zero_shot_head(clip, processor, task)
    vision = mini_train.vision_tower(clip)
    mini_train.finetune(
        vision,
        clip.visual_projection,
        head,
        splits["train"],
        r,
        seed,
        desc=f"teacher {task} (CLIP)",
    )
    accs = {
        s: round(mini_train.accuracy(vision, clip.visual_projection, head, splits[s]), 4)
        for s in ("train", "val")
    }
    clip.vision_model.load_state_dict(vision.vision_model.state_dict())
    clip.save_pretrained(out)
    processor.save_pretrained(out)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)  # the processor saved its own copy
    return {
        "kind": "wide_clip",
        "vision_width": recipe.clip_width,
        "vision_params": sum(p.numel() for p in vision.parameters()),
        "accuracy": accs,
    }


def build_teachers(out: Path, mini_root: Path, recipe: HeteroRecipe, progress: bool = True) -> dict:
    """Train every teacher into ``out/teachers/<task>``; return the manifest content."""
    from statsmerge_plugin.mini import data as mini_data
    from statsmerge_plugin.mini.recipe import Recipe, library_versions

    manifest = base_manifest(mini_root)
    base_recipe = Recipe(**manifest["recipe"])
    seed = int(manifest["seed"])
    start = time.perf_counter()
    teachers, timings = {}, {}
    for i, (task, kind) in enumerate(TEACHERS.items()):
        t = time.perf_counter()
        splits = {s: mini_data.load_split(mini_root / "data" / task / s) for s in ("train", "val")}
        path = out / "teachers" / task
        path.mkdir(parents=True, exist_ok=True)
        if kind == "resnet":
            teachers[task] = train_resnet(
                path, task, splits, recipe, seed * 1000 + 500 + i, progress
            )
        else:
            teachers[task] = train_wide_clip(
                path, task, splits, base_recipe, recipe, seed * 1000 + 500 + i, progress
            )
        timings[task] = round(time.perf_counter() - t, 2)
    timings["total"] = round(time.perf_counter() - start, 2)
    return {
        "hetero_version": HETERO_VERSION,
        "recipe": asdict(recipe),
        "teachers": teachers,
        "libraries": library_versions(),
        "timings_seconds": timings,
    }


if __name__ == "__main__":  # python -m statsmerge_plugin.mini.hetero.build
    import sys

    print(ensure_hetero_built(sys.argv[1] if len(sys.argv) > 1 else None))
