"""Training dynamics through real sweeps on local Ray: recorded per trial into the pool, the
data map on the sweep's MLflow run and from the command line, label noise, and an FTFT sweep
that trains on the ambiguous third of another sweep's map."""

import contextlib
import io

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from orchestrator import data_map, soup_sweep
from orchestrator.common.pool import Pool
from orchestrator.soup.dynamics import report
from orchestrator.soup.config import load_config, make_task
from tests.helpers import TINY_TASK

FAST = [*TINY_TASK, "hyperparameters.epochs={randint: [2, 3]}", "soup.recipes=[uniform_soup]", "cook.workers=0"]
NOISY = ["task.label_noise=0.1", "task.label_noise_seed=7"]


def run_sweep(root, sweep, *more):
    args = ["--pool", str(root / "pool"), "--tracking-uri", f"sqlite:///{root}/mlflow.db",
            "--storage", str(root / "ray_results"), "--num-samples", "2", f"sweep={sweep}", *FAST, *more]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = soup_sweep.main(args)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamics")
    code, out = run_sweep(root, "ref", *NOISY)
    assert code == 0, out
    return root, out


def test_every_trial_records_each_example_once_per_epoch_with_its_flip(reference):
    root, _ = reference
    pool = Pool(str(root / "pool"))
    df = pool.manifest()
    trials, dyn = df[df["kind"] == "trial"], df[df["kind"] == "dynamics"]
    assert sorted(p[0] for p in dyn["parents"]) == sorted(trials["id"])
    task = make_task(load_config(None, [*FAST, *NOISY]))
    data = task.training_data()
    assert int(data.flipped.sum()) == round(0.1 * len(data.train))
    for r in dyn.to_dict("records"):
        frame = pool.load_table(r).to_pandas()
        epochs = int(trials.set_index("id").loc[r["parents"][0], "hparams"]["epochs"])
        assert len(frame) == len(data.train) * epochs and (frame.groupby(["id", "epoch"]).size() == 1).all()
        assert sorted(frame["epoch"].unique()) == list(range(epochs))
        flips = frame.groupby("id")["flipped"].first()
        assert torch.equal(torch.as_tensor(flips.to_numpy()), data.flipped)
        assert frame["p_gold"].between(0, 1).all()
    assert (trials["data_key"] == task.data_key()).all() and task.data_key() != make_task(load_config(None, FAST)).data_key()


def test_the_sweep_logs_its_data_map_and_prints_label_error_triage(reference):
    root, out = reference
    assert "data map of sweep ref:" in out and "label-error triage (" in out
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("ref")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'sweep'")
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "data_map")}
    assert {"data_map/data_map.png", "data_map/data_map.parquet", "data_map/hard_to_learn.png",
            "data_map/hard_to_learn.txt"} <= files
    assert 0 <= parent.data.metrics["triage_precision_averaged"] <= 1


def test_the_command_line_draws_the_same_map(reference, tmp_path):
    root, _ = reference
    args = ["--pool", str(root / "pool"), "--sweep", "ref", "--out", str(tmp_path), *TINY_TASK, *NOISY]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert data_map.main(args) == 0
    table = pd.read_parquet(tmp_path / "data_map.parquet")
    assert {"confidence", "variability", "correctness", "region", "label", "flipped"} <= set(table.columns)
    assert table["hard_to_learn"].sum() == round(len(table) / 3)
    assert "averaged over 2 trials" in out.getvalue()
    assert (tmp_path / "data_map.png").stat().st_size > 10_000


def test_clean_labels_are_other_training_data_for_the_map(reference, capsys):
    root, _ = reference
    assert data_map.main(["--pool", str(root / "pool"), "--sweep", "ref", *TINY_TASK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other training data" in err[0]


def test_an_ftft_sweep_trains_on_the_ambiguous_third_of_the_reference(reference):
    root, _ = reference
    pool = Pool(str(root / "pool"))
    before = set(pool.manifest()["id"])
    code, out = run_sweep(root, "main", *NOISY, "data_selection.from_sweep=ref", "data_selection.region=ambiguous")
    assert code == 0, out
    df = Pool(str(root / "pool")).manifest()
    new = df[~df["id"].isin(before)]
    (selection,) = new[new["kind"] == "selection"].to_dict("records")
    key = make_task(load_config(None, [*FAST, *NOISY])).data_key()
    chosen = report.select(pool, "ref", key, "ambiguous", 0.33, 0)
    assert selection["hparams"]["ids"] == chosen.tolist()  # deterministic given the reference's dynamics
    assert selection["hparams"]["examples"] == round(0.33 * 899)
    for r in new[new["kind"] == "dynamics"].to_dict("records"):
        assert sorted(pool.load_table(r).to_pandas()["id"].unique()) == chosen.tolist()  # the full set's ids
    trials = new[new["kind"] == "trial"]
    assert len(trials) == 2 and (trials["data_key"] == selection["data_key"]).all() and selection["data_key"] != key
    assert f"data_selection: training on {len(chosen)} of 899 examples" in out
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (parent,) = client.search_runs([client.get_experiment_by_name("main").experiment_id],
                                   "tags.`orchestrator.role` = 'sweep'")
    assert "data_selection.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # the sweep keeps its selection: re-cooking (or resuming, or more trials) trains on the same examples
    code, again = run_sweep(root, "main", *NOISY, "data_selection.from_sweep=ref", "--skip-train")
    assert code == 0 and "(the selection this sweep made before" in again, again[-2000:]


@pytest.mark.parametrize("more, message", [
    (["data_selection.from_sweep=nobody"], "no training dynamics of sweep 'nobody'"),
    (["data_selection.from_sweep=ref"], "other training data"),  # ref trained on noisy labels
])
def test_a_selection_without_matching_dynamics_is_one_line_and_writes_nothing(reference, capsys, more, message):
    root, _ = reference
    rows = set(Pool(str(root / "pool")).manifest()["id"])
    code, out = run_sweep(root, "bad", *more)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert set(Pool(str(root / "pool")).manifest()["id"]) == rows
    assert MlflowClient(f"sqlite:///{root}/mlflow.db").get_experiment_by_name("bad") is None
