"""Task arithmetic and its sparsified, sign-elected kin, one generalized method with options,
as in mergekit: the variants (task arithmetic, TIES, DARE-TIES, DARE-linear) are data.

Per tensor, with tau_i = theta_i - theta_0:
1. sparsify each tau_i: none; `magnitude` (TIES's trim: exactly max(1, int(k n)) entries kept,
   per tensor or over each model's entries); or `random` (DARE's seeded drop);
2. combine: the sum (task arithmetic), or, with `consensus`, TIES's election and disjoint
   mean: the sign of sum_i tau_i per entry (an exact 0 elects +1, as mergekit), and the mean of
   the nonzero entries that agree with it (0 where none does);
3. theta = theta_0 + lambda * combined.
The election is one pass: the positive and negative entries' sums and counts are four running
accumulators, so one task vector is held at a time whatever N is."""

from __future__ import annotations

import torch

from orchestrator.merging import sparsify
from orchestrator.merging.methods import DeltaMethod, Param, in_range, one_of, register

LAMBDA = Param("lambda", float, 1.0, "scale of the combined task vector", in_range(0, float("inf")))
TRIM = (
    Param("k", float, 0.2, "fraction of each task vector's entries kept by magnitude: exactly max(1, int(k n)), "
          "equal magnitudes at the cut kept lowest index first", in_range(0, 1, low_open=True)),
    Param("scope", str, "tensor", "trim per tensor ('tensor', as mergekit) or over all of a model's entries "
          "('global', the original; holds one task vector's magnitudes while it finds the cut)",
          one_of("tensor", "global")),
)
DROP = (
    Param("p", float, 0.5, "drop probability of each entry", in_range(0, 1, high_open=True)),
    Param("rescale", str, "exact", "survivors x 1/(1-p) ('exact', the paper) or scaled to keep each tensor's L1 "
          "norm ('l1', as mergekit)", one_of("exact", "l1")),
    Param("seed", int, 0, "seed of the drop: the same seed drops the same entries on every device"),
)


class TaskVectorMerge(DeltaMethod):
    def __init__(self, name: str, reference: str, sparsification: str | None, consensus: bool):
        self.name, self.reference = name, reference
        self.sparsification, self.consensus = sparsification, consensus
        self.params = (LAMBDA, *{None: (), "magnitude": TRIM, "random": DROP}[sparsification])

    def prepare(self, inputs, base, p, device, side):
        if self.sparsification == "magnitude" and p["scope"] == "global":
            return {"global_cut": [global_cut(source, base, p["k"], device) for source in inputs]}
        return {}

    def sparse(self, t, i: int, tau: torch.Tensor, p) -> torch.Tensor:
        if self.sparsification == "random":
            return sparsify.random_drop(tau, p["p"], sparsify.seed_key(p["seed"], i, t.name), p["rescale"])
        if self.sparsification == "magnitude":
            if p["scope"] == "global":
                cut, room = t.prepared["global_cut"][i]
                magnitude = tau.abs().reshape(-1)
                return torch.where(sparsify.trim_mask(magnitude, cut, room[t.name]).reshape(tau.shape), tau, 0.0)
            return sparsify.top_k(tau, p["k"])
        return tau

    def delta(self, t, p):
        total = pos = neg = n_pos = n_neg = None
        for i, x in enumerate(t.tensors):
            tau = self.sparse(t, i, x - t.base, p)
            if not self.consensus:
                total = tau if total is None else total.add_(tau)
                continue
            if pos is None:
                pos, neg = tau.clamp(min=0), tau.clamp(max=0)
                n_pos, n_neg = (tau > 0).to(tau.dtype), (tau < 0).to(tau.dtype)
            else:
                pos.add_(tau.clamp(min=0))
                neg.add_(tau.clamp(max=0))
                n_pos.add_(tau > 0)
                n_neg.add_(tau < 0)
        if not self.consensus:
            return total
        elected_up = (pos + neg) >= 0  # sign(sum_i tau_i), an exact 0 taking +1
        return torch.where(elected_up, pos / n_pos.clamp(min=1), neg / n_neg.clamp(min=1))


def global_cut(source, base, k: float, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TIES's trim over all of one model's entries: the cut (the k-th largest |tau| over every
    floating tensor, in the base's order) and, per tensor, how many entries equal to the cut it
    keeps (lowest global index first). Holds one model's magnitudes (float32, or float64 for a
    float64 model)."""
    names = [n for n in base.names() if base.spec(n)[0].is_floating_point]
    sizes = [torch.Size(base.spec(n)[1]).numel() for n in names]
    acc = torch.float64 if any(base.spec(n)[0] == torch.float64 for n in names) else torch.float32
    magnitude = torch.empty(sum(sizes), dtype=acc, device=device)
    for name, piece in zip(names, magnitude.split(sizes)):
        piece.copy_((source.get(name, device).to(acc) - base.get(name, device).to(acc)).abs().reshape(-1))
    keep = sparsify.keep_count(magnitude.numel(), k)
    cut = sparsify.kth_largest(magnitude, keep)
    room = keep - (magnitude > cut).sum()
    quota = {}
    for name, piece in zip(names, magnitude.split(sizes)):
        quota[name] = torch.minimum((piece == cut).sum(), room)
        room = room - quota[name]
    return cut, quota


register(TaskVectorMerge("task_arithmetic", "https://arxiv.org/abs/2212.04089", None, False))
register(TaskVectorMerge("ties", "https://arxiv.org/abs/2306.01708", "magnitude", True))
register(TaskVectorMerge("dare_ties", "https://arxiv.org/abs/2311.03099", "random", True))
register(TaskVectorMerge("dare_linear", "https://arxiv.org/abs/2311.03099", "random", False))
