"""`vidsearch synth`: write the synthetic benchmark (mp4 videos + JSONL manifest)."""
from __future__ import annotations

import argparse

from vidsearch.cli import CommandError
from vidsearch.config import Settings

# The long mode's defaults, stated once for the help text and the run.
LONG_DEFAULTS = {"n": 4, "seconds": 180.0, "min_event_s": 5.0, "max_event_s": 12.0, "max_gap_s": 2.0}
# Stated here too so that `--help` does not import numpy; vidsearch.synth checks they agree.
DOMAINS = ("classic", "randomized")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write N procedurally drawn videos of coloured shapes doing ordered events, with "
        "captions and reversed-order / one-attribute hard negatives, into OUT/videos/ and "
        "OUT/manifest.jsonl (paths relative to OUT). With --long: a few minutes-long videos, "
        "each a run of single events with their own captions and start/end times (moments).")
    parser.add_argument("--out", required=True, help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--n", type=int, default=None, help="number of videos (default 500; 4 with --long)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default 0)")
    parser.add_argument("--size", type=int, default=64, help="frame width = height in pixels, even (default 64)")
    parser.add_argument("--fps", type=float, default=8.0, help="frames per second (default 8)")
    parser.add_argument("--seconds", type=float, default=None, help="video length (default 3; 180 with --long)")
    parser.add_argument("--val-frac", type=float, default=0.1, help="fraction of videos in the val split")
    parser.add_argument("--test-frac", type=float, default=0.1, help="fraction of videos in the test split")
    parser.add_argument("--reverse-rate", type=float, default=0.4,
                        help="fraction of base videos that get a reversed-event-order twin (default 0.4)")
    parser.add_argument("--swap-rate", type=float, default=0.4,
                        help="fraction of base videos that get a one-attribute-changed twin (default 0.4)")
    parser.add_argument("--domain", default="classic", metavar="{" + ",".join(DOMAINS) + "}",
                        help="classic: the renderer the shipped model was trained on (byte-identical for a seed); "
                             "randomized: same vocabulary, randomised backgrounds, shades, sizes, anti-aliasing, "
                             "noise, crf, frame sizes around --size, fps around --fps, lengths around --seconds, "
                             "eased motion, lingering objects, direction twins and a wider caption grammar "
                             "(default classic)")
    parser.add_argument("--direction-rate", type=float, default=None,
                        help="fraction of base videos that get a twin with one event played backwards "
                             "(--domain randomized only; default 0.3)")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier dataset in a non-empty OUT (other files are kept)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: only when stderr is a terminal)")
    long = parser.add_argument_group("long videos (--long; the split and twin options above do not apply)")
    long.add_argument("--long", action="store_true",
                      help="write long videos of many events with known times (split test, no twins)")
    for flag, default, what in (("--min-event-s", LONG_DEFAULTS["min_event_s"], "shortest event"),
                                ("--max-event-s", LONG_DEFAULTS["max_event_s"], "longest event"),
                                ("--max-gap-s", LONG_DEFAULTS["max_gap_s"], "longest empty gap before an event")):
        long.add_argument(flag, type=float, default=None, help=f"{what}, seconds (default {default:g})")


def run(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here so that `vidsearch synth --help` does not load PyAV.
    from vidsearch.synth import SynthError, generate_dataset, load_manifest

    if args.domain not in DOMAINS:  # checked here, not by argparse choices: one line, exit 1
        raise CommandError(f"--domain must be one of {', '.join(DOMAINS)} (got {args.domain!r})")
    if args.long:
        return _run_long(args)
    given = [flag for flag in ("min_event_s", "max_event_s", "max_gap_s") if getattr(args, flag) is not None]
    if given:
        raise CommandError(f"--{given[0].replace('_', '-')} applies only with --long")
    args.n = 500 if args.n is None else args.n
    args.seconds = 3.0 if args.seconds is None else args.seconds
    try:
        manifest = generate_dataset(
            args.out, args.n, args.seed, size=args.size, fps=args.fps, seconds=args.seconds,
            val_frac=args.val_frac, test_frac=args.test_frac, reverse_rate=args.reverse_rate,
            swap_rate=args.swap_rate, workers=args.workers, overwrite=args.overwrite, progress=args.progress,
            domain=args.domain, direction_rate=args.direction_rate)
    except SynthError as exc:
        raise CommandError(str(exc)) from None
    records = load_manifest(manifest)
    counts = {split: sum(r.split == split for r in records) for split in ("train", "val", "test")}
    domain = "" if args.domain == "classic" else f" ({args.domain} domain)"
    print(f"wrote {len(records)} videos{domain} ({', '.join(f'{k} {v}' for k, v in counts.items())}) -> {manifest}")
    return 0


def _run_long(args: argparse.Namespace) -> int:
    from vidsearch.synth import SynthError, load_manifest
    from vidsearch.synth_long import generate_long_dataset

    if args.direction_rate is not None:
        raise CommandError("--direction-rate does not apply with --long (long videos have no twins)")
    values = {k: (LONG_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)) for k in LONG_DEFAULTS}
    try:
        manifest = generate_long_dataset(
            args.out, int(values["n"]), args.seed, size=args.size, fps=args.fps, seconds=values["seconds"],
            min_event_s=values["min_event_s"], max_event_s=values["max_event_s"], max_gap_s=values["max_gap_s"],
            workers=args.workers, overwrite=args.overwrite, progress=args.progress, domain=args.domain)
    except SynthError as exc:
        raise CommandError(str(exc)) from None
    records = load_manifest(manifest)
    events = sum(len(r.events) for r in records)
    print(f"wrote {len(records)} long videos ({events} events, {values['seconds']:g} s each) -> {manifest}")
    return 0
