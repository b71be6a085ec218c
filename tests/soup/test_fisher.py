"""Fisher-weighted averaging: the diagonal Fisher against its closed form for a linear
softmax model, and the weighted average on hand-made states (one with a zero Fisher)."""

from __future__ import annotations

import torch

from orchestrator.soup.fisher import FLOOR, diagonal_fisher
from orchestrator.soup.merge import fisher_average
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


def test_fisher_average_weights_each_entry_by_its_fisher():
    states = {"a": {"w": torch.tensor([1.0, 2.0, 4.0]), "n": torch.tensor(3)},
              "b": {"w": torch.tensor([3.0, 6.0, 8.0]), "n": torch.tensor(5)}}
    fishers = {"a": {"w": torch.tensor([1.0, 0.0, 0.0])},  # entry 1: a's Fisher is 0
               "b": {"w": torch.tensor([3.0, 2.0, 0.0])}}  # entry 2: nobody's Fisher covers it
    merged = fisher_average(["a", "b"], states.get, fishers.get)
    # entry 0: (1*1 + 3*3) / 4; entry 1: b dominates (a floored at 1e-6); entry 2: both floored, the plain mean
    expected = torch.tensor([2.5, (FLOOR * 2 + 2 * 6) / (FLOOR + 2), 6.0])
    torch.testing.assert_close(merged["w"], expected)
    assert merged["n"].item() == 3  # integer buffers: the first model's


def test_fisher_average_normalised_and_unfishered_tensors():
    states = {"a": {"w": torch.tensor([0.0, 0.0]), "bn": torch.tensor([1.0])},
              "b": {"w": torch.tensor([1.0, 1.0]), "bn": torch.tensor([3.0])}}
    fishers = {"a": {"w": torch.tensor([30.0, 40.0])}, "b": {"w": torch.tensor([0.3, 0.4])}}
    plain = fisher_average(["a", "b"], states.get, fishers.get)
    normalised = fisher_average(["a", "b"], states.get, fishers.get, normalize=True)
    torch.testing.assert_close(plain["w"], torch.tensor([0.3 / 30.3, 0.4 / 40.4]))  # a's larger Fisher dominates
    torch.testing.assert_close(normalised["w"], torch.tensor([0.5, 0.5]))  # both norms 1: equal weights
    assert plain["bn"].item() == 2.0  # no Fisher: the plain mean
