"""`vidsearch synth`: write the synthetic benchmark (mp4 videos + JSONL manifest)."""
from __future__ import annotations

import argparse

from vidsearch.cli import CommandError
from vidsearch.config import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write N procedurally drawn videos of coloured shapes doing ordered events, with "
        "captions and reversed-order / one-attribute hard negatives, into OUT/videos/ and "
        "OUT/manifest.jsonl (paths relative to OUT).")
    parser.add_argument("--out", required=True, help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--n", type=int, default=500, help="number of videos (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default 0)")
    parser.add_argument("--size", type=int, default=64, help="frame width = height in pixels, even (default 64)")
    parser.add_argument("--fps", type=float, default=8.0, help="frames per second (default 8)")
    parser.add_argument("--seconds", type=float, default=3.0, help="video length (default 3)")
    parser.add_argument("--val-frac", type=float, default=0.1, help="fraction of videos in the val split")
    parser.add_argument("--test-frac", type=float, default=0.1, help="fraction of videos in the test split")
    parser.add_argument("--reverse-rate", type=float, default=0.4,
                        help="fraction of base videos that get a reversed-event-order twin (default 0.4)")
    parser.add_argument("--swap-rate", type=float, default=0.4,
                        help="fraction of base videos that get a one-attribute-changed twin (default 0.4)")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier dataset in a non-empty OUT (other files are kept)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: only when stderr is a terminal)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here so that `vidsearch synth --help` does not load PyAV.
    from vidsearch.synth import SynthError, generate_dataset, load_manifest

    try:
        manifest = generate_dataset(
            args.out, args.n, args.seed, size=args.size, fps=args.fps, seconds=args.seconds,
            val_frac=args.val_frac, test_frac=args.test_frac, reverse_rate=args.reverse_rate,
            swap_rate=args.swap_rate, workers=args.workers, overwrite=args.overwrite, progress=args.progress)
    except SynthError as exc:
        raise CommandError(str(exc)) from None
    records = load_manifest(manifest)
    counts = {split: sum(r.split == split for r in records) for split in ("train", "val", "test")}
    print(f"wrote {len(records)} videos ({', '.join(f'{k} {v}' for k, v in counts.items())}) -> {manifest}")
    return 0
