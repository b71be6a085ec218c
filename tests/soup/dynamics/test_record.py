"""Recording training dynamics in the fine-tuning loop (no Ray): every example exactly once per
epoch, the probabilities the model really gave, training unchanged, resume, data-parallel."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from orchestrator.soup.dynamics.record import Recorder
from orchestrator.soup.tasks.base import View
from orchestrator.soup.train import FineTune
from tests.helpers import free_port, gloo_group
from tests.soup.test_train import TinyTask, data, init, task  # noqa: F401 - the fine-tuning tests' fixtures

HP = {"lr": 0.05, "weight_decay": 1e-4, "epochs": 3, "batch_size": 32, "mixup": 0.0, "augment": 0.0, "seed": 3}


def train(task, data, init, hp, **kw) -> FineTune:
    run = FineTune(task, data, init, {**HP, **hp}, **kw)
    while not run.done:
        run.run_epoch()
    return run


def assert_once_per_epoch(frame, ids, epochs):
    assert len(frame) == len(ids) * epochs
    assert (frame.groupby(["id", "epoch"]).size() == 1).all()
    for e in range(epochs):
        assert sorted(frame.loc[frame["epoch"] == e, "id"]) == sorted(ids)


class NormTask(TinyTask):
    """TinyTask with BatchNorm and dropout: what the extra forward pass under mixup must not disturb
    (running statistics, and the RNG dropout draws from)."""

    def build_model(self):
        from torch import nn

        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


@pytest.mark.parametrize("mixup", [0.0, 0.4])
@pytest.mark.parametrize("model", ["linear", "batchnorm+dropout"])
def test_every_example_once_per_epoch_and_training_unchanged(task, data, init, mixup, model):
    if model != "linear":
        task = NormTask()
        init = task.pretrain()
    hp = {"mixup": mixup, "augment": 0.5, "label_smoothing": 0.1}
    recorded, plain = train(task, data, init, hp), train(task, data, init, hp, record_dynamics=False)
    assert plain.dynamics is None
    assert_once_per_epoch(recorded.dynamics.frame(), range(len(data.train)), 3)
    for k, v in plain.weights().items():  # the extra forward pass under mixup leaves training as it was
        assert torch.equal(recorded.weights()[k], v), k


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_p_gold_is_the_probability_of_the_unmixed_example(task, data, init, mixup):
    """lr 0: the model stays at its start, so each recorded p(gold) must equal the start model's
    softmax on that example, even when the training forward pass saw mixed inputs."""
    run = train(task, data, init, {"lr": 0.0, "mixup": mixup, "weight_decay": 0.0})
    probs = task.build_model()
    probs.load_state_dict(init)
    with torch.no_grad():
        p = probs(data.train.inputs).softmax(1)
    frame = run.dynamics.frame()
    ids = torch.tensor(frame["id"].to_numpy())
    y = data.train.labels[ids]
    assert torch.allclose(torch.tensor(frame["p_gold"].to_numpy()), p[ids, y], atol=1e-6)
    correct = p.argmax(1)[ids] == y
    assert frame["correct"].tolist() == correct.tolist()


def test_a_resumed_run_records_each_epoch_once(task, data, init):
    whole = train(task, data, init, {})
    first = FineTune(task, data, init, HP)
    first.run_epoch()
    weights, state = first.weights(), copy.deepcopy(first.state())  # as a checkpoint saves it
    first.run_epoch()  # an epoch that finished but never reached a checkpoint: lost with the crash
    resumed = FineTune(task, data, init, HP)
    resumed.restore(weights, state)
    while not resumed.done:
        resumed.run_epoch()
    assert_once_per_epoch(resumed.dynamics.frame(), range(len(data.train)), 3)
    assert resumed.dynamics.frame().equals(whole.dynamics.frame())


def test_a_subset_is_recorded_under_the_full_sets_ids(task, data, init):
    ids = torch.tensor([5, 17, 40, 41, 100, 150, 3, 9])
    sub = type(data)(train=View(data.train, ids), evals=data.evals, ood=data.ood)
    run = train(task, sub, init, {"batch_size": 4, "epochs": 2})
    assert_once_per_epoch(run.dynamics.frame(), ids.tolist(), 2)


def test_recorder_restore_drops_epochs_after_the_checkpoint():
    rec = Recorder()
    for epoch in range(3):
        rec.add(torch.tensor([1, 0]), torch.zeros(2, 3), torch.tensor([0, 2]))
        rec.end_epoch(epoch)
    again = Recorder()
    again.restore(rec.state(), epochs=2)
    assert sorted(again.frame()["epoch"].unique()) == [0, 1]
    assert again.frame()["p_gold"].tolist() == pytest.approx([1 / 3] * 4)
    assert again.frame()["id"].tolist() == [0, 1, 0, 1]  # sorted by id within an epoch


def _data_parallel_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, world, port):
        task = TinyTask()
        run = train(task, task.data(), task.pretrain(), {}, rank=rank, world=world, wrap=DistributedDataParallel)
        torch.save({"weights": run.weights(), "frame": run.dynamics.frame()}, os.path.join(out, f"rank{rank}.pt"))


def test_two_data_parallel_workers_train_and_record_what_one_does(task, data, init, tmp_path):
    """Two gloo workers, each on half of every batch of 32, gradients all-reduced: the same weights
    as one worker on the whole batch, and every example recorded once per epoch, gathered from
    both ranks. A trial whose gradients were never all-reduced fails here."""
    single = train(task, data, init, {})
    mp.spawn(_data_parallel_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for k, v in single.weights().items():
        for r in results:
            assert torch.allclose(r["weights"][k], v, atol=1e-5), k
    for r in results:
        assert_once_per_epoch(r["frame"], range(len(data.train)), 3)
        # every rank holds every example's record, the one worker's own to float tolerance
        assert torch.allclose(torch.as_tensor(r["frame"]["p_gold"].to_numpy()),
                              torch.as_tensor(single.dynamics.frame()["p_gold"].to_numpy()), atol=1e-5)
