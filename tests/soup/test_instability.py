"""Instability signals (common/instability.py) and how the fine-tuning loop records them:
RMS_t from real optimizer steps, its 1/(1-beta2) bound, the spike detector, the loss z-score,
spikes under a too-high LR, StableAdamW's damped update, resume and data-parallel workers."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from orchestrator.common.errors import UserError
from orchestrator.common.instability import LossZ, SpikeDetector, optimizer_rms_t, rms_t_bound, tensor_rms_t
from orchestrator.soup.train import FineTune
from tests.helpers import free_port, gloo_group
from tests.soup.test_train import TinyTask, data, init, one_thread, task  # noqa: F401 - the fine-tuning fixtures

# The tiny task at small batches, no mixup: lr 3.0 overshoots (the model turns confident, then
# a batch with a mistake brings a gradient far above the recent ones); lr 0.05 trains smoothly.
BASE = {"weight_decay": 1e-4, "epochs": 5, "batch_size": 8, "label_smoothing": 0.0, "mixup": 0.0, "augment": 0.0,
        "log_every": 1}
TOO_HIGH, SANE = 3.0, 0.05


@pytest.fixture(scope="module")
def optimi():
    """torch-optimi (the `stable` extra; the `test` extra installs it). Imported here, not at the
    top: it takes seconds (it loads torch's compiler), and the data-parallel workers import this file."""
    return pytest.importorskip("optimi")


def fine_tune(task, data, init, **hp) -> tuple[FineTune, list[dict[str, float]]]:
    run = FineTune(task, data, init, {**BASE, **hp})
    signals = []
    while not run.done:
        run.run_epoch()
        signals += run.signals
    return run, signals


def step_with(opt: torch.optim.Optimizer, p: torch.Tensor, grad: torch.Tensor) -> None:
    p.grad = grad.clone()
    opt.step()


# -- RMS_t ------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw-0.95", "adamw-0.999", "stableadamw"])
def test_rms_t_is_one_after_the_first_step(optimizer, request):
    """v_1 = g_1^2, so RMS_1 = 1 on every tensor (gradients well above eps), from the optimizer's own state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    if optimizer == "stableadamw":
        opt = request.getfixturevalue("optimi").StableAdamW(model.parameters(), lr=1e-3, foreach=False)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, float(optimizer.split("-")[1])))
    nn.functional.cross_entropy(model(torch.randn(32, 16)), torch.randint(0, 3, (32,))).backward()
    opt.step()
    rms = tensor_rms_t(opt, model.named_parameters())
    assert set(rms) == {n for n, _ in model.named_parameters()}
    assert rms == {n: pytest.approx(1.0, abs=1e-6) for n in rms}


@pytest.mark.parametrize("beta2", [0.95, 0.98, 0.99, 0.999])
def test_rms_t_bound_holds_and_a_gradient_jump_nearly_reaches_it(beta2):
    bound = rms_t_bound(beta2)
    assert bound == pytest.approx({0.95: 4.47, 0.98: 7.07, 0.99: 10.0, 0.999: 31.6}[beta2], abs=0.05)
    gen = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.zeros(64))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, beta2), weight_decay=0.0)
    # heavy-tailed gradients: RMS_t moves around but never passes the bound
    for _ in range(200):
        step_with(opt, p, torch.randn(64, generator=gen) * torch.exp(3 * torch.randn(64, generator=gen)))
        assert optimizer_rms_t(opt, p).item() <= bound * (1 + 1e-6)
    # a fresh tensor: long enough of small gradients that beta2**t has faded, then one 10^4 times larger
    p = nn.Parameter(torch.zeros(64))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, beta2), weight_decay=0.0)
    for _ in range(int(6 / (1 - beta2))):
        step_with(opt, p, 1e-3 * torch.randn(64, generator=gen).sign())
    calm = optimizer_rms_t(opt, p).item()
    step_with(opt, p, 10.0 * torch.randn(64, generator=gen).sign())
    jump = optimizer_rms_t(opt, p).item()
    assert calm == pytest.approx(1.0, abs=0.01)  # g^2 equal to the second moment's memory of it
    assert 0.99 * bound < jump <= bound * (1 + 1e-6)


# -- the detector and the loss z-score --------------------------------------------------------------


def test_detector_marks_a_planted_spike_and_not_a_smooth_sequence():
    gen = torch.Generator().manual_seed(2)
    noise = (1 + 0.2 * (torch.rand(80, generator=gen) - 0.5)).tolist()
    smooth = [1.2 / math.sqrt(1 + t / 10) * n for t, n in enumerate(noise)]  # decays from 1.2 to ~0.4, +-10%
    det = SpikeDetector(3.0)
    assert not any(det.update(v) for v in smooth)
    planted = [0.4 * n for n in noise]
    planted[50] = 2.0  # 5x the median, above 1
    det = SpikeDetector(3.0)
    assert [t for t, v in enumerate(planted) if det.update(v)] == [50]
    # 5x the median but below 1 (StableAdamW would not touch it): not a spike
    det = SpikeDetector(3.0)
    assert not any(det.update(v) for v in [0.1 * n for n in noise[:40]] + [0.5])
    # too little history to judge: not a spike; `check` tests without adding to the history
    det = SpikeDetector(3.0, min_history=3)
    assert not det.update(0.2) and not det.update(0.2) and not det.check(5.0)
    det.update(0.2)
    assert det.check(5.0) and len(det.history) == 3


def test_loss_z_flags_a_jump_against_the_moving_average():
    gen = torch.Generator().manual_seed(3)
    losses = (1.0 - 0.002 * torch.arange(60) + 0.02 * torch.randn(60, generator=gen)).tolist()  # a slow decline
    tracker = LossZ()
    zs = [tracker.update(v) for v in losses]
    assert zs[:10] == [0.0] * 10  # not enough history yet
    assert max(abs(z) for z in zs) < 4
    assert tracker.update(losses[-1] + 0.3) > 5


# -- the fine-tuning loop ---------------------------------------------------------------------------


def test_too_high_lr_counts_spikes_and_a_sane_lr_does_not(task, data, init):
    for seed in (0, 1, 2):
        high, signals = fine_tune(task, data, init, lr=TOO_HIGH, seed=seed)
        sane, _ = fine_tune(task, data, init, lr=SANE, seed=seed)
        assert high.spikes >= 3 and sane.spikes == 0, seed
        spikes = [s for s in signals if s["spike"]]
        assert len(spikes) == high.spikes
        # a spike is the first layer's RMS_t above 3x its rolling median and above 1
        assert all(s["rms_t_first"] > 1 and s["rms_t_first"] <= s["rms_t_max"] for s in spikes)
        assert all(s["rms_t_max"] <= rms_t_bound(0.999) for s in signals)


def test_signals_every_log_every_steps_plus_spike_steps(task, data, init):
    every = 4
    off_schedule = 0
    for seed in (0, 1, 3):
        run = FineTune(task, data, init, {**BASE, "lr": TOO_HIGH, "log_every": every, "seed": seed})
        assert run.first_layer == ""  # found by the first forward pass
        counted = 0
        while not run.done:
            first_step = run.epoch * run.steps_per_epoch
            run.run_epoch()
            steps = [s["step"] for s in run.signals]
            assert set(run.signals[0]) == {"step", "rms_t_first", "rms_t_max", "grad_norm", "loss_z", "spike"}
            assert steps == sorted(steps) and all(first_step <= t < first_step + run.steps_per_epoch for t in steps)
            scheduled = [t for t in range(first_step, first_step + run.steps_per_epoch) if t % every == 0]
            assert [t for t in steps if t % every == 0] == scheduled
            assert all(s["spike"] == 1.0 for s in run.signals if s["step"] % every)  # off the schedule: a spike
            assert all(math.isfinite(v) and v >= 0 for s in run.signals for v in (s["grad_norm"], s["rms_t_max"]))
            assert all(math.isfinite(s["loss_z"]) for s in run.signals)
            off_schedule += sum(1 for t in steps if t % every)
            counted += sum(int(s["spike"]) for s in run.signals)
        assert run.first_layer == "weight"
        assert run.spikes == counted
    # the gradient-norm watch catches spikes between two records
    assert off_schedule > 0


def test_first_step_record_is_rms_one(task, data, init):
    run = FineTune(task, data, init, {**BASE, "lr": SANE, "epochs": 1})
    run.run_epoch()
    first = run.signals[0]
    assert first["step"] == 0 and first["rms_t_first"] == pytest.approx(1.0, abs=1e-5)
    assert first["rms_t_max"] == pytest.approx(1.0, abs=1e-5) and first["loss_z"] == 0.0


class TokenModel(nn.Module):
    """Parameter order starts with a (1, 1, 8) token, as a ViT's class token; the forward runs `embed` first."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 8))
        self.head = nn.Linear(8, 3)
        self.embed = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(torch.relu(self.embed(x)) + self.token[0])


class TokenTask(TinyTask):
    def build_model(self):
        return TokenModel()

    def pretrain(self, data=None):
        torch.manual_seed(1234)
        return {k: v.detach().clone() for k, v in self.build_model().state_dict().items()}


def test_first_layer_is_the_first_the_forward_pass_runs():
    task = TokenTask()
    run = FineTune(task, task.data(), task.pretrain(), {**BASE, "lr": SANE, "epochs": 1})
    run.run_epoch()
    assert run.first_layer == "embed.weight"
    assert not any(m._forward_hooks for m in run.model.modules())  # the hooks are gone


@pytest.mark.parametrize("optimizer", ["adamw", "stableadamw"])
def test_resume_keeps_the_spike_count_and_the_detectors(task, data, init, tmp_path, optimizer, request):
    if optimizer == "stableadamw":
        request.getfixturevalue("optimi")
    hp = {"lr": TOO_HIGH, "seed": 1, "optimizer": optimizer}
    full, signals = fine_tune(task, data, init, **hp)
    assert full.spikes > 0
    first = FineTune(task, data, init, {**BASE, **hp})
    for _ in range(2):
        first.run_epoch()
    torch.save(first.state(), tmp_path / "state.pt")
    resumed = FineTune(task, data, init, {**BASE, **hp})
    resumed.restore(first.weights(), torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.spikes == first.spikes
    later = []
    while not resumed.done:
        resumed.run_epoch()
        later += resumed.signals
    assert resumed.spikes == full.spikes
    assert later == [s for s in signals if s["step"] >= 2 * full.steps_per_epoch]
    assert all(torch.equal(full.weights()[k], resumed.weights()[k]) for k in full.weights())


def test_stableadamw_divides_the_update_by_rms_t(optimi):
    """Same gradients into AdamW and StableAdamW: equal updates while RMS_t <= 1, then on a
    gradient jump StableAdamW's update is AdamW's / RMS_t, with RMS_t read from either state."""
    gen = torch.Generator().manual_seed(4)
    a, s = nn.Parameter(torch.zeros(32)), nn.Parameter(torch.zeros(32))
    adamw = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    stable = optimi.StableAdamW([s], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, foreach=False)
    grads = [0.01 * torch.randn(32, generator=gen) for _ in range(50)] + [torch.randn(32, generator=gen)]
    for i, g in enumerate(grads):
        before_a, before_s = a.detach().clone(), s.detach().clone()
        step_with(adamw, a, g)
        step_with(stable, s, g)
        rms_a, rms_s = optimizer_rms_t(adamw, a).item(), optimizer_rms_t(stable, s).item()
        assert rms_s == pytest.approx(rms_a, rel=1e-4)
        update_a, update_s = a.detach() - before_a, s.detach() - before_s
        assert torch.allclose(update_s, update_a / max(1.0, rms_a), rtol=1e-3, atol=1e-9), i
    assert rms_a > 5  # the last step was damped: by more than 5x
    assert update_s.norm() < update_a.norm() / 5


def test_stableadamw_fine_tune_does_not_clip(task, data, init, optimi):
    run, signals = fine_tune(task, data, init, lr=TOO_HIGH, seed=0, optimizer="stableadamw")
    assert isinstance(run.opt, optimi.StableAdamW) and run.spikes > 0
    assert max(s["grad_norm"] for s in signals) > 1  # the recorded norm is the gradient's own
    assert all(math.isfinite(v) for s in signals for v in s.values())


@pytest.mark.parametrize("hp, message", [
    ({"optimizer": "sgd"}, "hyperparameters.optimizer: must be one of adamw, stableadamw, got 'sgd'"),
    ({"log_every": 0}, "hyperparameters.log_every: must be an integer >= 1"),
    ({"log_every": 2.5}, "hyperparameters.log_every: must be an integer >= 1"),
    ({"spike_threshold": 1.0}, "hyperparameters.spike_threshold: must be a number > 1"),
])
def test_bad_settings_are_one_line_errors(task, data, init, hp, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")) as e:
        FineTune(task, data, init, {**BASE, **hp})
    assert "\n" not in str(e.value)


def test_stableadamw_without_torch_optimi_names_the_extra(task, data, init, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimi", None)  # `import optimi` raises ImportError
    with pytest.raises(UserError) as e:
        FineTune(task, data, init, {**BASE, "optimizer": "stableadamw"})
    assert str(e.value) == ("hyperparameters.optimizer: stableadamw needs torch-optimi, which is not installed: "
                            "pip install 'orchestrator[stable]'")


# -- data-parallel ---------------------------------------------------------------------------------

DP = {**BASE, "batch_size": 16, "lr": TOO_HIGH, "seed": 0, "epochs": 3}


def _data_parallel_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, world, port):
        task = TinyTask()
        run = FineTune(task, task.data(), task.pretrain(), DP, rank=rank, world=world, wrap=DistributedDataParallel)
        signals = []
        while not run.done:
            run.run_epoch()
            signals += run.signals
        result = {"signals": signals, "spikes": run.spikes, "first": run.first_layer}
        torch.save(result, os.path.join(out, f"{rank}.pt"))


def test_data_parallel_workers_record_what_one_worker_does(task, data, init, tmp_path):
    """Two gloo workers on halves of every batch: gradients all-reduced, so both see the one
    worker's RMS_t and gradient norm, and count the same spikes."""
    single = FineTune(task, data, init, DP)
    signals = []
    while not single.done:
        single.run_epoch()
        signals += single.signals
    mp.spawn(_data_parallel_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["first"] == r1["first"] == "weight"
    assert r0["spikes"] == r1["spikes"]
    for key in ("rms_t_first", "rms_t_max", "grad_norm"):
        assert [s[key] for s in r0["signals"]] == [s[key] for s in r1["signals"]], key
        assert [s[key] for s in r0["signals"]] == pytest.approx([s[key] for s in signals], rel=1e-4), key
    assert [s["step"] for s in r0["signals"]] == [s["step"] for s in signals]
