"""The teachers' training, with labels on their task's train split (like the base build's models).

* ResNet: a tiny ``ResNetForImageClassification`` with its own ``ViTImageProcessor`` (ImageNet
  normalisation, 32 px);
* wider CLIP: the base recipe with :attr:`HeteroRecipe.wide_clip`'s changes, its own text tower
  contrastively pretrained on the task's ``pretrain`` pool, then its vision tower fine-tuned
  against its own zero-shot head (the base builder's :mod:`statsmerge_plugin.mini.train`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import data as mini_data
from .. import train as mini_train
from ..recipe import Recipe
from .recipe import HeteroRecipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """Train a tiny ``ResNetForImageClassification`` with labels on the train split; save it."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    from ..tasks import get_task

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
    gen = torch.Generator().manual_seed(seed)

    def step_loss(_: int) -> torch.Tensor:
        idx = torch.randint(len(labels), (recipe.resnet_batch,), generator=gen)
        logits = model(pixel_values=imagenet_pixels(train.images[idx.numpy()])).logits
        return F.cross_entropy(logits, labels[idx])

    model.train()
    losses = mini_train.optimize(
        model.parameters(),
        step_loss,
        recipe.resnet_steps,
        recipe.resnet_lr,
        recipe.resnet_wd,
        desc=f"teacher {task} (ResNet)",
        progress=progress,
    )
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
        "loss": {"first": round(losses[0], 4), "last": round(losses[-1], 4)},
        "accuracy": accs,
    }


def train_wide_clip(
    out: Path,
    task: str,
    splits,
    base_recipe: Recipe,
    recipe: HeteroRecipe,
    seed: int,
    progress: bool,
) -> dict:
    """A wider tiny CLIP: brief contrastive pretraining on the task's pretraining pool, then its
    vision tower fine-tuned with labels against its own zero-shot head (the base builder's code).
    """
    r = base_recipe.replace(**recipe.wide_clip)
    if r.vision_width == base_recipe.vision_width:
        raise ValueError(
            f"the wide CLIP teacher of {task!r} must differ in width from the base build's CLIP "
            f"(both {r.vision_width}): set HeteroRecipe.wide_clip['vision_width']"
        )
    mini_train.seed_everything(seed)
    pool = mini_data.generate_split(task, "pretrain", r.n_pretrain, seed)
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
        progress=progress,
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
        "vision_width": r.vision_width,
        "vision_params": sum(p.numel() for p in vision.parameters()),
        "accuracy": accs,
    }
