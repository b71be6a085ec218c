"""Faults a sweep survives without losing or duplicating a finished run.

Each sweep runs as its own process with its own local Ray (started in a new process
group that the test kills afterwards), so faults can be injected through the
environment (ORCHESTRATOR_TEST_CRASH, read by orchestrator/common/trial.py) and the driver
itself can be killed.
"""

import os
import re
import shlex
import signal
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


def wait_for_line(root, text, proc, timeout=240.0, log="sweep.log") -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = (root / log).read_text() if (root / log).exists() else ""
        if text in out:
            return out
        assert proc.poll() is None, f"the sweep ended before {text!r}: {out[-3000:]}"
        time.sleep(0.3)
    raise AssertionError(f"no {text!r} in {timeout} s")


def test_ctrl_c_while_training_keeps_what_finished_cooks_nothing_and_resume_finishes(tmp_path):
    """SIGINT to the sweep's process group (what a terminal's Ctrl-C sends) after the first
    trial: exit 130 with one line saying what was kept and the command that continues; no soup,
    no registered version; that command then trains every other trial once and cooks."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = start(sweep_cmd(tmp_path, "ctrlc", 4, "max_concurrent_trials=1", *SLOWER), tmp_path)
    try:
        wait_for_line(tmp_path, "[1/4 ", proc)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        kill_group(proc)
    log = (tmp_path / "sweep.log").read_text()
    assert code == 130, log[-3000:]
    line = next(ln for ln in log.splitlines() if ln.startswith("interrupted (SIGINT): "))
    assert re.match(r"interrupted \(SIGINT\): [1-3] of 4 trials finished and are in the pool ", line), line
    assert "nothing was cooked or registered" in line and "Traceback" not in log
    pool = Pool(str(tmp_path / "pool"))
    kept = trial_rows(pool.uri)
    assert 1 <= len(kept) <= 3 and (pool.manifest()["kind"] == "soup").sum() == 0
    client = MlflowClient(uri)
    assert client.search_registered_models() == []
    (sweep_run,) = client.search_runs([client.get_experiment_by_name("ctrlc").experiment_id],
                                      "tags.`orchestrator.role` = 'sweep'")
    assert sweep_run.info.status == "KILLED"

    again = shlex.split(line.split("Continue with: ", 1)[1])
    assert again[:3] == ["python", "-m", "orchestrator.soup_sweep"] and again[-1] == "--resume"
    code, log = finish(start([sys.executable, *again[1:]], tmp_path, log="resume.log"), tmp_path, log="resume.log")
    assert code == 0, log[-3000:]
    trials = trial_rows(pool.uri)
    assert len(trials) == 4 and trials["id"].is_unique and set(trials["status"]) == {"ok"}
    assert list(trials.set_index("id").loc[kept["id"], "created"]) == list(kept["created"])  # kept as they were
    assert all(e == [1, 2] for e in epochs_logged(uri, "ctrlc").values())  # every trial trained once
    assert (pool.manifest()["kind"] == "soup").sum() >= 1
    assert [str(v.version) for v in client.search_model_versions("name = 'ctrlc'")] == ["1"]


def test_sigterm_to_the_driver_stops_it_and_a_second_one_quits_at_once(tmp_path):
    proc = start(sweep_cmd(tmp_path, "term", 4, "max_concurrent_trials=1", *SLOWER), tmp_path)
    try:
        wait_for_line(tmp_path, "[1/4 ", proc)
        os.kill(proc.pid, signal.SIGTERM)  # a preempted job's driver
        wait_for_line(tmp_path, "SIGTERM: stopping the trials", proc, timeout=30)
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.time()
        code = proc.wait(timeout=60)
        took = time.time() - t0
    finally:
        kill_group(proc)
    log = (tmp_path / "sweep.log").read_text()
    assert code == 143, log[-3000:]
    assert ("SIGTERM again: quitting now" in log and took < 10) or "interrupted (SIGTERM): " in log, log[-3000:]
    assert (Pool(str(tmp_path / "pool")).manifest()["kind"] == "soup").sum() == 0


def test_a_sweep_with_a_failed_trial_says_it_is_partial_and_registers_nothing(tmp_path):
    """One trial crashes with no retries left: the others are cooked, the closing lines say the
    sweep is partial, and no version is registered (publish.partial is false by default)."""
    markers = tmp_path / "crashed"
    markers.mkdir()
    cmd = sweep_cmd(tmp_path, "partial", 3, "max_failures=0", "max_concurrent_trials=1")
    code, log = finish(start(cmd, tmp_path, ORCHESTRATOR_TEST_CRASH=f"1:raise:{markers}", ORCHESTRATOR_TEST_CRASH_ONE="1"),
                       tmp_path)
    assert code == 0, log[-3000:]
    assert len(os.listdir(markers)) == 1
    assert "registered nothing: a partial sweep (2 of 3 trials finished (1 failed after 0 retries))" in log
    assert "partial sweep: 2 of 3 trials finished (1 failed after 0 retries); the dishes above are cooked from " \
           "those only, and the registry alias did not move" in log
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_registered_models() == []


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
