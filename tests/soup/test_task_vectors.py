"""Task-vector merges on tiny hand-computed examples: task arithmetic, TIES, DARE, Model Stock."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.soup.merge import uniform_soup
from orchestrator.soup.task_vectors import (apply, magnitude_trim, model_stock, random_drop, sum_task_vectors,
                                            task_vector, ties_delta)

ZERO = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "steps": torch.tensor(7)}


def models(*taus):
    """Fine-tuned states theta_0 + tau_i (the integer buffer as a trainer would leave it)."""
    return [{"w": ZERO["w"] + torch.tensor(t), "steps": torch.tensor(99)} for t in taus]


def load(state):
    return state


def no_trim(index, tau):
    return tau


def test_task_arithmetic_at_one_over_n_is_the_uniform_soup():
    states = models([1.0, 2.0, 3.0, 4.0], [3.0, 0.0, -1.0, 2.0], [-1.0, 1.0, 1.0, 0.0])
    delta = sum_task_vectors(ZERO, states, load)
    assert torch.equal(delta["w"], torch.tensor([3.0, 3.0, 3.0, 6.0]))
    merged = apply(ZERO, delta, 1 / 3)
    torch.testing.assert_close(merged["w"], uniform_soup(states)["w"])
    assert merged["steps"].item() == 7  # integer buffers are theta_0's, not merged
    assert torch.equal(apply(ZERO, delta, 0.0)["w"], ZERO["w"])


def test_ties_elects_signs_and_takes_the_disjoint_mean_with_a_tie():
    # sums: -1, -2, 0, 0 -> signs -, -, + (tie), + (tie)
    states = models([2.0, -1.0, 1.0, 1.0], [1.0, -3.0, -1.0, 0.0], [-4.0, 2.0, 0.0, -1.0])
    delta = ties_delta(ZERO, states, load, no_trim)
    # entry 0: only -4 agrees; entry 1: mean(-1, -3); entries 2, 3: only tau_1's +1 agrees
    assert torch.equal(delta["w"], torch.tensor([-4.0, -2.0, 1.0, 1.0]))


def test_ties_trims_to_the_top_k_before_electing():
    states = models([3.0, -1.0, 2.0, 0.5], [1.0, -4.0, -2.0, 0.5], [-2.0, 1.0, 0.5, 3.0])
    # k = 0.5 keeps 2 of 4 per model: [3, 0, 2, 0], [0, -4, -2, 0], [-2, 0, 0, 3]
    # sums 1, -4, 0, 3 -> signs +, -, + (tie), +; disjoint means 3, -4, 2, 3
    delta = ties_delta(ZERO, states, load, magnitude_trim(0.5))
    assert torch.equal(delta["w"], torch.tensor([3.0, -4.0, 2.0, 3.0]))
    assert torch.equal(apply(ZERO, delta, 0.5)["w"], torch.tensor([2.5, -1.0, 2.0, 2.5]))


def test_no_entry_agrees_gives_zero_not_nan():
    states = models([0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0])
    assert torch.equal(ties_delta(ZERO, states, load, no_trim)["w"], torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_trim_scope_per_tensor_or_over_the_whole_model():
    tau = {"a": torch.tensor([10.0, 9.0]), "b": torch.tensor([1.0, -2.0])}
    per_tensor = magnitude_trim(0.5, "tensor")(0, tau)
    assert torch.equal(per_tensor["a"], torch.tensor([10.0, 0.0])) and torch.equal(per_tensor["b"], torch.tensor([0.0, -2.0]))
    whole = magnitude_trim(0.5, "global")(0, tau)
    assert torch.equal(whole["a"], torch.tensor([10.0, 9.0])) and torch.equal(whole["b"], torch.tensor([0.0, 0.0]))
    tied = magnitude_trim(0.25)(0, {"c": torch.tensor([2.0, -2.0, 1.0, 0.5])})  # 1 of 4, tied at 2: both kept
    assert torch.equal(tied["c"], torch.tensor([2.0, -2.0, 0.0, 0.0]))
    assert torch.equal(magnitude_trim(1.0)(0, tau)["b"], tau["b"])


def test_dare_drops_with_probability_p_and_rescales_exactly():
    tau = {"w": torch.full((100_000,), 0.5), "b": torch.ones(3)}
    dropped = random_drop(0.75, seed=1)(0, tau)["w"]
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.equal(dropped[kept], torch.full((int(kept.sum()),), 2.0))  # 0.5 / (1 - 0.75)
    assert torch.equal(random_drop(0.0, seed=1)(0, tau)["w"], tau["w"])


def test_dare_is_seeded_per_ingredient_and_l1_rescale_keeps_the_norm():
    tau = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    drop = random_drop(0.5, seed=3)
    assert torch.equal(drop(0, tau)["w"], drop(0, tau)["w"])  # TIES's two passes see the same drop
    assert torch.equal(drop(0, tau)["w"], random_drop(0.5, seed=3)(0, tau)["w"])  # and so does a rerun
    assert not torch.equal(drop(0, tau)["w"], drop(1, tau)["w"])
    assert not torch.equal(drop(0, tau)["w"], random_drop(0.5, seed=4)(0, tau)["w"])
    l1 = random_drop(0.5, seed=3, rescale="l1")(0, tau)["w"]
    torch.testing.assert_close(l1.abs().sum(), tau["w"].abs().sum())


def test_model_stock_identical_fine_tunes_keep_them_and_orthogonal_ones_fall_back():
    same = model_stock(ZERO, models([1.0, 2.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0]), load)
    assert same.t == {"w": pytest.approx(1.0)}
    torch.testing.assert_close(same.state["w"], torch.tensor([2.0, 3.0, 1.0, 0.0]))
    orthogonal = model_stock(ZERO, models([1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]), load)
    assert orthogonal.t == {"w": 0.0}
    assert torch.equal(orthogonal.state["w"], ZERO["w"])
    opposed = model_stock(ZERO, models([1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]), load)
    assert opposed.t == {"w": 0.0}  # cos -1 is clamped: never away from the fine-tunes
    assert same.state["steps"].item() == 7


def test_model_stock_at_sixty_degrees():
    # cos = 0.5, N = 2: t = 2 * 0.5 / (1 + 0.5) = 2/3
    stock = model_stock(ZERO, models([1.0, 0.0, 0.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0, 0.0]), load)
    assert stock.t["w"] == pytest.approx(2 / 3, abs=1e-6)
    torch.testing.assert_close(stock.state["w"], torch.tensor([1.5, 1 + math.sqrt(3) / 6, 1.0, 1.0]))


def test_model_stock_mean_pairwise_cosine_from_running_sums():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(4, generator=g) + 1 for _ in range(5)]
    stock = model_stock(ZERO, models(*[t.tolist() for t in taus]), load)
    cos = [torch.nn.functional.cosine_similarity(a, b, dim=0) for i, a in enumerate(taus) for b in taus[i + 1:]]
    mean_cos = float(torch.stack(cos).mean())
    assert stock.t["w"] == pytest.approx(min(1.0, 5 * mean_cos / (1 + 4 * mean_cos)), abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        model_stock(ZERO, models([1.0, 0.0, 0.0, 0.0]), load)


def test_merges_compute_in_float32_and_keep_dtypes():
    zero = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    states = [{"w": torch.tensor([1.5, 2.0], dtype=torch.bfloat16)}, {"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)}]
    tau = task_vector(zero, states[0])
    assert tau["w"].dtype == torch.float32
    merged = apply(zero, ties_delta(zero, states, load, no_trim), 1.0)
    assert merged["w"].dtype == torch.bfloat16 and merged["w"].tolist() == [1.5, 3.0]


@pytest.mark.parametrize("make, message", [
    (lambda: magnitude_trim(0.0), r"k must be in \(0, 1\]"),
    (lambda: magnitude_trim(0.5, "layer"), "scope must be"),
    (lambda: random_drop(1.0, 0), r"p must be in \[0, 1\)"),
    (lambda: random_drop(0.5, 0, "l2"), "rescale must be"),
])
def test_bad_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
