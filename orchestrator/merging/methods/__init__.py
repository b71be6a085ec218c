"""Merge methods: one file per method in this folder, each registered with `register`, found
and imported automatically (as in mergekit's merge_methods/).

A method declares its name, a reference, its settings (`Param`: name, type, default, rule:
settings are checked from these declarations, never by method name) and whether it needs
the base model theta_0. Its `merge` does the math of ONE tensor name: it gets a
`TensorInputs` (the base's tensor and a lazy sequence of the ingredients' tensors, each read
when it is indexed, in float32 or float64 on the merge device) and returns the merged
tensor in that dtype; the executor casts it once. A method never does I/O, never makes a
tensor on another device, and never asks the host for a value (no `.item()`): the tests run
every method on the `meta` device, where either raises.

Methods that end in theta_0 + lambda * delta (task arithmetic, TIES, DARE) are
`DeltaMethod`s: their `delta` is the merged task vector, so a recipe that searches lambda
merges once and scales many times (executor.merge_delta / apply_delta).
"""

from __future__ import annotations

import importlib
import pkgutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from orchestrator.common.errors import MergeError


@dataclass(frozen=True)
class Param:
    """A declared setting (a merge method's; a recipe's config key soup.<name>): its name, type,
    default and rule (why a value is wrong, or None)."""

    name: str
    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] = lambda value: None


class Lazy(Sequence):
    """The ingredients' tensors of one name, each read from its source when indexed (so a
    method that reduces over them as they come holds one at a time); None for a source that
    lacks the name (a side input such as a Fisher that does not cover a buffer)."""

    def __init__(self, sources: Sequence[Any], name: str, device: torch.device, dtype: torch.dtype):
        self.sources, self.name, self.device, self.dtype = sources, name, device, dtype

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._cast(self._fetch(i))

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        """In order, the next ingredient's tensor read in a thread while the method works on
        this one (reads release the GIL): I/O hides behind the math, one tensor ahead at most."""
        with ThreadPoolExecutor(1) as reader:
            ahead = reader.submit(self._fetch, 0) if len(self) else None
            for i in range(len(self)):
                current = ahead.result()
                ahead = reader.submit(self._fetch, i + 1) if i + 1 < len(self) else None
                yield self._cast(current)

    def _fetch(self, i: int) -> torch.Tensor | None:
        source = self.sources[i]
        if source is None or not source.has(self.name):
            return None
        return source.get(self.name, self.device)

    def _cast(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(self.dtype)


@dataclass
class TensorInputs:
    """What a method sees of one tensor name."""

    name: str
    base: torch.Tensor | None  # theta_0's tensor, for methods that need it
    tensors: Lazy  # the ingredients', in order
    side: dict[str, Lazy]  # per-ingredient side inputs by name (e.g. "fisher")
    prepared: dict[str, Any]  # what the method's `prepare` computed over whole models
    notes: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.tensors.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors.dtype

    def note(self, value: torch.Tensor) -> None:
        """Record a per-tensor value (a device tensor: read once, after the merge)."""
        self.notes[self.name] = value


class Method:
    name: ClassVar[str]
    reference: ClassVar[str]  # the paper
    params: ClassVar[tuple[Param, ...]] = ()
    needs_base: ClassVar[bool] = False
    min_inputs: ClassVar[int] = 1
    side: ClassVar[tuple[str, ...]] = ()  # side inputs it reads, one source per ingredient

    def settings(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """The method's settings: defaults filled in, each checked; a bad one is one line."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = [k for k in given if k not in known]
        if unknown:
            raise MergeError(f"merge method {self.name}: unknown setting {unknown[0]!r} "
                             f"(its settings: {', '.join(known) or 'none'})")
        out = {}
        for p in self.params:
            value = given.get(p.name, p.default)
            why = p.check(value)
            if why:
                raise MergeError(f"merge method {self.name}: {p.name} {why}")
            out[p.name] = value
        return out

    def prepare(self, inputs: Sequence[Any], base: Any, p: dict[str, Any], device: torch.device,
                side: dict[str, Sequence[Any]]) -> dict[str, Any]:
        """Whatever the method needs over whole models before the per-tensor pass (a norm over
        all tensors, a global threshold); streamed like the merge itself. Default: nothing."""
        return {}

    def merge(self, t: TensorInputs, p: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


class DeltaMethod(Method):
    """theta_0 + lambda * delta(task vectors): task arithmetic and its sparsified, elected kin."""

    needs_base = True

    def delta(self, t: TensorInputs, p: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, t: TensorInputs, p: dict[str, Any]) -> torch.Tensor:
        return t.base + p["lambda"] * self.delta(t, p)


METHODS: dict[str, Method] = {}


def register(method):
    """Register a Method instance, or (as a class decorator) an instance of the class."""
    instance = method() if isinstance(method, type) else method
    METHODS[instance.name] = instance
    return method


def get(name: str | Method) -> Method:
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise MergeError(f"unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], str | None]:
    """A Param rule: a number in the interval."""
    def rule(v) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and \
            (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
        return None if ok else f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {v!r}"
    return rule


def one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}, got {v!r}"


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
