"""``statsmerge-leaderboard``: its arguments, the output guard and ``main``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .methods import DEFAULT_METHODS, METHODS
from .render import bar_chart, markdown, shape_markdown
from .runs import Leaderboard


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="statsmerge-leaderboard", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from: {', '.join(METHODS)}",
    )
    p.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds (program `seed` and our methods' `method.seed`)",
    )
    p.add_argument("--modelpool", default="CLIPVisionModelPool/mini-clip_TA8")
    p.add_argument("--taskpool", default="CLIPVisionModelTaskPool/mini-clip_TA8")
    p.add_argument(
        "--config-dir", default=None, help="extra Hydra config dir (fusion_bench --config-dir)"
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="a Hydra override for every run (repeatable)",
    )
    p.add_argument(
        "--method-override",
        action="append",
        default=[],
        help="METHOD:KEY=VALUE, a Hydra override for one method's runs (repeatable)",
    )
    p.add_argument(
        "--out", default="docs/leaderboard", help="output stem: writes OUT.md, OUT.json, OUT.png"
    )
    p.add_argument(
        "--runs-dir", default=None, help="where each run's log dir goes (default: OUT_runs)"
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per fusion_bench process")
    p.add_argument("--cwd", default=".", help="working directory of the fusion_bench processes")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--header", default="", help="markdown placed above the table")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing OUT.md, OUT.json, OUT.png (without it the run stops before any work)",
    )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        p.error(f"--methods: no method given; choose from {list(METHODS)}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.timeout > 0:
        p.error(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    for item in args.method_override:
        name, sep, _ = item.partition(":")
        if not sep or name not in METHODS:
            p.error(
                f"--method-override {item!r}: expected METHOD:KEY=VALUE with METHOD in {list(METHODS)}"
            )
    return args


OUTPUT_SUFFIXES = (".md", ".json", ".png")


def check_outputs(out: Path, runs_dir: Path, overwrite: bool) -> None:
    """Before any run: ``OUT.*`` and the runs dir can be written, and no earlier table is replaced
    unless ``overwrite``.

    Raises:
        ValueError: naming the option and the path.
    """
    from statsmerge_plugin.validation import check_writable_dir

    check_writable_dir(out.parent, "--out: directory")
    for suffix in OUTPUT_SUFFIXES:
        target = out.with_suffix(suffix)
        if target.is_dir():
            raise ValueError(f"--out: {str(target)!r} is a directory")
        if target.exists() and not overwrite:
            raise ValueError(
                f"--out: {str(target)!r} already exists; refusing to overwrite it (pass --overwrite, "
                "or choose another --out)"
            )
    check_writable_dir(runs_dir, "--runs-dir")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    runs_dir = Path(args.runs_dir or out.parent / f"{out.name}_runs")
    try:
        check_outputs(out, runs_dir, args.overwrite)
    except ValueError as err:
        raise SystemExit(f"statsmerge-leaderboard: error: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["statsmerge-leaderboard", *(sys.argv[1:] if argv is None else argv)])
    start = time.time()
    summary = Leaderboard(args).run()
    summary["command"] = command
    summary["total_wall_time_s"] = round(time.time() - start, 1)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    bar_chart(summary, out.with_suffix(".png"))
    text = markdown(summary, command, args.header) + "\n" + shape_markdown(summary["shape"])
    text += f"\n![leaderboard]({out.with_suffix('.png').name})\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    failed = [m for m, r in summary["methods"].items() if r["status"] != "ok"]
    return 1 if failed and len(failed) == len(summary["methods"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
