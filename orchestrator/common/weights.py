"""Model weights as plain state dicts, and the fingerprints that tell which can be mixed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


def arch_fingerprint(state: StateDict) -> str:
    """Names, shapes and dtypes of every tensor: equal fingerprints can be averaged."""
    spec = [(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(state.items())]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def digest(*parts: Any) -> str:
    """A short content hash, for ids derived from what something was made of."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
