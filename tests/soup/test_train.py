"""The fine-tuning loop on a tiny synthetic task: epochs, determinism, resume, divergence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.soup.tasks.base import Task, TaskData
from orchestrator.soup.train import HPARAMS, FineTune, evaluate, summarize


class TinyTask(Task):
    """8-dim Gaussian inputs, 3 classes from a fixed linear teacher, a single nn.Linear."""

    name = "tiny"
    defaults = {"n_train": 192, "seed": 0, "inf_inputs": False}

    def build_model(self) -> nn.Module:
        return nn.Linear(8, 3)

    def pretrain(self, data=None):
        torch.manual_seed(1234)
        return {k: v.detach().clone() for k, v in self.build_model().state_dict().items()}

    def augment(self, x, strength, gen):
        return x if strength <= 0 else x + torch.randn(x.shape, generator=gen) * 0.1 * strength

    def data(self) -> TaskData:
        g = torch.Generator().manual_seed(self.settings["seed"])
        teacher = torch.randn(8, 3, generator=g)

        def split(n, shift=0.0, scale=1.0):
            x = torch.randn(n, 8, generator=g) * scale + shift
            return x, (x @ teacher).argmax(1)

        x_train, y_train = split(self.settings["n_train"])
        if self.settings["inf_inputs"]:
            x_train[::7] = float("inf")
        return TaskData(
            train=(x_train, y_train),
            evals={"val": split(64), "id_test": split(64), "ood_shift": split(64, shift=1.5),
                   "ood_scale": split(64, scale=3.0)},
            ood=["ood_shift", "ood_scale"],
        )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model: intra-op threads only add synchronisation cost (seconds on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    return TinyTask()


@pytest.fixture(scope="module")
def data(task):
    return task.data()


@pytest.fixture(scope="module")
def init(task):
    return task.pretrain()


HP = {"lr": 0.05, "weight_decay": 1e-4, "epochs": 4, "batch_size": 32, "label_smoothing": 0.1,
      "mixup": 0.2, "augment": 0.5, "seed": 3}


def full_loss(task, model, data) -> float:
    with torch.no_grad():
        x, y = data.train.inputs, data.train.labels
        return F.cross_entropy(task.logits(model, x), y).item()


def train_to_end(run: FineTune) -> list[float]:
    losses = []
    while not run.done:
        losses.append(run.run_epoch())
    return losses


def test_trains_the_configured_epochs_and_lowers_loss(task, data, init):
    run = FineTune(task, data, init, {**HP, "mixup": 0.0, "label_smoothing": 0.0, "augment": 0.0})
    assert run.hp["warmup_frac"] == HPARAMS["warmup_frac"]  # defaults fill in what hp leaves out
    assert run.steps_per_epoch == math.ceil(192 / 32) and run.total_steps == 4 * run.steps_per_epoch
    before = full_loss(task, run.model, data)
    acc_before = evaluate(task, run.model, data)["val_acc"]
    losses = train_to_end(run)
    assert len(losses) == HP["epochs"] and run.epoch == HP["epochs"] and run.done
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    after = full_loss(task, run.model, data)
    assert after < 0.8 * before
    assert evaluate(task, run.model, data)["val_acc"] > acc_before
    # the initial weights given to FineTune are not modified in place
    assert all(torch.equal(init[k], TinyTask().pretrain()[k]) for k in init)


def test_run_epoch_loss_is_the_mean_training_loss(task, data, init):
    """With lr=0 nothing moves, so the epoch loss equals the full-batch loss."""
    run = FineTune(task, data, init, {**HP, "lr": 0.0, "mixup": 0.0, "label_smoothing": 0.0, "augment": 0.0,
                                      "weight_decay": 0.0, "epochs": 1})
    assert run.run_epoch() == pytest.approx(full_loss(task, run.model, data), rel=1e-5)


def test_same_seed_gives_bitwise_identical_weights(task, data, init):
    a = FineTune(task, data, init, HP)
    b = FineTune(task, data, init, HP)
    la, lb = train_to_end(a), train_to_end(b)
    assert la == lb
    wa, wb = a.weights(), b.weights()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # and the seed matters: another seed lands elsewhere
    c = FineTune(task, data, init, {**HP, "seed": 4})
    train_to_end(c)
    assert not torch.equal(c.weights()["weight"], wa["weight"])


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_resume_at_epoch_boundary_matches_uninterrupted_run(task, data, init, tmp_path, stop_after):
    full = FineTune(task, data, init, HP)
    train_to_end(full)

    first = FineTune(task, data, init, HP)
    for _ in range(stop_after):
        loss = first.run_epoch()
        first.history.append({"epoch": first.epoch, "train_loss": loss})
    saved_weights = {k: v.clone() for k, v in first.weights().items()}
    torch.save(first.state(), tmp_path / "train_state.pt")
    del first

    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    resumed = FineTune(task, data, init, HP)
    resumed.restore(saved_weights, state)
    assert resumed.epoch == stop_after
    assert [h["epoch"] for h in resumed.history] == list(range(1, stop_after + 1))
    train_to_end(resumed)
    assert resumed.epoch == HP["epochs"]
    wf, wr = full.weights(), resumed.weights()
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_resume_needs_the_optimizer_state(task, data, init):
    """Control for the resume test: restoring weights alone (fresh AdamW moments) does not match."""
    full = FineTune(task, data, init, HP)
    train_to_end(full)
    first = FineTune(task, data, init, HP)
    first.run_epoch()
    resumed = FineTune(task, data, init, HP)
    resumed.restore(first.weights(), {"optimizer": resumed.opt.state_dict(), "epoch": 1})
    train_to_end(resumed)
    assert not torch.equal(full.weights()["weight"], resumed.weights()["weight"])


def test_absurd_lr_gives_a_non_finite_loss(task, data, init):
    run = FineTune(task, data, init, {**HP, "lr": 1e30, "epochs": 2})
    losses = [run.run_epoch() for _ in range(2)]
    assert not all(math.isfinite(v) for v in losses)
    assert run.epoch < 2  # a diverged epoch is not counted as done


def test_inf_inputs_give_a_non_finite_loss(init):
    task = TinyTask({"inf_inputs": True})
    run = FineTune(task, task.data(), init, {**HP, "augment": 0.0, "mixup": 0.0})
    loss = run.run_epoch()
    assert not math.isfinite(loss)
    assert run.epoch == 0
    # the weights were not updated from the poisoned batch
    assert all(torch.isfinite(v).all() for v in run.weights().values())


def test_lr_schedule_warms_up_then_decays(task, data, init):
    run = FineTune(task, data, init, {**HP, "epochs": 10, "warmup_frac": 0.1})
    warmup = int(0.1 * run.total_steps)
    lrs = [run.lr_at(s) for s in range(run.total_steps)]
    assert lrs[0] == pytest.approx(HP["lr"] / warmup)
    assert max(lrs) == pytest.approx(HP["lr"])
    assert all(x < y for x, y in zip(lrs[:warmup - 1], lrs[1:warmup]))
    assert all(x >= y for x, y in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert lrs[-1] < 0.01 * HP["lr"]


def test_summarize_computes_ood_mean(data):
    acc = {"val": 0.5, "id_test": 0.8, "ood_shift": 0.2, "ood_scale": 0.7}
    m = summarize(acc, data)
    assert m["val_acc"] == 0.5
    assert m["id_acc"] == 0.8
    assert m["ood_acc"] == pytest.approx(0.45)
    assert {k for k in m if k.startswith("acc_")} == {f"acc_{k}" for k in acc}
    assert m["acc_ood_scale"] == 0.7
    # without every OOD set there is no OOD mean
    partial = summarize({"val": 0.5, "ood_shift": 0.2}, data)
    assert "ood_acc" not in partial and "id_acc" not in partial
    assert partial["val_acc"] == 0.5
    # a task with no OOD set at all: the OOD mean is NaN, a gap in tables and plots
    no_ood = TaskData(train=data.train, evals={"val": data.evals["val"], "id_test": data.evals["id_test"]})
    assert math.isnan(summarize({"val": 0.5, "id_test": 0.8}, no_ood)["ood_acc"])


def test_evaluate_reports_every_set(task, data, init):
    run = FineTune(task, data, init, HP)
    run.run_epoch()
    m = evaluate(task, run.model, data)
    assert set(m) >= {"acc_val", "acc_id_test", "acc_ood_shift", "acc_ood_scale", "val_acc", "id_acc", "ood_acc"}
    assert m["ood_acc"] == pytest.approx((m["acc_ood_shift"] + m["acc_ood_scale"]) / 2)
    assert all(0.0 <= v <= 1.0 for v in m.values())
