"""The whole set planned up front from one seed: families, twins, looks and captions.

Planning draws from a single generator family by family, so a set of n videos is a
prefix of any larger set with the same seed (only its last family may lose twins),
and the same (n, seed) always gives the same plans. Rendering is then a pure
function of a plan.
"""
from __future__ import annotations

import numpy as np

from .captions import MAX_EVENTS, MIN_EVENTS, write_captions
from .scenes import (FRAME_RATES, FRAME_SIZES, Act, VideoPlan, describe_key, direction_twin, family_wants,
                     finish_style, reverse_acts, sample_acts, sample_style, swap_twin)

# Salt for the set's generator, so that seed S here and seed S of any other generator
# in the project never draw the same numbers.
_SALT = 0x6E5E7


def plan_set(n: int, seed: int) -> list[VideoPlan]:
    """The n video plans of the set, in order, grouped in families (base first)."""
    rng = np.random.default_rng([_SALT, seed])
    # Frame sizes and rates go round in a shuffled cycle, so even a few families differ.
    sizes = [FRAME_SIZES[i] for i in rng.permutation(len(FRAME_SIZES))]
    rates = [FRAME_RATES[i] for i in rng.permutation(len(FRAME_RATES))]
    seen: set[tuple] = set()
    plans: list[VideoPlan] = []
    family = 0
    while len(plans) < n:
        style = sample_style(rng, sizes[family % len(sizes)], rates[(family + family // len(rates)) % len(rates)])
        members = _family_members(rng, family, style.num_frames, style.fps, seen)
        style = finish_style(rng, style, [acts for _, acts, _ in members])
        for variant, acts, change in members[: n - len(plans)]:
            plans.append(VideoPlan(index=len(plans), family=family, variant=variant, acts=acts, style=style,
                                   seed=seed, captions=write_captions(rng, acts), change=change))
        seen.update(describe_key(acts) for _, acts, _ in members)
        family += 1
    return plans


def _family_members(rng: np.random.Generator, family: int, num_frames: int, fps: float,
                    seen: set[tuple]) -> list[tuple[str, tuple[Act, ...], dict]]:
    want_reversed, want_direction, want_swap = family_wants(rng, family)
    while True:  # a redraw is rare: the key space is large next to any set's size
        k = int(rng.integers(MIN_EVENTS, MAX_EVENTS + 1))
        base = sample_acts(rng, k, num_frames, fps)
        members: list[tuple[str, tuple[Act, ...], dict]] = [("base", base, {})]
        if want_reversed:
            members.append(("reversed", reverse_acts(base, num_frames), {}))
        if want_direction:
            flipped = direction_twin(rng, base)
            if flipped is None:
                continue  # only "stay" events: nothing to play backwards
            members.append(("direction", *flipped))
        if want_swap:
            swapped = swap_twin(rng, base)
            if swapped is None:
                continue
            acts, attribute, change = swapped
            members.append((f"swap:{attribute}", acts, change))
        keys = [describe_key(acts) for _, acts, _ in members]
        if len(set(keys)) == len(keys) and not seen.intersection(keys):
            return members


def relation(a: str, b: str) -> str:
    """How member b differs from member a: the twin's variant against the base, else
    both changes joined with "+" ("reversed+direction", "direction+swap:colour"). The
    joined names never start with "swap" or equal "reversed", so an evaluator that
    scores twin_reversed / twin_swap against the base only counts base pairs."""
    if a == "base" or b == "base":
        return b if a == "base" else a
    order = ("reversed", "direction")
    first, second = sorted((a, b), key=lambda v: order.index(v) if v in order else len(order))
    return f"{first}+{second}"
