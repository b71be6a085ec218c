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
from torch.utils.data import Dataset, default_collate

from orchestrator.common.errors import ConfigError
from orchestrator.common.weights import StateDict, digest


# Settings every task has: flip this fraction of the training labels (seeded), to measure
# how well training dynamics find label errors
COMMON_DEFAULTS: dict[str, Any] = {"label_noise": 0.0, "label_noise_seed": 0}

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


class View(Examples):
    """Some examples of another Examples, in a given order, with labels of their own: a training
    subset chosen by another sweep's dynamics (FTFT), or training labels with noise injected.
    `ids` are the examples' positions in the base set, the stable ids dynamics are keyed by."""

    def __init__(self, base: Examples, ids: torch.Tensor, labels: torch.Tensor | None = None):
        ids = torch.as_tensor(ids, dtype=torch.long)
        labels = base.labels[ids] if labels is None else torch.as_tensor(labels)  # the view's own labels
        if isinstance(base, View):  # a view of a view: index the original directly
            base, ids = base.base, base.ids[ids]
        self.base, self.ids, self.labels = base, ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return self.base[int(self.ids[i])][0], self.labels[i]

    def __getitems__(self, idx: list[int]):
        if hasattr(self.base, "__getitems__"):  # the base fetches whole batches (e.g. TensorExamples)
            x, _ = self.base.__getitems__(self.ids[torch.as_tensor(idx)].tolist())
            return x, self.labels[torch.as_tensor(idx)]
        return [self[i] for i in idx]

    @property
    def collate(self):
        return getattr(self.base, "collate", default_collate)

    def with_transform(self, transform) -> "View":  # tasks that transform per example (timm_image)
        return View(self.base.with_transform(transform), self.ids, self.labels)


def original(examples: Examples) -> Examples:
    """The task's own training set behind a view: every example, the labels as the data has them."""
    return examples.base if isinstance(examples, View) else examples


def example_ids(examples: Examples) -> torch.Tensor:
    """Each example's stable id: its position in the task's training set as `Task.data()` made it."""
    return examples.ids if isinstance(examples, View) else torch.arange(len(examples))


def flip_labels(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels with `round(fraction * n)` of them flipped to another class (uniform over the classes
    present), seeded; returns (new labels, bool mask of the flipped ones)."""
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    n_flip = round(fraction * len(labels))
    flip = torch.randperm(len(labels), generator=gen)[:n_flip]
    position = torch.searchsorted(classes, labels[flip])
    shift = torch.randint(1, len(classes), (n_flip,), generator=gen)  # never the class it had
    new = labels.clone()
    new[flip] = classes[(position + shift) % len(classes)]
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[flip] = True
    return new, mask


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
    # training examples whose label was flipped on purpose (task.label_noise), by example id
    flipped: torch.Tensor | None = None

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
        self.settings = {**self.all_defaults(), **(settings or {})}

    @classmethod
    def all_defaults(cls) -> dict[str, Any]:
        """The task's settings with their defaults, the ones every task has included."""
        return {**COMMON_DEFAULTS, **cls.defaults}

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

    def training_data(self) -> TaskData:
        """`data()` as trials train on it: with `label_noise` of the training labels flipped
        (seeded; `TaskData.flipped` says which), for label-error triage experiments."""
        data = self.data()
        fraction = self.settings["label_noise"]
        if fraction > 0:
            if len(data.train.labels.unique()) < 2:
                raise ConfigError("task.label_noise: the training data has one class, so no label can be flipped")
            labels, data.flipped = flip_labels(data.train.labels, fraction, self.settings["label_noise_seed"])
            data.train = View(data.train, torch.arange(len(labels)), labels)
        return data

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

    def example_view(self, examples: Examples, index: int) -> str | torch.Tensor:
        """How a person sees one example (data maps list the hardest): an image as an HxW or HxWxC
        tensor scaled to [0, 1], or a text."""
        x, _ = examples[index]
        if isinstance(x, torch.Tensor) and x.ndim == 3:  # channels x height x width
            x = x.float()
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
            return x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)
        return str(x)

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

    # --- what a logged MLflow model of this task carries (soup/publish.py) -----------------
    def serve_example(self) -> Any:
        """A few raw inputs as a client sends them (what `serve_inputs` takes): MLflow stores them
        as the model's input example, and the model's signature is inferred from them."""
        raise NotImplementedError(f"task {self.name} has no serving input example")

    def serve_requirements(self) -> list[str]:
        """Packages (distribution names) the logged model imports when it loads, beyond torch,
        safetensors, numpy and mlflow; publish pins their installed versions."""
        return []

    def serve_files(self, folder: str) -> dict[str, str]:
        """Files the model reads when it is built, besides its weights (a tokenizer, a model
        config), written under `folder`: {setting name: file or folder}. The logged model bundles
        them and points those settings at its own copies, so it loads where the originals are not."""
        return {}

    def serve_settings(self) -> dict[str, Any]:
        """`model_settings()` as a logged model stores them: a task drops what only training
        reads (a pretrained file that need not exist where the model is served)."""
        return self.model_settings()

    pretrain_settings: ClassVar[tuple[str, ...]] = ()
    split_settings: ClassVar[tuple[str, ...]] = ()  # settings that define the training data and held-out split

    def data_key(self) -> str:
        """Hash of what defines the training data and the held-out split. Trials of another key
        trained on other data or are ranked on another held-out set: they never share a soup.
        Label noise is part of it (a clean pool keeps the key it had before label noise existed)."""
        noise = {k: self.settings[k] for k in COMMON_DEFAULTS}
        return digest(self.split_key(), noise) if noise["label_noise"] else self.split_key()

    def split_key(self) -> str:
        """Hash of the settings that define the clean training data and the held-out split."""
        return digest(self.name, {k: self.settings[k] for k in self.split_settings})

    def pretrained_id(self) -> str:
        """The pool id of this task's pretrained weights (cached per pretraining settings)."""
        return f"pretrained-{self.name}-{self.pretrain_key()}"

    def pretrain_key(self) -> str:
        """Hash of everything that determines the pretrained weights."""
        keyed = {k: self.settings[k] for k in self.pretrain_settings}
        blob = json.dumps({"task": self.name, **keyed}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
