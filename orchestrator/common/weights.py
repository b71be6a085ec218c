"""Model weights as plain state dicts, and the fingerprints that tell which can be mixed."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def arch_fingerprint(state: StateDict) -> str:
    """Names, shapes and dtypes of every tensor: equal fingerprints can be averaged."""
    return spec_fingerprint((k, v.dtype, v.shape) for k, v in state.items())


def spec_fingerprint(specs: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> str:
    """arch_fingerprint from (name, dtype, shape) alone, e.g. a safetensors header's."""
    spec = [(k, tuple(shape), str(dtype)) for k, dtype, shape in sorted(specs, key=lambda s: s[0])]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def digest(*parts: Any) -> str:
    """A short content hash, for ids derived from what something was made of."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
