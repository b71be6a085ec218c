"""Dataset cartography's math on hand-computed examples; label noise and training subsets."""

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator.soup.dynamics.cartography import average_maps, example_stats, region_ids, triage, with_regions
from orchestrator.soup.tasks.base import TensorExamples, View, example_ids, flip_labels


def frame(rows):
    return pd.DataFrame(rows, columns=["id", "epoch", "p_gold", "correct", "flipped"])


# three examples over two epochs: 0 is hard (and flipped), 1 easy, 2 ambiguous
DYN = frame([(0, 0, 0.2, False, True), (0, 1, 0.4, False, True),
             (1, 0, 0.9, True, False), (1, 1, 0.9, True, False),
             (2, 0, 0.1, False, False), (2, 1, 0.9, True, False)])


def test_confidence_variability_correctness_by_hand():
    s = example_stats(DYN)
    assert s["confidence"].tolist() == pytest.approx([0.3, 0.9, 0.5])
    assert s["variability"].tolist() == pytest.approx([0.1, 0.0, 0.4])  # population std: |a - b| / 2
    assert s["correctness"].tolist() == [0.0, 1.0, 0.5]
    assert s["epochs"].tolist() == [2, 2, 2]
    assert s["flipped"].tolist() == [True, False, False]


def test_regions_are_the_thirds():
    s = with_regions(example_stats(DYN))
    assert s["region"].tolist() == ["hard_to_learn", "easy", "ambiguous"]
    assert s["ambiguous"].sum() == s["hard_to_learn"].sum() == s["easy"].sum() == 1


def test_triage_precision_and_recall_by_hand():
    rng = np.random.default_rng(0)
    stats = pd.DataFrame({"confidence": rng.uniform(0.5, 1, 100), "variability": 0.0,
                          "flipped": np.zeros(100, bool)}).rename_axis("id")
    stats.loc[[3, 7, 11, 50], "confidence"] = [0.01, 0.02, 0.03, 0.99]  # three found, one missed
    stats.loc[[3, 7, 11, 50], "flipped"] = True
    stats.loc[[20, 21], "confidence"] = [0.04, 0.05]  # clean but low: two false positives
    t = triage(stats, fraction=0.05)  # the lowest 5: ids 3, 7, 11, 20, 21
    assert (t["examples"], t["hits"], t["flipped"]) == (5, 3, 4)
    assert t["precision"] == pytest.approx(3 / 5) and t["recall"] == pytest.approx(3 / 4)


def test_region_selection_is_deterministic_and_sized():
    rng = np.random.default_rng(1)
    stats = pd.DataFrame({"confidence": rng.uniform(size=90), "variability": rng.uniform(size=90)}).rename_axis("id")
    amb = region_ids(stats, "ambiguous", 1 / 3)
    assert len(amb) == 30 and set(amb) == set(stats["variability"].nlargest(30).index)
    assert set(region_ids(stats, "hard_to_learn", 1 / 3)) == set(stats["confidence"].nsmallest(30).index)
    assert set(region_ids(stats, "easy", 1 / 3)) == set(stats["confidence"].nlargest(30).index)
    r1, r2 = region_ids(stats, "random", 1 / 3, seed=5), region_ids(stats, "random", 1 / 3, seed=5)
    assert list(r1) == list(r2) and len(r1) == 30 and list(r1) != list(region_ids(stats, "random", 1 / 3, seed=6))
    tied = pd.DataFrame({"confidence": [0.5] * 6, "variability": 0.0}).rename_axis("id")
    assert list(region_ids(tied, "hard_to_learn", 0.5)) == [0, 1, 2]  # ties broken by id


def test_averaged_map_weighs_trials_equally():
    a = example_stats(DYN)
    b = a.copy()
    b["confidence"] = [0.5, 0.7, 0.1]
    avg = average_maps([a, b])
    assert avg["confidence"].tolist() == pytest.approx([0.4, 0.8, 0.3])
    assert avg["trials"].tolist() == [2, 2, 2]


def test_flip_labels_is_seeded_exact_and_never_keeps_the_class():
    labels = torch.arange(200) % 7
    new, mask = flip_labels(labels, 0.1, seed=3)
    again, mask2 = flip_labels(labels, 0.1, seed=3)
    other, mask3 = flip_labels(labels, 0.1, seed=4)
    assert torch.equal(new, again) and torch.equal(mask, mask2) and not torch.equal(mask, mask3)
    assert int(mask.sum()) == 20
    assert (new[mask] != labels[mask]).all() and torch.equal(new[~mask], labels[~mask])
    assert set(new.tolist()) <= set(range(7))


def test_a_view_keeps_stable_ids_and_its_own_labels():
    base = TensorExamples(torch.arange(10.0)[:, None], torch.arange(10))
    noisy = View(base, torch.arange(10), torch.arange(10) % 2)
    subset = View(noisy, torch.tensor([7, 2, 5]))
    assert example_ids(subset).tolist() == [7, 2, 5] and example_ids(base).tolist() == list(range(10))
    assert subset.labels.tolist() == [1, 0, 1]  # the noisy labels of those examples
    x, y = subset.__getitems__([0, 2])
    assert x[:, 0].tolist() == [7.0, 5.0] and y.tolist() == [1, 1]
    assert subset[1][0].item() == 2.0


def test_selection_from_hand_made_pool_rows(tmp_path):
    """report.select on dynamics rows written by hand: the data key must match, and the ambiguous
    region needs more than one epoch (one-epoch maps have no variability)."""
    import pyarrow as pa

    from orchestrator.common.errors import UserError
    from orchestrator.common.pool import Pool, Row
    from orchestrator.soup.dynamics import report

    pool = Pool(str(tmp_path / "pool"), create=True)
    for trial, start in (("t1", "pre-a"), ("t2", "pre-a"), ("t3", "pre-b")):
        pool.add(Row(id=trial, kind="trial", sweep="ref", task="glyphs", status="ok", parents=[start], data_key="k1"))
    for trial, epochs in (("t1", 1), ("t2", 1)):
        frame = pd.DataFrame({"id": list(range(6)) * epochs, "epoch": [e for e in range(epochs) for _ in range(6)],
                              "p_gold": [0.9, 0.1, 0.5, 0.7, 0.2, 0.6] * epochs, "correct": [True] * 6 * epochs,
                              "flipped": [False] * 6 * epochs})
        pool.add(Row(id=f"{trial}.dynamics", kind="dynamics", sweep="ref", task="glyphs", status="ok",
                     parents=[trial], data_key="k1"), table=pa.Table.from_pandas(frame))
    assert report.select(pool, "ref", "k1", "hard_to_learn", 0.5, 0).tolist() == [1, 2, 4]
    assert sorted(report.load(pool, "ref", "k1", start="pre-a").per_trial) == ["t1", "t2"]
    with pytest.raises(UserError, match="ambiguous needs dynamics over 2 or more epochs"):
        report.select(pool, "ref", "k1", "ambiguous", 0.5, 0)
    with pytest.raises(UserError, match="other training data"):
        report.select(pool, "ref", "k2", "hard_to_learn", 0.5, 0)
    with pytest.raises(UserError, match="no training dynamics of sweep 'nope'"):
        report.select(pool, "nope", "k1", "easy", 0.5, 0)
    frame = pd.DataFrame({"id": range(6), "epoch": 0, "p_gold": 0.5, "correct": True, "flipped": False})
    pool.add(Row(id="t3.dynamics", kind="dynamics", sweep="ref", task="glyphs", status="ok", parents=["t3"],
                 data_key="k1"), table=pa.Table.from_pandas(frame))  # the sweep name reused for another model
    with pytest.raises(UserError, match="from 2 start points"):
        report.select(pool, "ref", "k1", "hard_to_learn", 0.5, 0)
    assert sorted(report.load(pool, "ref", "k1", start="pre-b").per_trial) == ["t3"]
