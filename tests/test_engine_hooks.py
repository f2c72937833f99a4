"""Training hooks (engine/hooks.py) on a stub trainer: the loss log, token statistics, reseeding."""

import json
import random
from types import SimpleNamespace

import torch
from detectron2.utils.events import EventStorage

from dessam_d2.engine.hooks import LossLogHook, ReseedHook, TokenStatsHook


def stub_trainer(storage, it=0, model=None):
    return SimpleNamespace(iter=it, storage=storage, model=model, seed=7)


def test_the_loss_log_appends_one_line_per_iteration_and_ends_a_cut_line(tmp_path):
    log = tmp_path / "losses.jsonl"
    log.write_text('{"iteration": 0, "total_loss": 1.0}\n{"iteration": 1, "tot')  # a kill
    hook = LossLogHook(str(tmp_path))
    with EventStorage(2) as storage:
        hook.trainer = stub_trainer(storage, it=2)
        hook.before_train()
        storage.put_scalars(total_loss=0.5, loss_cls=0.25, lr=0.01, data_time=3.0)
        hook.after_step()
        hook.after_train()
    lines = log.read_text().splitlines()
    assert json.loads(lines[0]) == {"iteration": 0, "total_loss": 1.0}
    assert lines[1] == '{"iteration": 1, "tot'  # left as it was, but ended
    assert json.loads(lines[2]) == {
        "iteration": 2,
        "loss_cls": 0.25,
        "lr": 0.01,
        "total_loss": 0.5,
    }  # no data_time: losses and lr only


def test_token_statistics_are_the_models_under_token_slash():
    # DESSAM.token_stats itself: tests/test_modeling_meta_arch.py
    stats = {"norm": 5.0, "change": 3.0, "grad_norm": 2.0}
    model = SimpleNamespace(token_stats=lambda: dict(stats))
    with EventStorage(0) as storage:
        hook = TokenStatsHook()
        hook.trainer = stub_trainer(storage, model=model)
        hook.after_step()
        latest = {k: v for k, (v, _) in storage.latest().items()}
    assert latest == {"token/norm": 5.0, "token/change": 3.0, "token/grad_norm": 2.0}


def test_reseeding_depends_on_the_iteration_only():
    hook = ReseedHook()
    draws = []
    for it in (5, 6, 5):
        hook.trainer = stub_trainer(None, it=it)
        hook.before_step()
        draws.append((random.random(), torch.rand(1).item()))
    assert draws[0] == draws[2] and draws[0] != draws[1]
