"""StatsMerging's options: a few that most runs change, and research groups for the ablations.

``config/method/statsmerging.yaml`` lists them in this order. The top-level options are the ones a
user picks (granularity, learner, steps, data, seed). The groups hold what the paper's and our
ablations vary (``docs/statsmerging.md``), each a dataclass validated here in one place:

* ``features``: the weight statistics S_k^l (Eq. 2) and their normalisation;
* ``mlp``: the StatsMergeLearner's MLP (§3.2);
* ``coefficients``: logits -> lambda over tasks, and the overall scale s (Fig. 3);
* ``objective``: the task-specific teacher distillation loss (§3.3);
* ``optim``: Adam, its learning rates and schedule;
* ``model_selection``: picking a step on held-out unlabelled images (never the test split);
* ``memory``: how teachers label and where each step's merge lives.

Before the groups, every option was a flat key (``method.hidden_dim=16``). Those names still work,
from YAML or Python: each is moved to its group key with a warning that names it
(:data:`FLAT_KEYS`), and its value wins over the group's (an old command line such as
``method=statsmerging/paper method.lr=0.01`` keeps its meaning).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from statsmerge_plugin.data import HELD_OUT_SOURCES, plain_config
from statsmerge_plugin.precision import check_compute_dtype
from statsmerge_plugin.validation import check_bool, check_choice, check_int, check_positive

from .distillation import DISTILLATION_LOSSES, TASK_WEIGHTINGS
from .learner import (
    DEFAULT_LR,
    LEARNER_MODES,
    LR_SCHEDULES,
    OUTPUT_NORMS,
    SCALE_MODES,
    SELECTION_MODES,
    OptimiserSettings,
)
from .statistics import FEATURE_GROUPS, FEATURE_NORMS, check_feature_groups

log = logging.getLogger(__name__)

GRANULARITIES = ("layer_wise", "task_wise")
STATS_SOURCES = ("task_vector", "finetuned")
SELECTION_METRICS = ("agreement", "loss")


@dataclass
class FeatureOptions:
    """The statistics S_k^l of each task vector and tensor (Eq. 2) and their normalisation."""

    stats_source: str = "task_vector"
    stat_features: List[str] = field(default_factory=lambda: list(FEATURE_GROUPS))
    svd_rank: int = 3
    svd_exact_max_numel: int = 4_000_000
    feature_norm: str = "standardize"


@dataclass
class MLPOptions:
    """The StatsMergeLearner's MLP (shared / per_tensor learners)."""

    hidden_dim: int = 256
    zero_init_output: bool = True


@dataclass
class CoefficientOptions:
    """Logits -> coefficients over tasks, and the overall scale s (lambda = s * norm(f(S)))."""

    output_norm: str = "none"
    scale: str = "fixed"
    init_scale: float = 2.4


@dataclass
class ObjectiveOptions:
    """Task-specific teacher distillation (§3.3) and how the tasks' losses are combined."""

    loss: str = "ce_hard"
    temperature: float = 1.0
    task_weighting: str = "sum"


@dataclass
class OptimOptions:
    """Adam on the learner; ``lr=None`` is the learner mode's default (:data:`DEFAULT_LR`)."""

    lr: Optional[float] = None
    lr_schedule: str = "cosine"
    lr_step_size: int = 100
    lr_gamma: float = 0.1
    scale_lr: float = 0.01


@dataclass
class SelectionOptions:
    """Model selection on a held-out part of the unlabelled images (``mode=none``: the last step)."""

    mode: str = "none"
    fraction: float = 0.25
    metric: str = "agreement"
    eval_every: int = 25
    patience: int = 4


@dataclass
class MemoryOptions:
    """Batching of the teachers' labelling, and where each step's merge is held."""

    teacher_batch_size: int = 64
    merge_in_place: bool = True


#: group name -> its dataclass, in the order of the YAML
GROUPS = {
    "features": FeatureOptions,
    "mlp": MLPOptions,
    "coefficients": CoefficientOptions,
    "objective": ObjectiveOptions,
    "optim": OptimOptions,
    "model_selection": SelectionOptions,
    "memory": MemoryOptions,
}

#: the flat option names before the groups -> (group, field)
FLAT_KEYS: Dict[str, Tuple[str, str]] = {
    **{f.name: ("features", f.name) for f in dataclasses.fields(FeatureOptions)},
    **{f.name: ("mlp", f.name) for f in dataclasses.fields(MLPOptions)},
    **{f.name: ("coefficients", f.name) for f in dataclasses.fields(CoefficientOptions)},
    **{f.name: ("objective", f.name) for f in dataclasses.fields(ObjectiveOptions)},
    **{f.name: ("optim", f.name) for f in dataclasses.fields(OptimOptions)},
    "selection": ("model_selection", "mode"),
    "selection_fraction": ("model_selection", "fraction"),
    "selection_metric": ("model_selection", "metric"),
    "eval_every": ("model_selection", "eval_every"),
    "patience": ("model_selection", "patience"),
    **{f.name: ("memory", f.name) for f in dataclasses.fields(MemoryOptions)},
}


@dataclass
class StatsMergingOptions:
    """Every option of a StatsMerging run, validated (:func:`resolve_options`)."""

    granularity: str = "layer_wise"
    learner: str = "per_tensor"
    max_steps: int = 500
    batch_size_per_task: int = 4
    num_unlabelled_per_task: Optional[int] = 128
    data_source: str = "auto"
    seed: int = 0
    compute_dtype: Optional[str] = None
    features: FeatureOptions = field(default_factory=FeatureOptions)
    mlp: MLPOptions = field(default_factory=MLPOptions)
    coefficients: CoefficientOptions = field(default_factory=CoefficientOptions)
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    model_selection: SelectionOptions = field(default_factory=SelectionOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)

    def optimiser_settings(self) -> OptimiserSettings:
        """The optimiser of this run (``optim.lr=None``: the learner mode's default)."""
        o = self.optim
        return OptimiserSettings(
            lr=float(o.lr if o.lr is not None else DEFAULT_LR[self.learner]),
            schedule=o.lr_schedule,
            step_size=o.lr_step_size,
            gamma=o.lr_gamma,
            scale_lr=float(o.scale_lr),
        )

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def plain(value):
    """A config value as plain Python (:func:`~statsmerge_plugin.data.plain_config`), a tuple as
    a list (the class defaults hold tuples, the YAML lists)."""
    value = plain_config(value)
    return list(value) if isinstance(value, tuple) else value


def nest_flat_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Keyword arguments with the old flat names (:data:`FLAT_KEYS`) moved into their groups, e.g.
    ``{"hidden_dim": 16, "lr": 0.01}`` -> ``{"mlp": {"hidden_dim": 16}, "optim": {"lr": 0.01}}``:
    for scripts that describe settings by the flat names (no warning)."""
    nested: Dict[str, Any] = {}
    for key, value in options.items():
        if key in FLAT_KEYS:
            group, field_name = FLAT_KEYS[key]
            nested.setdefault(group, {})[field_name] = value
        elif key in GROUPS:
            nested.setdefault(key, {}).update(plain(value) or {})
        else:
            nested[key] = value
    return nested


def flat_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`nest_flat_options`: group keys as their flat names (scripts and tables
    that list settings by the flat names)."""
    flat = {v: k for k, v in FLAT_KEYS.items()}
    out: Dict[str, Any] = {}
    for key, value in options.items():
        if key in GROUPS:
            for field_name, v in (plain(value) or {}).items():
                out[flat[(key, field_name)]] = v
        else:
            out[key] = value
    return out


def _group(name: str, given: Optional[Mapping[str, Any]]):
    cls = GROUPS[name]
    given = plain(given) or {}
    if not isinstance(given, Mapping):
        raise ValueError(
            f"option `{name}` is a group of options ({', '.join(_fields(cls))}); "
            f"got {given!r}: set one of them, e.g. `{name}.{_fields(cls)[0]}=...`"
        )
    unknown = sorted(set(given) - set(_fields(cls)))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(f'`{name}.{k}`' for k in unknown)}; "
            f"`{name}` has: {', '.join(_fields(cls))}"
        )
    return cls(**given)


def _fields(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


def resolve_options(
    top: Mapping[str, Any], groups: Mapping[str, Any], flat: Mapping[str, Any]
) -> StatsMergingOptions:
    """The run's options from the top-level values, the groups (dicts or ``None``) and any old flat
    names (``None`` = not set), validated; every error names the option at fault."""
    options = StatsMergingOptions(
        **{k: plain(v) for k, v in top.items()},
        **{name: _group(name, groups.get(name)) for name in GROUPS},
    )
    for old, value in flat.items():
        if value is None:
            continue
        group, key = FLAT_KEYS[old]
        target = getattr(options, group)
        log.warning(
            f"StatsMerging: option `{old}` is now `{group}.{key}`; using {old}={value!r} "
            f"(over {group}.{key}={getattr(target, key)!r}); please use the new name"
        )
        setattr(target, key, plain(value))
    check_options(options)
    return options


def check_options(o: StatsMergingOptions) -> None:
    """Reject invalid values before any work, naming the option (``group.key``)."""
    f, c, s = o.features, o.coefficients, o.model_selection
    check_choice("granularity", o.granularity, GRANULARITIES)
    check_choice("learner", o.learner, LEARNER_MODES)
    check_choice("data_source", o.data_source, HELD_OUT_SOURCES)
    check_int("max_steps", o.max_steps)
    check_int("batch_size_per_task", o.batch_size_per_task)
    check_int("num_unlabelled_per_task", o.num_unlabelled_per_task, allow_none=True)
    check_int("seed", o.seed, minimum=0)
    check_compute_dtype("compute_dtype", o.compute_dtype)
    check_choice("features.stats_source", f.stats_source, STATS_SOURCES)
    check_choice("features.feature_norm", f.feature_norm, FEATURE_NORMS)
    f.stat_features = check_feature_groups(plain(f.stat_features), "features.stat_features")
    check_int("features.svd_rank", f.svd_rank, minimum=0)
    check_int("features.svd_exact_max_numel", f.svd_exact_max_numel)
    if "singular_values" in f.stat_features and f.svd_rank == 0:
        raise ValueError(
            "option `features.svd_rank=0` leaves no singular values for `features.stat_features` "
            "containing `singular_values`: set svd_rank >= 1 or drop singular_values"
        )
    if o.learner == "per_tensor" and f.stats_source != "task_vector":
        raise ValueError(
            "option `features.stats_source=finetuned` is not available with `learner=per_tensor`: "
            "the official per-tensor features are statistics of the task vectors"
        )
    check_int("mlp.hidden_dim", o.mlp.hidden_dim)
    check_bool("mlp.zero_init_output", o.mlp.zero_init_output)
    check_choice("coefficients.output_norm", c.output_norm, OUTPUT_NORMS)
    check_choice("coefficients.scale", c.scale, SCALE_MODES)
    check_positive("coefficients.init_scale", c.init_scale)
    check_choice("objective.loss", o.objective.loss, DISTILLATION_LOSSES)
    check_choice("objective.task_weighting", o.objective.task_weighting, TASK_WEIGHTINGS)
    check_positive("objective.temperature", o.objective.temperature)
    check_positive("optim.lr", o.optim.lr, allow_none=True)
    check_choice("optim.lr_schedule", o.optim.lr_schedule, LR_SCHEDULES)
    check_int("optim.lr_step_size", o.optim.lr_step_size)
    for key in ("lr_gamma", "scale_lr"):
        check_positive(f"optim.{key}", getattr(o.optim, key))
    check_choice("model_selection.mode", s.mode, SELECTION_MODES)
    check_choice("model_selection.metric", s.metric, SELECTION_METRICS)
    check_positive("model_selection.fraction", s.fraction)
    if s.fraction >= 1:
        raise ValueError(
            f"invalid value {s.fraction!r} for option `model_selection.fraction`: "
            "expected a fraction in (0, 1)"
        )
    check_int("model_selection.eval_every", s.eval_every)
    check_int("model_selection.patience", s.patience)
    check_int("memory.teacher_batch_size", o.memory.teacher_batch_size)
    check_bool("memory.merge_in_place", o.memory.merge_in_place)
