"""Model I/O shared by both methods: canonical parameter names and block-wise weight readers that
stream one group of tensors at a time from a pool's checkpoints (safetensors, in-memory modules,
FusionBench's ``LazyStateDict``)."""

from .canonical import (
    BLOCK_PATTERN,
    block_of,
    block_prefix,
    canonical_buffers,
    canonical_parameters,
    group_names,
    vision_backbone,
    weight_groups,
)
from .readers import (
    ModuleReader,
    SafetensorsReader,
    WeightReader,
    load_pool_model,
    make_reader,
    open_reader,
    unreadable,
)
