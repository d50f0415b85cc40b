"""Which videos and captions make up each step's batch, as a pure function of the step.

Anchors come from a fresh permutation per epoch; each anchor brings up to
``hard_negatives`` of its neighbours (the generator's twins first, then videos the
current model confuses it with), so a batch holds the negatives that matter
instead of only random ones. Every video in a batch contributes one of its
captions, so the (text, video) matrix stays square with the pairs on the diagonal.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def step_rng(seed: int, stage: int, step: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step, stream])


class BatchPlan:
    def __init__(self, num_videos: int, batch_size: int, hard_negatives: int,
                 neighbours: Sequence[Sequence[int]] | None, seed: int, stage: int) -> None:
        if num_videos < 2:
            raise ValueError(f"a batch needs at least 2 videos, got {num_videos}")
        self.n = num_videos
        self.size = min(batch_size, num_videos)
        self.hard = hard_negatives if neighbours is not None else 0
        self.neighbours = neighbours or [[] for _ in range(num_videos)]
        self.seed, self.stage = seed, stage
        self.anchors = max(1, math.ceil(self.size / (1 + self.hard)))
        self.per_epoch = math.ceil(num_videos / self.anchors)

    def indices(self, step: int) -> np.ndarray:
        epoch, chunk = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, self.stage, epoch, 7]).permutation(self.n)
        anchors = order[chunk * self.anchors:(chunk + 1) * self.anchors]
        rng = step_rng(self.seed, self.stage, step, 1)
        chosen: list[int] = []
        seen: set[int] = set()

        def add(index: int) -> None:
            if index not in seen and len(chosen) < self.size:
                seen.add(index)
                chosen.append(int(index))

        for anchor in anchors:
            add(anchor)
            for neighbour in list(self.neighbours[anchor])[:self.hard]:
                add(neighbour)
        # Top up with random videos (short last chunk, or anchors whose neighbours overlapped).
        for index in rng.permutation(self.n):
            if len(chosen) >= self.size:
                break
            add(index)
        return np.asarray(chosen, dtype=np.int64)

    def captions(self, step: int, index: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        """Which caption of each batch video this step uses (paraphrases rotate across steps)."""
        rng = step_rng(self.seed, self.stage, step, 2)
        return np.asarray([rng.integers(counts[i]) for i in index], dtype=np.int64)


def twin_neighbours(video_ids: Sequence[str], hard_negatives: Sequence[Sequence[dict]]) -> list[list[int]]:
    """Each video's hard-negative twins (same split only), as indices."""
    where = {vid: i for i, vid in enumerate(video_ids)}
    return [[where[n["video_id"]] for n in negs if n.get("video_id") in where] for negs in hard_negatives]


def merge_neighbours(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]]) -> list[list[int]]:
    return [list(dict.fromkeys([*a, *b])) for a, b in zip(first, second)]
