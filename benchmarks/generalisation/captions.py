"""This set's own caption grammar, in the training captions' words.

Words (colour, shape and size names, the verbs for each action, the places) are the
vocabulary a trained text tower knows; the sentence frames are new. Several name
the events out of temporal order and say so ("before ...", "... but only after ...",
"last, ...; before that ..."), so a model that reads captions as bags of clauses in
order of mention gets them wrong. Every template states the true order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .scenes import Act, caption_size

_SIZE = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
_SHAPE = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
          "diamond": ("diamond", "rhombus")}
_WHERE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
          "centre": "in the centre"}
_FROM = {"top": "from the top", "bottom": "from the bottom", "left": "from the left", "right": "from the right",
         "centre": "from the centre"}
# action -> (finite verb phrase, -ing verb phrase); {where} / {from} name the place.
_VERB: dict[str, tuple[tuple[str, str], ...]] = {
    "left": (("slides to the left", "sliding to the left"), ("moves left", "moving left"),
             ("travels left", "travelling left")),
    "right": (("slides to the right", "sliding to the right"), ("travels right", "travelling right"),
              ("moves right", "moving right")),
    "up": (("rises", "rising"), ("goes upwards", "going upwards"), ("moves up", "moving up")),
    "down": (("falls", "falling"), ("moves down", "moving down"), ("drops downwards", "dropping downwards")),
    "grow": (("expands", "expanding"), ("gets bigger", "getting bigger"), ("grows", "growing")),
    "shrink": (("contracts", "contracting"), ("shrinks", "shrinking"), ("gets smaller", "getting smaller")),
    "stay": (("sits {where}", "sitting {where}"), ("rests {where}", "resting {where}"),
             ("stays still {where}", "staying still {where}")),
    "appear": (("shows up {where}", "showing up {where}"), ("appears {where}", "appearing {where}"),
               ("pops up {where}", "popping up {where}")),
    "disappear": (("vanishes {from}", "vanishing {from}"), ("disappears {from}", "disappearing {from}"),
                  ("fades out {where}", "fading out {where}")),
}


def phrase(act: Act, choice: Sequence[int] = (0, 0, 0), ing: bool = False) -> str:
    """One event as words: "a little red square slides to the left". ``choice`` picks the
    (size, shape, verb) synonym; (0, 0, 0) is the event's canonical phrase."""
    size = caption_size(act)
    words = [_SIZE[size][choice[0] % len(_SIZE[size])]] if size else []
    words += [act.colour, _SHAPE[act.shape][choice[1] % len(_SHAPE[act.shape])]]
    finite, gerund = _VERB[act.action][choice[2] % len(_VERB[act.action])]
    verb = gerund if ing else finite
    if act.position is not None:
        verb = verb.format(where=_WHERE[act.position], **{"from": _FROM[act.position]})
    return f"a {' '.join(words)} {verb}"


Frame = Callable[[list[str], list[str]], str]
# p: finite phrases, g: -ing phrases, both in temporal order.
_FRAMES: dict[int, tuple[Frame, ...]] = {
    2: (
        lambda p, g: f"{p[0]}; afterwards {p[1]}",
        lambda p, g: f"at the start {p[0]}, at the end {p[1]}",
        lambda p, g: f"once {p[0]}, {p[1]}",
        lambda p, g: f"before {p[1]}, {p[0]}",
        lambda p, g: f"{p[1]}, but only after {p[0]}",
        lambda p, g: f"{p[0]}, and later {p[1]}",
        lambda p, g: f"we see {g[0]}, and after that {g[1]}",
        lambda p, g: f"{p[1]} once {p[0]}",
    ),
    3: (
        lambda p, g: f"{p[0]}; afterwards {p[1]}; last of all {p[2]}",
        lambda p, g: f"at the start {p[0]}, in the middle {p[1]}, at the end {p[2]}",
        lambda p, g: f"once {p[0]}, {p[1]}, and after that {p[2]}",
        lambda p, g: f"last, {p[2]}; before that {p[1]}, and before that {p[0]}",
        lambda p, g: f"{p[1]} after {p[0]}, and later {p[2]}",
        lambda p, g: f"we see {g[0]}, then {g[1]}, and lastly {g[2]}",
        lambda p, g: f"to begin, {p[0]}; next {p[1]}; to finish, {p[2]}",
        lambda p, g: f"{p[2]} at the end, after {p[0]} and then {p[1]}",
    ),
}
MAX_EVENTS = max(_FRAMES)
MIN_EVENTS = min(_FRAMES)


def write_captions(rng: np.random.Generator, acts: Sequence[Act]) -> tuple[str, ...]:
    """3-4 captions of the events, each in a different sentence frame, with independent
    synonym choices per event; about half end with a full stop."""
    frames = _FRAMES[len(acts)]
    count = int(rng.integers(3, 5))
    captions = []
    for index in rng.choice(len(frames), size=count, replace=False):
        picks = [tuple(int(v) for v in rng.integers(0, 6, size=3)) for _ in acts]
        finite = [phrase(a, c) for a, c in zip(acts, picks)]
        gerund = [phrase(a, c, ing=True) for a, c in zip(acts, picks)]
        text = frames[int(index)](finite, gerund)
        text = text[0].upper() + text[1:]
        captions.append(text + "." if rng.random() < 0.5 else text)
    return tuple(captions)
