"""Synthetic full-size CLIP pools (ViT-B/32, ViT-L/14 sizes, random weights, built offline in
seconds) for measuring cost and catching size-dependent failures; used by
``benchmarks/real_scale.py``. Import-light: the submodules import torch/transformers.

* :mod:`.specs`: the published architecture sizes;
* :mod:`.build`: :func:`~.build.build_pool` writes a pool (``PoolRecipe``);
* :mod:`.pools`: FusionBench ``CLIPVisionModelPool`` / ``CLIPVisionModelTaskPool`` over a build.
"""
