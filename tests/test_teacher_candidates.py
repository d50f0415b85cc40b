"""benchmarks/teacher_candidates.py, the re-ranking objective of the teacher probe, on a real tiny
open_clip model and real synthetic captions: the candidate lists, and the loss against a hand
computation of its two cross-entropies."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from teacher_candidates import candidate_lists, candidate_rows, candidate_teacher_loss  # noqa: E402

from vidsearch.models import build_model  # noqa: E402
from vidsearch.services.trainer.batches import step_rng  # noqa: E402
from vidsearch.services.trainer.stages import CaptionBank, FrozenFeatures, caption_negatives  # noqa: E402
from vidsearch.synth import generate_dataset, load_manifest  # noqa: E402

VIDEOS, FRAMES, SEED, STAGE = 8, 4, 3, 2


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    model = build_model("tiny-spatial", device="cpu", seed=0)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # move the zero-initialised read-outs, so scores differ per pair
        for p in model.scorer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    root = generate_dataset(tmp_path_factory.mktemp("synth"), VIDEOS, SEED, val_frac=0.0, test_frac=0.0,
                            progress=False)
    records = load_manifest(root)
    bank = CaptionBank(captions=[list(r.captions) for r in records], events=[list(r.events) for r in records])
    dim, cells, width = model.embed_dim, model.region_cells, model.region_width
    features = FrozenFeatures(
        frames=F.normalize(torch.randn(VIDEOS, FRAMES, dim, generator=gen), dim=-1),
        mask=torch.ones(VIDEOS, FRAMES, dtype=torch.bool),
        times=torch.arange(FRAMES, dtype=torch.float32).repeat(VIDEOS, 1) * 0.75,
        regions=F.normalize(torch.randn(VIDEOS, FRAMES, cells, width, generator=gen), dim=-1))
    twins = [[(v + 1) % VIDEOS] for v in range(VIDEOS)]
    return model, bank, features, twins


def test_each_list_starts_with_the_own_video_then_its_twins_then_distinct_recalls(setting):
    model, bank, features, twins = setting
    lists = candidate_lists(model, features, bank, twins, 5)
    assert len(lists) == sum(bank.counts())
    assert lists.candidates.shape == (len(lists), 5)
    for row, owner in enumerate(lists.owners):
        cands = lists.candidates[row].tolist()
        assert cands[0] == owner and cands[1] == twins[owner][0]
        assert len(set(cands)) == 5
    assert lists.texts[0] == bank.captions[0][0]
    with pytest.raises(ValueError, match="at least 2 videos"):
        candidate_lists(model, FrozenFeatures(features.frames[:1], features.mask[:1], features.times[:1],
                                              regions=features.regions[:1]), CaptionBank([["x"]], [[]]), [[]], 4)


def test_the_loss_is_both_cross_entropies_computed_by_hand(setting):
    model, bank, features, twins = setting
    lists = candidate_lists(model, features, bank, twins, 4)
    loss_fn = candidate_teacher_loss(model, features, bank, lists, batch_size=3, caption_negatives_per_video=2,
                                     text_weight=0.5, seed=SEED, stage=STAGE)
    step = 1
    with torch.no_grad():
        loss, parts = loss_fn(step)
    rows = candidate_rows(lists, 3, SEED, STAGE, step)
    scale = float(model.scorer.logit_scale.detach().exp())
    with torch.no_grad():
        own_scores, by_hand_video = [], []
        for r in rows:
            cands = torch.as_tensor(lists.candidates[r])
            scores, _ = model.score_query(lists.texts[r], features.frames[cands], features.mask[cands],
                                          regions=features.regions[cands])
            logits = scale * scores.double()
            own_scores.append(logits[0])
            by_hand_video.append(-(logits[0] - torch.logsumexp(logits, 0)))
        video_ce = float(torch.stack(by_hand_video).mean())
        negatives = caption_negatives(bank, lists.owners[rows], 2, step_rng(SEED, STAGE, step, 23))
        assert negatives is not None
        by_hand_text = []
        for b, r in enumerate(rows):
            mine = [i for i, o in enumerate(negatives.owners.tolist()) if o == b]
            if not mine:
                continue
            v = torch.as_tensor([int(lists.owners[r])] * len(mine))
            wrong, _ = model.score_pairs([negatives.texts[i] for i in mine], features.frames[v], features.mask[v],
                                         regions=features.regions[v])
            logits = torch.cat([own_scores[b][None], scale * wrong.double()])
            by_hand_text.append(-(logits[0] - torch.logsumexp(logits, 0)))
        text_ce = float(torch.stack(by_hand_text).mean())
    assert parts["video"] == pytest.approx(video_ce, rel=1e-4, abs=1e-5)
    assert parts["text"] == pytest.approx(text_ce, rel=1e-4, abs=1e-5)
    assert float(loss) == pytest.approx(video_ce + 0.5 * text_ce, rel=1e-4, abs=1e-5)


def test_every_caption_is_visited_once_per_epoch(setting):
    model, bank, features, twins = setting
    lists = candidate_lists(model, features, bank, twins, 3)
    per_epoch = len(lists) // 4
    seen = np.concatenate([candidate_rows(lists, 4, SEED, STAGE, s) for s in range(per_epoch)])
    assert len(seen) == len(set(seen.tolist())) == per_epoch * 4
