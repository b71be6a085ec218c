"""Where a merge's tensors come from: a safetensors file, a Hugging Face model folder (one
`model.safetensors` or shards listed in `model.safetensors.index.json`), or a state dict
already in memory (a dish just cooked). Every source answers the same three questions:
which tensors it has, each one's dtype and shape, and the tensor itself on a device.

A source hands out its tensors as they are: a method must never change one in place (a
state dict's tensor on the merge device is not copied).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Protocol

import torch

from orchestrator.common.errors import MergeError
from orchestrator.common.weights import StateDict
from orchestrator.merging.safetensors_io import SafetensorsFile

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Source(Protocol):
    label: str  # how messages name it: a path, or an ingredient id

    def names(self) -> list[str]: ...

    def has(self, name: str) -> bool: ...

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]: ...

    def get(self, name: str, device: torch.device | str) -> torch.Tensor: ...


class FileSource:
    """A safetensors file, or a model folder of them; tensors read one at a time."""

    def __init__(self, path: str, label: str | None = None):
        self.path, self.label = path, label or path
        self._where: dict[str, SafetensorsFile] = {}
        self._files: list[SafetensorsFile] = []
        for shard in _shards(path):
            f = SafetensorsFile(shard)
            self._files.append(f)
            for name in f.entries:
                self._where.setdefault(name, f)

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        e = self._where[name].entries[name]
        return e.dtype, e.shape

    def get(self, name: str, device: torch.device | str) -> torch.Tensor:
        return self._where[name].read(name).to(device)

    @property
    def metadata(self) -> dict[str, str]:
        return self._files[0].metadata if self._files else {}

    def close(self) -> None:
        for f in self._files:
            f.close()


def _shards(path: str) -> list[str]:
    """The safetensors files that hold a checkpoint given as a file or a model folder."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise MergeError(f"{path}: no such file or folder")
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            weight_map = json.load(open(index))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MergeError(f"{index}: not a safetensors index (no weight_map)") from None
        shards = [os.path.join(path, f) for f in dict.fromkeys(weight_map.values())]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise MergeError(f"{index}: names {os.path.basename(missing[0])}, which is not in {path}")
        return shards
    if os.path.isfile(os.path.join(path, SINGLE)):
        return [os.path.join(path, SINGLE)]
    pickled = [f for f in ("pytorch_model.bin", "model.bin") if os.path.isfile(os.path.join(path, f))]
    why = (f"only {pickled[0]} (a pickle: load it and save_pretrained(..., safe_serialization=True) first)"
           if pickled else f"no {SINGLE} or {INDEX}")
    raise MergeError(f"{path}: {why}")


class StateSource:
    """A state dict in memory (on any device)."""

    def __init__(self, state: StateDict, label: str = "state dict"):
        self.state, self.label = state, label

    def names(self) -> list[str]:
        return list(self.state)

    def has(self, name: str) -> bool:
        return name in self.state

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        v = self.state[name]
        return v.dtype, tuple(v.shape)

    def get(self, name: str, device: torch.device | str) -> torch.Tensor:
        return self.state[name].to(device)


def specs(source: Source) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in the source's order."""
    return [(name, *source.spec(name)) for name in source.names()]


def check_compatible(reference: Source, others: Iterable[Source], what: str = "the base") -> None:
    """Every other source has the reference's tensors with the same shapes and dtypes; else
    one line naming the source, the tensor and the difference."""
    want = {name: spec for name, *spec in specs(reference)}
    for other in others:
        have = {name: spec for name, *spec in specs(other)}
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing or extra:
            name, side = (missing[0], f"lacks tensor {missing[0]!r}") if missing else (extra[0], f"has tensor {extra[0]!r}")
            count = len(missing) + len(extra)
            raise MergeError(f"{other.label}: {side}, which {what} ({reference.label}) "
                             f"{'has' if missing else 'does not have'}"
                             + (f" ({count} tensors differ)" if count > 1 else ""))
        for name, (dtype, shape) in want.items():
            odtype, oshape = have[name]
            if oshape != shape:
                raise MergeError(f"{other.label}: tensor {name!r} has shape {list(oshape)}, "
                                 f"{what} ({reference.label}) has {list(shape)}")
            if odtype != dtype:
                raise MergeError(f"{other.label}: tensor {name!r} is {str(odtype).replace('torch.', '')}, "
                                 f"{what} ({reference.label}) is {str(dtype).replace('torch.', '')}")
