"""The kitchen recipes cook in: the pool's usable ingredients (best first), weight
loading and evaluation; and the Dish every recipe returns.

Recipes live in soup/recipes/ (one file each); storing their dishes in the pool and in
MLflow happens in soup/publish.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from orchestrator.common.errors import PoolError
from orchestrator.common.pool import Pool
from orchestrator.common.weights import StateDict, arch_fingerprint, spec_fingerprint
from orchestrator.merging import executor
from orchestrator.merging.executor import Merged
from orchestrator.merging.sources import FileSource, Source, specs
from orchestrator.soup.tasks.base import Task, TaskData
from orchestrator.soup.train import (batchnorm_buffers, device, load_into, predict_logits, recompute_batchnorm,
                                     summarize)

log = logging.getLogger(__name__)


@dataclass
class Dish:
    """What a recipe made: metrics on every eval set, the ingredient ids it used, and its
    weights (None for an ensemble)."""

    recipe: str  # the recipe's registry name
    label: str  # how tables and plots name it
    metrics: dict[str, float]
    parents: list[str]
    weights: StateDict | None = None
    params: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)  # metrics along the recipe's curve_x
    name: str = ""  # unique among one cook's dishes (metric prefixes); default: the recipe's name
    # records too large or too nested for MLflow params (a greedy trace, per-tensor values):
    # a JSON artifact of the dish's run, not pool hparams
    details: dict[str, Any] = field(default_factory=dict)
    # per eval set, which examples it got right (Verdict.correct): the summary's intervals;
    # a dish without them is shown without intervals
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    # the pool id of its weights when they are there and not loaded (a dish reused from an earlier cook)
    weights_id: str = ""

    def __post_init__(self):
        self.name = self.name or self.recipe


@dataclass
class Verdict:
    """An evaluation on every eval set: the metrics, and which examples were right."""

    metrics: dict[str, float]
    correct: dict[str, np.ndarray]  # eval set -> bool per example, in the set's order


class Kitchen:
    """What recipes share: usable ingredients (best first), weight loading and evaluation."""

    def __init__(self, pool: Pool, task: Task, data: TaskData, sweep: str | None, settings: dict[str, Any],
                 keys: tuple[str, str] | None = None):
        """`settings`: the config's `precision`, `soup.bn_batches` and (optional) `cook.selection`
        and `stopped` (soup.stopped_ingredients).
        `keys`: the task's (pretrained_id, data_key) as the driver computed them; a cooking
        worker passes them, as it may run where the task's files are not."""
        self.pool, self.task, self.data = pool, task, data
        self.pretrained_id, self.data_key = keys or (task.pretrained_id(), task.data_key())
        self.precision, self.bn_batches = settings["precision"], settings["bn_batches"]
        # "all": curves (WiSE-FT, task arithmetic) are measured on every eval set at every point;
        # "held_out": candidates on the held-out split only, every eval set for the final dishes
        self.full_curves = settings.get("selection", "all") == "all"
        self.device = device()  # soups are mixed and evaluated on the GPU when there is one
        self.model = task.build_model().to(self.device)
        self.bn_buffers = batchnorm_buffers(self.model)
        df = pool.manifest()
        pre = df[(df["kind"] == "pretrained") & (df["id"] == self.pretrained_id)]
        if pre.empty:
            raise PoolError(f"{pool.uri}: no pretrained weights for task {task.name} ({self.pretrained_id})")
        self.pretrained = pre.iloc[0].to_dict()
        self.arch = self.pretrained["arch"]
        trials = df[(df["kind"] == "trial") & (df["task"] == task.name)]
        if sweep is not None:
            trials = trials[trials["sweep"] == sweep]
        # trials a scheduler stopped early trained fewer epochs than asked: weaker, and picked for
        # being behind at a rung, so they are left out unless the config says otherwise
        statuses = ("ok", "stopped") if settings.get("stopped") else ("ok",)
        usable, seen, stopped = [], {}, 0
        for row in self.compatible(trials.to_dict("records")):
            if row["sha256"] and row["sha256"] in seen:  # e.g. the same sweep run twice: same seeds, same weights
                log.warning("skipping ingredient %s: same weights as %s", row["id"], seen[row["sha256"]])
                continue
            seen.setdefault(row["sha256"], row["id"])
            if row["status"] == "stopped" and "stopped" not in statuses:
                stopped += 1
            elif row["status"] not in statuses:
                log.warning("skipping ingredient %s: status %s", row["id"], row["status"])
            elif row["arch"] != self.arch:
                log.warning("skipping ingredient %s: architecture %s differs from the pretrained %s",
                            row["id"], row["arch"], self.arch)
            else:
                usable.append(row)
        if stopped:
            print(f"leaving out {stopped} trial(s) stopped early by the scheduler (soup.stopped_ingredients: true "
                  "cooks from them too)")
        self.ingredients = sorted(usable, key=lambda r: (-r["metrics"]["val_acc"], r["id"]))
        # each trial's diagonal Fisher (soup/fisher.py), by trial id: a row whose parent is the trial
        fishers = df[(df["kind"] == "fisher") & (df["status"] == "ok")].to_dict("records")
        self.fishers = {r["parents"][0]: r for r in fishers if len(r["parents"])}
        self._loadable = None
        self._sources: dict[str, FileSource] = {}
        self.evaluations = 0  # models evaluated on one eval set each: what cooking progress counts

    def compatible(self, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The trials that started from these pretrained weights and trained on this data and
        held-out split. Any other would be averaged with weights of another start, or ranked on
        a split it trained on; they are left out with one line per sweep and reason."""
        kept, left = [], Counter()
        for row in trials:
            start = row["parents"][0] if len(row["parents"]) else "none"
            if start != self.pretrained["id"]:
                left[row["sweep"], f"other start point {start}"] += 1
            elif (row.get("data_key") or "") != self.data_key:
                left[row["sweep"], "other training data or held-out split" if row.get("data_key")
                     else "no data key recorded (an older pool)"] += 1
            else:
                kept.append(row)
        for (sweep, why), n in sorted(left.items()):
            log.warning("left out %d trial(s) of sweep %s: %s", n, sweep, why)
        return kept

    def loadable(self) -> list[dict[str, Any]]:
        """Ingredients whose weights verify; a missing or corrupt file is skipped with a warning.
        The pool remembers what it verified: the recipes' loads do not read the files again."""
        if self._loadable is None:
            self._loadable = []
            for row in self.ingredients:
                try:
                    self.pool.local_weights(row)
                    self._loadable.append(row)
                except PoolError as e:
                    log.warning("skipping ingredient %s: %s", row["id"], e)
        return self._loadable

    def load(self, row: dict[str, Any]) -> StateDict:
        """An ingredient's whole state dict, on the device (to evaluate it as it is)."""
        state = self.pool.load(row)
        if arch_fingerprint(state) != self.arch:
            raise ValueError(f"ingredient {row['id']}: weights do not match its architecture fingerprint")
        return {k: v.to(self.device) for k, v in state.items()}

    def source(self, row: dict[str, Any]) -> FileSource:
        """An ingredient's weights for the merge engine, which reads them one tensor at a time
        from the pool's verified file (a download, on an object store)."""
        if row["id"] not in self._sources:
            src = FileSource(self.pool.local_weights(row), label=row["id"])
            if spec_fingerprint(specs(src)) != self.arch:
                raise ValueError(f"ingredient {row['id']}: weights do not match its architecture fingerprint")
            self._sources[row["id"]] = src
        return self._sources[row["id"]]

    def fisher_source(self, row: dict[str, Any]) -> FileSource:
        """An ingredient's diagonal Fisher (a pool row of its own), for the merge engine."""
        fisher = self.fishers[row["id"]]
        if fisher["id"] not in self._sources:
            self._sources[fisher["id"]] = FileSource(self.pool.local_weights(fisher), label=fisher["id"])
        return self._sources[fisher["id"]]

    def merge(self, method: str, items: list[dict[str, Any] | Source], params: dict[str, Any] | None = None,
              side: dict[str, list[Source]] | None = None) -> Merged:
        """`method` (merging/methods/) over ingredients (pool rows, or sources such as a cooked
        dish's weights) with theta_0 as the base, on the kitchen's device."""
        return executor.merge(method, self._sources_of(items), base=self.source(self.pretrained), params=params,
                              side=side, device=self.device)

    def merge_delta(self, method: str, rows: list[dict[str, Any]], params: dict[str, Any] | None = None) -> StateDict:
        """The combined task vector of a task-arithmetic-like method: a lambda search scales it."""
        return executor.merge_delta(method, self._sources_of(rows), base=self.source(self.pretrained), params=params,
                                    device=self.device)

    def apply_delta(self, delta: StateDict, scale: float) -> StateDict:
        """theta_0 + scale * delta, on the device."""
        return executor.apply_delta(self.source(self.pretrained), delta, scale, self.device)

    def _sources_of(self, items) -> list[Source]:
        return [self.source(i) if isinstance(i, dict) else i for i in items]

    def evaluate(self, state: StateDict, sets: list[str] | None = None, soup: bool = True) -> dict[str, float]:
        """Accuracy on the named eval sets (default all). Averaged weights (`soup`) of a model
        with BatchNorm get fresh running statistics from a few training batches first."""
        return self._judge(state, sets or list(self.data.evals), soup).metrics

    def judge(self, state: StateDict, soup: bool = True) -> Verdict:
        """`evaluate` on every eval set, keeping which examples were right (a dish's intervals)."""
        return self._judge(state, list(self.data.evals), soup)

    def _judge(self, state: StateDict, sets: list[str], soup: bool) -> Verdict:
        load_into(self.model, state)
        if soup and self.bn_buffers:
            recompute_batchnorm(self.task, self.model, self.data.train, self.bn_batches,
                                precision=self.precision)
            fresh = self.model.state_dict()
            state.update({k: fresh[k].detach().clone() for k in self.bn_buffers})  # the soup keeps its statistics
        return self.verdict({n: self.logits(n) for n in sets})

    def verdict(self, logits: dict[str, torch.Tensor]) -> Verdict:
        """Metrics and per-example correctness from each eval set's logits."""
        hits = {n: out.argmax(1) == self.data.evals[n].labels for n, out in logits.items()}
        acc = {n: h.float().mean().item() for n, h in hits.items()}  # as train.accuracy computes it
        return Verdict(summarize(acc, self.data), {n: h.numpy() for n, h in hits.items()})

    def logits(self, eval_set: str):
        self.evaluations += 1
        return predict_logits(self.task, self.model, self.data.evals[eval_set], precision=self.precision)

    def val_acc(self, state: StateDict) -> float:
        return self.evaluate(state, [self.data.val])["val_acc"]


def check_cookable(kitchen: Kitchen) -> None:
    """At least one ingredient survives the checks (status, architecture, sha256)."""
    if not kitchen.loadable():
        raise PoolError(f"{kitchen.pool.uri}: no usable trial ingredients to cook from")
