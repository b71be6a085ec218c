"""The merge methods on tiny hand-computed examples: task arithmetic, TIES (election, disjoint
mean, the exact-k trim), DARE, Model Stock, Fisher, linear; and their settings' checks."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.common.errors import MergeError
from orchestrator.merging import executor, sparsify
from orchestrator.merging.sources import StateSource

ZERO = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "steps": torch.tensor(7)}


def models(*taus):
    """Fine-tuned states theta_0 + tau_i (the integer buffer as a trainer would leave it)."""
    return [{"w": ZERO["w"] + torch.tensor(t), "steps": torch.tensor(99)} for t in taus]


def run(method, states, params=None, base=ZERO, **kw):
    return executor.merge(method, [StateSource(s, f"m{i}") for i, s in enumerate(states)],
                          base=StateSource(base, "base"), params=params, **kw)


def delta(method, states, params=None):
    return executor.merge_delta(method, [StateSource(s) for s in states], base=StateSource(ZERO), params=params)["w"]


def test_task_arithmetic_at_one_over_n_is_the_uniform_soup():
    states = models([1.0, 2.0, 3.0, 4.0], [3.0, 0.0, -1.0, 2.0], [-1.0, 1.0, 1.0, 0.0])
    assert torch.equal(delta("task_arithmetic", states), torch.tensor([3.0, 3.0, 3.0, 6.0]))
    merged = run("task_arithmetic", states, {"lambda": 1 / 3}).state
    torch.testing.assert_close(merged["w"], run("linear", states).state["w"])
    assert merged["steps"].item() == 7  # integer buffers are theta_0's, not merged
    assert torch.equal(run("task_arithmetic", states, {"lambda": 0.0}).state["w"], ZERO["w"])
    d = executor.merge_delta("task_arithmetic", [StateSource(s) for s in states], base=StateSource(ZERO))
    assert torch.equal(executor.apply_delta(StateSource(ZERO), d, 1 / 3)["w"], merged["w"])


def test_ties_elects_signs_and_takes_the_disjoint_mean_with_a_tie():
    # sums: -1, -2, 0, 0 -> signs -, -, + (tie), + (tie)
    states = models([2.0, -1.0, 1.0, 1.0], [1.0, -3.0, -1.0, 0.0], [-4.0, 2.0, 0.0, -1.0])
    # entry 0: only -4 agrees; entry 1: mean(-1, -3); entries 2, 3: only tau_1's +1 agrees
    assert torch.equal(delta("ties", states, {"k": 1.0}), torch.tensor([-4.0, -2.0, 1.0, 1.0]))


def test_ties_trims_to_the_top_k_before_electing():
    states = models([3.0, -1.0, 2.0, 0.5], [1.0, -4.0, -2.0, 0.5], [-2.0, 1.0, 0.5, 3.0])
    # k = 0.5 keeps 2 of 4 per model: [3, 0, 2, 0], [0, -4, -2, 0], [-2, 0, 0, 3]
    # sums 1, -4, 0, 3 -> signs +, -, + (tie), +; disjoint means 3, -4, 2, 3
    assert torch.equal(delta("ties", states, {"k": 0.5}), torch.tensor([3.0, -4.0, 2.0, 3.0]))
    assert torch.equal(run("ties", states, {"k": 0.5, "lambda": 0.5}).state["w"], torch.tensor([2.5, -1.0, 2.0, 2.5]))


def test_no_entry_agrees_gives_zero_not_nan():
    states = models([0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0])
    assert torch.equal(delta("ties", states, {"k": 1.0}), torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_the_trim_keeps_exactly_k_entries_lowest_index_first_among_equals():
    tau = torch.tensor([2.0, -2.0, 1.0, 2.0, 0.5, -2.0, 0.0, 1.0])
    kept = sparsify.top_k(tau, 0.25)  # int(0.25 * 8) = 2 of the four entries tied at |2|
    assert torch.equal(kept, torch.tensor([2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert torch.count_nonzero(sparsify.top_k(tau, 0.5)) == 4  # all four 2s
    five = sparsify.top_k(tau, 0.625)  # 5: the four 2s and the first of the two 1s
    assert torch.equal(five, torch.tensor([2.0, -2.0, 1.0, 2.0, 0.0, -2.0, 0.0, 0.0]))
    assert torch.count_nonzero(sparsify.top_k(tau, 0.01)) == 1  # max(1, int(k n)): never nothing
    assert torch.equal(sparsify.top_k(tau, 1.0), tau)
    # bf16 weights are full of ties: exactly k survive, whatever the values
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(-3, 4, (1000,), generator=g).float()
    for k in (0.1, 0.2, 0.37):
        assert torch.count_nonzero(sparsify.top_k(ties, k)) == int(k * 1000)


def test_trim_scope_per_tensor_or_over_the_whole_model():
    zero = {"a": torch.zeros(2), "b": torch.zeros(2)}
    fine = {"a": torch.tensor([10.0, 9.0]), "b": torch.tensor([1.0, -2.0])}
    def trimmed(scope, k=0.5):
        return executor.merge_delta("ties", [StateSource(fine)], base=StateSource(zero), params={"k": k, "scope": scope})
    per_tensor, whole = trimmed("tensor"), trimmed("global")
    assert torch.equal(per_tensor["a"], torch.tensor([10.0, 0.0])) and torch.equal(per_tensor["b"], torch.tensor([0.0, -2.0]))
    assert torch.equal(whole["a"], torch.tensor([10.0, 9.0])) and torch.equal(whole["b"], torch.tensor([0.0, 0.0]))
    # global ties at the cut: kept in the model's tensor order, lowest index first, exactly k in all
    tied = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([3.0, 3.0])}
    out = executor.merge_delta("ties", [StateSource(tied)], base=StateSource(zero), params={"k": 0.5, "scope": "global"})
    assert torch.equal(out["a"], torch.tensor([0.0, 3.0])) and torch.equal(out["b"], torch.tensor([3.0, 0.0]))


def test_dare_drops_with_probability_p_and_rescales_exactly():
    tau = torch.full((100_000,), 0.5)
    dropped = sparsify.random_drop(tau, 0.75, key=1)
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.equal(dropped[kept], torch.full((int(kept.sum()),), 2.0))  # 0.5 / (1 - 0.75)
    assert torch.equal(sparsify.random_drop(tau, 0.0, key=1), tau)


def test_dare_is_seeded_per_seed_ingredient_and_tensor_and_l1_rescale_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(1000, generator=g)
    key = sparsify.seed_key(3, 0, "w")
    assert torch.equal(sparsify.random_drop(tau, 0.5, key), sparsify.random_drop(tau, 0.5, sparsify.seed_key(3, 0, "w")))
    for other in (sparsify.seed_key(3, 1, "w"), sparsify.seed_key(4, 0, "w"), sparsify.seed_key(3, 0, "v")):
        assert not torch.equal(sparsify.random_drop(tau, 0.5, key), sparsify.random_drop(tau, 0.5, other))
    l1 = sparsify.random_drop(tau, 0.5, key, "l1")
    torch.testing.assert_close(l1.abs().sum(), tau.abs().sum())


def test_dare_masks_do_not_depend_on_the_device_or_on_chunking(monkeypatch):
    tau = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    whole = sparsify.random_drop(tau, 0.3, key=9)
    monkeypatch.setattr(sparsify, "CHUNK", {"cpu": 777})  # hashed in other pieces: the same entries
    assert torch.equal(sparsify.random_drop(tau, 0.3, key=9), whole)
    bits = sparsify.random_bits(0, 5000, 9, "cpu")
    assert bits.min() >= 0 and bits.max() < 2 ** 32
    assert abs(bits.double().mean().item() / 2 ** 32 - 0.5) < 0.02  # uniform enough to be a coin
    assert sparsify.random_bits(0, 10, 9, "meta").device.type == "meta"  # made where the tensor lives


def test_dare_merges_the_dropped_task_vectors_by_ties_or_task_arithmetic():
    states = models([1.0, 2.0, 3.0, 4.0], [1.0, -2.0, 3.0, 0.5])
    for method in ("dare_ties", "dare_linear"):
        assert torch.equal(delta(method, states, {"p": 0.0}), delta(method.replace("dare_linear", "task_arithmetic")
                                                                    .replace("dare_ties", "ties"), states, {"k": 1.0}
                                                                    if method == "dare_ties" else None))
    a, b = delta("dare_ties", states, {"seed": 1}), delta("dare_ties", states, {"seed": 1})
    assert torch.equal(a, b)


def test_model_stock_identical_fine_tunes_keep_them_and_orthogonal_ones_fall_back():
    same = run("model_stock", models([1.0, 2.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0]))
    assert same.notes["w"].item() == pytest.approx(1.0)
    torch.testing.assert_close(same.state["w"], torch.tensor([2.0, 3.0, 1.0, 0.0]))
    orthogonal = run("model_stock", models([1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]))
    assert orthogonal.notes["w"].item() == 0.0
    assert torch.equal(orthogonal.state["w"], ZERO["w"])
    opposed = run("model_stock", models([1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]))
    assert opposed.notes["w"].item() == 0.0  # cos -1 is clamped: never away from the fine-tunes
    assert same.state["steps"].item() == 7


def test_model_stock_at_sixty_degrees():
    # cos = 0.5, N = 2: t = 2 * 0.5 / (1 + 0.5) = 2/3
    stock = run("model_stock", models([1.0, 0.0, 0.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0, 0.0]))
    assert stock.notes["w"].item() == pytest.approx(2 / 3, abs=1e-6)
    torch.testing.assert_close(stock.state["w"], torch.tensor([1.5, 1 + math.sqrt(3) / 6, 1.0, 1.0]))


def test_model_stock_mean_pairwise_cosine_from_running_sums():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(4, generator=g) + 1 for _ in range(5)]
    stock = run("model_stock", models(*[t.tolist() for t in taus]))
    cos = [torch.nn.functional.cosine_similarity(a, b, dim=0) for i, a in enumerate(taus) for b in taus[i + 1:]]
    mean_cos = float(torch.stack(cos).mean())
    assert stock.notes["w"].item() == pytest.approx(min(1.0, 5 * mean_cos / (1 + 4 * mean_cos)), abs=1e-5)
    with pytest.raises(MergeError, match="at least 2"):
        run("model_stock", models([1.0, 0.0, 0.0, 0.0]))


def test_fisher_weights_each_entry_by_its_fisher():
    states = [{"w": torch.tensor([1.0, 2.0, 4.0]), "n": torch.tensor(3)},
              {"w": torch.tensor([3.0, 6.0, 8.0]), "n": torch.tensor(5)}]
    fishers = [{"w": torch.tensor([1.0, 0.0, 0.0])},  # entry 1: the first model's Fisher is 0
               {"w": torch.tensor([3.0, 2.0, 0.0])}]  # entry 2: nobody's Fisher covers it
    merged = executor.merge("fisher", [StateSource(s) for s in states],
                            side={"fisher": [StateSource(f) for f in fishers]}).state
    # entry 0: (1*1 + 3*3) / 4; entry 1: the second dominates (the first floored at 1e-6); entry 2: the plain mean
    expected = torch.tensor([2.5, (1e-6 * 2 + 2 * 6) / (1e-6 + 2), 6.0])
    torch.testing.assert_close(merged["w"], expected)
    assert merged["n"].item() == 3  # integer buffers: the first model's


def test_fisher_normalised_and_tensors_without_a_fisher():
    states = [{"w": torch.tensor([0.0, 0.0]), "bn": torch.tensor([1.0])},
              {"w": torch.tensor([1.0, 1.0]), "bn": torch.tensor([3.0])}]
    fishers = [StateSource({"w": torch.tensor([30.0, 40.0])}), StateSource({"w": torch.tensor([0.3, 0.4])})]
    def fisher(normalize):
        return executor.merge("fisher", [StateSource(s) for s in states], params={"normalize": normalize},
                              side={"fisher": fishers}).state
    plain, normalised = fisher(False), fisher(True)
    torch.testing.assert_close(plain["w"], torch.tensor([0.3 / 30.3, 0.4 / 40.4]))  # the larger Fisher dominates
    torch.testing.assert_close(normalised["w"], torch.tensor([0.5, 0.5]))  # both norms 1: equal weights
    assert plain["bn"].item() == 2.0  # no Fisher: the plain mean
    with pytest.raises(MergeError, match="needs one fisher per ingredient"):
        executor.merge("fisher", [StateSource(s) for s in states], side={"fisher": fishers[:1]})


def test_merges_compute_in_float32_and_keep_dtypes():
    zero = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    states = [{"w": torch.tensor([1.5, 2.0], dtype=torch.bfloat16)}, {"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)}]
    d = executor.merge_delta("ties", [StateSource(s) for s in states], base=StateSource(zero), params={"k": 1.0})
    assert d["w"].dtype == torch.float32
    merged = run("ties", states, {"k": 1.0}, base=zero).state
    assert merged["w"].dtype == torch.bfloat16 and merged["w"].tolist() == [1.5, 3.0]


@pytest.mark.parametrize("method, params, message", [
    ("ties", {"k": 0.0}, r"ties: k must be in \(0, 1\]"),
    ("ties", {"scope": "layer"}, "scope must be one of"),
    ("dare_ties", {"p": 1.0}, r"p must be in \[0, 1\)"),
    ("dare_linear", {"rescale": "l2"}, "rescale must be one of"),
    ("task_arithmetic", {"k": 0.2}, "unknown setting 'k'"),
    ("linear", {"weights": [1.0]}, "1 weights for 2 ingredients"),
    ("nosuch", {}, "unknown merge method 'nosuch'"),
])
def test_bad_settings_are_one_line_errors(method, params, message):
    with pytest.raises(MergeError, match=message) as err:
        run(method, models([1.0, 0, 0, 0], [0, 1.0, 0, 0]), params)
    assert "\n" not in str(err.value)
