"""A tiny LR-sensitivity study end to end on local Ray: pool rows, nested MLflow runs, CSV."""


import pandas as pd
import pytest
from mlflow import MlflowClient

from orchestrator import lr_sensitivity
from orchestrator.common.pool import Pool

# Smaller than the quick preset: 2 widths x 2 LRs x 2 interventions, 20 steps, 1 MB of text.
TINY = [
    "study=tiny_proxy", "data.max_mb=1", "settings.head_dim=8", "settings.seq_len=32", "settings.batch_size=4",
    "settings.steps=20", "settings.warmup_steps=4", "settings.log_every=5", "settings.eval_batches=2",
    "settings.probe_step=10", "settings.base_width=16", "grid.widths=[16, 32]", "grid.lrs=[1.0e-2, 1.0e-1]",
    "grid.interventions=[baseline, mup]", "analysis.target_width=128",
]
TRIAL_METRICS = {"train_loss", "attn_logit_max_l0", "log_z_mean", "grad_norm", "grad_rms_embed", "update_rms_embed",
                 "rms_t_embed", "rms_t_mlp0", "val_loss"}


@pytest.fixture(scope="module")
def study(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("lr_study")
    uri = f"sqlite:///{root}/mlflow.db"
    common = ["--pool", str(root / "pool"), "--tracking-uri", uri, "--storage", str(root / "ray_results")]
    assert lr_sensitivity.main([*common, "--preset", "quick", *TINY]) == 0
    return root, uri, common


def runs_by_role(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_proxy")
    by_role = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        by_role.setdefault(r.data.tags.get("orchestrator.role"), []).append(r)
    return client, by_role


def test_pool_rows_are_proxy_runs(study):
    root, _, _ = study
    pool = Pool(str(root / "pool"))
    df = pool.manifest()
    assert len(df) == 8 and set(df["kind"]) == {"proxy"} and df["id"].is_unique
    assert set(df["status"]) <= {"ok", "diverged"}
    points = {(h["intervention"], h["width"], h["lr"]) for h in df["hparams"]}
    assert len(points) == 8
    ok = df[df["status"] == "ok"]
    assert len(ok) and (ok["weights"] != "").all() and (ok["final_loss"] < ok["init_loss"]).all()
    assert all(len(h) >= 4 for h in df["history"])  # step diagnostics kept for replay
    assert pool.verify() == []


def test_nested_mlflow_runs_with_step_metrics(study):
    _, uri, _ = study
    client, by_role = runs_by_role(uri)
    (parent,) = by_role["study"]
    trials = by_role["trial"]
    assert len(trials) == 8
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert all(t.info.status == "FINISHED" for t in trials)
    assert TRIAL_METRICS <= set(trials[0].data.metrics)
    assert len(client.get_metric_history(trials[0].info.run_id, "train_loss")) >= 4


def test_csv_and_plots_on_the_parent_run(study):
    root, uri, _ = study
    client, by_role = runs_by_role(uri)
    parent = by_role["study"][0].info.run_id
    path = client.download_artifacts(parent, "lr_sensitivity.csv", str(root))
    table = pd.read_csv(path)
    assert {"intervention", "width", "params", "lr_sensitivity", "optimal_lr", "best_loss", "init_loss",
            "diverged_runs"} <= set(table.columns)
    assert len(table) == 4 and (table["lr_sensitivity"] >= 0).all()
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert plots == {f"plots/{n}.png" for n in ("loss_vs_lr", "lr_sensitivity_vs_width", "attn_logit_vs_lr",
                                                  "attn_logit_forecast")}
    for name in ("lr_transfer.csv", "logit_forecast.csv"):
        assert len(pd.read_csv(client.download_artifacts(parent, name, str(root)))) > 0


def test_skip_train_reanalyses_the_pool(study, capsys):
    root, uri, common = study
    capsys.readouterr()
    assert lr_sensitivity.main([*common, "--preset", "quick", "--skip-train", "--target-width", "256", *TINY]) == 0
    out = capsys.readouterr().out
    assert "LR sensitivity" in out and "predicted at width 256" in out and "8/8 runs analysed" in out
    assert len(runs_by_role(uri)[1]["study"]) == 2
    assert len(Pool(str(root / "pool")).manifest()) == 8  # nothing retrained


def test_a_second_launch_reuses_the_grid_points_the_pool_holds(study, capsys):
    root, uri, common = study
    capsys.readouterr()
    more = [t if not t.startswith("grid.lrs=") else "grid.lrs=[1.0e-2, 1.0e-1, 3.0e-2]" for t in TINY]
    assert lr_sensitivity.main([*common, "--preset", "quick", *more]) == 0
    out = capsys.readouterr().out
    assert "reused 8 of 12 proxy runs from the pool" in out and "12/12 runs analysed" in out
    assert len(Pool(str(root / "pool")).manifest()) == 12  # only the 4 new grid points trained
    assert len(runs_by_role(uri)[1]["trial"]) == 12


def test_resume_without_an_earlier_run_is_a_clear_error(tmp_path, capsys):
    code = lr_sensitivity.main(["--pool", str(tmp_path / "p"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                                "--storage", str(tmp_path / "nothing"), "--resume", "--preset", "quick"])
    assert code == 2
    assert "--resume: no run of study 'proxy_lr-quick' to restore" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert lr_sensitivity.main(["--pool", str(tmp_path / "p"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                                "grid.lrs=[-1]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "grid.lrs" in err and "\n" not in err
