"""Why distillation does not lift the shipped student: what TeachCLIP's two teaching
signals ask of it, measured on the version's own frozen frame features.

    python benchmarks/distill_probe.py [--registry deploy/models] [--version production] [--steps 300]

1. How much each signal can say: the entropy of the teacher's frame relevance for full
   captions (the FgT target) against ln T and against the student's AFA weights, and
   CgT between the student's and the teacher's batch similarity rows at the start.
2. What FgT costs: the student's head trained from the shipped weights for ``--steps``
   steps on the same train batches with l_IN only, l_IN + l_FgT (distillation's FgT
   part at gamma=1), l_FgT only, and l_IN + l_FgT with AFA pooling at temperature 1
   instead of the preset's. Each arm reports the test FgT (cross-entropy from the
   teacher's relevance to the AFA weights) and the test student R@1 along the way.

The batches are simpler than the training stage's (one random caption per video, no
hard negatives), which is why the l_IN arm's R@1 can drift from the shipped head's.
Results go to docs/benchmarks/distill-probe.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import numpy as np
import torch

from common import DOCS_DIR, REPO_ROOT, command_line, isolate_environment, machine_facts, md_table, write_text
from quality import CACHE_DIR, eval_set, training_dataset

ARMS = {  # name: (InfoNCE weight, FgT weight, AFA pooling temperature or None for the preset's)
    "IN only": (1.0, 0.0, None),
    "IN + FgT": (1.0, 1.0, None),
    "FgT only": (0.0, 1.0, None),
    "IN + FgT, pooling at T=1": (1.0, 1.0, 1.0),
}


def entropy(p: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean entropy (nats) of rows that sum to 1 over their valid entries."""
    p = p.float().clamp_min(1e-12)
    return float((-(p * p.log()) * mask).sum(dim=-1).mean())


def matched_relevance(teacher, texts: list[str], frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The teacher's frame relevance of each (caption, its own video) pair, [B,T]."""
    with torch.inference_mode():
        _, relevance = teacher.score_pairs(teacher.encode_text_features(texts), frames, mask)
    return relevance.float().clone()


def measure_on_test(student, data, relevance: torch.Tensor) -> dict[str, float]:
    from vidsearch.retrieval_metrics import retrieval_metrics
    from vidsearch.services.trainer.evaluate import student_matrix
    from vidsearch.services.trainer.loss import fgt_loss

    student.eval()
    with torch.inference_mode():
        texts, owners = data.queries()
        r1 = retrieval_metrics(student_matrix(student, data, texts), owners)["R@1"]
        _, weights = student.aggregate_with_weights(data.frames, data.mask)
        fgt = float(fgt_loss(weights, relevance, data.mask))
    student.train()
    return {"R@1": float(r1), "FgT": fgt, "AFA_entropy": entropy(weights, data.mask)}


def train_arm(model, train, test, test_relevance, arm: tuple[float, float, float | None],
              steps: int, batch: int, seed: int, every: int) -> list[dict[str, float]]:
    """The head alone from the shipped weights, on frozen features and a frozen text tower."""
    from vidsearch.services.trainer.loss import fgt_loss, infonce_logits

    w_in, w_fgt, pooling = arm
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    if pooling is not None:
        student.head.temperature = pooling
    optimizer = torch.optim.AdamW(student.head.parameters(), lr=5e-4, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    scale = student.clip.logit_scale.exp().detach()
    curve = [{"step": 0, **measure_on_test(student, test, test_relevance)}]
    for step in range(1, steps + 1):
        index = rng.choice(len(train.bank.captions), size=batch, replace=False)
        texts = [train.bank.captions[i][rng.integers(len(train.bank.captions[i]))] for i in index]
        frames, mask = train.frames[index], train.mask[index]
        with torch.no_grad():
            text = student.encode_text(texts)
        video, weights = student.aggregate_with_weights(frames, mask)
        loss = torch.zeros(())
        if w_in:
            loss = loss + w_in * infonce_logits(scale * (text @ video.T))
        if w_fgt:
            loss = loss + w_fgt * fgt_loss(weights, matched_relevance(teacher, texts, frames, mask), mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.head.parameters(), 1.0)
        optimizer.step()
        if step % every == 0 or step == steps:
            curve.append({"step": step, **measure_on_test(student, test, test_relevance)})
    return curve


def plot(curves: dict[str, list[dict[str, float]]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in curves.items():
        steps = [p["step"] for p in curve]
        axes[0].plot(steps, [p["FgT"] for p in curve], marker="o", label=name)
        axes[1].plot(steps, [p["R@1"] for p in curve], marker="o", label=name)
    axes[0].set(title="test FgT (cross-entropy, nats)", xlabel="step")
    axes[1].set(title="test student R@1 (%)", xlabel="step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    isolate_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=str(REPO_ROOT / "deploy" / "models"))
    parser.add_argument("--version", default="production")
    parser.add_argument("--model-name", default="vidsearch")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()

    from vidsearch.config import load_settings
    from vidsearch.models.persist import load_model_version
    from vidsearch.registry import ModelRegistry
    from vidsearch.services.trainer.datasets import DatasetSource, load_dataset, split_videos, trusting_dataset_root
    from vidsearch.services.trainer.loss import cgt_loss

    registry = ModelRegistry(args.registry)
    model, manifest = load_model_version(registry, args.model_name, args.version, device="cpu")
    root = training_dataset(manifest.training, quick=False)
    source = DatasetSource(kind="synth", path=str(root))
    decode = trusting_dataset_root(load_settings().decode, source)
    dataset = load_dataset(source, decode)
    cache_dir = CACHE_DIR / "quality-cache"
    test = eval_set(model, split_videos(dataset, "test"), decode, cache_dir, f"test-{manifest.version}")
    train = eval_set(model, split_videos(dataset, "train"), decode, cache_dir, f"train-{manifest.version}")
    print(f"distill_probe: {len(train.bank.captions)} train and {len(test.bank.captions)} test videos", flush=True)

    test_caption = [caps[0] for caps in test.bank.captions]
    test_relevance = matched_relevance(model, test_caption, test.frames, test.mask)
    with torch.inference_mode():
        _, afa = model.aggregate_with_weights(test.frames, test.mask)
        pooling = torch.softmax(torch.log(afa.clamp_min(1e-12)) / model.head.temperature, dim=-1)
        rng = np.random.default_rng(args.seed)
        batch = rng.choice(len(test_caption), size=args.batch_size, replace=False)
        texts = [test_caption[i] for i in batch]
        student = model.clip.logit_scale.exp() * (model.encode_text(texts) @ model.aggregate(
            test.frames[batch], test.mask[batch]).T)
        slow, _ = model.score_matrix(model.encode_text_features(texts), test.frames[batch], test.mask[batch])
        cgt = float(cgt_loss(student, model.scorer.logit_scale.exp() * slow))
    frames_per_video = float(test.mask.sum(dim=-1).float().mean())
    signals = {
        "ln_T": math.log(frames_per_video),
        "teacher_relevance_entropy": entropy(test_relevance, test.mask),
        "teacher_relevance_max": float(test_relevance.max(dim=-1).values.mean()),
        "afa_weight_entropy": entropy(afa, test.mask),
        "afa_pooling_entropy": entropy(pooling, test.mask),
        "afa_temperature": float(model.head.temperature),
        "cgt_at_start": cgt,
    }
    print(f"distill_probe: {json.dumps({k: round(v, 4) for k, v in signals.items()})}", flush=True)

    curves = {}
    every = max(args.steps // 6, 1)
    for name, arm in ARMS.items():
        curves[name] = train_arm(model, train, test, test_relevance, arm, args.steps,
                                 args.batch_size, args.seed, every)
        end = curves[name][-1]
        print(f"distill_probe: {name}: test FgT {end['FgT']:.3f}, R@1 {end['R@1']:.1f}", flush=True)

    out = {"model": manifest.version, "command": command_line(), "machine": machine_facts(), "signals": signals,
           "steps": args.steps, "batch_size": args.batch_size, "curves": curves,
           "seconds": time.perf_counter() - started}
    (DOCS_DIR / "distill-probe.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(curves, DOCS_DIR / "distill-probe.png")
    start = curves["IN only"][0]
    lines = [
        "# What distillation asks of the student", "",
        f"Model `{manifest.version}`, command `{out['command']}`, {len(train.bank.captions)} train and "
        f"{len(test.bank.captions)} test videos of its own synthetic data, frozen frame features. "
        "Written by `benchmarks/distill_probe.py`; see `distillation.md` for the training runs.", "",
        "## The teaching signals at the start", "",
        *md_table(["quantity", "value"], [
            ["ln T (the entropy of uniform weights over the valid frames)", f"{signals['ln_T']:.3f}"],
            ["teacher's frame relevance for full captions: entropy", f"{signals['teacher_relevance_entropy']:.3f}"],
            ["… its largest weight (mean over videos)", f"{signals['teacher_relevance_max']:.3f}"],
            ["student's AFA weights softmax(w) (what FgT distils): entropy", f"{signals['afa_weight_entropy']:.3f}"],
            [f"student's AFA pooling softmax(w/{signals['afa_temperature']:g}): entropy",
             f"{signals['afa_pooling_entropy']:.3f}"],
            [f"CgT between student and teacher rows (batch of {args.batch_size} test captions)",
             f"{signals['cgt_at_start']:.4f}"],
        ]), "",
        f"## FgT against InfoNCE: the head trained {args.steps} steps from the shipped weights", "",
        "Same train batches in every arm (batch "
        f"{args.batch_size}, AdamW lr 5e-4, one random caption per video). `FgT`: test cross-entropy from the "
        "teacher's relevance to the AFA weights (its floor is the teacher's entropy above); `R@1`: test "
        "student recall over all captions.", "",
        *md_table(["arm", "FgT start", "FgT end", "R@1 start", "R@1 end", "AFA entropy end"],
                  [[name, f"{c[0]['FgT']:.3f}", f"{c[-1]['FgT']:.3f}", f"{c[0]['R@1']:.1f}", f"{c[-1]['R@1']:.1f}",
                    f"{c[-1]['AFA_entropy']:.3f}"] for name, c in curves.items()]), "",
        "![FgT and R@1 per arm](distill-probe.png)", "",
        f"Start (the shipped head): FgT {start['FgT']:.3f}, R@1 {start['R@1']:.1f}. "
        f"Took {out['seconds'] / 60:.1f} min.",
    ]
    write_text(DOCS_DIR / "distill-probe.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
