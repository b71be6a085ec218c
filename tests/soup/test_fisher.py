"""Fisher-weighted averaging: the diagonal Fisher against its closed form for a linear
softmax model, and the weighted average on hand-made states (one with a zero Fisher)."""

from __future__ import annotations

import torch

from orchestrator.soup.fisher import diagonal_fisher
from orchestrator.soup.tasks.base import TensorExamples


class PlainTask:
    """What diagonal_fisher reads of a task."""

    num_workers = 0

    @staticmethod
    def logits(model, x):
        return model(x)


def test_diagonal_fisher_of_a_linear_softmax_model_matches_its_closed_form():
    # log p_y = (Wx + b)_y - logsumexp: d/dW[c, d] = (1[y = c] - p_c) x_d, so
    # sum_y p_y (1[y = c] - p_c)^2 x_d^2 = p_c (1 - p_c) x_d^2, and p_c (1 - p_c) for b
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    fisher = diagonal_fisher(PlainTask, model, TensorExamples(x, torch.zeros(5, dtype=torch.long)), n=5)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    expected_w = (p * (1 - p)).unsqueeze(2) * x.pow(2).unsqueeze(1)  # example, class, input
    torch.testing.assert_close(fisher["weight"], expected_w.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher["bias"], (p * (1 - p)).mean(0), rtol=1e-5, atol=1e-7)
    assert model.training  # left as it was found


def test_diagonal_fisher_uses_a_seeded_sample_of_n_examples():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    examples = TensorExamples(torch.randn(50, 3), torch.zeros(50, dtype=torch.long))
    a = diagonal_fisher(PlainTask, model, examples, n=8, seed=1)
    assert torch.equal(a["weight"], diagonal_fisher(PlainTask, model, examples, n=8, seed=1)["weight"])
    assert not torch.equal(a["weight"], diagonal_fisher(PlainTask, model, examples, n=8, seed=2)["weight"])
