"""The fine-tuning loop of one trial, with no Ray or MLflow in it.

AdamW, linear warmup then cosine decay, label smoothing, mixup and the task's
augmentation, gradient clipping at 1.0 (the model soups recipe); or StableAdamW
(torch-optimi), which damps each tensor's update by max(1, RMS_t) in place of clipping.
Randomness is derived from (seed, epoch), so a trial resumed at an epoch boundary
replays the same batches it would have seen.

Instability signals (Wortsman et al., 2023; the math in common/instability.py): every
`log_every` steps the loop records the first layer's RMS_t, the largest RMS_t of any
tensor, the gradient norm before clipping and the loss z-score (`signals`, per epoch), and
counts update spikes: the first layer's RMS_t above `spike_threshold` x the median of its
last 20 records, and above 1 (`spikes`, over the whole trial). A step whose gradient norm
jumps above GRAD_JUMP x the median of the last 50 steps' is checked too (and recorded if it
is a spike), so a spike between two records is not missed. The per-step cost is one read of
the gradient norm that clipping computes anyway.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, default_collate

from orchestrator.common.errors import UserError
from orchestrator.common.instability import LossZ, SpikeDetector, tensor_rms_t
from orchestrator.soup.dynamics.record import Recorder
from orchestrator.soup.tasks.base import Examples, StateDict, Task, TaskData, example_ids, to_device

# Every hyperparameter a trial understands, with its default. The search space may
# sample any of them; an unknown name in a config is an error.
HPARAMS: dict[str, Any] = {
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "epochs": 4,
    "batch_size": 32,
    "label_smoothing": 0.0,
    "augment": 0.0,  # task-defined augmentation strength, 0 = none
    "mixup": 0.0,  # Beta(alpha, alpha) mixing; 0 = off
    "warmup_frac": 0.1,
    "seed": 0,
    "optimizer": "adamw",  # or "stableadamw" (torch-optimi: pip install 'orchestrator[stable]')
    "log_every": 10,  # steps between instability-signal records
    "spike_threshold": 3.0,  # update spike: first-layer RMS_t above this x its rolling median (and > 1)
}
OPTIMIZERS = ("adamw", "stableadamw")
STABLE_INSTALL = "pip install 'orchestrator[stable]'"  # the extra that brings torch-optimi
GRAD_JUMP = 2.0  # a step whose gradient norm is above this x its rolling median gets its RMS_t checked


PRECISIONS = ("auto", "fp32", "bf16")
BN_BATCH_SIZE = 64  # examples per batch when BatchNorm statistics of a soup are re-estimated


def hparam_problem(name: str, value: Any) -> str | None:
    """What is wrong with a hyperparameter's value beyond its type, or None. For `optimizer`,
    `log_every` and `spike_threshold` (the others have no rule here)."""
    if name == "optimizer":
        if value not in OPTIMIZERS:
            return f"must be one of {', '.join(OPTIMIZERS)}, got {value!r}"
        if value == "stableadamw" and _optimi() is None:
            return f"stableadamw needs torch-optimi, which is not installed: {STABLE_INSTALL}"
    elif name == "log_every":
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            return f"must be an integer >= 1 (steps), got {value!r}"
    elif name == "spike_threshold":
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 1 < value < math.inf:
            return f"must be a number > 1 (x the rolling median of RMS_t), got {value!r}"
    return None


def _optimi():
    try:
        import optimi
    except ImportError:
        return None
    return optimi


def make_optimizer(model: torch.nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW, or StableAdamW with AdamW's betas (0.9, 0.999) and eps (1e-8), so the update
    clipping is the only difference. foreach=False: optimi's foreach path reuses the gradients
    as scratch space, and RMS_t is read from them after the step."""
    if hp["optimizer"] == "stableadamw":
        return _optimi().StableAdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"],
                                     betas=(0.9, 0.999), eps=1e-8, foreach=False)
    return torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(precision: str = "auto"):
    """bf16 autocast where asked for, or ("auto") on a GPU that supports it; fp32 otherwise."""
    dev = device()
    bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)


def loader(examples: Examples, batches: list[torch.Tensor], workers: int = 0,
           gen: torch.Generator | None = None) -> DataLoader:
    """Batches of `examples` in the given index order; pinned memory when feeding a GPU."""
    return DataLoader(examples, batch_sampler=[b.tolist() for b in batches], num_workers=workers,
                      collate_fn=getattr(examples, "collate", default_collate), generator=gen,
                      pin_memory=device().type == "cuda")


def in_order(examples: Examples, batch_size: int) -> list[torch.Tensor]:
    return list(torch.arange(len(examples)).split(batch_size))


@torch.no_grad()
def predict_logits(task: Task, model: torch.nn.Module, examples: Examples, batch_size: int = 256,
                   precision: str = "auto") -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    out = []
    with autocast(precision):
        for x, _ in loader(examples, in_order(examples, batch_size), task.num_workers):
            out.append(task.logits(model, to_device(x, dev)).float().cpu())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


# The summary columns beyond acc_<set>: name -> which eval sets it averages.
def metric_sets(data: TaskData) -> dict[str, list[str]]:
    """val_acc, id_acc, ood_acc (the OOD mean), natural_acc (the natural shifts' mean) and
    corrupt_acc (the synthetic corruptions' mean), each as the eval sets it averages."""
    groups = {"val_acc": [data.val], "id_acc": [data.id_test], "ood_acc": data.ood,
              "natural_acc": data.natural, "corrupt_acc": data.corruptions}
    return {name: sets for name, sets in groups.items() if sets}


def summarize(acc: dict[str, float], data: TaskData) -> dict[str, float]:
    """acc_<set> for every set, plus the conventional val_acc, id_acc and ood_acc (OOD mean),
    and natural_acc / corrupt_acc when the task has natural shifts / corruptions."""
    metrics = {f"acc_{name}": a for name, a in acc.items()}
    for name, sets in metric_sets(data).items():
        if all(s in acc for s in sets):
            metrics[name] = float(np.mean([acc[s] for s in sets])) if len(sets) > 1 else acc[sets[0]]
    if not data.ood and data.id_test in acc:
        metrics["ood_acc"] = float("nan")  # no OOD set given: tables and plots show a gap
    return metrics


def evaluate(task: Task, model: torch.nn.Module, data: TaskData, sets: list[str] | None = None,
             precision: str = "auto") -> dict[str, float]:
    names = sets or list(data.evals)
    acc = {n: accuracy(predict_logits(task, model, data.evals[n], precision=precision), data.evals[n].labels)
           for n in names}
    return summarize(acc, data)


def batchnorm_buffers(model: torch.nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm running statistic (empty: the model has no BatchNorm)."""
    return [f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, _BatchNorm)
            for b, v in m.named_buffers(recurse=False) if v is not None]


@torch.no_grad()
def recompute_batchnorm(task: Task, model: torch.nn.Module, examples: Examples, batches: int = 8,
                        precision: str = "auto") -> None:
    """Averaged weights do not come with matching BatchNorm statistics: reset them and take
    the plain average over a few training batches (momentum=None), then back to eval mode."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    dev = next(model.parameters()).device
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))
    with autocast(precision):
        for x, _ in loader(examples, list(order.split(BN_BATCH_SIZE))[:batches], task.num_workers):
            task.logits(model, to_device(x, dev))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


@contextlib.contextmanager
def frozen_batchnorm(model: torch.nn.Module):
    """BatchNorm layers still normalise with batch statistics but leave their running ones as they were."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def load_into(model: torch.nn.Module, state: StateDict) -> torch.nn.Module:
    dev = next(model.parameters()).device
    model.load_state_dict({k: v.to(dev) for k, v in state.items()})
    return model


def cpu_state(model: torch.nn.Module) -> StateDict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


@dataclass
class FineTune:
    """One fine-tuning run; call `run_epoch` until `done`. Checkpoint with `state()`."""

    task: Task
    data: TaskData
    init: StateDict
    hp: dict[str, Any]
    precision: str = "auto"
    rank: int = 0  # data-parallel: this worker trains on rows rank::world of every batch
    world: int = 1
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None  # e.g. DistributedDataParallel
    record_dynamics: bool = True  # p(gold) and correctness of every training example, per epoch
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self):
        self.hp = {**HPARAMS, **self.hp}
        for name in ("optimizer", "log_every", "spike_threshold"):
            problem = hparam_problem(name, self.hp[name])
            if problem:
                raise UserError(f"hyperparameters.{name}: {problem}")
        torch.manual_seed(self.hp["seed"])
        self.model = load_into(self.task.build_model().to(device()), self.init)
        self.forward = self.wrap(self.model) if self.wrap else self.model
        self.opt = make_optimizer(self.model, self.hp)
        # instability signals: this epoch's records, the trial's spike count, and the detectors
        self.signals: list[dict[str, float]] = []
        self.spikes = 0
        self._rms_spikes = SpikeDetector(self.hp["spike_threshold"], window=20, min_history=3, floor=1.0)
        self._grad_jumps = SpikeDetector(GRAD_JUMP, window=50, min_history=10, floor=0.0)
        self._loss_z = LossZ()
        self._named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.first_layer = ""  # its parameter's name, found by the first forward pass (_watch_first_layer)
        self._watch_first_layer()
        self.steps_per_epoch = math.ceil(len(self.data.train) / self.hp["batch_size"])
        self.total_steps = self.hp["epochs"] * self.steps_per_epoch
        self.dynamics = Recorder() if self.record_dynamics else None
        self.ids = example_ids(self.data.train)  # stable example ids (subsets keep the full set's)

    @property
    def done(self) -> bool:
        return self.epoch >= self.hp["epochs"]

    def lr_at(self, step: int) -> float:
        warmup = max(1, int(self.hp["warmup_frac"] * self.total_steps))
        if step < warmup:
            return self.hp["lr"] * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return self.hp["lr"] * 0.5 * (1 + math.cos(math.pi * progress))

    def run_epoch(self) -> float:
        """Train one epoch; returns the mean training loss (NaN/inf if the run diverged)."""
        hp, dev = self.hp, device()
        seed = hp["seed"] * 1009 + self.epoch
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # per-example augmentations in this process draw from the global RNG
        rng = np.random.default_rng([hp["seed"], self.epoch])
        train = self.task.train_examples(self.data.train, hp)
        order = torch.randperm(len(train), generator=gen)  # the same on every data-parallel worker
        # every worker needs a share of every batch: a last batch smaller than the world is dropped
        batches = [b[self.rank::self.world] for b in order.split(hp["batch_size"]) if len(b) >= self.world]
        self.forward.train()
        self.signals = []
        total, count = 0.0, 0
        workers_seed = torch.Generator().manual_seed(seed + 1)  # its own: a draw from `gen` would shift augmentation
        for i, (batch, (x, y)) in enumerate(zip(batches, loader(train, batches, self.task.num_workers, workers_seed))):
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.epoch * self.steps_per_epoch + i)
            x = to_device(self.task.augment(x, hp["augment"], gen), dev)
            y = y.to(dev, non_blocking=True)
            lam, perm = 1.0, None
            if hp["mixup"] > 0:
                lam = float(rng.beta(hp["mixup"], hp["mixup"]))
                perm = torch.randperm(len(y), generator=gen).to(dev)
                if self.dynamics:  # the unmixed examples' own probabilities, not the mixed input's
                    self.dynamics.add(self.ids[batch], self._unmixed_logits(x), y)
                x = lam * x + (1 - lam) * x[perm]
            with autocast(self.precision):
                logits = self.task.logits(self.forward, x).float()
            if self.dynamics and perm is None:
                self.dynamics.add(self.ids[batch], logits, y)
            loss = lam * F.cross_entropy(logits, y, label_smoothing=hp["label_smoothing"])
            if perm is not None:
                loss = loss + (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=hp["label_smoothing"])
            if not self._all_finite(loss):
                return float("nan")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = self._grad_norm()
            self.opt.step()
            value = loss.item()
            total, count = total + value * len(y), count + len(y)
            self._signals(self.epoch * self.steps_per_epoch + i, value, grad_norm)
        if self.dynamics:
            self.dynamics.end_epoch(self.epoch, self.world)
        self.epoch += 1
        return total / count

    def _grad_norm(self) -> torch.Tensor:
        """The gradient norm before clipping; AdamW's gradients are clipped at 1.0, StableAdamW's
        are not (its update clipping replaces it)."""
        if self.hp["optimizer"] == "stableadamw":
            return torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)

    def _signals(self, step: int, loss: float, grad_norm: torch.Tensor) -> None:
        """After the optimizer step (the gradients and the new second moments are still there):
        the loss z-score and the gradient-norm watch every step; RMS_t of every tensor every
        `log_every` steps and on a gradient-norm jump. Every worker of a data-parallel trial
        sees the same gradients and optimizer state, so they count the same spikes; `loss_z`
        is each worker's own loss (its share of the batch)."""
        norm = grad_norm.item()
        loss_z = self._loss_z.update(loss)
        jump = self._grad_jumps.update(norm)
        scheduled = step % self.hp["log_every"] == 0
        if not (scheduled or jump):
            return
        rms = tensor_rms_t(self.opt, self._named)
        if not rms:
            return
        if not self.first_layer:  # no forward hook fired: the first >= 2-D tensor in parameter order
            self.first_layer = next((n for n, p in self._named if p.ndim >= 2), self._named[0][0])
        first = rms.get(self.first_layer, float("nan"))  # NaN: it had no gradient this step
        spike = self._rms_spikes.update(first) if scheduled else self._rms_spikes.check(first)
        self.spikes += int(spike)
        if scheduled or spike:
            self.signals.append({"step": step, "rms_t_first": first, "rms_t_max": max(rms.values()),
                                 "grad_norm": norm, "loss_z": loss_z, "spike": float(spike)})

    def _watch_first_layer(self) -> None:
        """The first layer: the first module holding a >= 2-D parameter whose forward pass
        finishes first (the patch or token embedding, a CNN's first convolution). Not
        `model.parameters()` order, which starts with a ViT's class token, nor the first forward
        to start, which is the whole model's. Forward hooks note it once, then go."""
        hooks = []

        def noted(name: str):
            def hook(module, args, output):
                if not self.first_layer:
                    self.first_layer = name
                for h in hooks:
                    h.remove()
            return hook

        for prefix, module in self.model.named_modules():
            own = [n for n, p in module.named_parameters(recurse=False) if p.ndim >= 2 and p.requires_grad]
            if own:
                hooks.append(module.register_forward_hook(noted(f"{prefix}.{own[0]}" if prefix else own[0])))

    @torch.no_grad()
    def _unmixed_logits(self, x) -> torch.Tensor:
        """With mixup the training forward pass sees mixed inputs, so recording dynamics costs one
        more forward pass: still in train mode, but on the side (the global RNG that dropout draws
        from and BatchNorm's running statistics are left as they were), so training is unchanged."""
        devices = [torch.cuda.current_device()] if device().type == "cuda" else []
        with torch.random.fork_rng(devices=devices), frozen_batchnorm(self.model), autocast(self.precision):
            return self.task.logits(self.model, x).float()

    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if self.world > 1:  # every worker must stop together, or the others wait forever in all-reduce
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def weights(self) -> StateDict:
        return cpu_state(self.model)

    def state(self) -> dict[str, Any]:
        """Optimizer state and progress; plain tensors and numbers, loadable with weights_only=True."""
        return {"optimizer": self.opt.state_dict(), "epoch": self.epoch, "history": self.history,
                "instability": {"spikes": self.spikes, "rms_t_first": self._rms_spikes.state(),
                                "grad_norm": self._grad_jumps.state(), "loss_z": self._loss_z.state()},
                **({"dynamics": self.dynamics.state()} if self.dynamics else {})}

    def restore(self, weights: StateDict, state: dict[str, Any]) -> None:
        load_into(self.model, weights)
        self.opt.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        if "instability" in state:  # a checkpoint of an older version has none
            signals = state["instability"]
            self.spikes = int(signals["spikes"])
            self._rms_spikes.restore(signals["rms_t_first"])
            self._grad_jumps.restore(signals["grad_norm"])
            self._loss_z.restore(signals["loss_z"])
        if self.dynamics and "dynamics" in state:  # a checkpoint of an older version has none
            self.dynamics.restore(state["dynamics"], self.epoch)
