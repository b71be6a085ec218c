"""The task interface: what a sweep needs to know about a model and its data.

A task bundles the model architecture, the pretrained weights every trial starts
from, the fine-tuning data, the evaluation sets and how to read task logits off
the model. Trials, soups and analyses only talk to this interface, so a new task
(a Hugging Face encoder, a timm image model, a proxy LM) plugs into the same sweep.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from orchestrator.common.weights import StateDict, digest


Inputs = Union[torch.Tensor, dict[str, torch.Tensor]]  # a batch: one tensor, or named tensors (token ids, masks)


def take(x: Inputs, idx) -> Inputs:
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def to_device(x: Inputs, dev: torch.device) -> Inputs:
    move = lambda t: t.to(dev, non_blocking=True)  # noqa: E731 - non-blocking pays off with pinned memory
    return {k: move(v) for k, v in x.items()} if isinstance(x, dict) else move(x)


class Examples(Dataset):
    """Labelled examples: a map-style torch Dataset of (input, label) with every label in `labels`."""

    labels: torch.Tensor


class TensorExamples(Examples):
    """Examples held in memory as tensors; a DataLoader fetches a whole batch with one index."""

    def __init__(self, inputs: Inputs, labels: torch.Tensor):
        self.inputs, self.labels = inputs, torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return take(self.inputs, i), self.labels[i]

    def __getitems__(self, idx: list[int]):  # DataLoader calls this with a batch of indices
        idx = torch.as_tensor(idx)
        return take(self.inputs, idx), self.labels[idx]

    @staticmethod
    def collate(batch):
        return batch  # already a batch


@dataclass
class TaskData:
    """A task's examples. `evals` maps eval-set name -> Examples; (inputs, labels) tuples are
    wrapped in TensorExamples."""

    train: Examples
    evals: dict[str, Examples]
    val: str = "val"  # held-out set used only for soup selection
    id_test: str = "id_test"
    ood: list[str] = field(default_factory=list)
    # the OOD sets that are synthetic corruptions of the ID test set (noise, rotation, blur),
    # which fine-tuning itself tends to fix; every other OOD set is a natural shift
    corruptions: list[str] = field(default_factory=list)

    @property
    def natural(self) -> list[str]:
        return [n for n in self.ood if n not in self.corruptions]

    def __post_init__(self):
        wrap = lambda e: TensorExamples(*e) if isinstance(e, tuple) else e  # noqa: E731
        self.train = wrap(self.train)
        self.evals = {name: wrap(e) for name, e in self.evals.items()}


class Task(ABC):
    """One fine-tuning problem. Subclasses set `name` and `defaults` (the settings schema)."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]

    def __init__(self, settings: dict[str, Any] | None = None):
        self.settings = {**self.defaults, **(settings or {})}

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model of the task's architecture."""

    @abstractmethod
    def pretrain(self, data: TaskData) -> StateDict:
        """The shared starting weights every trial begins from: pretrained weights with the
        task's head (expensive; the pool caches them by `pretrain_key`)."""

    @abstractmethod
    def data(self) -> TaskData:
        """Fine-tuning data and every eval set, deterministic given the settings."""

    def logits(self, model: nn.Module, x: Inputs) -> torch.Tensor:
        """Logits over the task's labels (a task may read a slice of a wider head)."""
        return model(x)

    def augment(self, x: Inputs, strength: float, gen: torch.Generator) -> Inputs:
        """Random augmentation of a training batch, of the given strength (0 = none)."""
        return x

    def train_examples(self, train: Examples, hp: dict[str, Any]) -> Examples:
        """The training examples as a trial with hyperparameters `hp` sees them (a task with
        per-example augmentation, such as RandAugment on images, returns a transformed view)."""
        return train

    supports_mixup: ClassVar[bool] = True  # mixing inputs needs continuous inputs (not token ids)

    @property
    def num_workers(self) -> int:
        """DataLoader worker processes (tasks that decode files per example set this)."""
        return int(self.settings.get("num_workers", 0))

    def model_settings(self) -> dict[str, Any]:
        """Settings that rebuild this task's model anywhere (in a trial, in a logged MLflow model)."""
        return self.settings

    def serve_inputs(self, model_input: Any) -> Inputs:
        """Raw inputs of the logged MLflow model (arrays, texts, images) -> a model batch."""
        raise NotImplementedError(f"task {self.name} cannot serve raw inputs")

    pretrain_settings: ClassVar[tuple[str, ...]] = ()
    split_settings: ClassVar[tuple[str, ...]] = ()  # settings that define the training data and held-out split

    def data_key(self) -> str:
        """Hash of what defines the training data and the held-out split. Trials of another key
        trained on other data or are ranked on another held-out set: they never share a soup."""
        return digest(self.name, {k: self.settings[k] for k in self.split_settings})

    def pretrained_id(self) -> str:
        """The pool id of this task's pretrained weights (cached per pretraining settings)."""
        return f"pretrained-{self.name}-{self.pretrain_key()}"

    def pretrain_key(self) -> str:
        """Hash of everything that determines the pretrained weights."""
        keyed = {k: self.settings[k] for k in self.pretrain_settings}
        blob = json.dumps({"task": self.name, **keyed}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
