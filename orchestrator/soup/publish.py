"""Serving the dishes: every dish a nested MLflow run; every dish with new weights a pool
row (kind=soup) and an MLflow model. Driven by the recipes' declarations."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from orchestrator.common import tracking
from orchestrator.common.pool import Pool, Row, safe_id
from orchestrator.common.weights import StateDict, arch_fingerprint, digest
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.plots import per_tensor_histogram
from orchestrator.soup.recipes import RECIPES
from orchestrator.soup.tasks.base import Task

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # orchestrator/


class Publisher:
    """Where one sweep invocation's dishes go: its pool, its MLflow experiment and parent run."""

    def __init__(self, pool: Pool, uri: str, experiment: str, parent: str):
        self.pool, self.uri, self.experiment, self.parent = pool, uri, experiment, parent

    def serve(self, dishes: list[Dish], sweep: str, task: Task) -> None:
        for dish in dishes:
            self.serve_one(dish, sweep, task)

    def serve_one(self, dish: Dish, sweep: str, task: Task) -> None:
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
        if RECIPES[dish.recipe].produces_weights and dish.weights is not None:
            soup_id = safe_id(f"{sweep}-{dish.recipe}-{digest(dish.parents, params)}")
            self.pool.add(Row(id=soup_id, kind="soup", sweep=sweep, task=task.name, status="ok",
                              arch=arch_fingerprint(dish.weights), hparams={"recipe": dish.recipe, **params},
                              metrics=dish.metrics, parents=dish.parents, mlflow_run_id=run_id), dish.weights)
            tracking.set_tags(self.uri, run_id, {tracking.INGREDIENT: soup_id})
            log_model(self.uri, run_id, dish.weights, task)
        tracking.end_run(self.uri, run_id)


def log_model(uri: str, run_id: str, weights: StateDict, task: Task) -> None:
    """Log souped weights as an MLflow pyfunc model: code + safetensors, no pickle."""
    import mlflow
    from safetensors.torch import save_file

    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        save_file(weights, path)
        with mlflow.start_run(run_id=run_id):
            mlflow.pyfunc.log_model(
                name="model",
                python_model=os.path.join(PACKAGE, "soup", "mlflow_model.py"),
                artifacts={"weights": path},
                model_config={"task": task.name, "settings": task.model_settings()},
                code_paths=[PACKAGE],
                pip_requirements=["torch", "safetensors", "numpy", "mlflow"],
            )


def parent_metrics(dishes: list[Dish]) -> dict[str, Any]:
    """Every dish's metrics for the sweep's parent run, as <dish name>_<metric>."""
    return {f"{d.name}_{k}": v for d in dishes for k, v in d.metrics.items()}
