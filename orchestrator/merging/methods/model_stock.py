"""Model Stock (Jang et al., ECCV 2024), per tensor: cos = the mean pairwise cosine of the task
vectors, t = N cos / (1 + (N - 1) cos) clamped to [0, 1] (cos <= 0 would push away from the
fine-tunes; mergekit does not clamp), theta = t * mean_i theta_i + (1 - t) * theta_0.

The mean over pairs comes from running sums, not N^2 dot products, so one task vector is held
at a time: with u_i = tau_i / (|tau_i| + eps), sum over pairs i != j of u_i.u_j =
|sum_i u_i|^2 - sum_i |u_i|^2. Each tensor's t is noted (Model Stock's histogram)."""

import torch

from orchestrator.merging.methods import Method, register

EPS = 1e-8


@register
class ModelStock(Method):
    name = "model_stock"
    reference = "https://arxiv.org/abs/2403.19522"
    needs_base = True
    min_inputs = 2

    def merge(self, t, p):
        n = len(t.tensors)
        tau_sum = unit_sum = unit_sq = None
        for x in t.tensors:
            tau = x - t.base
            unit = tau / (tau.norm() + EPS)
            sq = unit.pow(2).sum()
            tau_sum = tau if tau_sum is None else tau_sum.add_(tau)
            unit_sum = unit if unit_sum is None else unit_sum.add_(unit)
            unit_sq = sq if unit_sq is None else unit_sq + sq
        cos = ((unit_sum.pow(2).sum() - unit_sq) / (n * (n - 1))).double()  # t in float64, as a host float would be
        weight = torch.where(cos > 0, (n * cos / (1 + (n - 1) * cos)).clamp(0, 1), torch.zeros_like(cos))
        t.note(weight)
        return t.base + weight * tau_sum / n  # = t * mean(theta_i) + (1 - t) * theta_0
