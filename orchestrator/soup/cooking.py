"""Cooking as Ray work: the recipes spread over `cook.workers` Ray actors, each asking for
`cook.resources` (on a GPU cluster: GPU workers, which the autoscaler adds, never the CPU
head). Each actor builds its own Kitchen and reads the ingredients straight from the pool
(once per actor: the pool verifies a file once and memory-maps it after), so nothing but
the task data, the needed dishes and the finished dishes travel through Ray's object store.

A recipe is one unit of work (a `per_need` recipe, WiSE-FT, one unit per base): it starts as
soon as the recipes it needs are done and an actor is free, so the greedy soup's sequential
loop runs in one actor while the others cook the independent recipes (ensemble, the
task-vector merges, Fisher, WiSE-FT from the best individual). Every actor runs the
same `cook_one` as cooking in the driver, with the same number of threads, so the dishes
are the same bit for bit whichever actor cooks them.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from orchestrator.common.pool import Pool
from orchestrator.soup.kitchen import Dish, Kitchen
from orchestrator.soup.recipes import RECIPES, cook_one, ordered
from orchestrator.soup.tasks import TASKS
from orchestrator.soup.tasks.base import TaskData


@dataclass
class KitchenSpec:
    """What an actor needs to build the driver's Kitchen again, wherever it runs."""

    pool_uri: str
    task_name: str
    task_settings: dict[str, Any]  # Task.model_settings(): enough to build the model anywhere
    keys: tuple[str, str]  # the driver's (pretrained_id, data_key): they may read files the actor cannot
    sweep: str | None
    settings: dict[str, Any]  # Kitchen settings: precision, bn_batches, selection
    threads: int  # torch threads per actor: the same everywhere, so the arithmetic is too

    def kitchen(self, data: TaskData) -> Kitchen:
        return Kitchen(Pool(self.pool_uri), TASKS[self.task_name](self.task_settings), data, self.sweep,
                       self.settings, self.keys)


class Progress:
    """What cooking prints while it runs: one line per finished recipe, and between them a
    progress line over recipes with the count of evaluations so far (a model on one eval set).
    On a terminal the progress line is redrawn in place every second; in a log file it is
    printed every `every` seconds while no recipe finishes, so a long recipe is never silent."""

    def __init__(self, recipes: int, stream: TextIO | None = None, every: float = 15.0):
        self.recipes, self.stream, self.every = recipes, stream or sys.stdout, every
        self.live = self.stream.isatty()
        self.t0 = self.last = time.time()
        self.done, self.evaluations, self._drawn = 0, 0, False
        self._lock = threading.Lock()

    def recipe(self, line: str) -> None:
        """A recipe finished: its line, printed over the progress line."""
        with self._lock:
            self.done += 1
            self.last = time.time()
            self._clear()
            print(line, file=self.stream, flush=True)

    def update(self, evaluations: int) -> None:
        """The evaluations counted so far, by every worker together."""
        with self._lock:
            self.evaluations = evaluations
            now = time.time()
            if not self.live and now - self.last < self.every:
                return
            self.last = now
            width = 20
            filled = round(width * self.done / max(1, self.recipes))
            text = (f"  [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.recipes} recipes, "
                    f"{evaluations} evaluations, {now - self.t0:.0f} s")
            if self.live:
                print(f"\r{text}", end="", file=self.stream, flush=True)
                self._drawn = True
            else:
                print(text, file=self.stream, flush=True)

    def close(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self._drawn:
            print("\r\033[K", end="", file=self.stream, flush=True)
            self._drawn = False


def watch(kitchen: Kitchen, progress: Progress, period: float = 1.0) -> Callable[[], None]:
    """Report `kitchen`'s evaluations to `progress` every `period` seconds from a thread, while
    the driver cooks in this process; returns the function that stops it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period):
            progress.update(kitchen.evaluations)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return lambda: (stop.set(), thread.join(), progress.close())


class Cook:
    """A Ray actor with a Kitchen of its own; cooks one recipe per call. It runs two threads, so
    `evaluations()` answers while a recipe cooks."""

    def __init__(self, spec: KitchenSpec):
        import torch

        torch.set_num_threads(spec.threads)
        self.spec, self.kitchen = spec, None

    def cook(self, data: list, name: str, settings: dict[str, Any],
             needed: dict[str, Dish]) -> tuple[list[Dish], float]:
        """`data`: [a reference to the task data], fetched only by the first call (and again by an
        actor restarted after its node was lost), which builds the Kitchen."""
        import ray

        t0 = time.time()
        if self.kitchen is None:
            self.kitchen = self.spec.kitchen(ray.get(data[0]))
        dishes = cook_one(self.kitchen, name, settings, needed)
        return dishes, time.time() - t0

    def evaluations(self) -> int:
        return self.kitchen.evaluations if self.kitchen else 0


def room(resources: dict[str, float]) -> int:
    """How many cooking actors the cluster can host now (at least 1: an autoscaler adds nodes
    for one that does not fit). More would wait for resources that may never come, e.g.
    after a node was lost."""
    import ray

    total = ray.cluster_resources()
    fits = [int(total.get(key, 0) // resources[ask]) for key, ask in (("CPU", "cpu"), ("GPU", "gpu"))
            if resources[ask] > 0]
    return max(1, min(fits, default=1))


def unit_needs(name: str, part: str | None) -> tuple[str, ...]:
    return RECIPES[name].needs if part is None else (part,)


def cook_on_ray(spec: KitchenSpec, data: TaskData, names: list[str], settings: dict[str, Any], workers: int,
                resources: dict[str, float], done: Callable[[str, list[Dish], float], None],
                progress: Callable[[int], None] = lambda evaluations: None, period: float = 1.0) -> list[Dish]:
    """Cook the named recipes (and what they need) on `workers` actors; `done(name, dishes,
    seconds)` is called as each recipe finishes, and `progress(evaluations)` with the actors'
    evaluations so far every `period` seconds. Dishes come back in the recipes' order."""
    import ray

    order = ordered(names)
    # units of work: a recipe, or one part per need of a recipe that cooks each need on its own
    # (WiSE-FT's curve from the best individual need not wait for the greedy soup)
    units = [(name, need) for name in order
             for need in (RECIPES[name].needs if RECIPES[name].per_need else [None])]
    # a restarted actor (its node lost) gets its unit again: cooking has no side effects
    actor = ray.remote(Cook).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"], max_restarts=2,
                                     max_task_retries=2, max_concurrency=2)
    data_ref = ray.put(data)  # held here while cooking, so a restarted actor finds it
    # the data goes with each call, not to the constructor: Ray warns on the terminal about an
    # actor that may restart with a constructor argument in the object store
    cooks = [actor.remote(spec) for _ in range(min(workers, len(units), room(resources)))]
    free, running = list(cooks), {}
    made: dict[str, list[Dish]] = {}
    parts: dict[tuple[str, str | None], tuple[list[Dish], float]] = {}
    pending = list(units)
    try:
        while pending or running:
            # what another recipe waits for goes first (the greedy soup before the ensemble)
            awaited = {need for n, _ in pending for need in RECIPES[n].needs}
            ready = [u for u in pending if all(need in made for need in unit_needs(*u))]
            for unit in sorted(ready, key=lambda u: (u[0] not in awaited, RECIPES[u[0]].position)):
                if not free:
                    break
                cook = free.pop(0)
                needed = {need: made[need][0] for need in unit_needs(*unit)}
                running[cook.cook.remote([data_ref], unit[0], settings, needed)] = (unit, cook)
                pending.remove(unit)
            finished, _ = ray.wait(list(running), num_returns=1, timeout=period)
            if not finished:  # still cooking: how far along
                try:
                    progress(sum(ray.get([c.evaluations.remote() for c in cooks], timeout=period)))
                except ray.exceptions.RayError:  # an actor restarting after its node was lost: next time
                    pass
                continue
            unit, cook = running.pop(finished[0])
            parts[unit] = ray.get(finished[0])
            free.append(cook)
            name = unit[0]
            mine = [u for u in units if u[0] == name]
            if all(u in parts for u in mine):  # the recipe is done: its dishes in its own order
                made[name] = [dish for u in mine for dish in parts[u][0]]
                done(name, made[name], sum(parts[u][1] for u in mine))
    finally:
        for cook in cooks:
            ray.kill(cook)
    return [dish for name in order for dish in made[name]]
