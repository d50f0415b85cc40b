"""Does the frame tower's spatial map carry what its pooled frame vector loses? Linear probes of
an event's attributes from the frame vectors and from the region tokens of its first and last
sampled frame.

    python benchmarks/region_probe.py --run-dir RUN_DIR [--registry deploy/models] [--version production] [--grid 2]

RUN_DIR is a training run directory over synthetic data (its data.json names the decoded frame
caches; events carry action, position, shape, size and colour). The version's frame tower
encodes them; region tokens come from the same pass (any scorer: the spatial one is built on
the side, since tokens depend only on the tower, the grid and the width). Probes fit on the
train split and are scored on val. Prints a table and writes docs/benchmarks/region-probe.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common import DOCS_DIR, REPO_ROOT, isolate_environment, md_table

ATTRIBUTES = ("action", "position", "shape", "size", "colour")
MOVES = ("left", "right", "up", "down", "grow", "shrink")


def probe_examples(data: dict, encoded, attr: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    frames, regions, labels = [], [], []
    for v, events in enumerate(data["events"]):
        times = encoded.times[v]
        for event in events:
            label = event.get(attr)
            if label is None or (attr == "action" and label not in MOVES):
                continue
            inside = ((times >= event["start_s"] - 1e-6) & (times < event["end_s"] - 1e-6)
                      & encoded.mask[v]).nonzero().flatten()
            if len(inside) < 2:
                continue
            first, last = int(inside[0]), int(inside[-1])
            frames.append(torch.cat([encoded.frames[v, first], encoded.frames[v, last]]).numpy())
            regions.append(torch.cat([encoded.regions[v, first].flatten(), encoded.regions[v, last].flatten()]).numpy())
            labels.append(str(label))
    return np.array(frames), np.array(regions), labels


def probe_accuracy(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str]) -> float:
    """Multinomial logistic regression (standardised inputs, L2), accuracy on the test rows."""
    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    x, xt = torch.tensor(train_x, dtype=torch.float32), torch.tensor(test_x, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    y = torch.tensor([index[c] for c in train_y])
    yt = torch.tensor([index.get(c, -1) for c in test_y])
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01, weight_decay=1e-3)
    for _ in range(400):
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * float(((xt @ weight + bias).argmax(1) == yt).float().mean())


def main() -> int:
    isolate_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--registry", default=str(REPO_ROOT / "deploy" / "models"))
    parser.add_argument("--model-name", default="vidsearch")
    parser.add_argument("--version", default="production")
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--out", default=str(DOCS_DIR / "region-probe.json"), help="where the JSON goes")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from vidsearch.models import ModelConfig, build_model
    from vidsearch.models.persist import load_model_version
    from vidsearch.registry import ModelRegistry
    from vidsearch.services.trainer.frames import open_cache
    from vidsearch.services.trainer.stages import encode_cache

    data = json.loads((Path(args.run_dir) / "data.json").read_text())
    version, _ = load_model_version(ModelRegistry(args.registry), args.model_name, args.version, device="cpu")
    config = ModelConfig.from_dict({**version.config.to_dict(), "scorer": {"kind": "spatial", "grid": args.grid,
                                                                             "heads": 4, "max_frames": 64}})
    model = build_model(config, device="cpu", seed=0, load_weights=False)
    model.clip.load_state_dict(version.clip.state_dict())
    model.eval()
    frames = model.config.num_frames
    train = encode_cache(model, open_cache(data["train"]["train_cache"]), frames, None, 0, 0)
    val = encode_cache(model, open_cache(data["val"]["eval_cache"]), frames, None, 0, 0)
    results = {}
    for attr in ATTRIBUTES:
        a_frames, a_regions, a_y = probe_examples(data["train"], train, attr)
        b_frames, b_regions, b_y = probe_examples(data["val"], val, attr)
        majority = 100.0 * max(b_y.count(c) for c in set(b_y)) / len(b_y)
        results[attr] = {"frames": probe_accuracy(a_frames, a_y, b_frames, b_y),
                         "regions": probe_accuracy(a_regions, a_y, b_regions, b_y),
                         "majority": majority, "val_events": len(b_y)}
        print(f"region probe: {attr} done", flush=True)
    print("\n".join(md_table(["attribute", "val events", "frame vectors (%)", "region tokens (%)", "majority (%)"],
                             [[a, r["val_events"], f"{r['frames']:.1f}", f"{r['regions']:.1f}", f"{r['majority']:.1f}"]
                              for a, r in results.items()])))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"version": args.version, "grid": args.grid,
                                                             "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
