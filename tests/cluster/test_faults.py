"""Faults a sweep survives without losing or duplicating a finished run.

Each sweep runs as its own process with its own local Ray (started in a new process
group that the test kills afterwards), so faults can be injected through the
environment (ORCHESTRATOR_TEST_CRASH, read by orchestrator/common/trial.py) and the driver
itself can be killed.
"""

import os
import re
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from orchestrator.common.pool import Pool
from tests.helpers import finish, free_port, kill_group, mlflow_server, start, sweep_cmd, trial_rows

pytestmark = pytest.mark.slow
SLOWER = ["hyperparameters.batch_size=8"]  # 4x the steps: a fault lands before the sweep is over


def wait_for_trial_rows(pool_uri, n, proc, timeout=240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before the fault was injected"
        try:
            df = Pool(pool_uri).manifest()
            if (df["kind"] == "trial").sum() >= n:
                return
        except Exception:  # noqa: BLE001 - the pool may not exist yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"no {n} trial rows in {timeout} s")


def epochs_logged(uri, sweep):
    """{ingredient id: [epoch of every val_acc point]}, over the trial runs that carry one."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(sweep)
    runs = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'trial'", max_results=1000)
    return {r.data.tags["orchestrator.ingredient_id"]: sorted(m.step for m in client.get_metric_history(
        r.info.run_id, "val_acc")) for r in runs if "orchestrator.ingredient_id" in r.data.tags}


def test_killed_trial_resumes_from_its_epoch_checkpoint(tmp_path):
    """Each trial's process is SIGKILLed once after epoch 1: the retry resumes at epoch 2
    and the pool gets exactly one row per trial. (tests/test_s3.py has the same with an
    exception and S3 storage.)"""
    markers = tmp_path / "crashed"
    markers.mkdir()
    proc = start(sweep_cmd(tmp_path, "crash", 2), tmp_path, ORCHESTRATOR_TEST_CRASH=f"1:kill:{markers}")
    code, log = finish(proc, tmp_path)
    assert code == 0, log[-3000:]
    crashed = sorted(os.listdir(markers))
    assert len(crashed) == 2  # every trial crashed once ...
    assert log.count("resuming after epoch 1 from its checkpoint") == 2, log[-3000:]  # ... and resumed
    trials = trial_rows(str(tmp_path / "pool"))
    assert sorted(trials["id"]) == crashed and set(trials["status"]) == {"ok"}  # one row each
    assert all([h["epoch"] for h in hist] == [1, 2] for hist in trials["history"])
    # the training dynamics hold each example once per epoch: epoch 0 came back with the checkpoint
    pool = Pool(str(tmp_path / "pool"))
    for trial in crashed:
        frame = pool.load_table(f"{trial}.dynamics").to_pandas()
        assert sorted(frame["epoch"].unique()) == [0, 1] and (frame.groupby(["id", "epoch"]).size() == 1).all()
        assert (frame.groupby("epoch").size() == 899).all()
    # MLflow saw epoch 1 once: the retry continued the run instead of training from scratch
    assert epochs_logged(f"sqlite:///{tmp_path}/mlflow.db", "crash") == {t: [1, 2] for t in crashed}


def test_killed_driver_resumes_with_resume_flag(tmp_path):
    """SIGKILL the driver (and its local Ray) once a trial is in the pool; `--resume`
    restores the Tune run: finished trials are not trained again, nothing is duplicated."""
    cmd = sweep_cmd(tmp_path, "resume", 3, "max_concurrent_trials=1", *SLOWER)
    proc = start(cmd, tmp_path)
    try:
        wait_for_trial_rows(str(tmp_path / "pool"), 1, proc)
    finally:
        kill_group(proc)
    before = trial_rows(str(tmp_path / "pool"))
    assert 1 <= len(before) < 3

    code, log = finish(start(cmd + ["--resume"], tmp_path, log="resume.log"), tmp_path, log="resume.log")
    assert code == 0, log[-3000:]
    assert "resuming " in log
    after = trial_rows(str(tmp_path / "pool"))
    assert len(after) == 3 and after["id"].is_unique and set(after["status"]) == {"ok"}
    kept = after.set_index("id").loc[before["id"], "created"]
    assert list(kept) == list(before["created"])  # the finished rows are untouched
    epochs = epochs_logged(f"sqlite:///{tmp_path}/mlflow.db", "resume")
    assert all(epochs[t] == [1, 2] for t in before["id"]), epochs  # not trained a second time
    assert len(os.listdir(tmp_path / "ray_results")) == 1  # the same Tune run, continued


def test_resume_without_an_earlier_run_is_a_clear_error(tmp_path, capsys):
    from orchestrator import soup_sweep

    code = soup_sweep.main(["--pool", str(tmp_path / "pool"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                            "--storage", str(tmp_path / "nothing"), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--resume: no run of sweep 'glyphs_soup' to restore" in err[0]
    assert os.listdir(tmp_path) == []


def test_mlflow_down_mid_sweep_then_sync_mlflow_replays_the_pool(tmp_path):
    """The tracking server dies after the first trial: the others still finish and land in
    the pool, the driver says how to catch up, and `pool sync-mlflow` replays (idempotently)."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    proc = start(sweep_cmd(tmp_path, "offline", 3, "max_concurrent_trials=1", *SLOWER, uri=uri), tmp_path)
    try:
        wait_for_trial_rows(str(tmp_path / "pool"), 1, proc)
    finally:
        kill_group(server)
    code, log = finish(proc, tmp_path)
    assert code == 2, log[-3000:]
    assert "during the sweep; finished trials are in the pool" in log and "Traceback" not in log.split("cooking")[-1]
    trials = trial_rows(str(tmp_path / "pool"))
    assert len(trials) == 3 and set(trials["status"]) == {"ok"}

    server = mlflow_server(tmp_path, port)
    try:
        sync = [sys.executable, "-m", "orchestrator.pool", "sync-mlflow", "--pool", str(tmp_path / "pool"),
                "--tracking-uri", uri]
        first = subprocess.run(sync, capture_output=True, text=True, cwd=tmp_path)
        second = subprocess.run(sync, capture_output=True, text=True, cwd=tmp_path)
        epochs = epochs_logged(uri, "offline")
        client = MlflowClient(uri)
        tagged = [r.data.tags["orchestrator.ingredient_id"] for r in client.search_runs(
            [client.get_experiment_by_name("offline").experiment_id], max_results=1000)
            if "orchestrator.ingredient_id" in r.data.tags]
    finally:
        kill_group(server)
    assert first.returncode == 0 and "replayed" in first.stdout, first.stderr
    replayed = int(re.search(r"replayed (\d+) ingredients", first.stdout).group(1))
    # the first trial's run reached MLflow before the outage, but maybe not its end: the driver
    # closes a run after the trial's pool row is written, and the server may die in between;
    # the replay then completes that run (each trial still has one run: `tagged` below)
    assert 1 <= replayed <= 3
    assert second.returncode == 0 and "replayed 0 ingredients" in second.stdout  # idempotent
    assert sorted(tagged) == sorted(trials["id"])  # every trial exactly once in MLflow
    assert all(epochs[t] == [1, 2] for t in trials["id"])  # with its per-epoch history
