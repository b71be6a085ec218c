"""The fine-tuning loop of one trial, with no Ray or MLflow in it.

AdamW, linear warmup then cosine decay, label smoothing, mixup and the task's
augmentation, gradient clipping at 1.0 (the model soups recipe). Randomness is
derived from (seed, epoch), so a trial resumed at an epoch boundary replays the
same batches it would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.tasks.base import StateDict, Task, TaskData

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
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict_logits(task: Task, model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([task.logits(model, xb.to(dev)).float().cpu() for xb in x.split(batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def summarize(acc: dict[str, float], data: TaskData) -> dict[str, float]:
    """acc_<set> for every set, plus the conventional val_acc, id_acc and ood_acc (OOD mean)."""
    metrics = {f"acc_{name}": a for name, a in acc.items()}
    if data.val in acc:
        metrics["val_acc"] = acc[data.val]
    if data.id_test in acc:
        metrics["id_acc"] = acc[data.id_test]
    if data.ood and all(o in acc for o in data.ood):
        metrics["ood_acc"] = float(np.mean([acc[o] for o in data.ood]))
    return metrics


def evaluate(task: Task, model: torch.nn.Module, data: TaskData, sets: list[str] | None = None) -> dict[str, float]:
    names = sets or list(data.evals)
    acc = {n: accuracy(predict_logits(task, model, data.evals[n][0]), data.evals[n][1]) for n in names}
    return summarize(acc, data)


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
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self):
        self.hp = {**HPARAMS, **self.hp}
        torch.manual_seed(self.hp["seed"])
        self.model = load_into(self.task.build_model().to(device()), self.init)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])
        self.steps_per_epoch = math.ceil(len(self.data.train[1]) / self.hp["batch_size"])
        self.total_steps = self.hp["epochs"] * self.steps_per_epoch

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
        gen = torch.Generator().manual_seed(hp["seed"] * 1009 + self.epoch)
        rng = np.random.default_rng([hp["seed"], self.epoch])
        x_all, y_all = self.data.train
        self.model.train()
        total, count = 0.0, 0
        for i, idx in enumerate(torch.randperm(len(y_all), generator=gen).split(hp["batch_size"])):
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.epoch * self.steps_per_epoch + i)
            x = self.task.augment(x_all[idx], hp["augment"], gen).to(dev)
            y = y_all[idx].to(dev)
            lam, perm = 1.0, None
            if hp["mixup"] > 0:
                lam = float(rng.beta(hp["mixup"], hp["mixup"]))
                perm = torch.randperm(len(idx), generator=gen).to(dev)
                x = lam * x + (1 - lam) * x[perm]
            logits = self.task.logits(self.model, x)
            loss = lam * F.cross_entropy(logits, y, label_smoothing=hp["label_smoothing"])
            if perm is not None:
                loss = loss + (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=hp["label_smoothing"])
            if not torch.isfinite(loss):
                return float("nan")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        self.epoch += 1
        return total / count

    def weights(self) -> StateDict:
        return cpu_state(self.model)

    def state(self) -> dict[str, Any]:
        """Optimizer state and progress; plain tensors and numbers, loadable with weights_only=True."""
        return {"optimizer": self.opt.state_dict(), "epoch": self.epoch, "history": self.history}

    def restore(self, weights: StateDict, state: dict[str, Any]) -> None:
        load_into(self.model, weights)
        self.opt.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
