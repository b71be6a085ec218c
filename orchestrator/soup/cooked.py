"""Dishes kept for reuse: a recipe cooked from the same ingredients with the same settings by
the same code makes the same dishes, so a rerun takes them from the pool instead.

Each cooked recipe leaves a pool row (kind `cooked`) whose id holds its cook key: a digest of
the recipe and its settings, the kitchen's settings, the start point and every ingredient it
could use (ids and the sha256 of their files, Fishers included), the keys of the recipes it
needs, and the source of the code that cooks (the merge engine and the soup side). Its table
holds every dish as the summary and the publisher need it: label, metrics, parents, settings,
curve, details, per-example correctness (bits), the MLflow run it was logged to, and where its
weights are in the pool. The row is written after the dishes were published, so a reused
dish's weights and run exist.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator.common.pool import Pool, Row, safe_id
from orchestrator.common.weights import digest
from orchestrator.soup.kitchen import Dish, Kitchen
from orchestrator.soup.recipes import RECIPES, ordered, recipe_params

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # orchestrator/
CODE = ("merging", "soup")  # what cooks: a change to any of its files cooks again
FIELDS = ("recipe", "label", "metrics", "parents", "params", "curve", "name", "details")


def code_fingerprint() -> str:
    """A digest of every Python file of the code that cooks and evaluates."""
    h = hashlib.sha256()
    for area in CODE:
        for folder, _, files in sorted(os.walk(os.path.join(PACKAGE, area))):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, PACKAGE).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def cook_keys(kitchen: Kitchen, names: list[str], settings: dict[str, Any], kitchen_settings: dict[str, Any]) -> dict[str, str]:
    """Each recipe's cook key (the recipes it needs first, their keys folded into it)."""
    code = code_fingerprint()
    inputs = {"pretrained": [kitchen.pretrained["id"], kitchen.pretrained["sha256"]], "data_key": kitchen.data_key,
              "ingredients": [[r["id"], r["sha256"]] for r in kitchen.loadable()],
              "fishers": sorted([trial, row["sha256"]] for trial, row in kitchen.fishers.items()),
              "kitchen": kitchen_settings, "code": code}
    keys: dict[str, str] = {}
    for name in ordered(names):
        keys[name] = digest(name, recipe_params(name, settings), inputs, [keys[n] for n in RECIPES[name].needs])
    return keys


def row_id(sweep: str, name: str, key: str) -> str:
    return safe_id(f"cooked-{sweep}-{name}-{key}")


def save(pool: Pool, sweep: str, task: str, name: str, key: str, dishes: list[Dish], run_ids: list[str],
         weight_ids: list[str]) -> None:
    """Keep a recipe's dishes (with the MLflow run each was logged to, and the pool id of its
    weights, "" for none) for the next cook of the same key."""
    records = []
    for dish, run_id, weights in zip(dishes, run_ids, weight_ids):
        bits = {s: {"n": len(c), "bits": np.packbits(np.asarray(c, dtype=bool)).tobytes().hex()}
                for s, c in dish.correct.items()}
        records.append({"dish": json.dumps({f: getattr(dish, f) for f in FIELDS}, default=_plain),
                        "correct": json.dumps(bits), "run_id": run_id, "weights": weights})
    table = pa.Table.from_pylist(records, schema=pa.schema([("dish", pa.string()), ("correct", pa.string()),
                                                            ("run_id", pa.string()), ("weights", pa.string())]))
    pool.add(Row(id=row_id(sweep, name, key), kind="cooked", sweep=sweep, task=task, status="ok",
                 hparams={"recipe": name, "key": key}), table=table)


def load(pool: Pool, sweep: str, name: str, key: str) -> list[tuple[Dish, str, str]] | None:
    """The dishes a cook of this key made, each with its run id and its weights' pool id (the
    weights themselves are not loaded), or None when no such cook is in the pool."""
    rid = row_id(sweep, name, key)
    if not pool.has(rid):
        return None
    out = []
    for record in pool.load_table(rid).to_pylist():
        fields = json.loads(record["dish"])
        correct = {s: np.unpackbits(np.frombuffer(bytes.fromhex(c["bits"]), dtype=np.uint8))[:c["n"]].astype(bool)
                   for s, c in json.loads(record["correct"]).items()}
        out.append((Dish(**fields, correct=correct, weights_id=record["weights"]), record["run_id"], record["weights"]))
    return out


def _plain(value: Any) -> Any:
    """What json cannot write itself: numpy numbers and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot keep {type(value).__name__} in a cooked dish")
