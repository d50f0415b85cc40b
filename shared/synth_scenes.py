"""Scene model of the synthetic benchmark: objects, ordered events, hard negatives, captions.

A video is a sequence of 2-3 *events*. Each event owns one contiguous time segment
and shows exactly one object (shape, colour, size) doing one action there; the
object is only on screen during its own segment. That choice is deliberate: the
"reversed" twin of a video plays the same event segments in the opposite order, so
its frames are the *same multiset* of frames and any order-blind model (mean pooling)
gives both videos the same embedding. Only a model that sees temporal order can
tell them apart. The "swap" twin changes one attribute of one event (colour, shape,
size, or flips the action: left<->right, up<->down, grow<->shrink, appear<->disappear);
an action flip again keeps the frame multiset of that segment.

That is the classic domain, the one the shipped model was trained on. The randomised
domain (:mod:`vidsearch.synth_domain`) reuses this scene model with per-event styles
(``Event.style``) and per-family looks (``VideoSpec.look``), lets objects linger after
their event and adds direction twins; both fields are None here, and then nothing about
the classic output changes.

Everything here is pure data plus a seeded ``numpy.random.Generator``; rendering is
in :mod:`vidsearch.synth` and is a pure function of a :class:`VideoSpec`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
# Object radius as a fraction of the frame side.
SIZES: dict[str, float] = {"small": 0.10, "big": 0.17}
MOVES: dict[str, tuple[float, float]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ACTIONS: tuple[str, ...] = ("left", "right", "up", "down", "grow", "shrink", "stay", "appear", "disappear")
# Named places (x, y) in [0, 1] frame coordinates, y pointing down.
POSITIONS: dict[str, tuple[float, float]] = {
    "top": (0.5, 0.25), "bottom": (0.5, 0.75), "left": (0.25, 0.5), "right": (0.75, 0.5), "centre": (0.5, 0.5),
}
# Flipping an action plays its segment backwards, so the frame multiset is kept.
FLIPS: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up",
                         "grow": "shrink", "shrink": "grow", "appear": "disappear", "disappear": "appear"}
# Fraction of an appear/disappear segment during which the object is hidden.
HIDDEN_FRACTION = 0.4
MIN_EVENT_FRAMES = 3
SWAP_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "action")


@dataclass(frozen=True)
class Event:
    """One object doing one action during frames [start_frame, end_frame)."""

    shape: str
    colour: str
    size: str  # for grow/shrink: the size it starts at (the caption does not name it)
    action: str
    start_xy: tuple[float, float]
    end_xy: tuple[float, float]
    start_frame: int
    end_frame: int
    position: str | None = None  # named place for stay/appear/disappear
    # Randomised domain only (vidsearch.synth_domain): shade, radius, easing, lingering...
    # None in the classic domain, whose manifests then stay byte-identical to before.
    style: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame

    def to_dict(self, fps: float) -> dict[str, Any]:
        return {
            "shape": self.shape, "colour": self.colour, "size": self.size, "action": self.action,
            "position": self.position, "start_xy": list(self.start_xy), "end_xy": list(self.end_xy),
            "start_frame": self.start_frame, "end_frame": self.end_frame,
            "start_s": round(self.start_frame / fps, 4), "end_s": round(self.end_frame / fps, 4),
            "phrase": clause(self, 0),
            **({"style": self.style} if self.style is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Event":
        return cls(shape=data["shape"], colour=data["colour"], size=data["size"], action=data["action"],
                   start_xy=tuple(data["start_xy"]), end_xy=tuple(data["end_xy"]),
                   start_frame=int(data["start_frame"]), end_frame=int(data["end_frame"]),
                   position=data.get("position"), style=data.get("style"))


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one video and describe it."""

    events: tuple[Event, ...]
    num_frames: int
    background: int  # grey level of the plain background
    family: int = 0
    variant: str = "base"  # base | reversed | swap:<attribute>
    captions: tuple[str, ...] = field(default=(), compare=False)
    # Randomised domain only: frame size, fps, crf, background, noise (vidsearch.synth_domain).
    look: dict[str, Any] | None = field(default=None, compare=False)

    def key(self) -> tuple:
        """What a caption can tell apart; two videos in a dataset never share a key."""
        return caption_key(self.events)


def caption_key(events: Sequence[Event]) -> tuple:
    """What a caption of these events can tell apart: equal keys, interchangeable captions."""
    return tuple((e.shape, e.colour, _caption_size(e), e.action, e.position) for e in events)


# ---------------------------------------------------------------- sampling

def _jitter(rng: np.random.Generator, value: float, amount: float) -> float:
    # Rounded so the manifest holds exactly the numbers the renderer used.
    return round(float(value + rng.uniform(-amount, amount)), 3)


def _segment_lengths(rng: np.random.Generator, num_frames: int, k: int) -> list[int]:
    """Split num_frames into k segments of at least MIN_EVENT_FRAMES, mildly uneven."""
    extra = num_frames - k * MIN_EVENT_FRAMES
    weights = rng.uniform(0.7, 1.3, size=k)
    shares = np.floor(extra * weights / weights.sum()).astype(int)
    for index in rng.permutation(k)[: extra - int(shares.sum())]:
        shares[index] += 1
    return [MIN_EVENT_FRAMES + int(s) for s in shares]


def _sample_event(rng: np.random.Generator, shape: str, colour: str, start: int, stop: int) -> Event:
    action = ACTIONS[rng.integers(len(ACTIONS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = None
    if action in MOVES:
        dx, dy = MOVES[action]
        # Travel half the frame along the move axis, at a random place across it.
        across = _jitter(rng, 0.5, 0.2)
        begin, end = _jitter(rng, 0.5 - 0.25, 0.04), _jitter(rng, 0.5 + 0.25, 0.04)
        if dx + dy < 0:
            begin, end = 1 - begin, 1 - end
        start_xy, end_xy = ((begin, across), (end, across)) if dx else ((across, begin), (across, end))
    elif action in ("grow", "shrink"):
        size = "small" if action == "grow" else "big"
        start_xy = end_xy = (_jitter(rng, 0.5, 0.12), _jitter(rng, 0.5, 0.12))
    else:
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        px, py = POSITIONS[position]
        start_xy = end_xy = (_jitter(rng, px, 0.04), _jitter(rng, py, 0.04))
    return Event(shape, colour, size, action, start_xy, end_xy, start, stop, position)


def _objects_distinct(events: Sequence[Event]) -> bool:
    # Distinct (shape, colour) per event keeps each caption unambiguous and means a
    # reversed twin never equals its base.
    return len({(e.shape, e.colour) for e in events}) == len(events)


def sample_events(rng: np.random.Generator, num_frames: int, k: int) -> tuple[Event, ...]:
    """k ordered events over num_frames frames, each with its own (shape, colour)."""
    picks = rng.choice(len(SHAPES) * len(COLOURS), size=k, replace=False)
    colours = list(COLOURS)
    start, events = 0, []
    for pick, length in zip(picks, _segment_lengths(rng, num_frames, k)):
        shape, colour = SHAPES[pick // len(COLOURS)], colours[pick % len(COLOURS)]
        events.append(_sample_event(rng, shape, colour, start, start + length))
        start += length
    return tuple(events)


def reverse_events(events: Sequence[Event]) -> tuple[Event, ...]:
    """Same event segments (same frames each), played in the opposite order."""
    start, out = 0, []
    for event in reversed(events):
        out.append(replace(event, start_frame=start, end_frame=start + event.num_frames))
        start += event.num_frames
    return tuple(out)


def swap_attribute(rng: np.random.Generator, events: Sequence[Event],
                   attributes: Sequence[str] = SWAP_ATTRIBUTES) -> tuple[tuple[Event, ...], str] | None:
    """Change one of ``attributes`` of one event; None when no change keeps the events valid."""
    options = [(i, a) for i in range(len(events)) for a in attributes]
    for index in rng.permutation(len(options)):
        i, attribute = options[index]
        event = events[i]
        if attribute == "colour":
            new = replace(event, colour=_other(rng, list(COLOURS), event.colour))
        elif attribute == "shape":
            new = replace(event, shape=_other(rng, list(SHAPES), event.shape))
        elif attribute == "size":
            if event.action in ("grow", "shrink"):
                continue  # the size is the action there
            new = replace(event, size=_other(rng, list(SIZES), event.size))
        else:
            if event.action not in FLIPS:
                continue
            new = flip_event(event)
        swapped = tuple(new if j == i else e for j, e in enumerate(events))
        if _objects_distinct(swapped):
            return swapped, attribute
    return None


def flip_event(event: Event) -> Event:
    """The event played backwards (left<->right, grow<->shrink, appear<->disappear...)."""
    style = event.style
    if style is not None:
        from vidsearch.synth_domain import reverse_style  # the randomised domain's own timing

        style = reverse_style(style)
    return replace(event, action=FLIPS[event.action], start_xy=event.end_xy, end_xy=event.start_xy,
                   size=_flipped_size(event), style=style)


def _flipped_size(event: Event) -> str:
    if event.action in ("grow", "shrink"):
        return "big" if event.size == "small" else "small"
    return event.size


def _other(rng: np.random.Generator, choices: list[str], current: str) -> str:
    rest = [c for c in choices if c != current]
    return rest[rng.integers(len(rest))]


def _flag(index: int, rate: float, phase: float) -> bool:
    # Evenly spread quota: ~rate of the families get the twin. Any phase in [1 - rate, 1)
    # gives family 0 one (when rate > 0), so even a tiny dataset has hard negatives.
    return math.floor((index + 1) * rate + phase) > math.floor(index * rate + phase)


def plan_dataset(n: int, seed: int, num_frames: int, *, min_events: int = 2, max_events: int = 3,
                 reverse_rate: float = 0.4, swap_rate: float = 0.4) -> list[VideoSpec]:
    """The n video specs of a dataset, in order, grouped in families (base + twins).

    Deterministic in every argument. Families are never split by truncation to n
    except the last one, which may lose its twins.
    """
    if not min(_TEMPLATES) <= min_events <= max_events <= max(_TEMPLATES):
        raise ValueError(f"events per video must satisfy 2 <= min <= max <= 3 (got {min_events}, {max_events})")
    if num_frames < MIN_EVENT_FRAMES * max_events:
        raise ValueError(f"{num_frames} frames cannot hold {max_events} events of {MIN_EVENT_FRAMES} frames")
    rng = np.random.default_rng(seed)
    seen: set[tuple] = set()
    specs: list[VideoSpec] = []
    family = 0
    while len(specs) < n:
        # Different phases, so that reversed and swap twins do not always come together.
        want_reversed = _flag(family, reverse_rate, 1.0 - reverse_rate)
        want_swap = _flag(family, swap_rate, 1.0 - swap_rate / 2)
        members = _sample_family(rng, num_frames, min_events, max_events, want_reversed, want_swap, seen)
        seen.update(VideoSpec(events, num_frames, 0).key() for events, _ in members)
        background = int(rng.integers(16, 72))
        for events, variant in members[: n - len(specs)]:
            spec = VideoSpec(events, num_frames, background, family, variant)
            specs.append(replace(spec, captions=make_captions(rng, events)))
        family += 1
    return specs


def _sample_family(rng: np.random.Generator, num_frames: int, min_events: int, max_events: int,
                   want_reversed: bool, want_swap: bool, seen: set[tuple]) -> list[tuple[tuple[Event, ...], str]]:
    while True:  # resampling is rare: the key space is ~10^6 for two events
        k = int(rng.integers(min_events, max_events + 1))
        events = sample_events(rng, num_frames, k)
        members = [(events, "base")]
        if want_reversed:
            members.append((reverse_events(events), "reversed"))
        if want_swap:
            swapped = swap_attribute(rng, events)
            if swapped is None:
                continue
            members.append((swapped[0], f"swap:{swapped[1]}"))
        keys = [VideoSpec(m, num_frames, 0).key() for m, _ in members]
        if len(set(keys)) == len(keys) and not seen.intersection(keys):
            return members


# ---------------------------------------------------------------- captions

def _caption_size(event: Event) -> str | None:
    return None if event.action in ("grow", "shrink") else event.size


_SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
_SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
                "diamond": ("diamond", "rhombus")}
_PLACE = {"top": ("at", "the top"), "bottom": ("at", "the bottom"), "left": ("on", "the left"),
          "right": ("on", "the right"), "centre": ("in", "the centre")}
# action -> list of (present, gerund) verb phrases; {at} = "at the top", {from} = "from the top".
_VERBS: dict[str, tuple[tuple[str, str], ...]] = {
    "left": (("moves left", "moving left"), ("slides to the left", "sliding to the left"),
             ("travels left", "travelling left")),
    "right": (("moves right", "moving right"), ("slides to the right", "sliding to the right"),
              ("travels right", "travelling right")),
    "up": (("moves up", "moving up"), ("rises", "rising"), ("goes upwards", "going upwards")),
    "down": (("moves down", "moving down"), ("falls", "falling"), ("drops downwards", "dropping downwards")),
    "grow": (("grows", "growing"), ("gets bigger", "getting bigger"), ("expands", "expanding")),
    "shrink": (("shrinks", "shrinking"), ("gets smaller", "getting smaller"), ("contracts", "contracting")),
    "stay": (("stays still {at}", "staying still {at}"), ("sits {at}", "sitting {at}"),
             ("rests {at}", "resting {at}")),
    "appear": (("appears {at}", "appearing {at}"), ("pops up {at}", "popping up {at}"),
               ("shows up {at}", "showing up {at}")),
    "disappear": (("disappears {from}", "disappearing {from}"), ("vanishes {from}", "vanishing {from}"),
                  ("fades out {at}", "fading out {at}")),
}


def clause(event: Event, variant: int = 0, gerund: bool = False) -> str:
    """"a big red circle moves left"; variant 0 is the canonical wording."""
    def pick(options: Sequence[str]) -> str:
        return options[variant % len(options)]

    size = _caption_size(event)
    words = ([pick(_SIZE_WORDS[size])] if size else []) + [event.colour, pick(_SHAPE_WORDS[event.shape])]
    verb = pick(_VERBS[event.action])[1 if gerund else 0]
    if event.position is not None:
        prep, place = _PLACE[event.position]
        verb = verb.format(at=f"{prep} {place}", **{"from": f"from {place}"})
    return f"a {' '.join(words)} {verb}"


Template = Callable[[list[str], list[str]], str]
# Each template gets the clauses (present tense) and gerunds in temporal order and
# must state that order. Index 0 is the canonical caption.
_TEMPLATES: dict[int, tuple[Template, ...]] = {
    2: (
        lambda c, g: f"first {c[0]}, then {c[1]}",
        lambda c, g: f"{c[0]}, and afterwards {c[1]}",
        lambda c, g: f"{c[1]} after {c[0]}",
        lambda c, g: f"{c[0]} before {c[1]}",
        lambda c, g: f"{g[0]}, followed by {g[1]}",
        lambda c, g: f"after {c[0]}, {c[1]}",
        lambda c, g: f"{c[0]}; next, {c[1]}",
    ),
    3: (
        lambda c, g: f"first {c[0]}, then {c[1]}, and finally {c[2]}",
        lambda c, g: f"{c[0]}, then {c[1]}, and afterwards {c[2]}",
        lambda c, g: f"after {c[0]}, {c[1]}, and then {c[2]}",
        lambda c, g: f"{g[0]}, followed by {g[1]}, and then {g[2]}",
        lambda c, g: f"{c[0]}; next, {c[1]}; at the end, {c[2]}",
        lambda c, g: f"{c[0]} before {c[1]}, and after that {c[2]}",
    ),
}


def make_captions(rng: np.random.Generator, events: Sequence[Event]) -> tuple[str, ...]:
    """3-5 paraphrases, all naming the events in temporal order; the first is canonical."""
    templates = _TEMPLATES[len(events)]
    count = int(rng.integers(3, 6))
    chosen = [0] + sorted(int(i) + 1 for i in rng.choice(len(templates) - 1, size=count - 1, replace=False))
    captions = []
    for number, index in enumerate(chosen):
        wording = [0] * len(events) if number == 0 else [int(w) for w in rng.integers(0, 6, size=len(events))]
        present = [clause(e, w) for e, w in zip(events, wording)]
        gerunds = [clause(e, w, gerund=True) for e, w in zip(events, wording)]
        text = templates[index](present, gerunds)
        captions.append(text[0].upper() + text[1:])
    return tuple(captions)


# ---------------------------------------------------------------- counterfactual captions

# Share of counterfactuals that flip one event's direction, for randomised-domain events.
DIRECTION_COUNTERFACTUAL_RATE = 0.3


def flip_direction(rng: np.random.Generator, events: Sequence[Event]) -> tuple[tuple[Event, ...], int] | None:
    """One random event with a direction (move, grow/shrink, appear/disappear) played
    backwards, and its index; None when no event has one. Objects stay distinct, since
    shape and colour are kept."""
    flippable = [i for i, e in enumerate(events) if e.action in FLIPS]
    if not flippable:
        return None
    index = flippable[int(rng.integers(len(flippable)))]
    return tuple(flip_event(e) if j == index else e for j, e in enumerate(events)), index


def counterfactual_caption(rng: np.random.Generator, events: Sequence[dict[str, Any]],
                           reverse_rate: float = 0.2, direction_rate: float | None = None) -> tuple[str, tuple] | None:
    """A caption that describes a video the events do *not* show: at ``direction_rate``
    one event played backwards (kind "direction"), else, at ``reverse_rate``, the events
    in the opposite order, else one attribute of one event changed (as a swap twin would
    be). Worded with a random paraphrase template, like a real caption.

    ``direction_rate=None`` means 0 for classic events (so the shipped recipe draws
    exactly the numbers it always drew) and DIRECTION_COUNTERFACTUAL_RATE for events of
    the randomised domain (they carry a ``style``), which are also worded with that
    domain's wider grammar (full captions only: a partial one could leave out the
    changed event and so describe the real video).

    Training uses these as text-side hard negatives. Twins in the batch contrast a
    caption against similar videos; these contrast a video against similar captions,
    for every video and every step, so attributes that random in-batch negatives seldom
    test (shape, size, direction) get a gradient as often as colour does.

    Returns (caption, its ``caption_key``): the key lets a caller drop the caption as a
    negative for a batch video it does describe (the anchor's own twin, say). None when
    no changed caption is valid (e.g. a single event whose changes all collide).
    """
    parsed = tuple(Event.from_dict(e) for e in events)
    if not parsed:
        return None
    randomised = any(e.style is not None for e in parsed)
    if direction_rate is None:
        direction_rate = DIRECTION_COUNTERFACTUAL_RATE if randomised else 0.0
    changed: tuple[Event, ...] | None = None
    if direction_rate > 0 and rng.random() < direction_rate:  # no draw at rate 0: classic streams unchanged
        flipped = flip_direction(rng, parsed)
        changed = flipped[0] if flipped is not None else None
    if changed is None and len(parsed) > 1 and rng.random() < reverse_rate:
        changed = reverse_events(parsed)
    elif changed is None:
        swapped = swap_attribute(rng, parsed)
        changed = swapped[0] if swapped is not None else None
    if changed is None or len(changed) not in _TEMPLATES:
        return None
    if randomised:
        from vidsearch.synth_grammar import full_captions  # imported late: it imports this module

        captions = full_captions(rng, changed)
    else:
        captions = make_captions(rng, changed)
    return captions[int(rng.integers(len(captions)))], caption_key(changed)


def events_key(events: Sequence[dict[str, Any]]) -> tuple:
    """``caption_key`` of events as stored in a manifest (dicts)."""
    return caption_key(tuple(Event.from_dict(e) for e in events))
