"""Published CLIP architecture sizes (no weights): what a synthetic full-size pool is built from.

The numbers are those of the Hugging Face configs of ``openai/clip-vit-base-patch32`` and
``openai/clip-vit-large-patch14`` (the ``_pretrained_`` models of FusionBench's ViT-B/32 and
ViT-L/14 pools), which agree with open_clip's bundled ``model_configs/ViT-B-32.json`` /
``ViT-L-14.json``: vision width, depth, patch and image size; text width, heads, depth, vocabulary
and context length; the joint embedding size. The vision towers have 87,456,000 parameters in 199
tensors (ViT-B/32) and 303,179,776 in 391 (ViT-L/14), as FusionBench's real checkpoints.
``tiny`` is a CI-sized stand-in with the same structure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

ARCHITECTURES = ("vit-b-32", "vit-l-14", "tiny")


@dataclass(frozen=True)
class ClipSize:
    """The sizes that define a CLIP model (vision and text towers, joint embedding)."""

    name: str
    vision_width: int
    vision_layers: int
    vision_heads: int
    patch_size: int
    image_size: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int
    vocab_size: int = 49408
    context_length: int = 77
    mlp_ratio: int = 4

    def to_dict(self) -> Dict:
        return asdict(self)

    def vision_config(self):
        """The ``transformers.CLIPVisionConfig`` of this size (OpenAI CLIP's ``quick_gelu``)."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.vision_width,
            intermediate_size=self.mlp_ratio * self.vision_width,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            projection_dim=self.embed_dim,
            hidden_act="quick_gelu",
        )

    def text_config(self):
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            intermediate_size=self.mlp_ratio * self.text_width,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.context_length,
            projection_dim=self.embed_dim,
            hidden_act="quick_gelu",
            bos_token_id=self.vocab_size - 2,
            eos_token_id=self.vocab_size - 1,
            pad_token_id=self.vocab_size - 1,
        )

    def clip_config(self):
        """The full ``transformers.CLIPConfig`` (both towers)."""
        from transformers import CLIPConfig

        return CLIPConfig(
            text_config=self.text_config().to_dict(),
            vision_config=self.vision_config().to_dict(),
            projection_dim=self.embed_dim,
        )

    @property
    def tokens(self) -> int:
        """Tokens per image: patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


SIZES: Dict[str, ClipSize] = {
    "vit-b-32": ClipSize("vit-b-32", 768, 12, 12, 32, 224, 512, 12, 8, 512),
    "vit-l-14": ClipSize("vit-l-14", 1024, 24, 16, 14, 224, 768, 12, 12, 768),
    "tiny": ClipSize("tiny", 32, 2, 2, 8, 32, 32, 2, 2, 16),
}


def get_size(name: str) -> ClipSize:
    """The :class:`ClipSize` called ``name``; ``ValueError`` naming the known sizes otherwise."""
    if name not in SIZES:
        raise ValueError(f"unknown architecture size {name!r}: expected one of {ARCHITECTURES}")
    return SIZES[name]


def vision_parameter_count(size: ClipSize) -> Dict[str, int]:
    """``{"tensors": ..., "parameters": ...}`` of the vision tower, built on the ``meta`` device."""
    import torch
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(size.vision_config())
    params = list(model.parameters())
    return {"tensors": len(params), "parameters": sum(p.numel() for p in params)}
