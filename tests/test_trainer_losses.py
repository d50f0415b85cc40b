"""The training losses against hand computations (numpy and explicit loops), the direction
one SGD step moves a student under CgT and FgT, and the AFA head's two softmaxes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidsearch.models import HeadConfig, build_model, load_model_config
from vidsearch.models.heads import AFAHead, build_head
from vidsearch.services.trainer.loss import (
    cgt_loss, fgt_loss, infonce_logits, moment_loss, phrase_infonce, sharpen, symmetric_infonce,
)

# A non-symmetric logit matrix: the text->video and video->text losses differ.
LOGITS = np.array([[2.0, 0.5, -1.0, 0.0],
                   [1.5, 1.0, 0.3, -0.5],
                   [0.0, 2.5, 0.7, 0.2],
                   [-1.0, 0.0, 0.4, 3.0]])


def t(array) -> torch.Tensor:
    return torch.tensor(np.asarray(array), dtype=torch.float32)


def softmax_list(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def pearson(p: list[float], q: list[float]) -> float:
    pm, qm = sum(p) / len(p), sum(q) / len(q)
    num = sum((a - pm) * (b - qm) for a, b in zip(p, q))
    den = math.sqrt(sum((a - pm) ** 2 for a in p)) * math.sqrt(sum((b - qm) ** 2 for b in q))
    return num / den


def row_ce(matrix: np.ndarray) -> float:
    """Mean over rows of -log softmax(row)[diagonal]."""
    total = 0.0
    for i, row in enumerate(matrix.tolist()):
        total += -math.log(softmax_list(row)[i])
    return total / len(matrix)


def pearson_distance_rows(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = softmax_list([v / temperature for v in s_row])
        q = softmax_list([v / temperature for v in t_row])
        total += 1.0 - pearson(p, q)
    return total / len(student)


def hand_cgt(student: np.ndarray, teacher: np.ndarray, temperature: float = 1.0) -> float:
    # TeachCLIP sums the two directions (its train.py: rows.mean() + cols.mean()).
    rows = pearson_distance_rows(student, teacher, temperature)
    cols = pearson_distance_rows(student.T, teacher.T, temperature)
    return rows + cols


# ---------------------------------------------------------------- InfoNCE
def test_infonce_logits_is_the_mean_of_both_directions():
    text_to_video = row_ce(LOGITS)
    video_to_text = row_ce(LOGITS.T)
    assert abs(text_to_video - video_to_text) > 0.05  # the two directions really differ here
    got = float(infonce_logits(t(LOGITS)))
    assert got == pytest.approx(0.5 * (text_to_video + video_to_text), rel=1e-5)


def test_infonce_logits_each_direction_separately():
    # Rows: every row's diagonal dominates. Columns: column 1 is won by row 2, not row 1.
    only_rows = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 4.9], [0.0, 9.0, 10.0]])
    expected_rows = (-math.log(softmax_list([5.0, 0.0, 0.0])[0])
                     - math.log(softmax_list([0.0, 5.0, 4.9])[1])
                     - math.log(softmax_list([0.0, 9.0, 10.0])[2])) / 3
    expected_cols = (-math.log(softmax_list([5.0, 0.0, 0.0])[0])
                     - math.log(softmax_list([0.0, 5.0, 9.0])[1])
                     - math.log(softmax_list([0.0, 4.9, 10.0])[2])) / 3
    assert float(infonce_logits(t(only_rows))) == pytest.approx(0.5 * (expected_rows + expected_cols), rel=1e-5)
    # Transposing swaps the directions, and the mean is the same.
    assert float(infonce_logits(t(only_rows.T))) == pytest.approx(float(infonce_logits(t(only_rows))), rel=1e-6)


def test_infonce_logits_of_a_perfect_matrix_is_near_zero_and_of_a_flat_one_is_log_b():
    assert float(infonce_logits(t(np.eye(5) * 50))) < 1e-6
    assert float(infonce_logits(torch.zeros(5, 5))) == pytest.approx(math.log(5), rel=1e-6)


def test_infonce_logits_rejects_a_non_square_matrix():
    with pytest.raises(ValueError, match="square"):
        infonce_logits(torch.zeros(3, 4))


def test_symmetric_infonce_scales_cosine_similarities():
    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(4, 6, generator=gen), dim=-1)
    video = F.normalize(torch.randn(4, 6, generator=gen), dim=-1)
    scale = torch.tensor(math.log(20.0))
    sims = (text.double() @ video.double().T).numpy() * 20.0
    expected = 0.5 * (row_ce(sims) + row_ce(sims.T))
    assert float(symmetric_infonce(text, video, scale)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"\[B,D\]"):
        symmetric_infonce(text, video[:3], scale)


def test_infonce_extra_negatives_join_only_the_video_to_text_side():
    # Video j's row over captions is [LOGITS[:, j], extra[j]]; -inf drops a caption for that video.
    extra = np.array([[1.0, -np.inf], [0.2, 0.4], [-np.inf, -np.inf], [2.0, 3.5]])
    per_video = []
    for j in range(4):
        row = list(LOGITS[:, j]) + [v for v in extra[j] if np.isfinite(v)]
        per_video.append(-math.log(softmax_list(row)[j]))
    expected = 0.5 * (row_ce(LOGITS) + sum(per_video) / 4)
    assert float(infonce_logits(t(LOGITS), t(extra))) == pytest.approx(expected, rel=1e-5)
    # All-masked extras change nothing.
    assert float(infonce_logits(t(LOGITS), torch.full((4, 3), float("-inf")))) == pytest.approx(
        float(infonce_logits(t(LOGITS))), rel=1e-6)
    with pytest.raises(ValueError, match=r"\[B,E\]"):
        infonce_logits(t(LOGITS), torch.zeros(3, 2))


def test_symmetric_infonce_with_caption_negatives_and_mask():
    gen = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(3, 5, generator=gen), dim=-1)
    video = F.normalize(torch.randn(3, 5, generator=gen), dim=-1)
    negatives = F.normalize(torch.randn(2, 5, generator=gen), dim=-1)
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    scale = torch.tensor(math.log(10.0))
    sims = (text.double() @ video.double().T).numpy() * 10.0
    extra = (video.double() @ negatives.double().T).numpy() * 10.0
    per_video = []
    for j in range(3):
        row = list(sims[:, j]) + [extra[j, e] for e in range(2) if bool(valid[j, e])]
        per_video.append(-math.log(softmax_list(row)[j]))
    expected = 0.5 * (row_ce(sims) + sum(per_video) / 3)
    got = float(symmetric_infonce(text, video, scale, negatives, valid))
    assert got == pytest.approx(expected, rel=1e-5)
    # A hard caption negative raises the loss above the plain one.
    assert got > float(symmetric_infonce(text, video, scale)) - 1e-6


# ---------------------------------------------------------------- CgT
def test_phrase_infonce_leaves_out_interchangeable_phrases_as_negatives():
    # Phrases 0 and 2 say the same thing: neither is a negative of the other, in either direction.
    gen = torch.Generator().manual_seed(2)
    text = F.normalize(torch.randn(4, 5, generator=gen), dim=-1)
    video = F.normalize(torch.randn(4, 5, generator=gen), dim=-1)
    same = torch.eye(4, dtype=torch.bool)
    same[0, 2] = same[2, 0] = True
    scale = torch.tensor(math.log(10.0))
    sims = (text.double() @ video.double().T).numpy() * 10.0

    def direction(matrix: np.ndarray) -> float:
        total = 0.0
        for i in range(4):
            row = [matrix[i, j] for j in range(4) if j == i or not bool(same[i, j])]
            total += -math.log(softmax_list(row)[[j for j in range(4) if j == i or not bool(same[i, j])].index(i)])
        return total / 4

    expected = 0.5 * (direction(sims) + direction(sims.T))
    assert float(phrase_infonce(text, video, scale, same)) == pytest.approx(expected, rel=1e-5)
    # With nothing interchangeable it is plain symmetric InfoNCE.
    plain = torch.eye(4, dtype=torch.bool)
    assert float(phrase_infonce(text, video, scale, plain)) == pytest.approx(
        float(symmetric_infonce(text, video, scale)), rel=1e-6)
    with pytest.raises(ValueError, match=r"\[P,P\]"):
        phrase_infonce(text, video, scale, same[:3])


def test_cgt_loss_is_the_sum_of_the_pearson_distances_of_softmax_rows_and_columns():
    student = LOGITS
    teacher = np.array([[1.0, 0.2, 0.1, -0.3],
                        [0.4, 2.0, -1.0, 0.0],
                        [0.3, 0.1, 1.7, 0.9],
                        [0.0, -0.5, 0.6, 1.2]])
    rows = pearson_distance_rows(student, teacher, 1.0)
    cols = pearson_distance_rows(student.T, teacher.T, 1.0)
    assert abs(rows - cols) > 0.01  # columns are a different term, not a copy of the rows
    assert float(cgt_loss(t(student), t(teacher))) == pytest.approx(rows + cols, rel=1e-4)
    assert float(cgt_loss(t(student), t(teacher), temperature=0.5)) == pytest.approx(
        hand_cgt(student, teacher, 0.5), rel=1e-4)


def test_cgt_loss_is_zero_for_the_teacher_itself_and_the_teacher_gets_no_gradient():
    teacher = t(LOGITS).requires_grad_(True)
    assert float(cgt_loss(t(LOGITS), teacher)) == pytest.approx(0.0, abs=1e-5)
    student = (t(LOGITS) * 0.3).requires_grad_(True)
    cgt_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_one_sgd_step_under_cgt_moves_the_student_towards_the_teacher():
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(6, 6, generator=gen) * 2 + torch.eye(6) * 2
    student = torch.randn(6, 6, generator=gen).requires_grad_(True)

    def kl_rows(s: torch.Tensor) -> float:
        q = F.softmax(teacher, dim=1)
        return float((q * (q.log() - F.log_softmax(s, dim=1))).sum(dim=1).mean())

    def l2_rows(s: torch.Tensor) -> float:
        return float((F.softmax(s, dim=1) - F.softmax(teacher, dim=1)).norm(dim=1).mean())

    before = float(cgt_loss(student.detach(), teacher))
    kl_before, l2_before = kl_rows(student.detach()), l2_rows(student.detach())
    loss = cgt_loss(student, teacher)
    loss.backward()
    with torch.no_grad():
        stepped = student - 0.5 * student.grad
    assert float(cgt_loss(stepped, teacher)) < before
    assert kl_rows(stepped) < kl_before
    assert l2_rows(stepped) < l2_before


# ---------------------------------------------------------------- FgT and sharpen
MASK = np.array([[True, True, True, True], [True, True, True, False]])
RELEVANCE = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.25, 0.0]])
WEIGHTS = np.array([[0.25, 0.25, 0.25, 0.25], [0.6, 0.3, 0.1, 0.0]])


def hand_fgt(weights: np.ndarray, relevance: np.ndarray, mask: np.ndarray, temperature: float) -> float:
    # TeachCLIP averages -target * log(weight) over all B x T (valid) elements.
    total, count = 0.0, 0
    for w_row, r_row, m_row in zip(weights.tolist(), relevance.tolist(), mask.tolist()):
        valid = [i for i, m in enumerate(m_row) if m]
        powered = {i: r_row[i] ** (1.0 / temperature) for i in valid}  # softmax(log r / T) = r^(1/T) / sum
        norm = sum(powered.values())
        total += -sum(powered[i] / norm * math.log(w_row[i]) for i in valid)
        count += len(valid)
    return total / count


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_fgt_loss_is_cross_entropy_from_teacher_relevance_to_student_weights(temperature):
    got = float(fgt_loss(t(WEIGHTS), t(RELEVANCE), torch.tensor(MASK), temperature))
    assert got == pytest.approx(hand_fgt(WEIGHTS, RELEVANCE, MASK, temperature), rel=1e-5)


def test_fgt_loss_ignores_masked_frames_whatever_they_hold():
    base = float(fgt_loss(t(WEIGHTS), t(RELEVANCE), torch.tensor(MASK)))
    # Garbage in the padded frame: a huge teacher relevance and a zero student weight
    # (log 0 would dominate the loss if the frame were counted).
    relevance, weights = RELEVANCE.copy(), WEIGHTS.copy()
    relevance[1, 3], weights[1, 3] = 50.0, 0.0
    assert float(fgt_loss(t(weights), t(relevance), torch.tensor(MASK))) == pytest.approx(base, rel=1e-6)
    # And the padded frame gets no gradient.
    w = t(weights).requires_grad_(True)
    fgt_loss(w, t(relevance), torch.tensor(MASK)).backward()
    assert float(w.grad[1, 3]) == 0.0


def test_sharpen_at_temperature_one_returns_the_input_distribution():
    got = sharpen(t(RELEVANCE), torch.tensor(MASK), 1.0)
    assert torch.allclose(got, t(RELEVANCE), atol=1e-6)
    # A lower temperature sharpens towards the argmax, still a distribution over valid frames.
    sharp = sharpen(t(RELEVANCE), torch.tensor(MASK), 0.25)
    assert torch.allclose(sharp.sum(dim=1), torch.ones(2), atol=1e-6)
    assert float(sharp[1, 3]) == 0.0
    assert float(sharp[0, 3]) > float(RELEVANCE[0, 3])
    expected = RELEVANCE[0] ** 4 / (RELEVANCE[0] ** 4).sum()
    assert np.allclose(sharp[0].numpy(), expected, atol=1e-6)


def test_one_sgd_step_under_fgt_moves_the_afa_weights_towards_the_teacher():
    mask = torch.tensor(MASK)
    target = sharpen(t(RELEVANCE), mask, 1.0)
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0], [-1.0, 0.0, 1.0, 0.0]], requires_grad=True)

    def weights_of(w: torch.Tensor) -> torch.Tensor:
        return F.softmax(w.masked_fill(~mask, float("-inf")), dim=-1)

    def kl_to_target(w: torch.Tensor) -> float:
        p = weights_of(w)
        terms = torch.where(mask, target * (target.clamp_min(1e-12).log() - p.clamp_min(1e-12).log()), 0.0)
        return float(terms.sum(dim=1).mean())

    before_loss = float(fgt_loss(weights_of(logits.detach()), t(RELEVANCE), mask))
    before_kl = kl_to_target(logits.detach())
    fgt_loss(weights_of(logits), t(RELEVANCE), mask).backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert float(fgt_loss(weights_of(stepped), t(RELEVANCE), mask)) < before_loss
    assert kl_to_target(stepped) < before_kl
    # The student's frame ranking moves towards the teacher's: the weight on the teacher's top frame rises.
    assert float(weights_of(stepped)[0, 3]) > float(weights_of(logits.detach())[0, 3])


def test_one_sgd_step_on_the_afa_head_under_fgt_moves_its_weights_towards_the_teacher():
    torch.manual_seed(0)
    head = AFAHead(dim=8, layers=0, heads=1, max_frames=8, temperature=0.1)
    with torch.no_grad():
        head.weight_mlp[2].weight.normal_(0.0, 0.5)
    gen = torch.Generator().manual_seed(1)
    frames = torch.randn(2, 4, 8, generator=gen)
    mask = torch.tensor(MASK)
    target = sharpen(t(RELEVANCE), mask, 1.0)

    def kl() -> float:
        with torch.no_grad():
            _, weights = head(frames, mask)
        terms = torch.where(mask, target * (target.clamp_min(1e-12).log() - weights.clamp_min(1e-12).log()), 0.0)
        return float(terms.sum(dim=1).mean())

    before = kl()
    optimizer = torch.optim.SGD(head.weight_mlp.parameters(), lr=0.5)
    _, weights = head(frames, mask)
    fgt_loss(weights, t(RELEVANCE), mask).backward()
    optimizer.step()
    assert kl() < before


# ---------------------------------------------------------------- moment loss
def test_moment_loss_is_minus_log_mass_inside_the_window_over_rows_with_a_window():
    relevance = t([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    inside = torch.tensor([[False, False, True, True], [True, True, False, False], [False, False, False, False]])
    expected = (-math.log(0.3 + 0.4) - math.log(0.7 + 0.1)) / 2  # row 2 has no window: left out
    assert float(moment_loss(relevance, inside)) == pytest.approx(expected, rel=1e-6)
    # The windowless row's relevance has no effect on the value.
    other = relevance.clone()
    other[2] = t([0.97, 0.01, 0.01, 0.01])
    assert float(moment_loss(other, inside)) == pytest.approx(expected, rel=1e-6)


def test_moment_loss_without_any_window_is_zero_and_still_differentiable():
    relevance = t([[0.5, 0.5], [0.2, 0.8]]).requires_grad_(True)
    loss = moment_loss(relevance, torch.zeros(2, 2, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(relevance.grad, torch.zeros(2, 2))


# ---------------------------------------------------------------- the AFA head
def manual_afa(head: AFAHead, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented AFA computation, step by step."""
    x = F.normalize(frames.masked_fill(~mask[..., None], 0.0), dim=-1).masked_fill(~mask[..., None], 0.0)
    if head.temporal is not None:
        x = head.temporal(x, mask)
    x = F.normalize(x, dim=-1).masked_fill(~mask[..., None], 0.0)
    lin1, lin2 = head.weight_mlp[0], head.weight_mlp[2]
    w = (torch.relu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias).squeeze(-1)
    videos, weights = [], []
    for b in range(frames.shape[0]):
        valid = mask[b].nonzero().squeeze(-1)
        reported = torch.zeros(frames.shape[1])
        reported[valid] = torch.softmax(w[b, valid], dim=0)
        pooling = torch.softmax(w[b, valid] / head.temperature, dim=0)
        videos.append(F.normalize((pooling[:, None] * x[b, valid]).sum(dim=0), dim=0))
        weights.append(reported)
    return torch.stack(videos), torch.stack(weights)


@pytest.mark.parametrize("layers", [0, 1])
def test_afa_head_reports_softmax_w_and_pools_with_softmax_w_over_temperature(layers):
    torch.manual_seed(0)
    head = build_head(HeadConfig(kind="afa", layers=layers, heads=2, max_frames=8, temperature=0.1), 8)
    assert isinstance(head, AFAHead) and head.temperature == 0.1
    head.eval()
    with torch.no_grad():
        head.weight_mlp[2].weight.normal_(0.0, 1.0)
        head.weight_mlp[2].bias.fill_(0.3)
    gen = torch.Generator().manual_seed(2)
    frames = torch.randn(3, 5, 8, generator=gen)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [False, True, True, True, True]])
    frames[1, 3:] = float("nan")  # padding must not leak, even as NaN
    with torch.no_grad():
        video, weights = head(frames, mask)
        expected_video, expected_weights = manual_afa(head, frames, mask)
    assert torch.allclose(weights, expected_weights, atol=1e-5)
    assert torch.allclose(video, expected_video, atol=1e-5)
    assert torch.allclose(weights.sum(dim=1), torch.ones(3), atol=1e-5)
    assert float(weights[1, 3:].abs().sum()) == 0.0
    # Pooling at temperature 0.1 is sharper than the reported weights: the video is not the
    # softmax(w)-weighted mean (which a temperature-1 head would give).
    x = F.normalize(torch.nan_to_num(frames).masked_fill(~mask[..., None], 0.0), dim=-1)
    if head.temporal is None:
        soft_video = F.normalize((weights[..., None] * x).sum(dim=1), dim=-1)
        assert not torch.allclose(video, soft_video, atol=1e-3)


def test_untrained_afa_head_starts_uniform_like_mean_pooling():
    model = build_model(load_model_config("tiny-afa"), device="cpu", seed=0)
    assert isinstance(model.head, AFAHead)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(2, 4, model.embed_dim, generator=gen)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    with torch.no_grad():
        _, weights = model.aggregate_with_weights(frames, mask)
    assert torch.allclose(weights, torch.tensor([[0.25] * 4, [0.5, 0.5, 0.0, 0.0]]), atol=1e-6)
