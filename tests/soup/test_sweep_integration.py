"""A tiny soup sweep end to end on local Ray: pool rows, nested MLflow runs, recipes, plot."""

import contextlib
import io
import os
import re

import pytest
from mlflow import MlflowClient

from orchestrator import soup_sweep
from orchestrator.common.pool import Pool
from orchestrator.soup.config import load_config, make_task
from orchestrator.soup.recipes import RECIPES, default_recipes
from tests.helpers import TINY_TASK


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root}/mlflow.db"
    args = ["--pool", str(root / "pool"), "--tracking-uri", uri, "--storage", str(root / "ray_results"),
            "--num-samples", "3", "sweep=tiny", *TINY_TASK]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert soup_sweep.main(args) == 0
    swept.stdout = out.getvalue()
    return root, uri, args


def runs_by_role(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("orchestrator.role"), []).append(r)
    return client, by_role


def test_pool_holds_pretrained_trials_and_soups(swept):
    root, _, _ = swept
    df = Pool(str(root / "pool")).manifest()
    assert (df["kind"] == "pretrained").sum() == 1
    trials = df[df["kind"] == "trial"]
    assert len(trials) == 3 and set(trials["status"]) == {"ok"}
    assert trials["id"].is_unique
    pre_id = df[df["kind"] == "pretrained"]["id"].iloc[0]
    assert all(list(p) == [pre_id] for p in trials["parents"])
    for col in ("val_acc", "id_acc", "ood_acc", "acc_ood_fonts", "acc_ood_noise", "acc_ood_rotate", "acc_ood_blur"):
        assert trials[col].between(0, 1).all(), col
    assert all(len(h) >= 1 for h in trials["history"])  # per-epoch history kept for replay
    soups = df[df["kind"] == "soup"]
    recipes = sorted(h["recipe"] for h in soups["hparams"])
    greedy_kept = len(next(r["parents"] for _, r in soups.iterrows() if r["hparams"]["recipe"] == "greedy_soup"))
    per_recipe = {"wise_ft": 2, "model_stock": 1 + (greedy_kept >= 2)}  # one per base; all and the greedy's
    makers = [r for r in default_recipes() if RECIPES[r].produces_weights]
    assert recipes == sorted(r for r in makers for _ in range(per_recipe.get(r, 1)))
    fishers = df[df["kind"] == "fisher"]  # each trial's diagonal Fisher, the fisher recipe's input
    assert sorted(p[0] for p in fishers["parents"]) == sorted(trials["id"])
    assert all(h["examples"] == 256 for h in fishers["hparams"])
    uniform = soups[[h["recipe"] == "uniform_soup" for h in soups["hparams"]]].iloc[0]
    assert sorted(uniform["parents"]) == sorted(trials["id"])
    assert (soups["mlflow_run_id"] != "").all()
    assert Pool(str(root / "pool")).verify() == []


def test_task_vector_merges_record_how_they_were_made(swept):
    root, uri, _ = swept
    soups = Pool(str(root / "pool")).manifest().query("kind == 'soup'")
    made = {h["recipe"]: h for h in soups["hparams"]}
    assert made["ties"]["k"] == 0.2 and made["ties"]["trim"] == "tensor" and made["ties"]["sign_tie"] == "+1"
    assert made["ties"]["lambda"] in load_config()["soup"]["ties_lambdas"]
    assert {made["dare"][k] for k in ("p", "merge", "rescale", "seed")} == {0.5, "ties", "exact", 0}
    assert made["task_arithmetic"]["lambda"] in load_config()["soup"]["task_arithmetic_lambdas"]
    stocks = {h["from"]: h for h in soups["hparams"] if h["recipe"] == "model_stock"}
    assert stocks["all"]["n_ingredients"] == 3 and 0 <= stocks["all"]["t_median"] <= 1
    client, by_role = runs_by_role(uri)
    runs = {r.data.tags["orchestrator.recipe"]: r for r in by_role["recipe"]}
    arithmetic = client.get_metric_history(runs["task_arithmetic"].info.run_id, "curve_val_acc")
    assert len(arithmetic) == len(load_config()["soup"]["task_arithmetic_lambdas"])
    stock = runs["model_stock"].info.run_id  # either of its dishes: both draw their t
    assert {"ingredients.json", "t_per_tensor.png"} <= {a.path for a in client.list_artifacts(stock)}
    import mlflow

    mlflow.set_tracking_uri(uri)
    t = mlflow.artifacts.load_dict(f"runs:/{stock}/ingredients.json")["t_per_tensor"]
    assert len(t) > 4 and all(0 <= v <= 1 for v in t.values())


def test_greedy_soup_not_worse_than_best_individual_on_val(swept):
    root, _, _ = swept
    df = Pool(str(root / "pool")).manifest()
    best_val = df[df["kind"] == "trial"]["val_acc"].max()
    greedy = df[[isinstance(h, dict) and h.get("recipe") == "greedy_soup" for h in df["hparams"]]].iloc[0]
    assert greedy["val_acc"] >= best_val


def test_mlflow_has_parent_nested_trials_and_recipes(swept):
    import mlflow

    root, uri, _ = swept
    mlflow.set_tracking_uri(uri)
    client, by_role = runs_by_role(uri)
    (parent,) = by_role["sweep"]
    assert parent.info.status == "FINISHED"
    # what the MLflow UI shows: a model-training experiment, the run's source and user, and the
    # summary table as the run's description
    assert client.get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.tags["mlflow.user"] and parent.data.tags["mlflow.source.name"]
    note = parent.data.tags["mlflow.note.content"]  # Markdown tables, which the run page renders
    assert "| dish | val | ID |" in note and "\n| greedy soup (" in note and "Difference to the best individual" in note
    assert note.count("\n| ") >= 2 * 3  # every dish's row in both tables, none cut
    # one name per number: val_acc is acc_val, so only val_acc is logged (as the trial runs name it)
    assert "zero_shot_val_acc" in parent.data.metrics and "zero_shot_acc_val" not in parent.data.metrics
    assert "zero_shot_natural_acc" in parent.data.metrics and "zero_shot_acc_ood_fonts" not in parent.data.metrics
    assert "zero_shot_corrupt_acc" in parent.data.metrics and "zero_shot_acc_ood_noise" in parent.data.metrics
    assert parent.data.params["pool"] == str(root / "pool")
    assert float(parent.data.params["ray_cpus"]) >= 1
    trials = by_role["trial"]
    assert len(trials) == 3
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"lr", "weight_decay", "epochs", "seed"} <= set(t.data.params)
        assert {"val_acc", "id_acc", "ood_acc", "acc_ood_fonts", "train_loss"} <= set(t.data.metrics)
        assert t.data.tags["orchestrator.ingredient_id"] == t.data.tags["orchestrator.trial_id"]
        assert t.info.status == "FINISHED" and t.data.tags["orchestrator.status"] == "ok"
        assert t.data.tags["mlflow.user"] and t.data.tags["mlflow.source.name"]  # logged from the driver
        assert not {"time_this_iter_s", "training_iteration", "epoch"} & set(t.data.metrics)  # ours only
        assert t.data.params["batch_size"] == "32" and t.data.params["warmup_frac"] == "0.1"  # defaults filled in
        history = client.get_metric_history(t.info.run_id, "val_acc")
        assert len(history) == int(t.data.params["epochs"])  # one point per epoch
        # the instability signals: a point every log_every optimizer steps (epoch 0 starts at step 0)
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "rms_t_first")]
        assert steps[:2] == [0, 10] and len(steps) == len(set(steps))
        assert t.data.metrics["update_spikes"] >= 0
    recipes = by_role["recipe"]
    assert {r.data.tags["orchestrator.recipe"] for r in recipes} == set(default_recipes())
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in recipes)
    greedy = next(r for r in recipes if r.data.tags["orchestrator.recipe"] == "greedy_soup")
    artifacts = {a.path for a in client.list_artifacts(greedy.info.run_id)}
    assert "ingredients.json" in artifacts
    wise = [r for r in recipes if r.data.tags["orchestrator.recipe"] == "wise_ft"]
    assert len(client.get_metric_history(wise[0].info.run_id, "curve_id_acc")) == 11
    # the best dish, registered with its alias (a fresh process loads it: tests/soup/test_published_model.py)
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert champion.tags["orchestrator.sweep"] == "tiny" and champion.tags["orchestrator.recipe"]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"soups_id_vs_ood.png", "manifest.parquet", "config.yaml", "summary_table.json"} <= parent_artifacts
    table = client.load_table(parent.info.experiment_id, "summary_table.json", run_ids=[parent.info.run_id])
    assert {"best individual", "uniform soup"} <= set(table["dish"]) and table["val_acc"].between(0, 1).all()
    inputs = {(d.dataset.name, d.tags[0].value) for d in client.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert {("glyphs/train", "training"), ("glyphs/val", "evaluation"), ("glyphs/ood_fonts", "evaluation")} <= inputs
    trial_inputs = client.get_run(trials[0].info.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in trial_inputs] == [
        (name, digest) for name, digest in ((d.dataset.name, d.dataset.digest)
                                            for d in client.get_run(parent.info.run_id).inputs.dataset_inputs)
        if name == "glyphs/train"]


def test_soup_is_logged_as_a_loadable_mlflow_model(swept):
    import mlflow
    import numpy as np
    import torch

    _, uri, _ = swept
    _, by_role = runs_by_role(uri)
    greedy = next(r for r in by_role["recipe"] if r.data.tags["orchestrator.recipe"] == "greedy_soup")
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{greedy.info.run_id}/model")
    # the served model is the soup in the pool: the same logits on real digits
    root, _, _ = swept
    task = make_task(load_config(None, ["sweep=tiny", *TINY_TASK]))
    torch_model = task.build_model()
    torch_model.load_state_dict(Pool(str(root / "pool")).load(greedy.data.tags["orchestrator.ingredient_id"]))
    digits = task.serve_example()
    with torch.no_grad():
        want = task.logits(torch_model.eval(), task.serve_inputs(digits)).numpy()
    out = model.predict(digits)
    assert out.shape == (3, 10) and np.allclose(out, want, rtol=1e-5, atol=1e-6)


def test_skip_train_recooks_without_duplicates(swept):
    root, uri, args = swept
    before = Pool(str(root / "pool")).manifest()
    assert soup_sweep.main(args + ["--skip-train"]) == 0
    after = Pool(str(root / "pool")).manifest()
    assert len(after) == len(before)  # same soups, same ids: nothing added twice
    _, by_role = runs_by_role(uri)
    assert len(by_role["sweep"]) == 2 and len(by_role["trial"]) == 3


def test_recipes_subset_cooks_only_those_and_what_they_need(swept, capsys):
    root, uri, args = swept
    assert soup_sweep.main(args + ["--skip-train", "soup.recipes=[wise_ft]"]) == 0
    out = capsys.readouterr().out
    assert "soup.recipes: also cooking best_individual, greedy_soup (needed by wise_ft)" in out
    # the first sweep cooked them from the same ingredients: their dishes come from the pool
    assert "reused the dishes of 3 of 3 recipes from the pool (cooked before from the same ingredients, settings " \
           "and code): best_individual, greedy_soup, wise_ft" in out
    assert "zero-shot" not in out and "WiSE-FT greedy soup" in out


def test_terminal_output_is_progress_and_summary_only():
    out = swept.stdout
    lines = out.strip().splitlines()
    dishes = int(next(line for line in lines if line.startswith("cooked ")).split()[1])
    recipes = sum(line.startswith("  [") for line in lines)  # one progress line per recipe cooked
    assert recipes == len(default_recipes())
    assert len(lines) < 35 + recipes + 2 * dishes, out  # 3 trials, cooking, the two tables, where things, phases
    assert sum(line.startswith("[") and "/3 " in line for line in lines) == 3  # one line per finished trial
    assert "greedy soup" in out and "log:" in out and "update spikes: " in out
    assert "registered model tiny version 1 (alias champion): " in out
    phases = lines[lines.index("phases:") + 1:]  # the last lines: where each phase ran, how long it took
    assert [p.split()[0] for p in phases] == ["setup", "train", "cook", "publish", "report"]
    assert "Ray Tune: 3 trials on 1 node(s)" in phases[1] and "Ray worker(s)" in phases[2]
    for noise in ("Trial status", "╭", "snapshotting", "Checkpoint successfully", "tensorboard", "type hints"):
        assert noise not in out


def test_logged_config_round_trips_through_config_flag(swept, tmp_path):
    root, uri, args = swept
    client, by_role = runs_by_role(uri)
    first = min(by_role["sweep"], key=lambda r: r.info.start_time)
    path = client.download_artifacts(first.info.run_id, "config.yaml", str(tmp_path))
    expected = load_config(None, ["sweep=tiny", *TINY_TASK, "num_samples=3"])
    assert load_config(path) == expected


def summary_of(out: str) -> str:
    return out[out.index("95% intervals"):out.index("data map of sweep")]


def test_running_the_sweep_again_reuses_its_trials_and_dishes(swept, capsys):
    """The same command again: every trial and every recipe's dishes from the pool, no new recipe
    run, no new registered version, the same summary; a changed setting cooks that recipe and
    the recipes that need it again, and nothing else."""
    root, uri, args = swept
    assert soup_sweep.main(args) == 0  # other tests of this module may have moved the alias since the first run
    first = capsys.readouterr().out
    before = Pool(str(root / "pool")).manifest()
    client, by_role = runs_by_role(uri)
    recipe_runs, versions = len(by_role["recipe"]), len(client.search_model_versions("name = 'tiny'"))
    assert soup_sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "reused 3 of 3 trials from the pool" in out and out.count(": reused ") == 3
    assert "reused the dishes of 11 of 11 recipes from the pool" in out and "cooking " not in out
    assert re.search(r"registered nothing new: tiny version \d+ \(alias champion\) holds these weights already", out)
    assert summary_of(out) == summary_of(first) == summary_of(globals()["swept"].stdout)  # the first run's dishes
    after = Pool(str(root / "pool")).manifest()
    assert sorted(after["id"]) == sorted(before["id"])  # no trial trained again, the same soups and cooks
    client, by_role = runs_by_role(uri)
    assert len(by_role["trial"]) == 3 and "same weights as" not in out
    assert len(by_role["recipe"]) == recipe_runs and len(client.search_model_versions("name = 'tiny'")) == versions

    assert soup_sweep.main([*args, "soup.greedy_accept=>"]) == 0  # the greedy soup's rule changes
    out = capsys.readouterr().out
    cooked_again = sorted(re.findall(r"\] (\w+): \d+ dish", out))
    assert cooked_again == ["greedy_soup", "model_stock", "wise_ft"], out  # it and what needs it
    assert "reused the dishes of 8 of 11 recipes" in out


def test_fisher_asked_for_a_pool_without_fishers_is_a_clear_error(swept, tmp_path, capsys):
    import shutil

    root, _, args = swept
    older = tmp_path / "older_pool"  # as a pool from before Fisher estimates: the same rows minus those
    shutil.copytree(root / "pool", older)
    for row in (older / "manifest").glob("*.fisher.parquet"):
        row.unlink()
    uri = f"sqlite:///{tmp_path}/fresh.db"
    pool_at = args.index("--pool") + 1
    again = [*args[:pool_at], str(older), *args[pool_at + 1:], "--tracking-uri", uri, "--skip-train"]
    assert soup_sweep.main(again + ["soup.recipes=[uniform_soup, fisher]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: soup.recipes: fisher cannot cook from {older}: no ingredient has a Fisher")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "fresh.db").exists() or MlflowClient(uri).get_experiment_by_name("tiny") is None


def test_skip_train_on_a_fresh_folder_is_a_clear_error(tmp_path, capsys):
    code = soup_sweep.main(["--pool", str(tmp_path / "nothing"), "--tracking-uri",
                            f"sqlite:///{tmp_path}/m.db", "--skip-train"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and "not a pool" in err[0]
    assert not os.path.exists(tmp_path / "nothing")


def test_diverging_trial_is_recorded_not_errored(ray_session, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = soup_sweep.main(["--pool", str(tmp_path / "pool"), "--tracking-uri", uri,
                            "--storage", str(tmp_path / "ray_results"), "--num-samples", "1", "sweep=boom",
                            *TINY_TASK, "hyperparameters.lr=1.0e+30", "hyperparameters.epochs=2"])
    assert code == 2  # nothing usable to cook from: a clear error, not a crash
    assert "no usable trial ingredients" in capsys.readouterr().err
    df = Pool(str(tmp_path / "pool")).manifest()
    (row,) = df[df["kind"] == "trial"].to_dict("records")
    assert row["status"] == "diverged" and row["weights"] == ""
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("boom").experiment_id],
                                filter_string="tags.`orchestrator.role` = 'trial'")
    assert run.data.tags["orchestrator.status"] == "diverged" and run.info.status == "FAILED"


def cooked_by(swept, workers, names, selection="all"):
    """The swept pool's dishes cooked in the test process (workers 0, one thread) or on Ray actors."""
    import torch

    from orchestrator.soup.config import make_task
    from orchestrator.soup.cooking import KitchenSpec, cook_on_ray
    from orchestrator.soup.recipes import cook

    root, _, _ = swept
    cfg = load_config(None, ["sweep=tiny", *TINY_TASK])
    task = make_task(cfg)
    spec = KitchenSpec(str(root / "pool"), task.name, task.model_settings(), (task.pretrained_id(), task.data_key()),
                       "tiny",
                       {"precision": "fp32", "bn_batches": 2, "selection": selection}, threads=1)
    data = task.data()
    finished = []
    if workers == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return cook(spec.kitchen(data), names, cfg["soup"]), finished
        finally:
            torch.set_num_threads(threads)
    done = lambda name, dishes, seconds, actors: finished.append((name, actors))  # noqa: E731
    cooked_by.progress = []  # the actors' evaluations so far, as cooking reported them
    return cook_on_ray(spec, data, names, cfg["soup"], workers, {"cpu": 1, "gpu": 0}, done,
                       progress=cooked_by.progress.append, period=0.02), finished


def test_cooking_on_two_ray_workers_gives_the_dishes_of_cooking_in_one_process(swept):
    import torch

    names = ["greedy_soup", "ensemble", "wise_ft", "ties", "model_stock", "fisher"]  # wise_ft: in two parts
    alone, _ = cooked_by(swept, 0, names)
    parallel, finished = cooked_by(swept, 2, names)
    assert sorted(name for name, _ in finished) == sorted(["best_individual", *names])  # one call per recipe
    actors = dict(finished)
    # the greedy soup's loop is one unit, on one actor; WiSE-FT's 2 x 11 points, the ensemble's
    # members and TIES's lambdas are evaluations of their own, spread over both
    assert actors["greedy_soup"] == 1 and actors["wise_ft"] == 2
    counts = cooked_by.progress  # evaluations reported while the recipes cooked: they only grow
    assert counts and counts == sorted(counts) and counts[-1] > 0
    assert [d.name for d in parallel] == [d.name for d in alone]  # the recipes' order, whoever finished first
    for a, p in zip(alone, parallel):
        assert a.metrics == p.metrics and a.parents == p.parents, a.name
        assert (a.weights is None) == (p.weights is None)
        if a.weights is not None:
            assert all(torch.equal(a.weights[k], p.weights[k]) for k in a.weights), a.name  # bit for bit
        assert all((a.correct[s] == p.correct[s]).all() for s in a.correct)


def test_held_out_selection_measures_candidates_on_the_held_out_split_only(swept):
    from orchestrator.soup.kitchen import Kitchen
    from orchestrator.soup.recipes import cook

    root, _, _ = swept
    cfg = load_config(None, ["sweep=tiny", *TINY_TASK])
    task = make_task(cfg)
    kitchen = Kitchen(Pool(str(root / "pool")), task, task.data(), "tiny",
                      {"precision": "fp32", "bn_batches": 2, "selection": "held_out"})
    cook(kitchen, ["task_arithmetic"], cfg["soup"])
    # what cooking progress counts: each lambda on the held-out split, then the dish on all 6 sets
    assert kitchen.evaluations == len(cfg["soup"]["task_arithmetic_lambdas"]) + len(kitchen.data.evals)
    (arithmetic, *_), _ = cooked_by(swept, 0, ["task_arithmetic"], selection="held_out")
    assert all(set(point) == {"lambda", "val_acc"} for point in arithmetic.curve)  # candidates: val only
    assert len(arithmetic.curve) == len(load_config()["soup"]["task_arithmetic_lambdas"])
    assert {"val_acc", "id_acc", "ood_acc"} <= set(arithmetic.metrics)  # the dish: every eval set
    best = max(arithmetic.curve, key=lambda p: p["val_acc"])
    assert arithmetic.params["lambda"] == best["lambda"] and arithmetic.metrics["val_acc"] == best["val_acc"]
