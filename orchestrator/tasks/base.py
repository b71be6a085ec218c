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
from typing import Any, ClassVar

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


@dataclass
class TaskData:
    """Tensors for one task. `evals` maps eval-set name -> (inputs, labels)."""

    train: tuple[torch.Tensor, torch.Tensor]
    evals: dict[str, tuple[torch.Tensor, torch.Tensor]]
    val: str = "val"  # held-out set used only for soup selection
    id_test: str = "id_test"
    ood: list[str] = field(default_factory=list)


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
    def pretrain(self) -> StateDict:
        """The shared starting weights (expensive; the pool caches them by `pretrain_key`)."""

    @abstractmethod
    def data(self) -> TaskData:
        """Fine-tuning data and every eval set, deterministic given the settings."""

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits over the task's labels (a task may read a slice of a wider head)."""
        return model(x)

    def augment(self, x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
        """Random input augmentation of the given strength (0 = none)."""
        return x

    pretrain_settings: ClassVar[tuple[str, ...]] = ()

    def pretrained_id(self) -> str:
        """The pool id of this task's pretrained weights (cached per pretraining settings)."""
        return f"pretrained-{self.name}-{self.pretrain_key()}"

    def pretrain_key(self) -> str:
        """Hash of everything that determines the pretrained weights."""
        keyed = {k: self.settings[k] for k in self.pretrain_settings}
        blob = json.dumps({"task": self.name, **keyed}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def arch_fingerprint(state: StateDict) -> str:
    """Names, shapes and dtypes of every tensor: equal fingerprints can be averaged."""
    spec = [(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(state.items())]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
