"""The greedy soup loop on the engine, with one-hot ingredients whose mean tells the score
function exactly which ingredients a candidate holds."""

from __future__ import annotations

import pytest
import torch

from orchestrator.common.errors import MergeError
from orchestrator.merging import executor
from orchestrator.merging.greedy import greedy_soup
from orchestrator.merging.sources import StateSource

NAMES = ["a", "b", "c", "d", "e"]
SCORES = {
    frozenset("a"): 0.5,
    frozenset("ab"): 0.6,  # b improves: kept under both rules
    frozenset("abc"): 0.4,  # c hurts: rejected under both rules
    frozenset("abd"): 0.6,  # d ties: kept under ">=", rejected under ">"
    frozenset("abde"): 0.7,  # e improves after d
    frozenset("abe"): 0.65,  # e improves without d
}


def one_hot(name: str) -> StateSource:
    i = NAMES.index(name)
    return StateSource({"w": torch.nn.functional.one_hot(torch.tensor(i), len(NAMES)).float(),
                        "steps": torch.tensor(10 + i)}, name)


class Recorder:
    def __init__(self):
        self.opened: list[str] = []
        self.scored: list[frozenset] = []

    def source(self, name: str) -> StateSource:
        self.opened.append(name)
        return one_hot(name)

    def score(self, state) -> float:
        members = frozenset(NAMES[i] for i in torch.nonzero(state["w"]).flatten().tolist())
        expected = torch.zeros(len(NAMES))
        for m in members:
            expected[NAMES.index(m)] = 1.0 / len(members)
        torch.testing.assert_close(state["w"], expected)  # the candidate is exactly the mean of its members
        self.scored.append(members)
        return SCORES.get(members, 0.0)


@pytest.mark.parametrize("accept, kept, accepted, final_score", [
    (">=", list("abde"), [True, True, False, True, True], 0.7),
    (">", list("abe"), [True, True, False, False, True], 0.65),
])
def test_greedy_soup_acceptance_sequence(accept, kept, accepted, final_score):
    rec = Recorder()
    result = greedy_soup(NAMES, rec.source, rec.score, accept=accept)
    assert rec.opened == NAMES  # each ingredient opened once, in order
    assert [s.ingredient for s in result.steps] == NAMES
    assert [s.accepted for s in result.steps] == accepted
    assert result.kept == kept and result.score == final_score
    expected_scored, so_far = [frozenset("a")], {"a"}
    for name, ok in zip(NAMES[1:], accepted[1:]):
        expected_scored.append(frozenset(so_far | {name}))
        if ok:
            so_far.add(name)
    assert rec.scored == expected_scored
    torch.testing.assert_close(result.state["w"], torch.stack([one_hot(n).state["w"] for n in kept]).mean(0))
    assert result.state["steps"].item() == 10  # integer buffer from the first ingredient


def test_a_greedy_soup_that_keeps_everything_is_the_uniform_soup_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    states = [StateSource({"w": (torch.randn(999, generator=g) * 0.1 + 1).bfloat16()}, str(i)) for i in range(6)]
    result = greedy_soup(list(range(6)), states.__getitem__, lambda s: 1.0)
    assert len(result.kept) == 6
    assert torch.equal(result.state["w"], executor.merge("linear", states).state["w"])


def test_greedy_soup_tie_rule():
    scores = iter([0.8, 0.8])
    ge = greedy_soup(["a", "b"], one_hot, lambda s: next(scores), accept=">=")
    scores = iter([0.8, 0.8])
    gt = greedy_soup(["a", "b"], one_hot, lambda s: next(scores), accept=">")
    assert ge.kept == ["a", "b"] and ge.steps[1].accepted
    assert gt.kept == ["a"] and not gt.steps[1].accepted
    assert torch.equal(gt.state["w"], one_hot("a").state["w"])


def test_greedy_soup_first_score_saves_one_evaluation_and_is_the_bar():
    without, with_first = Recorder(), Recorder()
    r1 = greedy_soup(NAMES, without.source, without.score)
    r2 = greedy_soup(NAMES, with_first.source, with_first.score, first_score=0.5)
    assert len(without.scored) == len(NAMES) and len(with_first.scored) == len(NAMES) - 1
    assert r1.kept == r2.kept and r1.score == r2.score and torch.equal(r1.state["w"], r2.state["w"])
    assert greedy_soup(NAMES, one_hot, Recorder().score, first_score=0.99).kept == ["a"]


@pytest.mark.parametrize("ranked, accept, message", [
    (NAMES, "=>", "accept must be"), ([], ">=", "no ingredients"),
])
def test_greedy_soup_bad_input(ranked, accept, message):
    with pytest.raises(MergeError, match=message):
        greedy_soup(ranked, one_hot, lambda s: 0.0, accept=accept)


def test_greedy_soup_rejects_a_mismatched_ingredient():
    def source(name):
        return one_hot("a") if name == "a" else StateSource({"w": torch.zeros(3), "steps": torch.tensor(0)}, "x")

    with pytest.raises(MergeError, match="x: tensor 'w' has shape"):
        greedy_soup(["a", "x"], source, lambda s: 0.0)
