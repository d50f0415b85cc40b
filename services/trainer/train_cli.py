"""`vidsearch train --config RUN.yaml`: train, evaluate, gate, publish, re-index.

Exit codes: 0 published (or publishing off), 3 the gate refused the model (one
line says by how much), 1 any other failure (one line), 2 a bad config or usage.
Re-running with the same ``run_dir`` resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from vidsearch.cli import CommandError
from vidsearch.config import Settings

EXIT_GATE_REFUSED = 3

# flag -> dotted run-config key
OVERRIDES = {
    "run_dir": "run_dir", "data": "data.path", "data_kind": "data.kind", "preset": "model.preset",
    "pretrained": "model.pretrained", "init_from": "model.init_from", "seed": "seed",
    "workers": "scaling.num_workers", "cpus_per_worker": "scaling.cpus_per_worker",
    "backbone_steps": "stages.backbone.steps", "teacher_steps": "stages.teacher.steps",
    "distill_steps": "stages.distill.steps", "max_videos": "data.max_videos", "gate_metric": "publish.gate_metric",
    "registry": "publish.registry", "reindex": "publish.reindex",
}


def configure(parser: argparse.ArgumentParser) -> None:
    # dest differs from the global --config (the settings file) on purpose.
    parser.add_argument("--config", dest="run_config", required=True, help="run config YAML (the shipped model's: deploy/train/shipped.yaml)")
    parser.add_argument("--run-dir", dest="run_dir", help="checkpoints, report.md, metrics (resumes if present)")
    parser.add_argument("--data", help="dataset path (data.path)")
    parser.add_argument("--data-kind", choices=("synth", "msrvtt", "jsonl", "csv"), help="data.kind")
    parser.add_argument("--preset", help="model preset or JSON path (model.preset)")
    parser.add_argument("--pretrained", help="open_clip pretrained tag or local checkpoint (model.pretrained)")
    parser.add_argument("--init-from", dest="init_from", help="start from a registry version or alias")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int, help="Ray Train workers (scaling.num_workers)")
    parser.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=int)
    parser.add_argument("--gpu", action="store_true", help="train on GPUs (scaling.use_gpu)")
    for stage in ("backbone", "teacher", "distill"):
        parser.add_argument(f"--{stage}-steps", dest=f"{stage}_steps", type=int, help=f"stages.{stage}.steps")
        parser.add_argument(f"--no-{stage}", dest=f"no_{stage}", action="store_true", help=f"skip the {stage} stage")
    parser.add_argument("--max-videos", dest="max_videos", type=int, help="use at most N train videos")
    parser.add_argument("--gate-metric", dest="gate_metric", help="publish.gate_metric (default val.student.R@1)")
    parser.add_argument("--registry", help="registry root to publish into (default model.registry_root)")
    parser.add_argument("--reindex", choices=("auto", "always", "never"), help="publish.reindex")
    parser.add_argument("--no-publish", dest="no_publish", action="store_true", help="train and evaluate only")


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {key: getattr(args, flag) for flag, key in OVERRIDES.items()}
    if args.gpu:
        out["scaling.use_gpu"] = True
    for stage in ("backbone", "teacher", "distill"):
        if getattr(args, f"no_{stage}"):
            out[f"stages.{stage}.enabled"] = False
    if args.no_publish:
        out["publish.enabled"] = False
    return out


def run(args: argparse.Namespace, settings: Settings) -> int:
    from vidsearch.services.trainer.config import load_run_config
    from vidsearch.services.trainer.errors import TrainingError
    from vidsearch.services.trainer.job import run_training
    from vidsearch.services.trainer.publish import GateRefused, publish_run
    from vidsearch.services.trainer.report import write_report

    try:
        cfg = load_run_config(args.run_config, _overrides(args))
    except TrainingError as exc:
        raise CommandError(str(exc), exit_code=2) from None
    progress = sys.stderr.isatty()
    try:
        result = run_training(cfg, settings, progress=progress, log_level=args.log_level)
        report = write_report(result.run_dir, cfg.name, result.metrics, result.logs,
                              {"model": cfg.model.preset, "frame encoder": result.frame_encoder,
                               "data hash": result.data_hash[:16]})
        print(f"run {cfg.name}: report {report}")
        for split in cfg.evaluate.splits:
            row = {k.split(".", 1)[1]: v for k, v in result.metrics.items() if k.startswith(f"{split}.")}
            if row:
                print(f"  {split}: student R@1 {row.get('student.R@1', float('nan')):.1f}  "
                      f"teacher R@1 {row.get('teacher.R@1', float('nan')):.1f}  "
                      + "  ".join(f"rerank@{k} R@1 {row[f'rerank@{k}.R@1']:.1f}" for k in cfg.evaluate.rerank_k
                                  if f"rerank@{k}.R@1" in row))
        if not cfg.publish.enabled:
            return 0
        outcome = publish_run(result, settings, progress=progress)
    except GateRefused as exc:
        raise CommandError(str(exc), exit_code=EXIT_GATE_REFUSED) from None
    except TrainingError as exc:
        raise CommandError(str(exc)) from None
    print(f"published {outcome.version} (parent {outcome.parent or 'none'}; "
          f"{outcome.gate['metric']} {outcome.gate['new']:.2f}); {outcome.note}")
    return 0
