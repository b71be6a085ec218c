"""Serving the dishes: every dish a nested MLflow run; every dish with new weights a pool
row (kind=soup) and an MLflow model; the best dish, on request, a new version of a
registered model with an alias (e.g. `champion`) that serving loads it by. Driven by the
recipes' declarations."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from safetensors.torch import save as st_save

from orchestrator.common import tracking
from orchestrator.common.pool import Pool, Row, safe_id
from orchestrator.common.weights import StateDict, arch_fingerprint, digest
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.plots import per_tensor_histogram
from orchestrator.soup.recipes import RECIPES
from orchestrator.soup.tasks.base import Task

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # orchestrator/
# what every logged model imports when it loads (pyarrow: the task modules import it); a task
# adds its own (Task.serve_requirements)
REQUIREMENTS = ("torch", "safetensors", "numpy", "pyarrow", "mlflow")
DEFAULT_ALIAS = "champion"
SHA256 = "orchestrator.sha256"  # a registered version's tag: the sha256 of its weights file in the pool


@dataclass
class Served:
    run_ids: list[str]  # each dish's MLflow run
    version: str | None = None  # the registered version the alias points at, if one was asked for


class Publisher:
    """Where one sweep invocation's dishes go: its pool, its MLflow experiment and parent run."""

    def __init__(self, pool: Pool, uri: str, experiment: str, parent: str):
        self.pool, self.uri, self.experiment, self.parent = pool, uri, experiment, parent

    def serve(self, dishes: list[Dish], sweep: str, task: Task, register: dict[str, str] | None = None,
              logged: dict[int, str] | None = None) -> Served:
        """Log every dish not `logged` already (id(dish) -> its run, for dishes reused from an earlier
        cook); with `register` ({"name": ..., "alias": ...}; name defaults to the sweep, alias to
        "champion"), register the best dish (`champion`) unless the alias holds its weights already.
        Returns each dish's run id and the version the alias points at (None: nothing registered)."""
        logged = logged or {}
        best = champion(dishes) if register is not None else None
        run_ids = [logged.get(id(dish)) or self.serve_one(dish, sweep, task, model=dish is best) for dish in dishes]
        if register is None:
            return Served(run_ids)
        if best is None:
            print("registered nothing: no dish with weights and a val accuracy")
            return Served(run_ids)
        best_run = next(run_id for dish, run_id in zip(dishes, run_ids) if dish is best)  # `is`: dishes hold tensors
        name, alias = register.get("name") or sweep, register.get("alias") or DEFAULT_ALIAS
        ingredient = ingredient_id(best, sweep)
        sha = self.pool.get(ingredient)["sha256"] if ingredient and self.pool.has(ingredient) else \
            hashlib.sha256(st_save(best.weights)).hexdigest()  # as the pool names a file of these weights
        current = alias_version(self.uri, name, alias)
        if current is not None and current.tags.get(SHA256) == sha:
            print(f"registered nothing new: {name} version {current.version} (alias {alias}) holds these weights "
                  f"already ({best.label} [{best.recipe}], {accuracies(best.metrics)})")
            return Served(run_ids, str(current.version))
        if not has_logged_model(self.uri, best_run):  # a reused dish that was not the one to register before
            log_model(self.uri, best_run, best.weights if best.weights is not None else self.pool.load(ingredient), task)
        description, tags = version_notes(best, sweep, ingredient)
        version = register_best(self.uri, best_run, name, alias, description, {**tags, SHA256: sha})
        print(f"registered model {name} version {version} (alias {alias}): {best.label} [{best.recipe}], "
              f"{accuracies(best.metrics)}")
        return Served(run_ids, version)

    def serve_one(self, dish: Dish, sweep: str, task: Task, model: bool = False) -> str:
        """Log one dish as a nested run (its id returned); new weights also go to the pool and
        become an MLflow model. `model`: log the dish's weights as a model even when they are
        not new (the best individual, when it is the dish to register)."""
        params = dish.params
        tags = tracking.run_tags("recipe", self.parent, {tracking.RECIPE: dish.recipe, tracking.SWEEP: sweep})
        run_id = tracking.start_run(self.uri, self.experiment, dish.label, tags, params)
        tracking.log_metrics(self.uri, run_id, dish.metrics)
        curve_x = RECIPES[dish.recipe].curve_x
        for point in dish.curve:  # MLflow steps are integers: the curve's x in hundredths
            tracking.log_metrics(self.uri, run_id, {f"curve_{k}": v for k, v in point.items() if k != curve_x},
                                 step=round(point[curve_x] * 100))
        tracking.log_dict(self.uri, run_id, {"ingredients": dish.parents, **dish.params, **dish.details},
                          "ingredients.json")
        histogram = RECIPES[dish.recipe].histogram
        if histogram in dish.details:
            with tempfile.TemporaryDirectory() as tmp:
                values = dish.details[histogram]
                tracking.log_file(self.uri, run_id, per_tensor_histogram(
                    values, os.path.join(tmp, f"{histogram}.png"), f"{dish.label}: {histogram} over {len(values)} tensors",
                    histogram))
        new_weights = RECIPES[dish.recipe].produces_weights and dish.weights is not None
        if new_weights:
            soup_id = ingredient_id(dish, sweep)
            self.pool.add(Row(id=soup_id, kind="soup", sweep=sweep, task=task.name, status="ok",
                              arch=arch_fingerprint(dish.weights), hparams={"recipe": dish.recipe, **params},
                              metrics=dish.metrics, parents=dish.parents, mlflow_run_id=run_id), dish.weights)
            tracking.set_tags(self.uri, run_id, {tracking.INGREDIENT: soup_id})
        if dish.weights is not None and (new_weights or model):
            log_model(self.uri, run_id, dish.weights, task)
        tracking.end_run(self.uri, run_id)
        return run_id


def log_model(uri: str, run_id: str, weights: StateDict, task: Task) -> None:
    """Log weights as a complete MLflow pyfunc model: code + safetensors (no pickle), the files
    the task builds the model from, a signature and input example, pinned requirements."""
    import mlflow
    from safetensors.torch import save_file

    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        save_file(weights, path)
        files = task.serve_files(os.path.join(tmp, "files"))
        example = task.serve_example()
        with mlflow.start_run(run_id=run_id):
            mlflow.pyfunc.log_model(
                name="model",
                python_model=os.path.join(PACKAGE, "soup", "mlflow_model.py"),
                artifacts={"weights": path, **files},
                # "files": the settings that mlflow_model.py points at the bundled copies
                model_config={"task": task.name, "settings": task.serve_settings(), "files": sorted(files)},
                code_paths=[PACKAGE],
                pip_requirements=requirements(task),
                signature=signature(task, weights, example),
                input_example=example,
            )


def signature(task: Task, weights: StateDict, example: Any):
    """The model's signature, inferred from the example run through the model itself: raw inputs
    in, (N, n_labels) float32 logits out."""
    import torch
    from mlflow.models import infer_signature

    model = task.build_model()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        logits = task.logits(model, task.serve_inputs(example)).float().numpy()
    return infer_signature(example, logits)


def requirements(task: Task) -> list[str]:
    return [pinned(dist) for dist in (*REQUIREMENTS, *task.serve_requirements())]


def pinned(dist: str) -> str:
    """`dist==<installed release>`: the versions the model was logged (and its signature checked)
    with. The local label is dropped (torch 2.14.1+cpu -> torch==2.14.1), so any build of that
    release, CPU or CUDA, satisfies it."""
    try:
        return f"{dist}=={importlib.metadata.version(dist).split('+')[0]}"
    except importlib.metadata.PackageNotFoundError:
        return dist


def champion(dishes: list[Dish]) -> Dish | None:
    """The dish to serve: of the dishes with weights, the one with the highest held-out (val)
    accuracy. A tie goes to the dish cooked first (the simpler recipe: the best individual
    before a greedy soup that kept only it), not to the higher ID accuracy: the ID and OOD test
    sets report the champion and never choose it."""
    with_weights = [d for d in dishes if (d.weights is not None or d.weights_id) and "val_acc" in d.metrics]
    return max(with_weights, key=lambda d: d.metrics["val_acc"], default=None)  # max keeps the first of ties


def ingredient_id(dish: Dish, sweep: str) -> str:
    """The pool id of a dish's weights: a new soup's own row, or the one ingredient it served."""
    if RECIPES[dish.recipe].produces_weights:
        return safe_id(f"{sweep}-{dish.recipe}-{digest(dish.parents, dish.params)}")
    return dish.parents[0] if len(dish.parents) == 1 else ""


def accuracies(metrics: dict[str, float]) -> str:
    return ", ".join(f"{label} {metrics[key]:.4f}" for key, label in
                     (("val_acc", "val"), ("id_acc", "ID"), ("ood_acc", "OOD")) if key in metrics)


def version_notes(dish: Dish, sweep: str, ingredient: str) -> tuple[str, dict[str, str]]:
    """A registered version's description and tags: which recipe made it, from what, how good."""
    description = (f"{dish.label} ({dish.recipe}) from sweep {sweep}, {len(dish.parents)} ingredient(s): "
                   f"{accuracies(dish.metrics)}. Chosen on held-out (val) accuracy.")
    scores = {f"orchestrator.{k}": f"{dish.metrics[k]:.4f}" for k in ("val_acc", "id_acc", "ood_acc")
              if k in dish.metrics}
    tags = {tracking.SWEEP: sweep, tracking.RECIPE: dish.recipe, tracking.INGREDIENT: ingredient, **scores}
    return description, tags


def register_best(uri: str, run_id: str, name: str, alias: str, description: str = "",
                  tags: dict[str, str] | None = None) -> str:
    """Register the model logged in run `run_id` as a new version of registered model `name`
    (created if missing) and point `alias` at it; returns the version. Serving loads
    `models:/<name>@<alias>`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = tracking.client(uri)
    mlflow.set_tracking_uri(uri)  # the registry store reads the version's models:/ source through the global store
    # MLflow 3 keeps a logged model beside the run, not in its artifacts: find it by run and name
    # (mlflow.register_model("runs:/...") does the same, with a warning that it did)
    models = client.search_logged_models([client.get_run(run_id).info.experiment_id], max_results=1,
                                         filter_string=f"source_run_id = '{run_id}' AND name = 'model'")
    if not models:
        raise ValueError(f"run {run_id} has no logged model named 'model' to register")
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, f"models:/{models[0].model_id}", run_id=run_id, tags=tags,
                                          description=description or None, model_id=models[0].model_id).version
    client.set_registered_model_alias(name, alias, version)
    return str(version)


def alias_version(uri: str, name: str, alias: str):
    """The model version the alias points at, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking.client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def has_logged_model(uri: str, run_id: str) -> bool:
    client = tracking.client(uri)
    return bool(client.search_logged_models([client.get_run(run_id).info.experiment_id], max_results=1,
                                            filter_string=f"source_run_id = '{run_id}' AND name = 'model'"))


def parent_metrics(dishes: list[Dish], groups: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Every dish's metrics for the sweep's parent run, as <dish name>_<metric>, one name per
    number: an eval set's own accuracy (acc_<set>) is left out where a summary metric is that
    set alone (`groups`, train.metric_sets: val_acc is acc_val), as the trial runs name them."""
    alone = {f"acc_{sets[0]}" for sets in (groups or {}).values() if len(sets) == 1}
    return {f"{d.name}_{k}": v for d in dishes for k, v in d.metrics.items() if k not in alone}
