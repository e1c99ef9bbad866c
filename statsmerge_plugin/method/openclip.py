R"""FusionBench's OpenCLIP pools for both methods (issue 11, item 3).

Most published numbers of AdaMerging, StatsMerging and ProDistill were made on the OpenCLIP
``task_vectors`` checkpoints (Ilharco et al.), which FusionBench loads with
``fusion_bench.modelpool.OpenCLIPVisionModelPool`` (``modelpool=OpenCLIPVisionModelPool/ViT-B-32_TA8``,
``.../ViT-L-14_TA8``). Such a pool differs from a ``CLIPVisionModelPool`` in three ways, handled here:

* models are ``fusion_bench.models.open_clip.ImageEncoder`` (``encoder(images)`` returns the image
  features; the vision tower is ``encoder.model.visual``);
* images are processed by the encoder's torchvision transform ``val_preprocess`` (the pool's
  ``test_processor``) instead of a Hugging Face ``CLIPProcessor``;
* the zero-shot heads are the pool's ``classification_heads`` (``head_<Task>.pt``, a
  ``ClassificationHead`` that normalises the features and applies the text embeddings), not built
  from a text encoder: ``logits = head(encoder(images))``, exactly as FusionBench's
  ``OpenCLIPVisionModelTaskPool`` evaluates.
"""

from __future__ import annotations

import logging
import pickle
from typing import Dict, Iterable, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from .compat import patch_typing_override

log = logging.getLogger(__name__)


def is_openclip_pool(modelpool) -> bool:
    """Whether ``modelpool`` is FusionBench's ``OpenCLIPVisionModelPool`` (False if open_clip or the
    pool class cannot be imported)."""
    if modelpool is None:
        return False
    patch_typing_override()
    try:
        from fusion_bench.modelpool.openclip_vision.modelpool import OpenCLIPVisionModelPool
    except ImportError:
        return False
    return isinstance(modelpool, OpenCLIPVisionModelPool)


def _entry(modelpool, name: str):
    config = modelpool._models[name] if name in modelpool._models else name
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    return config


def load_openclip_model(modelpool, name: str) -> nn.Module:
    """``modelpool.load_model(name)``, with the loading of pickled ``task_vectors`` checkpoints that
    FusionBench 0.2.33 intends but cannot do under current torch.

    FusionBench's pool reads a pickled ``ImageEncoder`` (an entry that is a path, or
    ``{model_name, pickle_path}``) with ``torch.load(..., weights_only=True)``, which cannot unpickle
    a module, and falls back to ``pickle.load`` only on ``RuntimeError`` while torch raises
    ``pickle.UnpicklingError`` (passing ``weights_only=False`` through ``load_model`` raises a
    ``TypeError``). On that error this function performs FusionBench's own steps with a full
    unpickle: ``torch.load(path, weights_only=False)`` after FusionBench's open_clip redirection
    (``src.modeling``, old class names), and for ``{model_name, pickle_path}`` a fresh
    ``ImageEncoder(model_name)`` that receives the pickle's state dict. Like ``load_model`` it sets
    the pool's train/test processors from the first encoder it loads. Unpickling runs code from the
    file: only use checkpoints you trust (the same holds for FusionBench's fallback).
    """
    try:
        return modelpool.load_model(name)
    except pickle.UnpicklingError as err:
        config = _entry(modelpool, name)
        path = config if isinstance(config, str) else (config or {}).get("pickle_path")
        if not isinstance(path, str):
            raise
        error = err
    from fusion_bench.modelpool.openclip_vision.modelpool import (
        _check_and_redirect_open_clip_modeling,
    )

    log.info(f"model {name!r}: FusionBench could not unpickle {path!r} ({error}); full unpickle")
    _check_and_redirect_open_clip_modeling()
    encoder = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(config, dict) and "model_name" in config:
        from fusion_bench.models.open_clip import ImageEncoder

        fresh = ImageEncoder(config["model_name"])
        fresh.load_state_dict(encoder.state_dict())
        encoder = fresh
    if getattr(modelpool, "_train_processor", None) is None:
        modelpool._train_processor = getattr(encoder, "train_preprocess", None)
    if getattr(modelpool, "_test_processor", None) is None:
        modelpool._test_processor = getattr(encoder, "val_preprocess", None)
    return encoder


class ImageTransformProcessor:
    """An image transform (an open_clip ``val_preprocess``) behind the call signature of a Hugging
    Face image processor, ``processor(images=[...], return_tensors="pt")["pixel_values"]``, which is
    how :class:`statsmerge_plugin.data.UnlabelledImages` processes images."""

    def __init__(self, transform):
        if not callable(transform):
            raise TypeError(f"expected a callable image transform, got {type(transform).__name__}")
        self.transform = transform

    def __call__(
        self, images=None, return_tensors: str = "pt", **kwargs
    ) -> Dict[str, torch.Tensor]:
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}

    def __repr__(self) -> str:
        return f"ImageTransformProcessor({self.transform!r})"


def openclip_processor(modelpool) -> ImageTransformProcessor:
    """The pool's evaluation transform (``test_processor``, the encoder's ``val_preprocess``, which
    FusionBench's OpenCLIP task pool uses too), as a processor for unlabelled images."""
    if getattr(modelpool, "_test_processor", None) is None:  # set when a model is loaded
        load_openclip_model(
            modelpool, "_pretrained_" if modelpool.has_pretrained else modelpool.model_names[0]
        )
    transform = getattr(modelpool, "_test_processor", None)
    if transform is None:
        raise ValueError(
            "the OpenCLIP model pool has no image transform: its models have no `val_preprocess`"
        )
    return ImageTransformProcessor(transform)


def load_classification_heads(modelpool, tasks: Iterable[str]) -> Dict[str, nn.Module]:
    """The pool's zero-shot head of every task, frozen.

    Raises:
        ValueError: naming the task (and its entry) when the pool has no head for it or the head
            cannot be loaded or is not a module.
    """
    configured = getattr(modelpool, "_classification_heads", None)
    heads = {}
    for task in tasks:
        if configured is None or task not in configured:
            known = sorted(configured) if configured is not None else []
            raise ValueError(
                f"task {task!r}: the OpenCLIP model pool has no classification head for it "
                f"(`classification_heads` has {known}); StatsMerging and ProDistill need each task's "
                "zero-shot head"
            )
        try:
            head = modelpool.load_classification_head(task)
        except Exception as err:  # noqa: BLE001 - FileNotFoundError, UnpicklingError, ...
            raise ValueError(
                f"task {task!r}: cannot load its classification head {configured[task]!r} "
                f"({type(err).__name__}: {err})"
            ) from err
        if not isinstance(head, nn.Module):
            raise ValueError(
                f"task {task!r}: classification head {configured[task]!r} is a "
                f"{type(head).__name__}, not a torch module"
            )
        heads[task] = head.requires_grad_(False).eval()
    return heads


class OpenCLIPSupportMixin:
    """Lets a method built on FusionBench's ``CLIPClassificationMixin`` run on an
    ``OpenCLIPVisionModelPool`` as well: ``clip_processor``, ``setup_zero_shot_classification_head``
    and ``compute_logits`` use the pool's transform and heads when ``self.modelpool`` is an OpenCLIP
    pool and defer to the next class otherwise. Place it before ``CLIPClassificationMixin``.
    """

    _openclip_processor: Optional[ImageTransformProcessor] = None
    openclip_heads: Dict[str, nn.Module]

    @property
    def is_openclip(self) -> bool:
        return is_openclip_pool(getattr(self, "modelpool", None))

    @property
    def clip_processor(self):
        if not self.is_openclip:
            return super().clip_processor
        if self._openclip_processor is None:
            self._openclip_processor = openclip_processor(self.modelpool)
        return self._openclip_processor

    def setup_zero_shot_classification_head(self, *args, task_names=None, **kwargs):
        if not self.is_openclip:
            super().setup_zero_shot_classification_head(*args, task_names=task_names, **kwargs)
            # the head in float32 whatever the pool's dtype (a bfloat16 pool loads its CLIP, and
            # so the projection, in bfloat16): logits and losses are never computed in half
            self.visual_projection.float()
            self.logit_scale_exp = self.logit_scale_exp.float()
            for task in list(self.zeroshot_weights):
                self.zeroshot_weights[task] = self.zeroshot_weights[task].float()
            return None
        tasks = list(self.modelpool.model_names if task_names is None else task_names)
        heads = load_classification_heads(self.modelpool, tasks)
        self.openclip_heads = {t: self.to_device(h) for t, h in heads.items()}

    def compute_logits(self, module, images, task: str, image_embeds=None) -> torch.Tensor:
        """A task's logits from ``module`` (or its image embeddings), with the head in its own
        dtype (float32): a half-precision model's embeddings are cast up before the head."""
        if not self.is_openclip:
            if image_embeds is None:
                image_embeds = module(images)[1]
            head_dtype = self.visual_projection.weight.dtype
            return super().compute_logits(
                module, images, task, image_embeds=image_embeds.to(head_dtype)
            )
        features = module(images) if image_embeds is None else image_embeds
        head = self.openclip_heads[task]
        return head(features.to(next(head.parameters()).dtype))

    def image_embeds(self, module, images) -> torch.Tensor:
        """What ``compute_logits(..., image_embeds=...)`` takes: an ``ImageEncoder``'s features, or
        a Hugging Face vision model's pooled output (``module(images)[1]``)."""
        return module(images) if self.is_openclip else module(images)[1]
