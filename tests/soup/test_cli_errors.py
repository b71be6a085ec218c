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
    (["task.label_noise=1.5"], "task.label_noise: must be a number in [0, 1), got 1.5"),
    (["data_selection.region=middle"], "data_selection.region: must be one of ambiguous, hard_to_learn, easy, random"),
    (["data_selection.fraction=0"], "data_selection.fraction: must be a number in (0, 1], got 0"),
    (["data_selection.from_sweep=glyphs_soup"], "data_selection.from_sweep: must name another sweep"),
    (["data_selection.form_sweep=ref"], "data_selection.form_sweep: unknown key"),
    (["data_selection.from_sweep=ref"], "not a pool"),  # a selection reads an existing pool
    (["record_dynamics=maybe"], "record_dynamics"),
    (["search.algorithm=bayes"], "search.algorithm: must be one of random, grid, optuna, hyperopt"),
    (["search.algorithm=grid"], "search.algorithm: grid needs every hyperparameter a constant or a grid, not lr"),
    (["search.algorithm=optuna", "hyperparameters.seed={grid: [1, 2]}"], "seed need choice, not grid"),
    (["search.scheduler=hyperband"], "search.scheduler: must be one of fifo, asha"),
    (["search.reduction_factor=1"], "search.reduction_factor: must be >= 2"),
    (["hyperparameters.optimizer=sgd"], "hyperparameters.optimizer: must be one of adamw, stableadamw, got 'sgd'"),
    (["hyperparameters.log_every=0"], "hyperparameters.log_every: must be an integer >= 1"),
    (["hyperparameters.spike_threshold={choice: [2.0, 0.5]}"], "hyperparameters.spike_threshold: must be a number > 1"),
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


# -- pools that cannot be cooked as they are -------------------------------------------------

def tiny_pool(tmp_path, trials):
    """A pool with (untrained) pretrained weights of the tiny task and the given trials:
    {id: model width}; width 8 is the tiny task's own architecture."""
    from orchestrator.soup.config import load_config, make_task
    from orchestrator.common.pool import Pool, Row
    from orchestrator.common.weights import arch_fingerprint
    from orchestrator.soup.train import cpu_state
    from tests.helpers import TINY_TASK

    task = make_task(load_config(None, TINY_TASK))
    pool = Pool(str(tmp_path / "pool"), create=True)
    state = cpu_state(task.build_model())
    pool.add(Row(id=task.pretrained_id(), kind="pretrained", sweep="", task=task.name, status="ok",
                 arch=arch_fingerprint(state)), state)
    for i, (trial_id, width) in enumerate(trials.items()):
        other = make_task(load_config(None, [*TINY_TASK, f"task.width={width}"]))
        weights = cpu_state(other.build_model())
        pool.add(Row(id=trial_id, kind="trial", sweep="glyphs_soup", task=task.name, status="ok",
                     arch=arch_fingerprint(weights), metrics={"val_acc": 0.5 + i / 10},
                     parents=[task.pretrained_id()], data_key=task.data_key()), weights)
    return pool, task


def test_a_pool_mixing_architectures_skips_the_odd_ones_naming_them(tmp_path, caplog):
    from orchestrator.soup.kitchen import Kitchen

    pool, task = tiny_pool(tmp_path, {"good-a": 8, "wide-b": 16, "good-c": 8})
    kitchen = Kitchen(pool, task, data=None, sweep="glyphs_soup", settings={"precision": "auto", "bn_batches": 8})
    assert [r["id"] for r in kitchen.loadable()] == ["good-c", "good-a"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("skipping ingredient wide-b: architecture")


def test_a_pool_of_only_other_architectures_is_a_clear_error(tmp_path, capsys, caplog):
    from tests.helpers import TINY_TASK

    tiny_pool(tmp_path, {"wide-a": 16, "narrow-b": 4})
    code = soup_sweep.main(["--pool", str(tmp_path / "pool"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                            "--skip-train", *TINY_TASK])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"error: {tmp_path}/pool: no usable trial ingredients to cook from"
    assert sorted(line.split(":")[1] for line in err[:-1]) == [" skipping ingredient narrow-b",
                                                                " skipping ingredient wide-a"]  # why, on the terminal
    skipped = sorted(r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "WARNING")
    assert skipped == ["skipping ingredient narrow-b", "skipping ingredient wide-a"]  # one warning each
    assert not os.path.exists(tmp_path / "m.db")  # refused before MLflow was touched


def test_only_trials_of_this_start_point_and_split_are_cooked(tmp_path, caplog):
    """One sweep name, four trials: two from these pretrained weights and this split, one
    on another held-out split, one from other starting weights (another pretrain_seed, say)."""
    from orchestrator.common.pool import Row
    from orchestrator.soup.config import load_config, make_task
    from orchestrator.soup.kitchen import Kitchen
    from tests.helpers import TINY_TASK

    pool, task = tiny_pool(tmp_path, {"same-a": 8, "same-b": 8})
    other_split = make_task(load_config(None, [*TINY_TASK, "task.split_seed=1"]))
    assert other_split.pretrained_id() == task.pretrained_id() and other_split.data_key() != task.data_key()
    weights = pool.load("same-a")
    for trial_id, parent, key in (("split-1", task.pretrained_id(), other_split.data_key()),
                                  ("elsewhere", "pretrained-glyphs-other", task.data_key())):
        pool.add(Row(id=trial_id, kind="trial", sweep="glyphs_soup", task=task.name, status="ok",
                     arch=pool.get("same-a")["arch"], metrics={"val_acc": 0.99}, parents=[parent],
                     data_key=key), weights)
    settings = {"precision": "auto", "bn_batches": 8}
    kitchen = Kitchen(pool, task, data=None, sweep="glyphs_soup", settings=settings)
    assert sorted(r["id"] for r in kitchen.ingredients) == ["same-a", "same-b"]
    warned = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert warned == ["left out 1 trial(s) of sweep glyphs_soup: other start point pretrained-glyphs-other",
                      "left out 1 trial(s) of sweep glyphs_soup: other training data or held-out split"]
    assert [r["id"] for r in Kitchen(pool, other_split, None, "glyphs_soup", settings).ingredients] == ["split-1"]


def test_corrupt_and_missing_weights_are_never_souped(tmp_path, caplog):
    from orchestrator.soup.kitchen import Kitchen

    pool, task = tiny_pool(tmp_path, {"ok-a": 8, "corrupt-b": 8, "missing-c": 8})
    from tests.helpers import weights_file

    with open(weights_file(tmp_path / "pool", "corrupt-b"), "r+b") as blob:
        blob.seek(-4, os.SEEK_END)
        blob.write(b"\0\0\0\0")
    os.remove(weights_file(tmp_path / "pool", "missing-c"))
    kitchen = Kitchen(pool, task, data=None, sweep="glyphs_soup", settings={"precision": "auto", "bn_batches": 8})
    assert [r["id"] for r in kitchen.loadable()] == ["ok-a"]
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "corrupt (sha256 mismatch" in warnings[0] and warnings[0].startswith("skipping ingredient corrupt-b")
    assert "missing" in warnings[1] and warnings[1].startswith("skipping ingredient missing-c")


def test_skip_train_on_an_empty_pool_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    from orchestrator.common.pool import Pool

    Pool(str(tmp_path / "pool"), create=True)
    code = soup_sweep.main(["--pool", str(tmp_path / "pool"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                            "--skip-train"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "no pretrained weights for task glyphs" in err[0] and "run a sweep without --skip-train first" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["pool"] and sorted(os.listdir(tmp_path / "pool")) == ["pool.json"]


def test_no_torch_load_without_weights_only_and_no_pickle_for_weights():
    from tests.helpers import REPO

    checked = 0
    for dirpath, _, files in os.walk(os.path.join(REPO, "orchestrator")):
        for name in files:
            if name.endswith(".py"):
                checked += 1
                with open(os.path.join(dirpath, name)) as f:
                    text = f.read()
                for call in text.split("torch.load(")[1:]:
                    assert "weights_only=True" in call.split(")\n")[0], name
                assert "import pickle" not in text and "torch.save(model" not in text, name
    assert checked > 40  # every module of the package was read


def test_invalid_yaml_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("num_samples: [1, 2\nsweep: x\n")
    code = soup_sweep.main(["--config", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {tmp_path}/bad.yaml") and "YAML" in err[0], err
    assert os.listdir(tmp_path) == ["bad.yaml"]
