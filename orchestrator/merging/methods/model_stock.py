"""Model Stock (Jang et al., ECCV 2024), per tensor: cos = the mean pairwise cosine of the task
vectors, t = N cos / (1 + (N - 1) cos) clamped to [0, 1] (cos <= 0 would push away from the
fine-tunes; mergekit does not clamp), theta = t * mean_i theta_i + (1 - t) * theta_0.

The mean over pairs comes from running sums, not N^2 dot products, so one task vector is held
at a time: with u_i = tau_i / |tau_i| (0 for tau_i = 0), sum over pairs i != j of u_i.u_j =
|sum_i u_i|^2 - sum_i |u_i|^2. The norms are summed in float64: a float32 sum over millions of
entries is off by ~1e-4 on a CPU, which moves t, and t times |mean tau| moves every entry.
Each tensor's t is noted (Model Stock's histogram)."""

import torch

from orchestrator.merging.methods import Method, register



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
            norm = torch.linalg.vector_norm(tau, dtype=torch.float64)
            scale = torch.where(norm > 0, 1 / norm, 0.0)  # a task vector of 0 has no direction: u_i = 0
            sq = (norm > 0).double()  # |u_i|^2, from the norm: no pass over the tensor
            unit_sum = tau * scale if unit_sum is None else unit_sum.addcmul_(tau, scale)
            tau_sum = tau if tau_sum is None else tau_sum.add_(tau)
            unit_sq = sq if unit_sq is None else unit_sq + sq
        cos = (unit_sum.square().sum(dtype=torch.float64) - unit_sq) / (n * (n - 1))
        weight = torch.where(cos > 0, (n * cos / (1 + (n - 1) * cos)).clamp(0, 1), torch.zeros_like(cos))
        t.note(weight)
        return t.base + weight * tau_sum / n  # = t * mean(theta_i) + (1 - t) * theta_0
