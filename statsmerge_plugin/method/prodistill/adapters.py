"""Which block adapter runs a model: the vision adapters of :mod:`.layers` (Hugging Face CLIP,
open_clip) or the language ones of :mod:`.text_layers` (GPT-2, Llama/Qwen2/Mistral decoders)."""

from __future__ import annotations

from torch import nn

from .layers import HF_CLIP_LAYOUT, OPENCLIP_LAYOUT, BlockLayout, vision_backbone
from .text_layers import text_layout


def block_layout(model: nn.Module) -> BlockLayout:
    """The adapter of ``model``: an open_clip ``ImageEncoder`` or ``VisionTransformer``
    (:data:`~.layers.OPENCLIP_LAYOUT`), GPT-2 or a decoder-only LM (:func:`.text_layers.text_layout`),
    otherwise a Hugging Face CLIP vision model (:data:`~.layers.HF_CLIP_LAYOUT`)."""
    text = text_layout(model)
    if text is not None:
        return text
    backbone = vision_backbone(model)
    if hasattr(backbone, "transformer") and hasattr(backbone.transformer, "resblocks"):
        return OPENCLIP_LAYOUT
    return HF_CLIP_LAYOUT
