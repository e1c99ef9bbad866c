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
    """The ``CLIPVisionTransformer`` of a ``CLIPVisionModel`` (transformers 4), the vision tower
    ``model.model.visual`` of an open_clip ``ImageEncoder`` (FusionBench's OpenCLIP pools), or the
    model itself (transformers 5, where ``CLIPVisionModel`` is flattened)."""
    if hasattr(model, "vision_model"):
        return model.vision_model
    visual = getattr(getattr(model, "model", None), "visual", None)
    return visual if isinstance(visual, nn.Module) else model


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


# --- open_clip (FusionBench's OpenCLIP pools) --------------------------------------------------------

OPENCLIP_BLOCK_PATTERN = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def call_resblock(block: nn.Module, params: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
    """Run an open_clip ``ResidualAttentionBlock`` with ``params`` on batch-first ``hidden``
    (``[N, seq, D]``). Blocks of older open_clip versions (the pickled ``task_vectors`` checkpoints)
    are sequence-first: their ``attn.batch_first`` is False (or missing), so the input is transposed
    for the call and the output back."""
    seq_first = not getattr(getattr(block, "attn", None), "batch_first", False)
    x = hidden.transpose(0, 1) if seq_first else hidden
    out = functional_call(block, dict(params), (x,), strict=False)
    return out.transpose(0, 1) if seq_first else out


def call_openclip_embedding_stage(
    stage: nn.Module, params: Mapping[str, Tensor], pixel_values: Tensor
) -> Tensor:
    """The input of ``transformer.resblocks[0]`` of an open_clip ``VisionTransformer``, batch-first,
    computed with the embedding-stage parameters ``params`` (``conv1.*``, ``class_embedding``,
    ``positional_embedding``, ``ln_pre.*``): open_clip's ``VisionTransformer._embeds`` (patchify,
    class token, positional embedding, ``ln_pre``); patch dropout is inactive in evaluation."""
    conv = {k[len("conv1.") :]: v for k, v in params.items() if k.startswith("conv1.")}
    ln_pre = {k[len("ln_pre.") :]: v for k, v in params.items() if k.startswith("ln_pre.")}
    x = functional_call(stage.conv1, conv, (pixel_values,), strict=False)  # [N, D, grid, grid]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, grid**2, D]
    cls = params["class_embedding"].to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + params["positional_embedding"].to(x.dtype)
    return functional_call(stage.ln_pre, ln_pre, (x,), strict=False)


class BlockLayout:
    """Where a vision backbone keeps its transformer blocks and its embedding stage, and how to call
    them: Hugging Face ``CLIPVisionModel`` (:data:`HF_CLIP_LAYOUT`) or open_clip ``ImageEncoder``
    (:data:`OPENCLIP_LAYOUT`). Names are canonical (relative to :func:`vision_backbone`).

    Args:
        name: for messages.
        pattern: matches a block parameter name, groups (block index, local name).
        block_format: the prefix of block ``i``'s parameters, ``block_format.format(i)``.
        blocks_path: attribute path of the block list on the backbone.
        embedding_modules: backbone sub-modules of the embedding stage (copied for stage 0).
        embedding_prefixes: canonical name prefixes of the embedding-stage parameters.
        call_block: ``(block, params, hidden [N, seq, D]) -> [N, seq, D]``.
        call_embedding_stage: ``(stage, params, pixels) -> block 0 input [N, seq, D]``.
    """

    def __init__(
        self,
        name: str,
        pattern: "re.Pattern",
        block_format: str,
        blocks_path: str,
        embedding_modules: Tuple[str, ...],
        embedding_prefixes: Tuple[str, ...],
        call_block,
        call_embedding_stage,
    ):
        self.name = name
        self.pattern = pattern
        self.block_format = block_format
        self.blocks_path = blocks_path
        self.embedding_modules = embedding_modules
        self.embedding_prefixes = embedding_prefixes
        self.call_block = call_block
        self.call_embedding_stage = call_embedding_stage

    def __repr__(self) -> str:
        return f"BlockLayout({self.name!r})"

    def block_of(self, name: str) -> Optional[Tuple[int, str]]:
        m = self.pattern.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def block_prefix(self, index: int) -> str:
        return self.block_format.format(index)

    def group_names(self, names) -> Tuple[Dict[int, List[str]], List[str]]:
        """``{block index: [local names]}`` and the other names (see :func:`group_names`)."""
        blocks: Dict[int, List[str]] = {}
        others: List[str] = []
        for n in names:
            b = self.block_of(n)
            if b is None:
                others.append(n)
            else:
                blocks.setdefault(b[0], []).append(b[1])
        return {k: sorted(v) for k, v in sorted(blocks.items())}, sorted(others)

    def weight_groups(self, names) -> List[List[str]]:
        blocks, others = self.group_names(names)
        groups = [[self.block_prefix(b) + n for n in local] for b, local in blocks.items()]
        return groups + ([others] if others else [])

    def blocks(self, backbone: nn.Module) -> nn.ModuleList:
        module = backbone
        for attr in self.blocks_path.split("."):
            module = getattr(module, attr)
        return module

    def is_embedding(self, name: str) -> bool:
        return name.startswith(self.embedding_prefixes)

    def embedding_stage_modules(self, backbone: nn.Module) -> Dict[str, nn.Module]:
        return {name: getattr(backbone, name) for name in self.embedding_modules}


HF_CLIP_LAYOUT = BlockLayout(
    "transformers CLIPVisionModel",
    BLOCK_PATTERN,
    "encoder.layers.{}.",
    "encoder.layers",
    ("embeddings", "pre_layrnorm"),
    ("embeddings.", "pre_layrnorm."),
    call_block,
    call_embedding_stage,
)

OPENCLIP_LAYOUT = BlockLayout(
    "open_clip VisionTransformer",
    OPENCLIP_BLOCK_PATTERN,
    "transformer.resblocks.{}.",
    "transformer.resblocks",
    ("conv1", "ln_pre"),
    ("conv1.", "class_embedding", "positional_embedding", "ln_pre."),
    call_resblock,
    call_openclip_embedding_stage,
)


def block_layout(model: nn.Module) -> BlockLayout:
    """The layout of ``model``'s vision backbone (an open_clip ``ImageEncoder`` or ``VisionTransformer``:
    :data:`OPENCLIP_LAYOUT`; otherwise a Hugging Face CLIP vision model, :data:`HF_CLIP_LAYOUT`)."""
    backbone = vision_backbone(model)
    if hasattr(backbone, "transformer") and hasattr(backbone.transformer, "resblocks"):
        return OPENCLIP_LAYOUT
    return HF_CLIP_LAYOUT
