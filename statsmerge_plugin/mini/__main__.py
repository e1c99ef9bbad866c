"""Command line: ``python -m statsmerge_plugin.mini build [--root DIR] [--seed N] ...``.

Also installed as the console script ``statsmerge-mini``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="statsmerge-mini", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or reuse) the mini benchmark and print its path")
    build.add_argument(
        "--root", default=None, help="cache dir (default: $STATSMERGE_MINI_ROOT or user cache)"
    )
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--tasks", default=None, help="comma-separated subset, e.g. mini_mnist,mini_dtd"
    )
    build.add_argument("--preset", default="default", choices=["default", "smoke"])
    build.add_argument(
        "--force", action="store_true", help="rebuild even if a complete build exists"
    )
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from .build import build_mini_benchmark
    from .evaluate import format_table

    manifest = build_mini_benchmark(
        root=args.root,
        seed=args.seed,
        tasks=args.tasks,
        preset=args.preset,
        force=args.force,
        progress=not args.quiet,
    )
    if "test_accuracy" in manifest:
        print(format_table(manifest["test_accuracy"], manifest["tasks"]), file=sys.stderr)
    print(json.dumps(manifest["timings_seconds"]), file=sys.stderr)
    print(manifest["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
