"""Stage checkpoints: the weights on disk are never newer than the state.json naming them.

A real stage (runner.run_stage on a small linear model and a real regression loss) is
checkpointed; a kill between writing new weights and writing state.json is simulated by
writing the next step's weight file by hand and leaving state.json alone.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vidsearch.services.trainer.config import StageBase
from vidsearch.services.trainer.runner import StageContext, _save, load_stage_state, run_stage


def _stage(tmp_path, steps: int, every: int = 5):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(32, 4), torch.randn(32, 2)

    def loss_fn(step: int):
        return nn.functional.mse_loss(model(x), y), {}

    ctx = StageContext(run_dir=tmp_path, checkpoint_every=every, log_every=100, eval_every=100)
    config = StageBase(steps=steps, batch_size=32, lr=1e-2)
    return model, ctx, config, loss_fn


def test_weights_are_step_named_and_state_json_names_them(tmp_path):
    model, ctx, config, loss_fn = _stage(tmp_path, steps=10)
    run_stage("s", config, model, list(model.parameters()), loss_fn, ctx)
    where = tmp_path / "checkpoints" / "s"
    meta = json.loads((where / "state.json").read_text())
    assert meta["weights"] == "state-10.safetensors" and meta["step"] == 10
    # The step-5 file was removed once state.json named step 10's.
    assert sorted(p.name for p in where.iterdir()) == ["state-10.safetensors", "state.json"]


class Killed(Exception):
    pass


def test_a_kill_between_the_weights_and_state_json_resumes_from_a_consistent_pair(tmp_path):
    model, ctx, config, loss_fn = _stage(tmp_path, steps=20)

    def dies_at_12(step: int):
        if step == 12:
            raise Killed()
        return loss_fn(step)

    with pytest.raises(Killed):
        run_stage("s", config, model, list(model.parameters()), dies_at_12, ctx)
    where = tmp_path / "checkpoints" / "s"
    saved_meta, saved = load_stage_state(ctx, "s")
    assert saved_meta["step"] == 10 and not saved_meta["done"]
    # The crash: step 15's weights reached the disk, state.json (step 10) was never replaced.
    save_file({k: v + 1.0 for k, v in saved.items()}, str(where / "state-15.safetensors"))
    meta, tensors = load_stage_state(ctx, "s")
    assert meta == saved_meta
    assert set(tensors) == set(saved) and all(tensors[k].equal(saved[k]) for k in saved)

    # Resuming restores step 10's weights and optimizer, trains on, and the next checkpoint
    # removes the orphan. The result is exactly an uninterrupted run's.
    fresh, ctx2, _, fresh_loss = _stage(tmp_path, steps=20)
    log = run_stage("s", config, fresh, list(fresh.parameters()), fresh_loss, ctx2)
    assert log.steps == 20 and len(log.losses) == 20
    assert log.losses[:10] == saved_meta["log"]["losses"]
    assert sorted(p.name for p in where.iterdir()) == ["state-20.safetensors", "state.json"]
    clean, ctx3, _, clean_loss = _stage(tmp_path / "uninterrupted", steps=20)
    run_stage("s", config, clean, list(clean.parameters()), clean_loss, ctx3)
    assert all(a.equal(b) for a, b in zip(fresh.state_dict().values(), clean.state_dict().values()))


def test_a_run_dir_in_the_old_layout_still_loads(tmp_path):
    model, ctx, config, loss_fn = _stage(tmp_path, steps=5)
    where = tmp_path / "checkpoints" / "s"
    where.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(where / "state.safetensors"))
    (where / "state.json").write_text(json.dumps({"step": 3, "done": False, "param_groups": [], "log": {
        "name": "s", "steps": 3, "losses": [1.0, 0.9, 0.8], "parts": {}}}))
    meta, loaded = load_stage_state(ctx, "s")
    assert meta["step"] == 3 and all(loaded[k].equal(tensors[k]) for k in tensors)
    # The next save moves it to the new layout and drops the old file.
    optimizer = torch.optim.AdamW(model.parameters())
    from vidsearch.services.trainer.runner import StageLog

    _save(ctx, "s", model, optimizer, StageLog(name="s", steps=4), 4, False)
    assert sorted(p.name for p in where.iterdir()) == ["state-4.safetensors", "state.json"]
