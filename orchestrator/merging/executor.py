"""The executor: feeds a merge method one tensor name at a time.

For each tensor of the reference (theta_0, or the first ingredient when the method needs no
base), in its order: an integer tensor (BatchNorm's batch counter, say) is the reference's;
a floating one is the method's result, computed in float32 (float64 kept) on `device` from
the tensors the method reads lazily, and cast once to the reference's dtype. The result goes
into a state dict on `device` or, with `out`, straight into a safetensors file (written as it
goes, published whole). Peak memory: the output (none with `out`) plus what one tensor name
needs, never N models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from orchestrator.common.errors import MergeError
from orchestrator.common.weights import StateDict
from orchestrator.merging import methods as registry
from orchestrator.merging.methods import DeltaMethod, Lazy, Method, TensorInputs
from orchestrator.merging.safetensors_io import SafetensorsWriter
from orchestrator.merging.sources import Source, check_compatible, specs


@dataclass
class Merged:
    state: StateDict | None  # None when the merge went to a file
    notes: dict[str, torch.Tensor] = field(default_factory=dict)  # per-tensor values a method noted
    path: str | None = None  # the written file


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """What a tensor of `dtype` is merged in: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def merge(method: str | Method, inputs: Sequence[Source], *, base: Source | None = None,
          params: dict[str, Any] | None = None, side: dict[str, Sequence[Source | None]] | None = None,
          device: torch.device | str = "cpu", out: str | None = None, metadata: dict[str, str] | None = None,
          progress: Callable[[int, int], None] | None = None) -> Merged:
    """Merge `inputs` (the ingredients, in order) with `method` and its `params`; `base` is
    theta_0 for the methods that need it; `side` the method's side inputs (one source per
    ingredient, or None). Returns the merged state dict on `device`, or writes it to `out`.
    `progress(done, total)` after each tensor."""
    m = registry.get(method)
    p, side = m.settings(params), dict(side or {})
    reference, order = _plan(m, inputs, base, side)
    device = torch.device(device)
    prepared = m.prepare(inputs, base, p, device, side)
    notes: dict[str, torch.Tensor] = {}
    writer = SafetensorsWriter(out, order, metadata) if out else None
    state: StateDict = {}
    try:
        for i, (name, dtype, _) in enumerate(order):
            if dtype.is_floating_point:
                t = _inputs(m, name, dtype, inputs, base, side, prepared, notes, device)
                value = m.merge(t, p).to(dtype)
            else:  # integer buffers are not merged: the reference's
                value = reference.get(name, device).clone()
            if writer:
                writer.write(name, value)
            else:
                state[name] = value
            if progress:
                progress(i + 1, len(order))
    except BaseException:
        if writer:
            writer.abort()
        raise
    if writer:
        return Merged(None, notes, writer.close())
    return Merged(state, notes)


def merge_delta(method: str | Method, inputs: Sequence[Source], *, base: Source,
                params: dict[str, Any] | None = None, device: torch.device | str = "cpu") -> StateDict:
    """The combined task vector of a DeltaMethod (its lambda ignored), in float32 (float64 kept),
    for every floating tensor: what a lambda search scales again and again (apply_delta)."""
    m = registry.get(method)
    if not isinstance(m, DeltaMethod):
        raise MergeError(f"merge method {m.name} does not end in theta_0 + lambda * delta")
    p = m.settings(params)
    _, order = _plan(m, inputs, base, {})
    device = torch.device(device)
    prepared = m.prepare(inputs, base, p, device, {})
    return {name: m.delta(_inputs(m, name, dtype, inputs, base, {}, prepared, {}, device), p)
            for name, dtype, _ in order if dtype.is_floating_point}


def apply_delta(base: Source, delta: StateDict, scale: float, device: torch.device | str = "cpu") -> StateDict:
    """theta_0 + scale * delta, in theta_0's dtypes (tensors without a delta are theta_0's)."""
    out = {}
    for name, dtype, _ in specs(base):
        zero = base.get(name, device)
        out[name] = (zero.to(accumulator(dtype)) + scale * delta[name]).to(dtype) if name in delta else zero.clone()
    return out


def _plan(m: Method, inputs: Sequence[Source], base: Source | None,
          side: dict[str, Sequence[Source | None]]) -> tuple[Source, list]:
    """The reference source and its (name, dtype, shape) list, after checking that every input
    matches it and that the method has what it needs."""
    if len(inputs) < m.min_inputs:
        raise MergeError(f"merge method {m.name} needs at least {m.min_inputs} ingredients, got {len(inputs)}")
    if m.needs_base and base is None:
        raise MergeError(f"merge method {m.name} needs the base model (theta_0)")
    reference = base if m.needs_base else inputs[0]
    check_compatible(reference, [s for s in inputs if s is not reference],
                     "the base" if m.needs_base else "the first ingredient")
    for name in m.side:
        given = side.get(name)
        if given is None or len(given) != len(inputs):
            raise MergeError(f"merge method {m.name} needs one {name} per ingredient "
                             f"({0 if given is None else len(given)} for {len(inputs)})")
        for source in given:
            if source is not None:
                for tensor in source.names():
                    if reference.has(tensor) and tuple(source.spec(tensor)[1]) != tuple(reference.spec(tensor)[1]):
                        raise MergeError(f"{source.label}: {name} of tensor {tensor!r} has shape "
                                         f"{list(source.spec(tensor)[1])}, the weights have "
                                         f"{list(reference.spec(tensor)[1])}")
    return reference, specs(reference)


def _inputs(m: Method, name: str, dtype: torch.dtype, inputs, base, side, prepared, notes, device) -> TensorInputs:
    acc = accumulator(dtype)
    return TensorInputs(name, base.get(name, device).to(acc) if m.needs_base else None,
                        Lazy(inputs, name, device, acc), {k: Lazy(v, name, device, acc) for k, v in side.items()},
                        prepared, notes)
