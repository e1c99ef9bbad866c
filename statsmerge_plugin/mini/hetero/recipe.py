"""The teachers' recipe of the mixed mini benchmark: its knobs, presets and build key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict

from ..recipe import _digest, library_versions

# Which architecture serves which task (the other six keep the base build's CLIP models).
TEACHERS: Dict[str, str] = {"mini_gtsrb": "resnet", "mini_eurosat": "wide_clip"}

# Part of every teachers' build key. Bump it whenever what a knob means, or what the teachers'
# training produces for the same knobs, changes (a pure refactor does not).
HETERO_VERSION = 2


@dataclass(frozen=True)
class HeteroRecipe:
    """Knobs of the teachers' training (torch threads: the base recipe's ``num_threads``)."""

    # ResNet teacher (mini_gtsrb)
    resnet_embedding: int = 32
    resnet_hidden: tuple = (32, 64, 128)
    resnet_depths: tuple = (1, 1, 1)
    resnet_steps: int = 400
    resnet_batch: int = 64
    resnet_lr: float = 2e-3
    resnet_wd: float = 1e-4
    # wider CLIP teacher (mini_eurosat): the base build's ``Recipe.replace(**wide_clip)``, with its
    # own text tower, pretrained on the task's separate ``pretrain`` pool (``n_pretrain`` per class)
    wide_clip: Dict[str, Any] = field(
        default_factory=lambda: dict(
            vision_width=192,
            vision_layers=4,
            heads=4,
            n_pretrain=100,
            pretrain_steps=150,
            pretrain_batch=128,
            ft_steps=300,
            ft_batch=64,
            ft_lr=2e-4,
        )
    )

    def to_dict(self) -> Dict:
        return asdict(self)


HETERO_PRESETS: Dict[str, HeteroRecipe] = {
    "default": HeteroRecipe(),
    "smoke": HeteroRecipe(
        resnet_embedding=8,
        resnet_hidden=(8, 16),
        resnet_depths=(1, 1),
        resnet_steps=10,
        resnet_batch=16,
        # layers, heads, fine-tuning batch and lr: the smoke base recipe's
        wide_clip=dict(
            vision_width=48, n_pretrain=6, pretrain_steps=5, pretrain_batch=32, ft_steps=5
        ),
    ),
}


def key_payload(base_key: str, recipe: HeteroRecipe) -> Dict:
    """What determines the teachers: ``HETERO_VERSION``, the base build's key (its directory name,
    itself keyed on the base recipe, seed and tasks), the recipe's knobs, the teacher map and the
    library versions; never the source code, so that a refactor keeps every build."""
    return {
        "version": HETERO_VERSION,
        "base": base_key,
        "recipe": recipe.to_dict(),
        "teachers": TEACHERS,
        "libraries": library_versions(),
    }


def hetero_key(base_key: str, recipe: HeteroRecipe, preset: str) -> str:
    """Directory name of the teachers' build of base build ``base_key``."""
    digest = _digest(key_payload(base_key, recipe), 10)
    return f"{base_key}-hetero-h{HETERO_VERSION}-{preset}-{digest}"
