"""StatsMerging's configs: the short names `method=statsmerging` / `method=prodistill` (run from the
repository root and from elsewhere), the paper-literal config, YAML == class defaults, the grid."""

from __future__ import annotations

import importlib.util
import inspect
import sys

import pytest
from conftest import REPO_ROOT, read_json, run_fusion_bench, statsmerging_args, write_tiny_configs

from statsmerge_plugin.method.statsmerging import StatsMergingForCLIP
from statsmerge_plugin.method.statsmerging.options import (
    FLAT_KEYS,
    GROUPS,
    StatsMergingOptions,
    flat_options,
)


def compose(method: str, hydra: bool = False):
    """The composed config of ``method=<method>`` (FusionBench's primary config, our search path;
    with ``hydra``, also Hydra's own config)."""
    return compose_with(f"method={method}", hydra=hydra)


def compose_with(*overrides, hydra: bool = False):
    from fusion_bench.utils.hydra_utils import get_default_config_path
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=get_default_config_path(), version_base=None):
        return hydra_compose(
            config_name="fabric_model_fusion", overrides=list(overrides), return_hydra_config=hydra
        )


def options(method_cfg) -> dict:
    """The method's options as written in its config: without ``_target_`` and without the old flat
    names (all null unless set, config/statsmerge/statsmerging_flat_keys.yaml)."""
    from omegaconf import OmegaConf

    return {
        k: v
        for k, v in OmegaConf.to_container(method_cfg).items()
        if k != "_target_" and not (k in FLAT_KEYS and v is None)
    }


def init_defaults(cls) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_statsmerging_yaml_is_every_option_with_the_class_defaults():
    """Top-level keys first, then the groups, each group exactly its dataclass's fields and defaults;
    the old flat names are all there, all null."""
    from omegaconf import OmegaConf

    cfg = compose("statsmerging")
    assert cfg.method._target_ == "statsmerge_plugin.method.statsmerging.StatsMergingForCLIP"
    yaml_options = options(cfg.method)
    defaults = init_defaults(StatsMergingForCLIP)
    assert set(yaml_options) == set(defaults)
    resolved = StatsMergingOptions().as_dict()
    for key, value in yaml_options.items():
        want = resolved.get(key, defaults[key])
        assert value == want, key
    keys = list(yaml_options)
    assert keys.index("seed") < keys.index("features")  # recommended first, then the groups
    assert keys[-len(GROUPS) :] == list(GROUPS)
    flat = {k: v for k, v in OmegaConf.to_container(cfg.method).items() if k in FLAT_KEYS}
    assert flat == {k: None for k in FLAT_KEYS}
    hydra_callbacks = compose("statsmerging", hydra=True).hydra.callbacks
    assert "statsmerge_output_guard" in hydra_callbacks  # the output guard comes along


@pytest.mark.parametrize(
    "name, granularity",
    [("statsmerging/clip_layer_wise", "layer_wise"), ("statsmerging/clip_task_wise", "task_wise")],
)
def test_existing_config_names_are_statsmerging_with_their_granularity(name, granularity):
    short = options(compose("statsmerging").method)
    assert options(compose(name).method) == short | {"granularity": granularity}


def test_paper_config_is_the_paper_literal_setting():
    from hydra.utils import instantiate

    paper = options(compose("statsmerging/paper").method)
    want = {
        "learner": "shared",
        "max_steps": 500,
        "batch_size_per_task": 4,
        "features": {
            "stats_source": "task_vector",
            "stat_features": ["mean", "variance", "l2_norm", "singular_values"],
            "svd_rank": 3,
            "feature_norm": "none",
        },
        "mlp": {"zero_init_output": False},
        "coefficients": {"output_norm": "softmax", "scale": "fixed", "init_scale": 1.0},
        "objective": {"loss": "ce_hard", "task_weighting": "sum"},
        "optim": {"lr": 1e-3, "lr_schedule": "step", "lr_step_size": 100, "lr_gamma": 0.1},
        "model_selection": {"mode": "none"},
    }
    for key, value in want.items():
        if isinstance(value, dict):
            assert paper[key] | value == paper[key], key
        else:
            assert paper[key] == value, key
    alg = instantiate(compose("statsmerging/paper").method)  # valid options
    assert alg.options.learner == "shared" and alg.options.coefficients.output_norm == "softmax"


@pytest.mark.parametrize(
    "method, override, group, key, value",
    [
        ("statsmerging", "method.hidden_dim=16", "mlp", "hidden_dim", 16),
        ("statsmerging/paper", "method.lr=0.01", "optim", "lr", 0.01),  # wins over the config's
        ("statsmerging", "method.selection=best", "model_selection", "mode", "best"),
        ("statsmerging", "method.stat_features=[mean]", "features", "stat_features", ["mean"]),
        (
            "statsmerging/clip_task_wise",
            "method.merge_in_place=false",
            "memory",
            "merge_in_place",
            False,
        ),
    ],
)
def test_an_old_flat_override_still_works_and_names_its_new_key(
    method, override, group, key, value, caplog
):
    from hydra.utils import instantiate

    cfg = compose_with(f"method={method}", override)
    with caplog.at_level("WARNING"):
        alg = instantiate(cfg.method)
    assert getattr(getattr(alg.options, group), key) == value
    old = override.split("=")[0].removeprefix("method.")
    assert f"option `{old}` is now `{group}.{key}`" in caplog.text


def test_group_keys_override_and_a_wrong_group_key_names_the_groups_keys():
    from hydra.utils import instantiate

    alg = instantiate(compose_with("method=statsmerging", "method.mlp.hidden_dim=8").method)
    assert alg.options.mlp.hidden_dim == 8
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) `mlp.hiden_dim`; `mlp` has: hidden_dim"
    ):
        StatsMergingForCLIP(mlp={"hiden_dim": 8})
    with pytest.raises(ValueError, match=r"option `features` is a group of options \(stats_source"):
        StatsMergingForCLIP(features="mean")
    # an old Python call with flat keywords works too, moved to the groups
    assert (
        StatsMergingForCLIP(hidden_dim=8, selection="best").options.model_selection.mode == "best"
    )


def test_prodistill_short_name_is_prodistill_clip():
    assert options(compose("prodistill").method) == options(compose("prodistill/clip").method)
    assert compose("prodistill").method._target_ == compose("prodistill/clip").method._target_


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_short_commands_run(tiny_clip, tmp_path, where):
    """`fusion_bench method=statsmerging ...` and `method=prodistill ...` from the repository root
    (whose `config/` FusionBench would otherwise take as its only config dir) and from elsewhere."""
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg")
    cwd = REPO_ROOT if where == "repo_root" else tmp_path
    run_fusion_bench(
        statsmerging_args(config_dir, method="statsmerging"), cwd=cwd, log_dir=tmp_path / "sm"
    )
    summary = read_json(tmp_path / "sm" / "statsmerging" / "summary.json")
    assert summary["granularity"] == "layer_wise" and summary["steps"] == 3
    assert "coefficient_movement" in summary and "training_loss_per_task" in summary
    args = ["--config-dir", str(config_dir), "method=prodistill", "method.shots_per_task=8"]
    args += ["modelpool=tiny", "taskpool=tiny", "fabric.accelerator=cpu", "fast_dev_run=true"]
    run_fusion_bench([*args, "print_config=false"], cwd=cwd, log_dir=tmp_path / "pd")
    assert read_json(tmp_path / "pd" / "prodistill_report.json")["options"]["shots_per_task"] == 8
    assert 0.0 <= read_json(tmp_path / "pd" / "program_report.json")["mnist"]["accuracy"] <= 1.0


def load_grid():
    path = REPO_ROOT / "benchmarks" / "statsmerging_grid.py"
    spec = importlib.util.spec_from_file_location("statsmerging_grid", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_grid_setting_is_a_valid_option_set():
    grid = load_grid()
    grids = grid.named_grids()
    assert {"optim", "norm", "scale", "objective", "features", "paper", "smoke"} <= set(grids)
    for name, settings in grids.items():
        grid.check_settings(settings, {})  # raises SystemExit naming the setting
    paper = flat_options(options(compose("statsmerging/paper").method))
    assert grids["paper"]["paper-literal"] == {
        k: v for k, v in paper.items() if k in grid.paper_options()
    }
    with pytest.raises(SystemExit, match="setting 'typo'.*option `learner`"):
        grid.check_settings({"typo": {"learner": "mlp"}}, {})


def test_grid_table_marks_the_best_val_setting_and_reports_test_separately():
    grid = load_grid()
    runs = []
    for setting, vals in [
        ("a", [50.0, 52.0]),
        ("b", [60.0, 58.0]),
        ("[reference] simple_average", [70.0]),
    ]:
        for seed, val in enumerate(vals):
            summary = {
                "coefficient_movement": {"max_abs_from_uniform": 0.2},
                "training_loss_per_task": {"start": {"t": 2.0}, "end": {"t": 1.0}},
            }
            runs.append(
                grid.Run(
                    setting,
                    seed,
                    {},
                    {"t": val, "average": val},
                    {"t": 1.0, "average": 1.0},
                    summary,
                    3.0,
                )
            )
    rows = grid.rows_of(runs)
    text = grid.markdown(rows, runs, {"a": {}, "b": {"lr": 0.1}}, "## g", "cmd")
    assert "| b ★ | 2 | 59.0 ± 1.4 | 1.0 ± 0.0 | -50.0 ± 0.0 | 20.0 ± 0.0 | 3 |" in text
    assert "★" not in text.split("| a |")[1].split("\n")[0]  # references are never chosen
    assert "| [reference] simple_average | 1 | 70.0 |" in text
    assert "Command: `cmd`" in text
