"""`python -m benchmarks.generalisation --out DIR --n N --seed S` (from the repository root)."""
from __future__ import annotations

import argparse
import sys
import time

from .writer import GeneralisationError, generate_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generalisation",
        description="Write the independent generalisation set (final report only: never for training, model "
                    "selection, the gate or tuning): N videos from a renderer apart from the training one, "
                    "with captions, events and reversed / direction / swap twins, into OUT/videos/ and "
                    "OUT/manifest.jsonl.")
    parser.add_argument("--out", required=True, help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--n", type=int, default=300, help="number of videos (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same set (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier set in a non-empty OUT (other files are kept)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress on stderr (default: only when stderr is a terminal)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        manifest = generate_set(args.out, args.n, args.seed, workers=args.workers, overwrite=args.overwrite,
                                progress=args.progress)
    except GeneralisationError as exc:
        print(f"generalisation: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} videos (split test, final report only) in {time.monotonic() - started:.1f} s -> {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
