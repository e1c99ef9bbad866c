R"""Where ProDistill's "blocks" live in a Hugging Face ``CLIPVisionModel`` and how to call one
functionally (spec §5.12, §6).

Parameter names are handled *relative to the vision backbone* ("canonical" names such as
``encoder.layers.3.mlp.fc1.weight`` or ``embeddings.patch_embedding.weight``), which is what both
transformers 4 (``model.vision_model.<name>``) and 5 (flattened ``model.<name>``) agree on.
"""

from __future__ import annotations

import inspect
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

BLOCK_PATTERN = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def vision_backbone(model: nn.Module) -> nn.Module:
    """The ``CLIPVisionTransformer`` of a ``CLIPVisionModel`` (transformers 4) or the model itself
    (transformers 5, where ``CLIPVisionModel`` is flattened)."""
    return model.vision_model if hasattr(model, "vision_model") else model


def block_of(name: str) -> Optional[Tuple[int, str]]:
    """``"encoder.layers.3.mlp.fc1.weight"`` → ``(3, "mlp.fc1.weight")``; ``None`` outside blocks."""
    m = BLOCK_PATTERN.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def group_names(names) -> Tuple[Dict[int, List[str]], List[str]]:
    """Split canonical parameter names into ``{block index: [local names]}`` and the other names."""
    blocks: Dict[int, List[str]] = {}
    others: List[str] = []
    for n in names:
        b = block_of(n)
        if b is None:
            others.append(n)
        else:
            blocks.setdefault(b[0], []).append(b[1])
    return {k: sorted(v) for k, v in sorted(blocks.items())}, sorted(others)


def block_prefix(index: int) -> str:
    return f"encoder.layers.{index}."


def weight_groups(names) -> List[List[str]]:
    """Canonical names in read groups: one per transformer block, then all the others."""
    blocks, others = group_names(names)
    groups = [[block_prefix(b) + n for n in local] for b, local in blocks.items()]
    return groups + ([others] if others else [])


def canonical_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{canonical name: parameter}`` of a CLIP vision model."""
    return dict(vision_backbone(model).named_parameters())


def canonical_buffers(model: nn.Module) -> Dict[str, Tensor]:
    return dict(vision_backbone(model).named_buffers())


def empty_block_like(block: nn.Module, config) -> Optional[nn.Module]:
    """A parameter-less stand-in for ``block`` (same class and config, on the ``meta`` device) to
    run with :func:`call_block`, which supplies every parameter; reading nothing from ``block``
    keeps the output model's lazily loaded weights untouched. ``None`` if that is not possible
    (unknown constructor, or the block has buffers, which ``functional_call`` would not replace).
    """
    try:
        with torch.device("meta"):
            empty = type(block)(config)
    except Exception:  # noqa: BLE001 - the caller falls back to a copy of the block
        return None
    names = {n for n, _ in empty.named_parameters()}
    if list(empty.buffers()) or names != {n for n, _ in block.named_parameters()}:
        return None
    return empty


def _block_forward_kwargs(block: nn.Module) -> dict:
    params = inspect.signature(type(block).forward).parameters
    kwargs = {}
    if "attention_mask" in params:
        kwargs["attention_mask"] = None
    if "causal_attention_mask" in params:
        kwargs["causal_attention_mask"] = None
    return kwargs


def call_block(block: nn.Module, params: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
    """Run ``block`` (a ``CLIPEncoderLayer``) with parameters ``params`` (local names) on ``hidden``
    (batch-first ``[N, seq, D]``), via ``torch.func.functional_call``.

    Handles ``forward`` returning a tuple (transformers 4) or a tensor (transformers 5).
    """
    out = functional_call(
        block, dict(params), (hidden,), _block_forward_kwargs(block), strict=False
    )
    return out[0] if isinstance(out, (tuple, list)) else out


def call_embedding_stage(
    backbone: nn.Module, params: Mapping[str, Tensor], pixel_values: Tensor
) -> Tensor:
    """The input of block 0, ``pre_layrnorm(embeddings(pixels))`` (spec §1.3, §5.12), computed with
    the embedding-stage parameters ``params`` (canonical names ``embeddings.*``, ``pre_layrnorm.*``).
    """
    emb = {k[len("embeddings.") :]: v for k, v in params.items() if k.startswith("embeddings.")}
    pre = {k[len("pre_layrnorm.") :]: v for k, v in params.items() if k.startswith("pre_layrnorm.")}
    hidden = functional_call(backbone.embeddings, emb, (pixel_values,), strict=False)
    return functional_call(backbone.pre_layrnorm, pre, (hidden,), strict=False)
