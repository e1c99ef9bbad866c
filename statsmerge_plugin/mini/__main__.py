"""Command line: ``python -m statsmerge_plugin.mini build [--root DIR] [--seed N] ...``.

Also installed as the console script ``statsmerge-mini``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .resolver import ENV_PRESET, ENV_SEED, default_preset, default_seed


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="statsmerge-mini", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or reuse) the mini benchmark and print its path")
    build.add_argument(
        "--root", default=None, help="cache dir (default: $STATSMERGE_MINI_ROOT or user cache)"
    )
    build.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"build seed (default: ${ENV_SEED} or 0, as the configs' ${{mini_clip:}} resolves it)",
    )
    build.add_argument(
        "--tasks", default=None, help="comma-separated subset, e.g. mini_mnist,mini_dtd"
    )
    build.add_argument(
        "--preset",
        default=None,
        choices=["default", "smoke"],
        help=f"recipe preset (default: ${ENV_PRESET} or default, as the resolver does)",
    )
    build.add_argument(
        "--force", action="store_true", help="rebuild even if a complete build exists"
    )
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    shape = sub.add_parser(
        "shape",
        help="build a recipe variant (no test evaluation) and print its val shape",
        description="The cheap loop of the recipe search: how FusionBench's reference merges rank "
        "on a variant's val split, and the single-task-vector diagnostic.",
    )
    shape.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="override a recipe knob of the preset (repeatable), e.g. --set ft_lr=1e-4",
    )
    shape.add_argument("--seed", type=int, default=0)
    shape.add_argument(
        "--tasks",
        default=None,
        help="comma-separated subset (default: all eight), e.g. for the robustness check",
    )
    shape.add_argument("--root", default=None, help="cache dir (as for build)")
    shape.add_argument("--preset", default="default", choices=["default", "smoke"])
    shape.add_argument(
        "--adamerging-steps",
        type=int,
        default=1000,
        help="layer-wise AdaMerging steps on the val images (FusionBench's 1000; 0 skips it)",
    )
    shape.add_argument(
        "--free-control-steps",
        type=int,
        default=500,
        help="steps of the free-coefficient control whose coefficient range is reported (0 skips)",
    )
    shape.add_argument(
        "--split",
        default="val",
        choices=["val", "test"],
        help="val (default) to choose recipes; test only to report the chosen recipe",
    )
    shape.add_argument("--log", default=None, help="JSON-lines log (default <root>/variants.jsonl)")
    shape.add_argument("--name", default="", help="a label for the log")
    shape.add_argument("--quiet", action="store_true", help="no progress bars")
    variants = sub.add_parser("variants", help="print the recipe loop's log as a markdown table")
    variants.add_argument("log", help="the JSON-lines log written by 'shape'")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, KeyError, OSError) as err:  # bad input: one line naming the culprit
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"statsmerge-mini: error: {message}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.command == "shape":
        return shape_main(args)
    if args.command == "variants":
        from .shape_report import format_variants

        with open(args.log) as fh:
            print(format_variants([json.loads(line) for line in fh if line.strip()]))
        return 0
    from .build import build_mini_benchmark
    from .evaluate import format_table

    manifest = build_mini_benchmark(
        root=args.root,
        seed=default_seed(args.seed),
        tasks=args.tasks,
        preset=default_preset(args.preset),
        force=args.force,
        progress=not args.quiet,
    )
    if "test_accuracy" in manifest:
        print(format_table(manifest["test_accuracy"], manifest["tasks"]), file=sys.stderr)
    print(json.dumps(manifest["timings_seconds"]), file=sys.stderr)
    print(manifest["path"])
    return 0


def shape_main(args: argparse.Namespace) -> int:
    from .recipe import get_recipe
    from .shape import parse_overrides, run_variant
    from .shape_report import format_shape

    overrides = parse_overrides(args.overrides, get_recipe(args.preset))
    record = run_variant(
        overrides,
        seed=args.seed,
        root=args.root,
        preset=args.preset,
        adamerging_steps=args.adamerging_steps,
        free_control_steps=args.free_control_steps,
        log=args.log,
        name=args.name,
        progress=not args.quiet,
        split=args.split,
        tasks=args.tasks,
    )
    print(f"variant {args.name or overrides} seed {args.seed}, {args.split} split: {record['key']}")
    print(format_shape(record))
    print(json.dumps({"build": record["build_timings_seconds"], **record["timings_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
