"""Bad input to soup_sweep: one line naming the problem, exit 2, nothing written."""

import os
import subprocess
import sys

import pytest

from orchestrator import soup_sweep


@pytest.mark.parametrize("args, expected", [
    (["--address", "127.0.0.1:1"], "Ray address '127.0.0.1:1': nothing answers"),
    (["--address", "no-port-here"], "expected host:port"),
    (["--tracking-uri", "http://127.0.0.1:1"], "cannot reach the MLflow server"),
    (["--tracking-uri", "sqlite:////nonexistent-dir/x.db"], "folder /nonexistent-dir does not exist"),
    (["--config", "/nonexistent.yaml"], "/nonexistent.yaml: no such file"),
    (["num_samples=abc"], "num_samples: expected int, got 'abc'"),
    (["hyperparameters.lr={loguniform: [1.0e-2, 1.0e-3]}"], "hyperparameters.lr.loguniform: empty or inverted range"),
    (["task.name=imagenet"], "task.name: unknown task 'imagenet'"),
    (["bogus=1"], "bogus: unknown key"),
    (["--skip-train"], "not a pool"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    code = soup_sweep.main(["--pool", str(tmp_path / "pool"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert os.listdir(tmp_path) == []  # no pool folder, no mlflow.db, no ray_results


def test_a_pool_mixing_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notapool").mkdir()
    (tmp_path / "notapool" / "data.txt").write_text("mine")
    code = soup_sweep.main(["--pool", str(tmp_path / "notapool"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert code == 2 and "is not empty and is not a pool" in err
    assert sorted(os.listdir(tmp_path / "notapool")) == ["data.txt"]
    assert not (tmp_path / "m.db").exists()


def test_no_traceback_by_default_and_one_with_debug(tmp_path):
    cmd = [sys.executable, "-m", "orchestrator.soup_sweep", "--pool", str(tmp_path / "p"), "bogus=1"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    loud = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines() == ["error: " + quiet.stderr.strip().split("error: ", 1)[1]]
    assert loud.returncode == 2 and "Traceback" in loud.stderr
