"""Soup math on small hand-made state dicts: uniform soup, WiSE-FT, greedy soup, ensemble."""

from __future__ import annotations

import weakref

import pytest
import torch

from orchestrator.soup.merge import greedy_soup, interpolate, sum_logits, uniform_soup


def make_state(seed: int, steps: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(3, 4, generator=g),
        "layer.bias": torch.randn(3, generator=g),
        "head.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(seed if steps is None else steps, dtype=torch.int64),
    }


def exact_mean(states: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([s[key].double() for s in states]).mean(0)


# -- uniform soup ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5])
def test_uniform_soup_is_the_elementwise_mean(n):
    states = [make_state(100 + i) for i in range(n)]
    soup = uniform_soup(states)
    assert soup.keys() == states[0].keys()
    for key in ("layer.weight", "layer.bias", "head.weight"):
        assert soup[key].dtype == states[0][key].dtype
        assert soup[key].shape == states[0][key].shape
        torch.testing.assert_close(soup[key].double(), exact_mean(states, key), rtol=1e-6, atol=1e-6)
    # integer buffers are not averaged: they are copied from the first ingredient
    assert soup["bn.num_batches_tracked"].dtype == torch.int64
    assert soup["bn.num_batches_tracked"].item() == 100


def test_uniform_soup_of_one_is_a_copy_not_an_alias():
    state = make_state(1)
    soup = uniform_soup([state])
    for key in state:
        assert torch.equal(soup[key], state[key])
        assert soup[key].data_ptr() != state[key].data_ptr()
    soup["layer.weight"].add_(1.0)
    assert not torch.equal(soup["layer.weight"], state["layer.weight"])


def test_uniform_soup_mean_of_exact_values():
    # values whose mean is exact in float32: 1, 2, 3, 4, 5 -> 3
    states = [{"w": torch.full((2, 2), float(v))} for v in (1, 2, 3, 4, 5)]
    assert torch.equal(uniform_soup(states)["w"], torch.full((2, 2), 3.0))


def test_uniform_soup_streams_a_generator():
    """Consumes a generator lazily, never holding more than the current ingredient."""
    n = 6
    alive: list[weakref.ref] = []
    consumed = []

    def ingredients():
        for i in range(n):
            # uniform_soup's loop variable may still hold ingredient i-1; i-2 must be gone
            if i >= 2:
                assert alive[i - 2]() is None, f"ingredient {i - 2} still referenced when {i} is produced"
            state = make_state(200 + i)
            alive.append(weakref.ref(state["layer.weight"]))
            consumed.append(i)
            yield state
            del state

    expected = [make_state(200 + i) for i in range(n)]
    soup = uniform_soup(ingredients())
    assert consumed == list(range(n))  # everything consumed, once, in order
    torch.testing.assert_close(soup["layer.weight"].double(), exact_mean(expected, "layer.weight"),
                               rtol=1e-6, atol=1e-6)


def test_uniform_soup_of_nothing_raises():
    with pytest.raises(ValueError):
        uniform_soup([])
    with pytest.raises(ValueError):
        uniform_soup(s for s in [])


def test_uniform_soup_rejects_mismatched_shapes():
    a, b = make_state(1), make_state(2)
    b["layer.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="architecture"):
        uniform_soup([a, b])


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_uniform_soup_rejects_mismatched_keys(change):
    a, b = make_state(1), make_state(2)
    if change == "missing":
        del b["layer.bias"]
    else:
        b["other.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="architecture"):
        uniform_soup([a, b])


# -- WiSE-FT interpolation -----------------------------------------------------------------


def test_interpolate_endpoints_and_midpoint():
    zero, fine = make_state(1, steps=7), make_state(2, steps=9)
    at0 = interpolate(zero, fine, 0.0)
    at1 = interpolate(zero, fine, 1.0)
    mid = interpolate(zero, fine, 0.5)
    for key in ("layer.weight", "layer.bias"):  # float32
        assert torch.equal(at0[key], zero[key])
        assert torch.equal(at1[key], fine[key])
        torch.testing.assert_close(mid[key], (zero[key] + fine[key]) / 2)
        assert mid[key].dtype == zero[key].dtype
    # integer buffers come from the zero-shot weights
    assert at0["bn.num_batches_tracked"].item() == 7
    assert at1["bn.num_batches_tracked"].item() == 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpolate_half_precision_endpoints_are_exact(dtype):
    g = torch.Generator().manual_seed(0)
    zero = {"w": torch.randn(16, generator=g).to(dtype)}
    fine = {"w": torch.randn(16, generator=g).to(dtype)}
    assert torch.equal(interpolate(zero, fine, 0.0)["w"], zero["w"])
    assert torch.equal(interpolate(zero, fine, 1.0)["w"], fine["w"])
    assert interpolate(zero, fine, 0.5)["w"].dtype == dtype


def test_soup_math_keeps_float64_precision():
    """float64 tensors must not be rounded through float32.

    interpolate(zero, fine, 0) should return the zero-shot weights, and a soup of one
    ingredient twice should return that ingredient, for every floating dtype.
    """
    g = torch.Generator().manual_seed(0)
    zero = {"w": torch.randn(16, generator=g, dtype=torch.float64)}
    fine = {"w": torch.randn(16, generator=g, dtype=torch.float64)}
    assert torch.equal(interpolate(zero, fine, 0.0)["w"], zero["w"])
    assert torch.equal(interpolate(zero, fine, 1.0)["w"], fine["w"])
    assert torch.equal(uniform_soup([zero, zero])["w"], zero["w"])


def test_interpolate_is_linear_in_alpha():
    zero, fine = {"w": torch.zeros(5)}, {"w": torch.full((5,), 10.0)}
    for alpha in (0.1, 0.3, 0.7):
        torch.testing.assert_close(interpolate(zero, fine, alpha)["w"], torch.full((5,), 10.0 * alpha))


def test_interpolate_rejects_mismatched_states():
    with pytest.raises(ValueError):
        interpolate({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)


# -- greedy soup ---------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]

# Each ingredient is a one-hot vector, so the mean of a set S of ingredients is
# indicator(S) / |S|: the score function can read off which ingredients a candidate
# soup contains, and the test can check the candidate is exactly their mean.
SCORES = {
    frozenset("a"): 0.5,
    frozenset("ab"): 0.6,  # b improves: kept under both rules
    frozenset("abc"): 0.4,  # c hurts: rejected under both rules
    frozenset("abd"): 0.6,  # d ties: kept under ">=", rejected under ">"
    frozenset("abde"): 0.7,  # e improves after d
    frozenset("abe"): 0.65,  # e improves without d
}


def one_hot(name: str) -> dict[str, torch.Tensor]:
    i = NAMES.index(name)
    return {"w": torch.nn.functional.one_hot(torch.tensor(i), len(NAMES)).float(),
            "steps": torch.tensor(10 + i)}


class Recorder:
    def __init__(self):
        self.loads: list[str] = []
        self.scored: list[frozenset] = []

    def load(self, name: str) -> dict[str, torch.Tensor]:
        self.loads.append(name)
        return one_hot(name)

    def score(self, state: dict[str, torch.Tensor]) -> float:
        members = frozenset(NAMES[i] for i in torch.nonzero(state["w"]).flatten().tolist())
        # the candidate must be exactly the uniform mean of its members
        expected = torch.zeros(len(NAMES))
        for m in members:
            expected[NAMES.index(m)] = 1.0 / len(members)
        torch.testing.assert_close(state["w"], expected)
        self.scored.append(members)
        return SCORES.get(members, 0.0)


@pytest.mark.parametrize("accept, kept, accepted, final_score", [
    (">=", list("abde"), [True, True, False, True, True], 0.7),
    (">", list("abe"), [True, True, False, False, True], 0.65),
])
def test_greedy_soup_acceptance_sequence(accept, kept, accepted, final_score):
    rec = Recorder()
    result = greedy_soup(NAMES, rec.load, rec.score, accept=accept)
    assert rec.loads == NAMES  # each ingredient loaded exactly once, in the given order
    assert [s.ingredient for s in result.steps] == NAMES  # each tried exactly once, in order
    assert [s.accepted for s in result.steps] == accepted
    assert result.kept == kept
    assert result.score == final_score
    # candidates tried: the soup alone, then kept-so-far + next
    expected_scored, so_far = [frozenset("a")], {"a"}
    for name, ok in zip(NAMES[1:], accepted[1:]):
        expected_scored.append(frozenset(so_far | {name}))
        if ok:
            so_far.add(name)
    assert rec.scored == expected_scored
    assert [s.score for s in result.steps] == [SCORES[c] for c in expected_scored]
    # the final state is the mean of exactly the kept ingredients
    expected = torch.stack([one_hot(n)["w"] for n in kept]).mean(0)
    torch.testing.assert_close(result.state["w"], expected)
    assert result.state["steps"].item() == 10  # integer buffer from the first ingredient


def test_greedy_soup_tie_rule():
    """The same tie is kept by '>=' (the paper) and dropped by '>' (the reference code)."""
    scores = iter([0.8, 0.8])
    ge = greedy_soup(["a", "b"], one_hot, lambda s: next(scores), accept=">=")
    scores = iter([0.8, 0.8])
    gt = greedy_soup(["a", "b"], one_hot, lambda s: next(scores), accept=">")
    assert ge.kept == ["a", "b"] and ge.steps[1].accepted
    assert gt.kept == ["a"] and not gt.steps[1].accepted
    assert torch.equal(gt.state["w"], one_hot("a")["w"])


def test_greedy_soup_first_score_saves_one_evaluation():
    without, with_first = Recorder(), Recorder()
    r1 = greedy_soup(NAMES, without.load, without.score)
    r2 = greedy_soup(NAMES, with_first.load, with_first.score, first_score=0.5)
    assert len(without.scored) == len(NAMES)
    assert len(with_first.scored) == len(NAMES) - 1
    assert frozenset("a") not in with_first.scored
    assert r2.steps[0].score == 0.5
    assert r1.kept == r2.kept and r1.score == r2.score
    assert torch.equal(r1.state["w"], r2.state["w"])


def test_greedy_soup_first_score_is_the_bar_to_beat():
    # a first score above every candidate's: nothing else is kept
    rec = Recorder()
    result = greedy_soup(NAMES, rec.load, rec.score, first_score=0.99)
    assert result.kept == ["a"]
    assert result.score == 0.99


def test_greedy_soup_single_ingredient():
    rec = Recorder()
    result = greedy_soup(["a"], rec.load, rec.score)
    assert result.kept == ["a"] and rec.loads == ["a"] and result.score == 0.5


@pytest.mark.parametrize("accept", ["=>", ">>", "ge", "", "<"])
def test_greedy_soup_bad_accept(accept):
    with pytest.raises(ValueError, match="accept"):
        greedy_soup(NAMES, one_hot, lambda s: 0.0, accept=accept)


def test_greedy_soup_of_nothing_raises():
    with pytest.raises(ValueError):
        greedy_soup([], one_hot, lambda s: 0.0)


def test_greedy_soup_rejects_mismatched_ingredient():
    def load(name):
        return one_hot("a") if name == "a" else {"w": torch.zeros(3), "steps": torch.tensor(0)}

    with pytest.raises(ValueError):
        greedy_soup(["a", "x"], load, lambda s: 0.0)


# -- output ensemble -------------------------------------------------------------------------


def test_sum_logits_per_key():
    members = [
        {"val": torch.tensor([[1.0, 2.0]]), "ood": torch.tensor([[0.0, 3.0], [6.0, 0.0]])},
        {"val": torch.tensor([[3.0, 4.0]]), "ood": torch.tensor([[3.0, 3.0], [0.0, 0.0]])},
        {"val": torch.tensor([[5.0, 0.0]]), "ood": torch.tensor([[0.0, 3.0], [3.0, 3.0]])},
    ]
    out = sum_logits(iter(members))
    assert set(out) == {"val", "ood"}
    torch.testing.assert_close(out["val"], torch.tensor([[9.0, 6.0]]))
    torch.testing.assert_close(out["ood"], torch.tensor([[3.0, 9.0], [9.0, 3.0]]))
    # the inputs are left untouched
    assert torch.equal(members[0]["val"], torch.tensor([[1.0, 2.0]]))


def test_sum_logits_single_member_is_a_copy_and_empty_raises():
    x = {"val": torch.randn(4, 3)}
    out = sum_logits([x])
    assert torch.equal(out["val"], x["val"]) and out["val"] is not x["val"]
    with pytest.raises(ValueError):
        sum_logits([])
