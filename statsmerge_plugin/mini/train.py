"""The tiny CLIP: model/processor construction, contrastive pretraining and fine-tuning.

Fine-tuning follows the task-arithmetic recipe: only the vision tower is trained, against the
frozen zero-shot head that FusionBench's ``HFCLIPClassifier.set_classification_task`` computes
(we call that very method), with logits ``100 * cos(visual_projection(pooled), head)``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Split
from .recipe import Recipe
from .tasks import get_task
from .tokenizer import copy_assets, load_tokenizer

IMAGE_SIZE = 32
LOGIT_SCALE = 100.0
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 32, 32, 3)`` -> normalized float ``(N, 3, 32, 32)``.

    For 32x32 inputs this equals what ``CLIPProcessor`` feeds the model in FusionBench.
    """
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def make_processor(directory: Path):
    """``CLIPProcessor`` with the pruned CLIP tokenizer and a 32x32 image processor."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    tokenizer = load_tokenizer(copy_assets(Path(directory) / "tokenizer"))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_clip(recipe: Recipe, tokenizer):
    """A randomly initialised tiny ``CLIPModel`` with its logit scale frozen at 100."""
    from transformers import CLIPConfig, CLIPModel

    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab,
        hidden_size=recipe.text_width,
        intermediate_size=4 * recipe.text_width,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.heads,
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=recipe.patch_size,
        hidden_size=recipe.vision_width,
        intermediate_size=4 * recipe.vision_width,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.heads,
    )
    config = CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=recipe.projection_dim,
        logit_scale_init_value=math.log(LOGIT_SCALE),
    )
    model = CLIPModel(config)
    model.logit_scale.requires_grad_(False)
    return model


def cosine_lr(step: int, total: int, warmup_frac: float = 0.05) -> float:
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def optimize(
    params,
    step_loss: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    wd: float,
    desc: str = "train",
    progress: bool = True,
    leave: bool = True,
) -> List[float]:
    """AdamW with a cosine schedule (5 % warm-up) for ``steps`` steps of ``step_loss(step)``.

    The one training loop of the builders (pretraining, fine-tuning, the heterogeneous teachers);
    returns the per-step losses.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=leave):
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------------------------
# contrastive pretraining


def caption_table(tasks: Sequence[str]) -> Tuple[List[str], np.ndarray]:
    """All captions and, per caption, its global class id ``task_index * 10 + label``."""
    captions, owner = [], []
    for t, task in enumerate(tasks):
        spec = get_task(task)
        for label in range(len(spec.classnames)):
            for c in spec.captions(label):
                captions.append(c)
                owner.append(t * 10 + label)
    return captions, np.asarray(owner)


def ambiguous_pairs(tasks: Sequence[str], pair_frac: float, seed: int) -> Dict[str, List[int]]:
    """Per task, the pair indices ``k`` whose classes ``2k`` and ``2k+1`` share captions."""
    rng = np.random.default_rng([seed, 777])
    n = int(round(pair_frac * 5))
    return {task: sorted(int(k) for k in rng.permutation(5)[:n]) for task in tasks}


def positive_matrix(
    tasks, owner: np.ndarray, pairs: Dict[str, List[int]], swap: float = 0.5
) -> torch.Tensor:
    """``(num_classes_total, num_captions)``: how much each caption is a positive for a class's images.

    In a chosen pair ``(2k, 2k+1)`` each class's images are captioned with their partner's captions
    with probability ``swap``: ``0.5`` blurs the pair (pretraining cannot tell the two apart, the
    zero-shot model guesses), above ``0.5`` the pretrained model confuses them *confidently*, as web
    captions can teach a CLIP a systematic confusion that fine-tuning has to undo.
    """
    own = np.zeros((10 * len(tasks), len(owner)), dtype=np.float32)
    own[owner, np.arange(len(owner))] = 1.0
    pos = own.copy()
    for t, task in enumerate(tasks):
        for k in pairs[task]:
            a, b = t * 10 + 2 * k, t * 10 + 2 * k + 1
            pos[a] = (1 - swap) * own[a] + swap * own[b]
            pos[b] = (1 - swap) * own[b] + swap * own[a]
    return torch.from_numpy(pos)


def tokenize(tokenizer, captions: Sequence[str]) -> Dict[str, torch.Tensor]:
    return dict(tokenizer(list(captions), padding=True, return_tensors="pt"))


def encode_captions(model, ids: Dict[str, torch.Tensor]) -> torch.Tensor:
    out = model.text_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    return F.normalize(model.text_projection(out.pooler_output), dim=-1)


def encode_images(model, pixels: torch.Tensor) -> torch.Tensor:
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def pretrain(model, tokenizer, pools: Dict[str, Split], recipe: Recipe, seed: int, pbar=True):
    """Contrastive pretraining on captions of the separate ``pretrain`` pools of all tasks."""
    tasks = list(pools)
    captions, owner = caption_table(tasks)
    ids = tokenize(tokenizer, captions)
    pairs = ambiguous_pairs(tasks, recipe.pair_frac, seed)
    pos = positive_matrix(tasks, owner, pairs, recipe.pair_swap)
    images = np.concatenate([pools[t].images for t in tasks])
    classes = torch.from_numpy(
        np.concatenate([t * 10 + pools[task].labels for t, task in enumerate(tasks)])
    )
    gen = torch.Generator().manual_seed(seed)

    def step_loss(_: int) -> torch.Tensor:
        idx = torch.randint(len(images), (recipe.pretrain_batch,), generator=gen)
        img = encode_images(model, to_pixels(images[idx.numpy()]))
        txt = encode_captions(model, ids)
        target = pos[classes[idx]]
        i2t = -(F.log_softmax(LOGIT_SCALE * img @ txt.T, dim=-1) * target).sum(-1) / target.sum(-1)
        # text -> image: one positive caption per image, in-batch images as candidates
        cap = torch.multinomial(target, 1, generator=gen).squeeze(1)
        t_pos = pos[classes[idx]][:, cap].T  # (B captions, B images)
        logits = LOGIT_SCALE * txt[cap] @ img.T
        t2i = -(F.log_softmax(logits, dim=-1) * t_pos).sum(-1) / t_pos.sum(-1)
        return 0.5 * (i2t.mean() + t2i.mean())

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = optimize(
        params,
        step_loss,
        recipe.pretrain_steps,
        recipe.pretrain_lr,
        recipe.pretrain_wd,
        desc="pretrain",
        progress=pbar,
    )
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------
# fine-tuning


@torch.no_grad()
def zero_shot_head(clip_model, processor, task: str) -> torch.Tensor:
    """The ``(classes, dim)`` head exactly as FusionBench's taskpool computes it."""
    import copy

    from fusion_bench.models.hf_clip import HFCLIPClassifier

    spec = get_task(task)
    classifier = HFCLIPClassifier(copy.deepcopy(clip_model), processor)
    classifier.eval()
    classifier.set_classification_task(list(spec.classnames), spec.templates)
    return classifier.zeroshot_weights.detach().clone()


def vision_logits(vision_model, projection, head: torch.Tensor, pixels: torch.Tensor):
    pooled = vision_model(pixel_values=pixels).pooler_output
    return LOGIT_SCALE * F.normalize(projection(pooled), dim=-1) @ head.T


def finetune(
    vision_model,
    projection,
    head,
    split: Split,
    recipe: Recipe,
    seed: int,
    desc="ft",
    progress: bool = True,
):
    """Train ``vision_model`` (a ``CLIPVisionModel``) in place with cross-entropy on ``split``."""
    projection.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(split.labels)

    def step_loss(_: int) -> torch.Tensor:
        idx = torch.randint(len(labels), (recipe.ft_batch,), generator=gen)
        logits = vision_logits(vision_model, projection, head, to_pixels(split.images[idx.numpy()]))
        return F.cross_entropy(logits, labels[idx])

    vision_model.train()
    params = [p for p in vision_model.parameters() if p.requires_grad]
    losses = optimize(
        params,
        step_loss,
        recipe.ft_steps,
        recipe.ft_lr,
        recipe.ft_wd,
        desc=desc,
        progress=progress,
        leave=False,
    )
    vision_model.eval()
    return losses


@torch.no_grad()
def accuracy(vision_model, projection, head, split: Split, batch: int = 500) -> float:
    """Plain accuracy (used on train/val only; test numbers come from FusionBench)."""
    vision_model.eval()
    correct = 0
    for i in range(0, len(split.labels), batch):
        logits = vision_logits(
            vision_model, projection, head, to_pixels(split.images[i : i + batch])
        )
        correct += int((logits.argmax(-1).numpy() == split.labels[i : i + batch]).sum())
    return correct / len(split.labels)


def vision_tower(clip_model):
    """A standalone ``CLIPVisionModel`` holding a copy of ``clip_model``'s vision weights."""
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel(clip_model.config.vision_config)
    vision.vision_model.load_state_dict(clip_model.vision_model.state_dict())
    return vision.eval()
