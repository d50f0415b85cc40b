"""Can the slow model learn what the fast one misses, if it is trained on the re-ranking task?

    python benchmarks/teacher_probe.py --run-dir RUN_DIR [--version VERSION] [--steps 300]

RUN_DIR is the training run of VERSION (its data.json names the decoded frame caches and the
splits). The version's frame tower encodes the train split once (clean and augmented views,
with region tokens), exactly as the trainer's teacher stage does; each arm then trains a
copy of the version's slow scorer, from its trained weights, with
``benchmarks/teacher_candidates.py``: every caption against its own video, its twins and the
student's top recall, plus counterfactual captions of its own video. The arms differ in what
learns: the scorer alone, or the scorer and its own text tower.

The control is the version itself: its teacher stage (in-batch InfoNCE) had plateaued (val
R@1 49.2 at step 200, 49.4 at step 400 in run 3). Every arm is scored on the val split the
way the service re-ranks: the student's top 20, re-scored (the teacher alone within them, and
fused with beta), with twin accuracy (direction, reversed, swap) from the teacher's own
scores. Nothing here touches the test split. Results go to docs/benchmarks/teacher-probe.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from common import DOCS_DIR, REPO_ROOT, command_line, isolate_environment, machine_facts, md_table, write_text

K = 20
# Caption pairs that differ only in a motion word (what direction twins ask) or in a colour (a
# control the student tells apart): how alike the slow model's text tower makes them.
MOTION_PAIRS = (("moves left", "moves right"), ("moves up", "moves down"), ("grows", "shrinks"),
                ("appears", "disappears"))
OBJECTS = ("red circle", "blue square", "green triangle", "yellow diamond")


@torch.no_grad()
def text_blindness(model) -> dict[str, float]:
    """How alike captions that differ only in a motion word (what direction twins ask), or only in
    a colour (a control), reach the slow model: the cosine of their least alike word token in its
    own text tower (1.0: the change is invisible to it), and the student's sentence cosine."""
    def token_cos(pairs) -> float:
        a = model.encode_scorer_text([x for x, _ in pairs])
        b = model.encode_scorer_text([y for _, y in pairs])
        length = min(a.tokens.shape[1], b.tokens.shape[1])
        cos = F.cosine_similarity(a.tokens[:, :length].float(), b.tokens[:, :length].float(), dim=-1)
        both = a.mask[:, :length] & b.mask[:, :length]
        return float(cos.masked_fill(~both, 2.0).min(dim=1).values.mean())

    def sentence_cos(pairs) -> float:
        return float(F.cosine_similarity(model.encode_text([x for x, _ in pairs]),
                                         model.encode_text([y for _, y in pairs]), dim=-1).mean())

    motion = [(f"a {o} {x}", f"a {o} {y}") for o in OBJECTS for x, y in MOTION_PAIRS]
    colour = [(f"a {o} {x}", f"a {OBJECTS[(i + 1) % len(OBJECTS)].split()[0]} {o.split()[1]} {x}")
              for i, o in enumerate(OBJECTS) for x, _ in MOTION_PAIRS]
    return {"text.scorer_motion_cos": token_cos(motion), "text.scorer_colour_cos": token_cos(colour),
            "text.student_motion_cos": sentence_cos(motion), "text.student_colour_cos": sentence_cos(colour)}


@torch.no_grad()
def rerank_eval(model, val, beta: float, encode=None) -> dict[str, float]:
    """The student's top K re-scored by the slow model, plus each caption's own video and twins."""
    from vidsearch.retrieval_metrics import retrieval_metrics
    from vidsearch.services.trainer.evaluate import rerank_similarity, student_matrix, twin_accuracy

    model.eval()
    texts, owners = val.queries()
    student = student_matrix(model, val, texts)
    top = np.argsort(-student, axis=1, kind="stable")[:, :K]
    pairs = [(q, int(v)) for q in range(len(texts))
             for v in dict.fromkeys([*top[q].tolist(), int(owners[q]), *[t for t, _ in val.twins[owners[q]]]])]
    teacher = np.full_like(student, -1e4)
    frames, mask = val.frames, val.mask
    for start in range(0, len(pairs), 2048):
        chunk = pairs[start:start + 2048]
        rows = sorted({q for q, _ in chunk})
        where = {q: i for i, q in enumerate(rows)}
        text = (encode or model.encode_scorer_text)([texts[q] for q in rows])
        pick = torch.as_tensor([where[q] for q, _ in chunk])
        videos = torch.as_tensor([v for _, v in chunk])
        scores, _ = model.score_pairs(text.select(pick), frames[videos], mask[videos],
                                      regions=None if val.regions is None else val.regions[videos])
        for (q, v), s in zip(chunk, scores.cpu().numpy()):
            teacher[q, v] = s
    out = {f"student.{k}": v for k, v in {**retrieval_metrics(student, owners),
                                           **twin_accuracy(student, owners, val.twins)}.items()}
    alone = rerank_similarity(student, teacher, K, 1.0)
    fused = rerank_similarity(student, teacher, K, beta)
    out.update({f"teacher@{K}.{k}": v for k, v in retrieval_metrics(alone, owners).items()})
    out.update({f"teacher.{k}": v for k, v in twin_accuracy(teacher, owners, val.twins).items()})
    out.update({f"rerank@{K}.{k}": v for k, v in {**retrieval_metrics(fused, owners),
                                                  **twin_accuracy(fused, owners, val.twins)}.items()})
    out.update(text_blindness(model))
    return out


def with_scorer_inputs(base, *, motion: bool, words: bool, seed: int):
    """A copy of ``base`` whose slow scorer also reads motion tokens and/or word embeddings
    (``scorer.motion_tokens`` / ``scorer.word_tokens``): every trained weight carried over, the
    new input projections freshly initialised."""
    import dataclasses

    from vidsearch.models import build_model

    scorer = dataclasses.replace(base.config.scorer, motion_tokens=motion, word_tokens=words)
    model = build_model(dataclasses.replace(base.config, scorer=scorer), device="cpu", seed=seed, load_weights=False)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith(("scorer.motion_", "scorer.word_"))]
    if new or unexpected:
        raise RuntimeError(f"weights that did not carry over: missing {new}, unexpected {unexpected}")
    return model.eval()


def direction_pair_lists(lists, hard_negatives, video_ids):
    """The diagnostic arm's rows: only captions whose video has a direction twin (the same event
    played backwards), each against that twin alone. Nothing else to tell apart, so what the
    slow model learns here is direction or nothing."""
    from teacher_candidates import CandidateLists

    where = {vid: i for i, vid in enumerate(video_ids)}
    twin = {v: where[n["video_id"]] for v, negs in enumerate(hard_negatives) for n in negs
            if n.get("relation") == "direction" and n.get("video_id") in where}
    keep = [q for q, owner in enumerate(lists.owners) if int(owner) in twin]
    return CandidateLists(owners=lists.owners[keep], texts=[lists.texts[q] for q in keep],
                          candidates=np.array([[int(lists.owners[q]), twin[int(lists.owners[q])]] for q in keep]))


@torch.no_grad()
def pair_accuracy(model, features, pairs, rows: int = 512, encode=None) -> float:
    """% of the first ``rows`` training pairs whose own video the slow model scores above its twin
    (clean view): whether the training rows themselves are being learned."""
    texts = pairs.texts[:rows]
    text = (encode or model.encode_scorer_text)(texts)
    frames, mask, _, regions = features.view(None)
    wins = []
    for column in (0, 1):
        videos = torch.as_tensor(pairs.candidates[:rows, column])
        scores, _ = model.score_pairs(text, frames[videos], mask[videos], regions=regions[videos])
        wins.append(scores)
    return 100.0 * float((wins[0] > wins[1]).float().mean())


def train_arm(base, features, bank, lists, val, beta: float, *, steps: int, batch: int, lr: float,
              train_text: bool, text_lr_scale: float, text_weight: float, eval_every: int, seed: int,
              fresh_text: bool = False, motion: bool = False, words: bool = False, pairs=None,
              mix_pairs=None) -> dict:
    from teacher_candidates import candidate_teacher_loss, own_words_student_sentence
    from vidsearch.services.trainer.runner import param_groups

    model = (with_scorer_inputs(base, motion=motion, words=words, seed=seed) if motion or words
             else copy.deepcopy(base))
    if fresh_text:
        # The text tower as it was before any training (the shipped recipe trains from scratch):
        # words not yet merged by the student's objective.
        from vidsearch.models import build_model
        untrained = build_model(base.config, device="cpu", seed=seed, load_weights=False)
        model.scorer_text.copy_from(untrained.clip)
    encode = own_words_student_sentence(model) if fresh_text else None
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.scorer.parameters())
    scales: dict[int, float] = {}
    if train_text:
        text = list(model.scorer_text.parameters())
        params += text
        scales = {id(p): text_lr_scale for p in text}
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(param_groups(params, 0.2, scales), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    loss_fn = candidate_teacher_loss(model, features, bank, pairs or lists, batch_size=batch,
                                     caption_negatives_per_video=2, text_weight=0.0 if pairs else text_weight,
                                     seed=seed, stage=2, train_text=train_text, encode=encode)
    # The mixed arm: every other step trains on the direction pairs alone, the others on the
    # candidate rows, so the slow model learns direction without forgetting how to rank.
    pair_loss_fn = None if mix_pairs is None else candidate_teacher_loss(
        model, features, bank, mix_pairs, batch_size=batch, caption_negatives_per_video=2, text_weight=0.0,
        seed=seed + 1, stage=2, train_text=train_text, encode=encode)
    tracked_pairs = pairs if pairs is not None else mix_pairs

    def evaluate() -> dict:
        out = rerank_eval(model, val, beta, encode)
        if tracked_pairs is not None:
            out["train_pairs.direction"] = pair_accuracy(model, features, tracked_pairs, encode=encode)
        return out

    curve = [{"step": 0, **evaluate()}]
    print(f"  step 0: {curve[-1]['teacher@20.R@1']:.1f} teacher, direction {curve[-1].get('teacher.twin_direction')}",
          flush=True)
    began, losses = time.perf_counter(), []
    train_seconds = 0.0
    for step in range(steps):
        model.train()
        tick = time.perf_counter()
        loss, parts = (pair_loss_fn if pair_loss_fn is not None and step % 2 else loss_fn)(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        model.scorer.clamp_temperatures_()
        train_seconds += time.perf_counter() - tick
        losses.append({"step": step + 1, "loss": float(loss.detach()), **parts})
        if (step + 1) % 25 == 0:
            print(f"  step {step + 1}: loss {np.mean([x['loss'] for x in losses[-25:]]):.3f} "
                  f"{train_seconds / (step + 1):.2f} s/step", flush=True)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, **evaluate()})
            row = curve[-1]
            print(f"  step {step + 1}: teacher@20 R@1 {row['teacher@20.R@1']:.1f} rerank@20 {row['rerank@20.R@1']:.1f} "
                  f"student {row['student.R@1']:.1f} direction {row.get('teacher.twin_direction')} "
                  f"train pairs {row.get('train_pairs.direction')}", flush=True)
    return {"curve": curve, "losses": losses, "s_per_step": train_seconds / max(1, steps),
            "wall_s": time.perf_counter() - began}


def main() -> int:
    isolate_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--registry", default=str(REPO_ROOT / "deploy" / "models"))
    parser.add_argument("--model-name", default="vidsearch")
    parser.add_argument("--version", default="production")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="captions per step")
    parser.add_argument("--candidates", type=int, default=16, help="videos per caption")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--arms", default="scorer,scorer+text:0.1,scorer+text:1,fresh+text:1",
                        help="comma-separated: 'scorer', 'scorer+text:LR_SCALE' (the text tower's share of lr), "
                             "'fresh+text:LR_SCALE' (its own text tower restarted from the untrained init); "
                             "'motion' and/or 'words' in an arm's name add the scorer's motion tokens / word "
                             "embeddings (e.g. 'motion+words'); 'pairs' trains on direction twins alone "
                             "(a diagnostic: each caption against its video played backwards); 'mix' alternates "
                             "steps between the candidate rows and those direction pairs")
    parser.add_argument("--name", default="teacher-probe", help="report file name (NAME.md, NAME.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(DOCS_DIR), help="where teacher-probe.{md,json} go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vidsearch.config import load_settings
    from vidsearch.models.persist import load_model_version
    from vidsearch.registry import ModelRegistry
    from vidsearch.services.trainer.batches import twin_neighbours
    from teacher_candidates import candidate_lists
    from vidsearch.services.trainer.config import RunConfig
    from vidsearch.services.trainer.worker import _bank, _eval_set, _train_features

    run_dir, out_dir = Path(args.run_dir), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / "run.yaml").read_text()))
    data = json.loads((run_dir / "data.json").read_text())
    model, manifest = load_model_version(ModelRegistry(args.registry), args.model_name, args.version, device="cpu")
    model.eval()
    beta = load_settings().serve.beta
    began = time.perf_counter()
    features = _train_features(model, cfg, data["train"])
    bank = _bank(data["train"])
    twins = twin_neighbours(data["train"]["video_ids"], data["train"]["hard_negatives"])
    lists = candidate_lists(model, features, bank, twins, args.candidates)
    val = _eval_set(model, data["val"], cfg.seed)
    setup_s = time.perf_counter() - began
    print(f"teacher_probe: {len(lists)} train captions, {features.frames.shape[0]} videos, "
          f"{len(val.video_ids)} val videos; set-up {setup_s:.0f} s", flush=True)

    arms = {}
    for arm in args.arms.split(","):
        print(f"arm {arm}", flush=True)
        arms[arm] = train_arm(model, features, bank, lists, val, beta, steps=args.steps, batch=args.batch,
                              lr=args.lr, train_text="+text" in arm,
                              text_lr_scale=float(arm.split(":")[1]) if ":" in arm else 0.1, text_weight=1.0,
                              eval_every=args.eval_every, seed=cfg.seed, fresh_text=arm.startswith("fresh"),
                              motion="motion" in arm, words="words" in arm,
                              pairs=direction_pair_lists(lists, data["train"]["hard_negatives"],
                                                         data["train"]["video_ids"]) if "pairs" in arm else None,
                              mix_pairs=direction_pair_lists(lists, data["train"]["hard_negatives"],
                                                             data["train"]["video_ids"]) if "mix" in arm else None)
    results = {"version": manifest.version, "run_dir": str(run_dir), "steps": args.steps, "batch": args.batch,
               "candidates": args.candidates, "lr": args.lr, "beta": beta, "setup_s": setup_s,
               "machine": machine_facts(), "arms": arms}
    (out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    write_report(results, out_dir, args.name)
    return 0


def write_report(results: dict, out_dir: Path, name: str = "teacher-probe") -> None:
    metrics = ["student.R@1", "teacher@20.R@1", "rerank@20.R@1", "teacher.twin_direction", "train_pairs.direction",
               "teacher.twin_reversed", "teacher.twin_swap", "rerank@20.twin_direction", "rerank@20.twin_reversed",
               "text.scorer_motion_cos", "text.scorer_colour_cos"]
    rows = []
    for arm, out in results["arms"].items():
        for point in out["curve"]:
            rows.append([arm, point["step"], *[("-" if m not in point else f"{point[m]:.3f}" if m.startswith("text.")
                                                 else f"{point[m]:.1f}") for m in metrics]])
    lines = ["# The slow model trained on the re-ranking task", "",
             f"Generated by `{command_line()}`; model `{results['version']}`, its own run's val split "
             f"(`{Path(results['run_dir']).name}`). {results['steps']} steps per arm, {results['batch']} captions "
             f"x {results['candidates']} candidates per step, lr {results['lr']}, fusion beta {results['beta']}.", "",
             "Step 0 of every arm is the version as published (its teacher trained with in-batch InfoNCE, "
             "plateaued). `teacher@20`: the student's top 20 ordered by the slow model alone; `rerank@20`: "
             "the serving fusion; `teacher.twin_*`: % of captions whose own video the slow model scores above "
             "its twin.", "",
             *md_table(["arm", "step", *metrics], rows), "",
             *[f"- {arm}: {out['s_per_step']:.2f} s per step on this CPU, {out['wall_s'] / 60:.1f} min with evaluation"
               for arm, out in results["arms"].items()], ""]
    write_text(out_dir / f"{name}.md", lines)


if __name__ == "__main__":
    raise SystemExit(main())
