"""The build recipe of the mini benchmark: every knob, the presets, and the build key."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence

# Bump when the meaning of a knob changes; code changes are caught by ``source_digest`` anyway.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """All knobs of a build. Sizes are images per class; steps are optimizer steps."""

    # data
    n_pretrain: int = 100
    n_train: int = 200
    n_val: int = 20
    n_test: int = 50
    # model (vision: 32x32 images in 8x8 patches)
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    text_width: int = 64
    text_layers: int = 1
    heads: int = 4
    projection_dim: int = 64
    # contrastive pretraining of the whole CLIP
    pretrain_steps: int = 500
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    pretrain_wd: float = 0.1
    pair_frac: float = 0.6  # fraction of (2k, 2k+1) class pairs whose captions are blurred
    # fine-tuning of the vision tower against the frozen zero-shot head
    ft_steps: int = 200
    ft_batch: int = 32
    ft_lr: float = 2e-4
    ft_wd: float = 0.0
    # evaluation through FusionBench written into the manifest
    evaluate: bool = True
    evaluate_merges: bool = True
    num_threads: int = 2

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


PRESETS: Dict[str, Recipe] = {
    "default": Recipe(),
    "smoke": Recipe(
        n_pretrain=12,
        n_train=12,
        n_val=3,
        n_test=6,
        vision_width=32,
        vision_layers=2,
        text_width=32,
        text_layers=1,
        heads=2,
        projection_dim=16,
        pretrain_steps=20,
        pretrain_batch=64,
        ft_steps=8,
        ft_batch=16,
    ),
}


def get_recipe(preset: str) -> Recipe:
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]


# modules whose code determines the data and weights of a build
CONTENT_MODULES = ("build.py", "data.py", "recipe.py", "tasks.py", "tokenizer.py", "train.py")


def _code_fingerprint(source: str) -> str:
    """The module's syntax tree without docstrings: formatting, comments and docs do not count."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def source_digest() -> str:
    """Hash of the code and assets that determine the build's data and weights."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in CONTENT_MODULES:
        h.update(name.encode())
        h.update(_code_fingerprint((here / name).read_text(encoding="utf-8")).encode())
    for path in sorted((here / "assets").glob("*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def library_versions() -> Dict[str, str]:
    from importlib.metadata import version

    return {lib: version(lib) for lib in ("torch", "transformers", "datasets", "numpy", "pillow")}


def build_key(recipe: Recipe, preset: str, seed: int, tasks: Sequence[str]) -> str:
    """Directory name of a build: changes whenever recipe, seed, tasks, code or libraries change."""
    payload = {
        "version": RECIPE_VERSION,
        "recipe": recipe.to_dict(),
        "seed": seed,
        "tasks": list(tasks),
        "source": source_digest(),
        "libraries": library_versions(),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"mini-clip-r{RECIPE_VERSION}-{preset}-s{seed}-t{len(tasks)}-{digest}"
