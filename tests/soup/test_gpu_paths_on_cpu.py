"""The GPU code paths, exercised on the CPU (CI has no GPU): bf16 autocast, data-parallel
trials through a Ray Train TorchTrainer inside the Tune trial (gloo instead of NCCL)
resuming after a crash, soups cooked on the Kitchen's device."""

import os

import pytest
import torch

from orchestrator.soup.config import load_config, make_task
from orchestrator.soup.train import FineTune, autocast, evaluate
from orchestrator.common.pool import Pool
from tests.helpers import TINY_TASK
from tests.helpers import finish, start, sweep_cmd, trial_rows


def test_bf16_autocast_trains_and_evaluates():
    task = make_task(load_config(None, TINY_TASK))
    data = task.data()
    init = task.pretrain(data)
    with autocast("bf16"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is really on
    with autocast("fp32"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    losses, accs = {}, {}
    for precision in ("fp32", "bf16"):
        run = FineTune(task, data, init, {"epochs": 1, "lr": 2e-3, "batch_size": 64}, precision=precision)
        seen = set()
        run.model.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        losses[precision] = run.run_epoch()
        assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}  # the forward ran in bf16
        assert all(v.dtype == torch.float32 for v in run.weights().values() if v.is_floating_point())  # fp32 master
        accs[precision] = evaluate(task, run.model, data, precision=precision)["val_acc"]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 and abs(accs["bf16"] - accs["fp32"]) < 0.05


@pytest.mark.slow
def test_data_parallel_trial_resumes_after_a_crash(tmp_path):
    """Two gloo workers per trial (0.5 CPU each); one rank raises once after epoch 1: Tune
    retries the trial, whose TorchTrainer (same name) resumes from its epoch-1 checkpoint.
    Rank 1, not rank 0: the rank that reports and checkpoints must notice another's crash
    (a crash of rank 0 itself takes the same path, without that; ORCHESTRATOR_TEST_CRASH_RANK=0)."""
    rank = 1
    markers = tmp_path / "crashed"
    markers.mkdir()
    cmd = sweep_cmd(tmp_path, "ddp", 1, "resources={cpu: 0.5, gpu: 0, workers: 2}", "precision=fp32")
    code, log = finish(start(cmd, tmp_path, ORCHESTRATOR_TEST_CRASH=f"1:raise:{markers}",
                             ORCHESTRATOR_TEST_CRASH_RANK=str(rank)), tmp_path, timeout=420)
    assert code == 0, log[-4000:]
    assert "world_rank=1" in log  # really two workers
    assert f"test crash after epoch 1 (rank {rank})" in log  # the rank asked for crashed
    (crashed,) = os.listdir(markers)
    assert log.count("resuming after epoch 1 from its checkpoint") >= 2, log[-4000:]  # both ranks resumed
    trials = trial_rows(str(tmp_path / "pool"))
    assert list(trials["id"]) == [crashed] and set(trials["status"]) == {"ok"}
    (history,) = trials["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    # both ranks' training dynamics were gathered, each example once per epoch, across the resume
    frame = Pool(str(tmp_path / "pool")).load_table(f"{crashed}.dynamics").to_pandas()
    assert (frame.groupby(["id", "epoch"]).size() == 1).all() and (frame.groupby("epoch").size() == 899).all()
    assert sorted(frame["epoch"].unique()) == [0, 1]
    assert "greedy soup" in log
