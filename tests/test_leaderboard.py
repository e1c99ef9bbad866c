"""`statsmerge-leaderboard` and the table-printing program, on the tiny CLIP pool."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO_ROOT, run_fusion_bench, write_tiny_configs

from statsmerge_plugin.leaderboard import main, parse_args, seeds_for, shape_figures
from statsmerge_plugin.program import accuracy_table


def tiny_leaderboard_args(config_dir, out, cwd, methods: str) -> list:
    """statsmerge-leaderboard arguments for the tiny pool written by ``write_tiny_configs``."""
    return [
        "--config-dir",
        str(config_dir),
        "--modelpool",
        "tiny",
        "--taskpool",
        "tiny",
        "--methods",
        methods,
        "--override",
        "fabric.accelerator=cpu",
        "--out",
        str(out),
        "--cwd",
        str(cwd),
    ]


def test_leaderboard_runs_methods_reports_failures_and_writes_md_json_png(tiny_clip, tmp_path):
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg")
    out = tmp_path / "docs" / "leaderboard"
    code = main(
        tiny_leaderboard_args(
            config_dir, out, tmp_path, "pretrained,individual,task_arithmetic,ties,statsmerging_lw"
        )
        + [
            "--method-override",
            "statsmerging_lw:method.max_steps=2",
            "--method-override",
            "statsmerging_lw:method.num_unlabelled_per_task=8",
            "--method-override",
            "ties:method.threshold=not_a_number",  # makes TIES fail at run time
        ]
    )
    assert code == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    rows = summary["methods"]
    assert rows["ties"]["status"] == "failed" and "TypeError" in rows["ties"]["errors"][0]
    for m in ("pretrained", "individual", "task_arithmetic", "statsmerging_lw"):
        assert rows[m]["status"] == "ok", rows[m]
        assert set(rows[m]["accuracy"]) == {"mnist", "eurosat"}
        assert rows[m]["wall_time_s"] > 0 and rows[m]["peak_rss_mb"] > 50
    assert rows["individual"]["normalized"] == pytest.approx(1.0)
    assert summary["build"] is None  # a pool that is no mini build: nothing to name
    # individual = each task's own fine-tuned model, evaluated on its own task only
    individual_runs = sorted((tmp_path / "docs" / "leaderboard_runs").glob("individual_*_seed0"))
    assert [p.name for p in individual_runs] == [
        "individual_eurosat_seed0",
        "individual_mnist_seed0",
    ]
    report = json.loads((individual_runs[0] / "program_report.json").read_text())
    assert "eurosat" in report and "mnist" not in report
    md = out.with_suffix(".md").read_text()
    assert (
        "**failed**" in md and "Task Arithmetic" in md and "Command: `statsmerge-leaderboard" in md
    )
    assert out.with_suffix(".png").stat().st_size > 2000
    # a second run into the same --out stops before any work, and keeps the first table
    first = {suffix: out.with_suffix(suffix).read_bytes() for suffix in (".md", ".json", ".png")}
    runs = sorted(p.name for p in (tmp_path / "docs" / "leaderboard_runs").iterdir())
    with pytest.raises(
        SystemExit, match=f"--out: '{out}.md' already exists; refusing to overwrite"
    ):
        main(tiny_leaderboard_args(config_dir, out, tmp_path, "pretrained"))
    assert {suffix: out.with_suffix(suffix).read_bytes() for suffix in first} == first
    assert sorted(p.name for p in (tmp_path / "docs" / "leaderboard_runs").iterdir()) == runs


def test_only_seeded_methods_run_once_per_seed():
    assert seeds_for("statsmerging_lw", [0, 1, 2]) == [0, 1, 2]
    assert seeds_for("adamerging_lw", [3, 4]) == [3, 4]
    for deterministic in ("pretrained", "individual", "simple_average", "task_arithmetic", "ties"):
        assert seeds_for(deterministic, [0, 1, 2]) == [0]


def test_shape_figures_check_the_real_benchmarks_ranking():
    def row(avg):
        return {"average": avg, "accuracy": {"a": avg, "b": avg}}

    rows = {
        "pretrained": row(0.5),
        "simple_average": row(0.6),
        "task_arithmetic": row(0.58),
        "ties": row(0.7),
        "adamerging_lw": row(0.8),
        "individual": row(0.95),
    }
    shape = shape_figures(rows)
    holds = {r["pair"]: r["holds"] for r in shape["ranking"]}
    assert holds["simple_average ≤ task_arithmetic"] is False
    assert holds["pretrained < simple_average"] and holds["adamerging_lw < individual"]
    assert shape["task_arithmetic_gap_points"] == pytest.approx(37.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "pretrained,no_such_method"], "unknown method(s) ['no_such_method']"),
        (["--methods", ""], "--methods: no method given"),
        (["--methods", " , "], "--methods: no method given"),
        (["--method-override", "ties=method.threshold=3"], "expected METHOD:KEY=VALUE"),
        (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
        (["--timeout", "0"], "--timeout must be a number of seconds > 0"),
    ],
)
def test_bad_leaderboard_options_are_rejected(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _existing_table(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "leaderboard.md").write_text("earlier table")
    return tmp_path / "docs" / "leaderboard"


def _under_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "leaderboard"


def _fresh(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "docs" / "leaderboard"


@pytest.mark.parametrize(
    "make_out, extra, message",
    [
        (_existing_table, [], "--out: '{out}.md' already exists; refusing to overwrite it"),
        (_under_a_file, [], "--out: directory '{out_dir}' is an existing file, not a directory"),
        (
            _fresh,
            ["--runs-dir", "{t}/a_file/runs"],
            "--runs-dir '{t}/a_file/runs' cannot be created",
        ),
    ],
)
def test_leaderboard_checks_its_outputs_before_any_run(tmp_path, make_out, extra, message):
    out = make_out(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    argv = ["--methods", "pretrained", "--out", str(out), "--cwd", str(tmp_path)]
    argv += [a.format(t=tmp_path) for a in extra]
    message = message.format(out=out, out_dir=out.parent, t=tmp_path)
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(argv)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


def test_leaderboard_overwrite_is_explicit(tmp_path):
    from statsmerge_plugin.leaderboard import check_outputs

    out = _existing_table(tmp_path)
    check_outputs(out, tmp_path / "runs", overwrite=True)  # allowed
    with pytest.raises(ValueError, match="pass --overwrite"):
        check_outputs(out, tmp_path / "runs", overwrite=False)


def test_accuracy_table():
    table = accuracy_table({"model_info": {}, "x": {"accuracy": 0.5}, "average": {"accuracy": 0.5}})
    assert "| x | 50.0 |" in table and "| **average** | **50.0** |" in table


def test_table_program_prints_and_saves_the_table(tiny_clip, tmp_path):
    config_dir = write_tiny_configs(tiny_clip, tmp_path / "cfg")
    proc = run_fusion_bench(
        [
            "--config-dir",
            str(config_dir),
            "--config-name",
            "statsmerging_mini",
            "modelpool=tiny",
            "taskpool=tiny",
            "method.max_steps=1",
            "method.num_unlabelled_per_task=8",
            "fabric.accelerator=cpu",
            "print_config=false",
        ],
        cwd=REPO_ROOT,
        log_dir=tmp_path / "run",
    )
    assert "| **average** |" in proc.stdout
    assert "| mnist |" in (tmp_path / "run" / "report_table.md").read_text()
