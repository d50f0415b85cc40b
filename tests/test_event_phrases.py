"""Event phrases for the backbone's phrase loss: every event with a sampled frame in its
window becomes one phrase in the dataset's own wording, its window marks exactly those
frames, and phrases that say the same thing are marked interchangeable (no negatives of
each other)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from vidsearch.services.trainer.stages import CaptionBank, event_phrases
from vidsearch.synth_scenes import SHAPES, plan_dataset

FPS = 8.0


def _bank(specs) -> CaptionBank:
    return CaptionBank(captions=[list(s.captions) for s in specs], events=[[e.to_dict(FPS) for e in s.events] for s in specs])


def _uniform_times(rows: int, frames: int = 8, total: int = 24) -> torch.Tensor:
    # Like ingest's uniform sampling of 8 of 24 frames at 8 fps.
    picks = np.linspace(0, total - 1, frames).round() / FPS
    return torch.tensor(np.tile(picks, (rows, 1)), dtype=torch.float32)


def test_each_event_with_a_sampled_frame_becomes_one_phrase_over_its_own_frames():
    specs = plan_dataset(12, seed=4, num_frames=24)
    bank = _bank(specs)
    index = np.arange(len(specs))
    times = _uniform_times(len(specs))
    mask = torch.ones(times.shape, dtype=torch.bool)
    phrases = event_phrases(bank, index, times, mask, np.random.default_rng(0))
    assert phrases is not None
    expected = 0
    for row, spec in enumerate(specs):
        for event in spec.events:
            inside = (times[row] >= event.start_frame / FPS - 1e-6) & (times[row] < event.end_frame / FPS - 1e-6)
            expected += int(inside.any())
    assert len(phrases.texts) == expected == phrases.windows.shape[0] == phrases.rows.shape[0]
    for p, (row, text) in enumerate(zip(phrases.rows.tolist(), phrases.texts)):
        window = phrases.windows[p]
        assert window.any()
        # The window's frames all lie inside one event of that row's video, and the phrase names it.
        owner = [e for e in specs[row].events
                 if bool(((times[row][window] >= e.start_frame / FPS - 1e-6)
                          & (times[row][window] < e.end_frame / FPS - 1e-6)).all())]
        assert len(owner) == 1, text
        assert owner[0].colour in text and text.startswith("a ")
        assert not any(shape in text for shape in SHAPES if shape != owner[0].shape)
    same = phrases.interchangeable
    assert bool(same.diagonal().all()) and bool((same == same.T).all())


def test_phrases_that_say_the_same_thing_are_interchangeable_and_others_are_not():
    base = plan_dataset(3, seed=9, num_frames=24)[0]
    other = replace(base, events=tuple(replace(e, shape="square" if e.shape != "square" else "circle")
                                       for e in base.events))
    bank = _bank([base, base, other])  # the same events twice, then every shape changed
    times = _uniform_times(3)
    phrases = event_phrases(bank, np.array([0, 1, 2]), times, torch.ones(times.shape, dtype=torch.bool),
                            np.random.default_rng(1))
    rows = phrases.rows.tolist()
    for a in range(len(rows)):
        for b in range(len(rows)):
            if rows[a] != rows[b] and {rows[a], rows[b]} == {0, 1}:
                # Same event of two identical videos <=> interchangeable.
                same_window = bool((phrases.windows[a] == phrases.windows[b]).all())
                assert bool(phrases.interchangeable[a, b]) == same_window
            if 2 in (rows[a], rows[b]) and rows[a] != rows[b]:
                assert not bool(phrases.interchangeable[a, b])


def test_padding_and_empty_windows_give_no_phrase():
    specs = plan_dataset(4, seed=2, num_frames=24)
    bank = _bank(specs)
    times = _uniform_times(len(specs))
    none_valid = torch.zeros(times.shape, dtype=torch.bool)
    assert event_phrases(bank, np.arange(len(specs)), times, none_valid, np.random.default_rng(0)) is None
    no_events = CaptionBank(captions=bank.captions, events=[[] for _ in specs])
    assert event_phrases(no_events, np.arange(len(specs)), times, torch.ones(times.shape, dtype=torch.bool),
                         np.random.default_rng(0)) is None


def test_wordings_vary_and_are_reproducible_from_the_generator():
    specs = plan_dataset(20, seed=6, num_frames=24)
    bank = _bank(specs)
    times = _uniform_times(len(specs))
    mask = torch.ones(times.shape, dtype=torch.bool)
    first = event_phrases(bank, np.arange(len(specs)), times, mask, np.random.default_rng(3)).texts
    again = event_phrases(bank, np.arange(len(specs)), times, mask, np.random.default_rng(3)).texts
    other = event_phrases(bank, np.arange(len(specs)), times, mask, np.random.default_rng(4)).texts
    assert first == again and first != other
    canonical = [e["phrase"] for r in range(len(specs)) for e in bank.events[r]]
    assert any(text not in canonical for text in first)
