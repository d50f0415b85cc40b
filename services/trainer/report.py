"""``report.md`` of a run: the results table and PNG plots of the loss curves and val R@1."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ROWS = ("student", "baseline_student", "teacher", "rerank@10", "rerank@20", "rerank@50")
COLUMNS = ("R@1", "R@5", "R@10", "MdR", "MnR", "twin_reversed", "twin_swap")


def _smooth(values: list[float], window: int = 25) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_losses(logs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [name for name in ("backbone", "teacher", "distill", "baseline") if name in logs]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4 * max(1, len(stages)), 3.2), squeeze=False)
    for ax, name in zip(axes[0], stages):
        ax.plot(_smooth(logs[name]["losses"]), label="total", color="black")
        for part, values in logs[name]["parts"].items():
            if len(logs[name]["parts"]) > 1:
                ax.plot(_smooth(values), label=part, alpha=0.7)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (moving average)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_val(logs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    offset = 0
    for name in ("backbone", "teacher", "distill", "baseline"):
        if name not in logs:
            continue
        evals = logs[name].get("evals") or []
        start = offset if name != "baseline" else offset - logs["distill"]["steps"]
        if evals:
            steps, values = zip(*evals)
            ax.plot([start + s for s in steps], values, marker="o", label=name)
        if name != "baseline":
            offset += logs[name]["steps"]
    ax.set_xlabel("step (stages in order)")
    ax.set_ylabel("val R@1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def metrics_table(metrics: dict[str, float], split: str) -> str:
    lines = [f"| {split} | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in ROWS:
        if f"{split}.{row}.R@1" not in metrics:
            continue
        cells = []
        for column in COLUMNS:
            value = metrics.get(f"{split}.{row}.{column}")
            cells.append("–" if value is None else f"{value:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: Path, name: str, metrics: dict[str, float], logs: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> Path:
    """Write report.md, losses.png and val_r1.png into ``run_dir``; return the report's path."""
    plot_losses(logs, run_dir / "losses.png")
    plot_val(logs, run_dir / "val_r1.png")
    splits = sorted({key.split(".", 1)[0] for key in metrics}, key=lambda s: ("val", "test").index(s)
                    if s in ("val", "test") else 9)
    parts = [f"# Training run `{name}`", ""]
    for key, value in (extra or {}).items():
        parts.append(f"- {key}: {value}")
    parts += ["", "## Stages", "", "| stage | steps | samples/s | seconds | final loss |", "|---|---|---|---|---|"]
    for stage, entry in logs.items():
        final = np.mean(entry["losses"][-25:]) if entry["losses"] else float("nan")
        parts.append(f"| {stage} | {entry['steps']} | {entry['samples_per_s']:.1f} | {entry['seconds']:.0f} | {final:.3f} |")
    parts += ["", "## Results (text→video; R@k in %, twin = % of captions whose video beats its twin)", ""]
    for split in splits:
        parts += [metrics_table(metrics, split), ""]
    parts += ["![losses](losses.png)", "", "![val R@1](val_r1.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
