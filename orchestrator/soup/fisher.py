"""The diagonal Fisher information of a trained model (Matena & Raffel, NeurIPS 2022), the
weights of Fisher-weighted averaging (recipes/fisher.py).

A trial estimates it at its end, while its model is loaded, and stores it in the pool beside
its weights (a row of kind `fisher` whose parent is the trial): F = mean over examples x of
sum_y p(y|x) (d log p(y|x) / d theta)^2, with the model's own predictive distribution p
(the true Fisher, not the "empirical" one on gold labels), the expectation over y computed
exactly. Squares of per-example gradients need one backward pass per example and label,
so the estimate uses a seeded sample of `examples` training examples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.common.weights import StateDict
from orchestrator.soup.tasks.base import Examples, Task, to_device
from orchestrator.soup.train import autocast, loader

FLOOR = 1e-6  # merging floors each F here: a parameter no example moves keeps a weight


def fisher_row_id(trial_id: str) -> str:
    return f"{trial_id}.fisher"


def diagonal_fisher(task: Task, model: torch.nn.Module, examples: Examples, n: int, seed: int = 0,
                    precision: str = "auto") -> StateDict:
    """The diagonal Fisher of every trainable parameter (float32, on the CPU), in eval mode
    (BatchNorm uses its running statistics), over `n` training examples drawn with `seed`."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    chosen = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n]
    for x, _ in loader(examples, list(chosen.split(1)), task.num_workers):  # one example at a time
        with autocast(precision):
            log_p = F.log_softmax(task.logits(model, to_device(x, dev)).float(), dim=-1)[0]
        p = log_p.detach().exp()
        for y in range(len(p)):
            grads = torch.autograd.grad(log_p[y], list(params.values()), retain_graph=y < len(p) - 1,
                                        allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[name] += p[y] * g.float().pow(2)
    model.train(was_training)
    return {k: (v / max(1, len(chosen))).cpu() for k, v in fisher.items()}
