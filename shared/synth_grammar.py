"""The randomised domain's caption grammar, and a parser back to events.

Templates are strings with slots: ``{0}`` is event 0's clause ("a big red circle
moves left"), ``{g1}`` event 1's gerund ("a ... moving left"); slot numbers are the
events' *temporal* order, wherever the slot stands in the sentence. Besides the
classic in-order wordings the grammar names events out of order behind an explicit
marker ("{1} after {0}", "before {1}, {0}", "{1} once {0}", "at the end {1}; at the
start {0}", "{1} later, but first {0}"...), and has *partial* templates that name
only the first event, the last, or both ends of a 3-event video.

Because each template is data, :func:`parse_caption` can read a caption back: it
matches the templates and looks each slot's text up among every possible clause,
which gives the events' caption keys in temporal order. Tests use it to check that
every caption says the right order; an evaluator can use it to tell partial captions
(kind "first", "last", "ends") from full ones.
"""
from __future__ import annotations

import itertools
import re
from functools import lru_cache
from typing import Sequence

import numpy as np

from vidsearch.synth_scenes import (_PLACE, _SHAPE_WORDS, _SIZE_WORDS, _VERBS, ACTIONS, COLOURS, POSITIONS,
                                    Event, caption_key, clause)

# In temporal order; index 0 is the canonical caption (as in the classic domain).
IN_ORDER: dict[int, tuple[str, ...]] = {
    2: ("first {0}, then {1}", "{0}, and afterwards {1}", "{0} before {1}", "{g0}, followed by {g1}",
        "after {0}, {1}", "{0}; next, {1}", "once {0}, {1}", "{0}, and later {1}",
        "at the start {0}, at the end {1}"),
    3: ("first {0}, then {1}, and finally {2}", "{0}, then {1}, and afterwards {2}",
        "after {0}, {1}, and then {2}", "{g0}, followed by {g1}, and then {g2}",
        "{0}; next, {1}; at the end, {2}", "{0} before {1}, and after that {2}",
        "at the start {0}, in the middle {1}, at the end {2}", "once {0}, {1}; later {2}"),
}
# A later event named before an earlier one, always behind a marker that says so.
OUT_OF_ORDER: dict[int, tuple[str, ...]] = {
    2: ("{1} after {0}", "before {1}, {0}", "{1} once {0}", "{1} later, but first {0}",
        "at the end {1}; at the start {0}", "{1}, but before that {0}", "{g1}, after {g0}"),
    3: ("{2} at the end, after {0} and then {1}", "at the end {2}; at the start {0}; in between {1}",
        "before {2}, {1}, and before that {0}", "{1} once {0}, and later {2}",
        "{2} last, {1} before that, and {0} first", "{1} after {0}, and {2} at the end"),
}
# Partial captions: slot "F" is the first event, "L" the last (both temporal).
PARTIAL: dict[str, tuple[str, ...]] = {
    "first": ("at the start, {F}", "it starts with {gF}", "{F} first", "first of all, {F}"),
    "last": ("at the end, {L}", "it ends with {gL}", "{L} last", "finally, {L}"),
    "ends": ("{F} at the start and {L} at the end", "at the end {L}, after {F} at the start",
             "it starts with {gF} and ends with {gL}"),
}
PARTIAL_KINDS: tuple[str, ...] = tuple(PARTIAL)
_SLOT = re.compile(r"\{(g?)([0-9FL])\}")


def _fill(template: str, present: Sequence[str], gerunds: Sequence[str]) -> str:
    def one(match: re.Match) -> str:
        index = {"F": 0, "L": len(present) - 1}.get(match.group(2))
        index = int(match.group(2)) if index is None else index
        return (gerunds if match.group(1) else present)[index]

    text = _SLOT.sub(one, template)
    return text[0].upper() + text[1:]


def _wordings(rng: np.random.Generator, events: Sequence[Event], canonical: bool) -> tuple[list[str], list[str]]:
    wording = [0] * len(events) if canonical else [int(w) for w in rng.integers(0, 6, size=len(events))]
    return ([clause(e, w) for e, w in zip(events, wording)],
            [clause(e, w, gerund=True) for e, w in zip(events, wording)])


def full_captions(rng: np.random.Generator, events: Sequence[Event]) -> tuple[str, ...]:
    """3-5 captions naming every event: the canonical one first, then at least one out
    of temporal order, the rest from the whole grammar."""
    k = len(events)
    ordered, shuffled = IN_ORDER[k], OUT_OF_ORDER[k]
    count = int(rng.integers(3, 6))
    pool = list(ordered[1:]) + list(shuffled)
    chosen = [ordered[0], shuffled[int(rng.integers(len(shuffled)))]]
    rest = [t for t in pool if t not in chosen]
    chosen += [rest[int(i)] for i in rng.choice(len(rest), size=count - 2, replace=False)]
    return tuple(_fill(t, *_wordings(rng, events, canonical=(n == 0))) for n, t in enumerate(chosen))


def partial_caption(rng: np.random.Generator, events: Sequence[Event], kind: str) -> str:
    """A caption naming only the first event, the last, or both ends ("ends", 3+ events)."""
    templates = PARTIAL[kind]
    return _fill(templates[int(rng.integers(len(templates)))], *_wordings(rng, events, canonical=False))


# ---------------------------------------------------------------- parsing

@lru_cache(maxsize=1)
def _clause_table() -> dict[str, tuple]:
    """Every clause and gerund the grammar can write -> its event's caption-key entry."""
    table: dict[str, tuple] = {}
    sizes = ["small", "big", None]
    for shape, colour, size, action in itertools.product(_SHAPE_WORDS, COLOURS, sizes, ACTIONS):
        if (size is None) != (action in ("grow", "shrink")):
            continue
        positions = list(POSITIONS) if "{at}" in _VERBS[action][0][0] or "{from}" in _VERBS[action][0][0] else [None]
        for position in positions:
            event = Event(shape, colour, size or "small", action, (0.5, 0.5), (0.5, 0.5), 0, 3, position)
            key = caption_key([event])[0]
            for variant, gerund in itertools.product(range(6), (False, True)):
                table[clause(event, variant, gerund)] = key
    return table


@lru_cache(maxsize=1)
def _patterns() -> list[tuple[re.Pattern, list[str], str]]:
    """(regex, slot names in sentence order, kind) for every template."""
    out = []
    templates = [(t, "full") for group in (IN_ORDER, OUT_OF_ORDER) for ts in group.values() for t in ts]
    templates += [(t, kind) for kind, ts in PARTIAL.items() for t in ts]
    for template, kind in templates:
        slots, regex, last = [], "", 0
        for match in _SLOT.finditer(template):
            regex += re.escape(template[last:match.start()]) + "(.+?)"
            slots.append(match.group(2))
            last = match.end()
        out.append((re.compile(regex + re.escape(template[last:])), slots, kind))
    return out


def _rank(slot: str) -> int:
    # F and L sort before and after the numbered slots.
    return -1 if slot == "F" else 99 if slot == "L" else int(slot)


def parse_caption(text: str) -> tuple[tuple[tuple, ...], str] | None:
    """The caption keys of the events a randomised-domain caption names, in temporal
    order, and its kind: "full", or for a partial caption "first", "last" or "ends"
    (then the keys are those of the events it names). None when no template reads it
    or two readings disagree."""
    text = text[:1].lower() + text[1:]
    table = _clause_table()
    readings = set()
    for pattern, slots, kind in _patterns():
        match = pattern.fullmatch(text)
        if match is None or not all(g in table for g in match.groups()):
            continue
        order = sorted(range(len(slots)), key=lambda i: _rank(slots[i]))
        readings.add((tuple(table[match.group(i + 1)] for i in order), kind))
    return readings.pop() if len(readings) == 1 else None


__all__ = ["IN_ORDER", "OUT_OF_ORDER", "PARTIAL", "PARTIAL_KINDS", "full_captions", "parse_caption",
           "partial_caption"]
