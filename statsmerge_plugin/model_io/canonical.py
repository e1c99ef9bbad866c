R"""Canonical parameter names: what both methods call a model's tensors.

A vision model's names are taken *relative to its vision backbone* (``encoder.layers.3.mlp.fc1.weight``,
``embeddings.patch_embedding.weight``), which transformers 4 (``model.vision_model.<name>``) and 5
(flattened ``model.<name>``) agree on, and which an open_clip ``ImageEncoder`` gives for its
``model.visual``. Language models (GPT-2, Llama, Qwen2, Mistral) have no such backbone: their names
are the model's own ``named_parameters()`` (``model.layers.0.self_attn.q_proj.weight``,
``h.0.attn.c_attn.weight``).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

#: a parameter of an HF CLIP vision encoder block: (block index, local name)
BLOCK_PATTERN = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def vision_backbone(model: nn.Module) -> nn.Module:
    """The ``CLIPVisionTransformer`` of a ``CLIPVisionModel`` (transformers 4), the vision tower
    ``model.model.visual`` of an open_clip ``ImageEncoder`` (FusionBench's OpenCLIP pools), or the
    model itself (transformers 5, where ``CLIPVisionModel`` is flattened, and every language model).
    """
    if hasattr(model, "vision_model"):
        return model.vision_model
    visual = getattr(getattr(model, "model", None), "visual", None)
    return visual if isinstance(visual, nn.Module) else model


def canonical_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{canonical name: parameter}`` (see the module docstring); tied parameters appear once."""
    return dict(vision_backbone(model).named_parameters())


def canonical_buffers(model: nn.Module) -> Dict[str, Tensor]:
    return dict(vision_backbone(model).named_buffers())


def block_of(name: str, pattern: "re.Pattern" = BLOCK_PATTERN) -> Optional[Tuple[int, str]]:
    """``"encoder.layers.3.mlp.fc1.weight"`` → ``(3, "mlp.fc1.weight")``; ``None`` outside blocks."""
    m = pattern.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def group_names(
    names, pattern: "re.Pattern" = BLOCK_PATTERN
) -> Tuple[Dict[int, List[str]], List[str]]:
    """Split canonical names into ``{block index: [sorted local names]}`` and the other names."""
    blocks: Dict[int, List[str]] = {}
    others: List[str] = []
    for n in names:
        b = block_of(n, pattern)
        if b is None:
            others.append(n)
        else:
            blocks.setdefault(b[0], []).append(b[1])
    return {k: sorted(v) for k, v in sorted(blocks.items())}, sorted(others)


def block_prefix(index: int, block_format: str = "encoder.layers.{}.") -> str:
    return block_format.format(index)


def weight_groups(
    names, pattern: "re.Pattern" = BLOCK_PATTERN, block_format: str = "encoder.layers.{}."
) -> List[List[str]]:
    """Canonical names in read groups: one per block, then all the others (one tensor wide
    validation and statistics passes read a model group by group)."""
    blocks, others = group_names(names, pattern)
    groups = [[block_format.format(b) + n for n in local] for b, local in blocks.items()]
    return groups + ([others] if others else [])
