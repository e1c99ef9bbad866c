"""Command line of the language miniature: ``statsmerge-mini-lm build|leaderboard ...``.

``build`` builds (or reuses) a build and prints its path and exact-match figures;
``leaderboard`` runs FusionBench's methods and ProDistill on it (see ``leaderboard.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="statsmerge-mini-lm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or reuse) the language miniature, print its path")
    build.add_argument(
        "--root", default=None, help="cache dir (default: $STATSMERGE_MINI_ROOT or user cache)"
    )
    build.add_argument("--seed", type=int, default=int(os.environ.get("STATSMERGE_MINI_SEED", 0)))
    build.add_argument("--preset", default=os.environ.get("STATSMERGE_MINI_LM_PRESET", "default"))
    build.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser(
        "leaderboard",
        help="run the methods on the build and write the tables (options: leaderboard --help)",
        add_help=False,
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["leaderboard"]:
        from .leaderboard import main as leaderboard_main

        return leaderboard_main(argv[1:])
    args = parse_args(argv)
    from .build import build_mini_lm

    manifest = build_mini_lm(args.root, args.seed, args.preset, args.force, progress=not args.quiet)
    print(manifest["path"])
    print(json.dumps({"exact_match": manifest["exact_match"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
