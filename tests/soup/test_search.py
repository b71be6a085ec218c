"""`search:` picks Tune's search algorithm and scheduler; ASHA's stopped trials land in the pool."""

import contextlib
import io

import pytest
from mlflow import MlflowClient

from orchestrator import soup_sweep
from orchestrator.common import tune
from orchestrator.common.pool import Pool
from tests.helpers import TINY_TASK


def first_point(algorithm: str, seed: int) -> dict:
    from ray import tune as ray_tune

    searcher = tune.search_algorithm(algorithm, seed, 0)
    searcher.set_search_properties("val_acc", "max", {"lr": ray_tune.loguniform(1e-4, 1e-2)})
    return searcher.suggest("trial_1")


@pytest.mark.parametrize("algorithm", ["optuna", "hyperopt"])
def test_searchers_are_seeded_by_search_seed(algorithm):
    assert first_point(algorithm, 3) == first_point(algorithm, 3) != first_point(algorithm, 4)


def test_searchers_are_capped_by_max_concurrent_trials():
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    assert isinstance(tune.search_algorithm("random", 3, 0), BasicVariantGenerator)
    optuna = tune.search_algorithm("optuna", 3, 2)
    assert isinstance(optuna, ConcurrencyLimiter) and optuna.max_concurrent == 2
    assert isinstance(optuna.searcher, OptunaSearch)
    assert not isinstance(tune.search_algorithm("optuna", 3, 0), ConcurrencyLimiter)


def test_asha_rungs_follow_the_config():
    assert tune.scheduler({"scheduler": "fifo"}, "epoch", 8) is None
    asha = tune.scheduler({"scheduler": "asha", "grace_period": 1, "reduction_factor": 2}, "epoch", 8)
    assert asha._time_attr == "epoch" and asha._max_t == 8
    assert sorted(milestone for milestone, _ in asha._brackets[0]._rungs) == [1, 2, 4, 8]


@pytest.fixture(scope="module")
def asha_sweep(ray_session, tmp_path_factory):
    """Four trials one at a time, the first with a good learning rate and three barely moving:
    ASHA compares each at epoch 1 with those before it and stops the worse."""
    root = tmp_path_factory.mktemp("asha")
    uri = f"sqlite:///{root}/mlflow.db"
    args = ["--pool", str(root / "pool"), "--tracking-uri", uri, "--storage", str(root / "ray_results"),
            "--num-samples", "1", "sweep=asha", *TINY_TASK, "hyperparameters.epochs=4",
            "hyperparameters.lr={grid: [3.0e-3, 1.0e-7, 1.0e-7, 1.0e-7]}", "max_concurrent_trials=1",
            "search.scheduler=asha", "soup.recipes=[best_individual, uniform_soup]"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert soup_sweep.main(args) == 0
    return root, uri, args, out.getvalue()


def test_stopped_trials_are_in_the_pool_with_their_metrics_at_the_stop(asha_sweep):
    root, uri, _, out = asha_sweep
    df = Pool(str(root / "pool")).manifest()
    trials = df[df["kind"] == "trial"]
    stopped, ok = trials[trials["status"] == "stopped"], trials[trials["status"] == "ok"]
    assert len(stopped) >= 1 and len(ok) >= 1 and len(trials) == 4, trials[["id", "status"]]
    assert f"ASHA stopped {len(stopped)} of 4 trials early" in out
    for row in stopped.to_dict("records"):
        epochs = [h["epoch"] for h in row["history"]]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 4  # stopped before its last epoch
        assert row["metrics"]["val_acc"] == row["history"][-1]["val_acc"]  # the metrics at the stop
        assert row["hparams"]["lr"] == 1e-7 and row["sha256"]  # with the weights of its last epoch
    assert all(len(h) == 4 for h in ok["history"])
    # soups from finished trials only (the default)
    uniform = df[[isinstance(h, dict) and h.get("recipe") == "uniform_soup" for h in df["hparams"]]].iloc[0]
    assert sorted(uniform["parents"]) == sorted(ok["id"])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id],
                              "tags.`orchestrator.status` = 'stopped'")
    assert sorted(r.data.tags["orchestrator.ingredient_id"] for r in runs) == sorted(stopped["id"])
    assert all(r.info.status == "FINISHED" for r in runs)


def test_stopped_trials_are_ingredients_when_asked(asha_sweep, capsys):
    root, _, args, _ = asha_sweep
    assert soup_sweep.main([*args, "--skip-train", "soup.stopped_ingredients=true"]) == 0
    assert "stopped early" not in capsys.readouterr().out
    df = Pool(str(root / "pool")).manifest()
    trials = df[df["kind"] == "trial"]
    soups = df[[isinstance(h, dict) and h.get("recipe") == "uniform_soup" for h in df["hparams"]]]
    assert any(sorted(p) == sorted(trials["id"]) for p in soups["parents"])  # all four, stopped ones too


def test_a_stopped_data_parallel_trial_is_published_from_its_ray_train_checkpoint(tmp_path):
    """A data-parallel trial's Tune result has no checkpoint of its own: TuneReportCallback puts the
    Ray Train checkpoint's path in the metrics, and the stopped trial's row is made from that."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from orchestrator.soup.trial import SweepContext, publish_stopped, stopped_early

    checkpoint = tmp_path / "checkpoint_000000"
    checkpoint.mkdir()
    weights = {"w": torch.arange(4.0)}
    save_file(weights, str(checkpoint / "model.safetensors"))
    torch.save({"history": [{"epoch": 1, "val_acc": 0.5}]}, checkpoint / "train_state.pt")
    result = SimpleNamespace(error=None, checkpoint=None, path=str(tmp_path / "run" / "abc_00003"),
                             config={"lr": 1e-3, "epochs": 4},
                             metrics={"val_acc": 0.5, "epoch": 1, "diverged": 0.0, "checkpoint_path": str(checkpoint)})
    assert stopped_early(result)
    ctx = SweepContext(sweep="dp", pool_uri=str(tmp_path / "pool"), cpus_per_trial=1, task_name="glyphs",
                       pretrained_id="pretrained-x", data_key="key", storage=str(tmp_path))
    Pool(ctx.pool_uri, create=True)
    publish_stopped(result, ctx)
    row = Pool(ctx.pool_uri).get("abc_00003")
    assert row["status"] == "stopped" and row["metrics"] == {"val_acc": 0.5}
    assert row["history"] == [{"epoch": 1, "val_acc": 0.5}] and row["hparams"]["epochs"] == 4
    assert torch.equal(Pool(ctx.pool_uri).load("abc_00003")["w"], weights["w"])
    assert not stopped_early(SimpleNamespace(error=None, checkpoint=None, metrics={"val_acc": 0.5, "epoch": 1}))
