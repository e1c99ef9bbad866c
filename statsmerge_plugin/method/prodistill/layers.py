R"""ProDistill's per-architecture adapters (:class:`BlockLayout`): where a model keeps its blocks and
its embedding stage, and how to call one block functionally (spec §5.12, §6). The vision adapters are
here (Hugging Face ``CLIPVisionModel``, open_clip ``ImageEncoder``); the language ones (GPT-2, decoder
LMs) in :mod:`.text_layers`. :func:`.adapters.block_layout` picks the adapter of a model.

Parameter names are canonical (:mod:`statsmerge_plugin.model_io.canonical`): relative to the vision
backbone for CLIP, the model's own names for language models.
"""

from __future__ import annotations

import copy
import inspect
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...model_io.canonical import (  # noqa: F401 - re-exported for callers of this module
    BLOCK_PATTERN,
    block_of,
    block_prefix,
    canonical_buffers,
    canonical_parameters,
    group_names,
    vision_backbone,
    weight_groups,
)


def block_template(block: nn.Module, device) -> nn.Module:
    """A stand-in for ``block`` to run with a layout's ``call_block``, which supplies every
    parameter: the same modules with every parameter on the ``meta`` device (nothing is copied, so
    the output model's lazily loaded weights stay untouched) and the buffers (causal masks, rotary
    frequencies) copied to ``device``. A parameter that the call does not supply then fails loudly.
    """
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for p in block.parameters()
    }
    template = copy.deepcopy(block, memo)
    for module in template.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return template.eval()


def _block_forward_kwargs(block: nn.Module) -> dict:
    params = inspect.signature(type(block).forward).parameters
    kwargs = {}
    if "attention_mask" in params:
        kwargs["attention_mask"] = None
    if "causal_attention_mask" in params:
        kwargs["causal_attention_mask"] = None
    return kwargs


def call_block(
    block: nn.Module, params: Mapping[str, Tensor], hidden: Tensor, mask: Optional[Tensor] = None
) -> Tensor:
    """Run ``block`` (a ``CLIPEncoderLayer``) with parameters ``params`` (local names) on ``hidden``
    (batch-first ``[N, seq, D]``), via ``torch.func.functional_call``.

    Handles ``forward`` returning a tuple (transformers 4) or a tensor (transformers 5). Every
    image token is real: ``mask`` is ``None`` for images.
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


def call_resblock(
    block: nn.Module, params: Mapping[str, Tensor], hidden: Tensor, mask: Optional[Tensor] = None
) -> Tensor:
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
    """A per-architecture adapter: where a model keeps its transformer blocks and its embedding stage,
    and how to call them. Hugging Face ``CLIPVisionModel`` (:data:`HF_CLIP_LAYOUT`), open_clip
    ``ImageEncoder`` (:data:`OPENCLIP_LAYOUT`), GPT-2 and decoder LMs (:mod:`.text_layers`). Names
    are canonical (relative to :func:`vision_backbone`). Everything that is neither a block nor an
    embedding-stage parameter (final norms, projections, LM heads) is merged outside the loop.

    Args:
        name: for messages.
        pattern: matches a block parameter name, groups (block index, local name).
        block_format: the prefix of block ``i``'s parameters, ``block_format.format(i)``.
        blocks_path: attribute path of the block list on the backbone.
        embedding_modules: backbone sub-modules of the embedding stage (copied for stage 0).
        embedding_prefixes: canonical name prefixes of the embedding-stage parameters.
        call_block: ``(block, params, hidden [N, seq, D], mask [N, seq] or None) -> [N, seq, D]``.
        call_embedding_stage: ``(stage, params, inputs) -> block 0 input [N, seq, D]``; ``inputs``
            is a pixel batch, or for text a dict with ``input_ids`` and ``attention_mask``.
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
        return block_of(name, self.pattern)

    @staticmethod
    def mask_of(inputs) -> Optional[Tensor]:
        """The ``[N, seq]`` mask of real tokens of a batch (``None``: images, every token is real)."""
        return inputs.get("attention_mask") if isinstance(inputs, Mapping) else None

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` if this adapter cannot run ``model`` (the language adapters check
        the model type)."""

    def block_prefix(self, index: int) -> str:
        return self.block_format.format(index)

    def group_names(self, names) -> Tuple[Dict[int, List[str]], List[str]]:
        """``{block index: [local names]}`` and the other names (see :func:`group_names`)."""
        return group_names(names, self.pattern)

    def weight_groups(self, names) -> List[List[str]]:
        return weight_groups(names, self.pattern, self.block_format)

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
