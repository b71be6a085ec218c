"""Cooking as Ray work: the recipes spread over `cook.workers` Ray actors, each asking for
`cook.resources` (on a GPU cluster: GPU workers, which the autoscaler adds, never the CPU
head). Each actor builds its own Kitchen and reads the ingredients straight from the pool
(once per actor: the pool verifies a file once and memory-maps it after), so nothing but
the task data, the needed dishes and the finished dishes travel through Ray's object store.

Units of work: a recipe that fans out (recipes/__init__.py: plan, evaluate, serve) is a plan,
then one unit per candidate evaluation (a lambda, a WiSE-FT alpha, a group of ensemble
members), then a serve; any other recipe is one unit (`cook`). A `per_need` recipe
(WiSE-FT) is one part per need. A recipe's first unit starts as soon as the recipes it
needs are done and an actor is free, so the greedy soup's sequential loop runs in one actor
while the others cook the rest, and a recipe's evaluations spread over every free actor.
A plan's shared value (theta_0 and the merged task vector, say) stays in the object store and
is fetched once per actor that evaluates its candidates. Every actor runs the same recipe
functions as cooking in the driver, with the same number of threads, so the dishes are the
same bit for bit whichever actor cooks them.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from orchestrator.common.pool import Pool
from orchestrator.soup.kitchen import Dish, Kitchen
from orchestrator.soup.recipes import RECIPES, Plan, cook_one, on_cpu, ordered, recipe_params, tensors_to
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
    """A Ray actor with a Kitchen of its own; runs one unit of cooking per call: a whole recipe,
    or a fanning-out recipe's plan, one candidate's evaluation or its serve. It runs two
    threads, so `evaluations()` answers while a unit cooks."""

    def __init__(self, spec: KitchenSpec):
        import torch

        torch.set_num_threads(spec.threads)
        self.spec, self.kitchen = spec, None
        self.shared: dict[str, Any] = {}  # plans' shared values by object id, the last two fetched

    def _kitchen(self, data: list) -> Kitchen:
        """`data`: [a reference to the task data], fetched only by the first call (and again by an
        actor restarted after its node was lost), which builds the Kitchen."""
        import ray

        if self.kitchen is None:
            self.kitchen = self.spec.kitchen(ray.get(data[0]))
        return self.kitchen

    def _shared(self, box: list) -> Any:
        """A plan's shared value (box: [its reference]), fetched once per actor, on the kitchen's device."""
        import ray

        key = box[0].hex()
        if key not in self.shared:
            if len(self.shared) >= 2:
                self.shared.pop(next(iter(self.shared)))
            self.shared[key] = tensors_to(ray.get(box[0]), self.kitchen.device)
        return self.shared[key]

    def cook(self, data: list, name: str, settings: dict[str, Any],
             needed: dict[str, Dish]) -> tuple[list[Dish], float]:
        t0 = time.time()
        dishes = cook_one(self._kitchen(data), name, settings, needed)
        return dishes, time.time() - t0

    def plan(self, data: list, name: str, settings: dict[str, Any],
             needed: dict[str, Dish]) -> tuple[tuple[list, float], Any]:
        """Two returns: (the candidates, seconds) for the driver, the shared value for the workers."""
        t0 = time.time()
        plan = RECIPES[name].plan(self._kitchen(data), recipe_params(name, settings), needed)
        return (plan.candidates, time.time() - t0), tensors_to(plan.shared, "cpu")

    def evaluate(self, data: list, name: str, box: list, candidate: Any) -> tuple[float, Any]:
        """Two returns: seconds for the driver, the result for the serve."""
        t0 = time.time()
        kitchen = self._kitchen(data)
        result = RECIPES[name].evaluate(kitchen, self._shared(box), candidate)
        return time.time() - t0, tensors_to(result, "cpu")

    def serve(self, data: list, name: str, settings: dict[str, Any], needed: dict[str, Dish], box: list,
              candidates: list, *results: Any) -> tuple[list[Dish], float]:
        t0 = time.time()
        kitchen = self._kitchen(data)
        plan = Plan(candidates, self._shared(box))
        dishes = RECIPES[name].serve(kitchen, recipe_params(name, settings), needed, plan, list(results))
        return on_cpu(dishes), time.time() - t0

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


@dataclass
class Unit:
    """One call to a cooking actor: `stage` "cook" (a whole recipe), or "plan", "evaluate"
    (candidate `index`) and "serve" of a recipe that fans out. `part`: the need a per_need
    recipe's part cooks from (None: all its needs)."""

    name: str
    part: str | None
    stage: str
    index: int = 0

    @property
    def needs(self) -> tuple[str, ...]:
        return RECIPES[self.name].needs if self.part is None else (self.part,)


def cook_on_ray(spec: KitchenSpec, data: TaskData, names: list[str], settings: dict[str, Any], workers: int,
                resources: dict[str, float], done: Callable[[str, list[Dish], float, int], None],
                progress: Callable[[int], None] = lambda evaluations: None, period: float = 1.0,
                ready: dict[str, list[Dish]] | None = None) -> list[Dish]:
    """Cook the named recipes (and what they need) on `workers` actors; `done(name, dishes,
    seconds, actors)` is called as each recipe finishes (seconds: its units' time added up;
    actors: how many different actors ran them), and
    `progress(evaluations)` with the actors' evaluations so far every `period` seconds.
    `ready`: the dishes of recipes cooked before (reused from the pool), not cooked again.
    Dishes come back in the recipes' order, the ready ones left out."""
    import ray

    order = [n for n in ordered(names) if n not in (ready or {})]
    # a recipe's parts: one per need of a recipe that cooks each need on its own (WiSE-FT's curve
    # from the best individual need not wait for the greedy soup), else one
    parts = {name: list(RECIPES[name].needs) if RECIPES[name].per_need else [None] for name in order}
    # a restarted actor (its node lost) gets its unit again: cooking has no side effects
    actor = ray.remote(Cook).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"], max_restarts=2,
                                     max_task_retries=2, max_concurrency=2)
    data_ref = ray.put(data)  # held here while cooking, so a restarted actor finds it
    # the data goes with each call, not to the constructor: Ray warns on the terminal about an
    # actor that may restart with a constructor argument in the object store
    cooks = [actor.remote(spec) for _ in range(min(workers, room(resources)))]
    free, running = list(cooks), {}
    made: dict[str, list[Dish]] = dict(ready or {})
    served: dict[tuple[str, str | None], list[Dish]] = {}  # each part's dishes
    seconds: dict[str, float] = dict.fromkeys(order, 0.0)
    ran_on: dict[str, set] = {name: set() for name in order}  # the actors each recipe's units ran on
    plans: dict[tuple[str, str | None], tuple[list, Any]] = {}  # a part's candidates and its shared value's reference
    results: dict[tuple[str, str | None], dict[int, Any]] = {}  # a part's evaluations' result references
    pending = [Unit(name, part, "plan" if RECIPES[name].fans_out() else "cook")
               for name in order for part in parts[name]]
    rank = {"serve": 0, "evaluate": 1, "plan": 2, "cook": 2}  # finish what was started first

    def start(unit: Unit, cook) -> Any:
        """The unit's call; the reference to wait on."""
        key = (unit.name, unit.part)
        needed = {need: made[need][0] for need in unit.needs}
        if unit.stage == "cook":
            return cook.cook.remote([data_ref], unit.name, settings, needed)
        if unit.stage == "plan":
            meta, shared = cook.plan.options(num_returns=2).remote([data_ref], unit.name, settings, needed)
            plans[key] = (None, shared)
            return meta
        candidates, shared = plans[key]
        if unit.stage == "evaluate":
            took, result = cook.evaluate.options(num_returns=2).remote([data_ref], unit.name, [shared],
                                                                      candidates[unit.index])
            results[key][unit.index] = result
            return took
        return cook.serve.remote([data_ref], unit.name, settings, needed, [shared], candidates,
                                 *[results[key][i] for i in range(len(candidates))])

    def finished(unit: Unit, value: Any, cook) -> None:
        """What follows a unit: the evaluations after a plan, the serve after the last evaluation,
        the recipe's `done` after its last part."""
        key = (unit.name, unit.part)
        if unit.stage == "plan":
            (candidates, took), shared = value, plans[key][1]
            plans[key], results[key] = (candidates, shared), {}
            pending.extend(Unit(unit.name, unit.part, "evaluate", i) for i in range(len(candidates)))
            if not candidates:
                pending.append(Unit(unit.name, unit.part, "serve"))
        elif unit.stage == "evaluate":
            took = value
            left = [u for u in pending + [u for u, _ in running.values()]
                    if (u.name, u.part, u.stage) == (*key, "evaluate")]
            if not left:  # the last of the part's evaluations
                pending.append(Unit(unit.name, unit.part, "serve"))
        else:
            served[key], took = value
            if unit.stage == "serve":  # the plan's shared value and the results may leave the object store
                plans.pop(key), results.pop(key)
        seconds[unit.name] += took
        ran_on[unit.name].add(cook)
        if unit.stage in ("cook", "serve") and all((unit.name, p) in served for p in parts[unit.name]):
            made[unit.name] = [dish for p in parts[unit.name] for dish in served[unit.name, p]]
            done(unit.name, made[unit.name], seconds[unit.name], len(ran_on[unit.name]))

    try:
        while pending or running:
            # what another recipe waits for goes first (the greedy soup before the ensemble)
            awaited = {need for u in pending for need in RECIPES[u.name].needs}
            ready = [u for u in pending if u.stage not in ("cook", "plan") or all(need in made for need in u.needs)]
            for unit in sorted(ready, key=lambda u: (u.name not in awaited, RECIPES[u.name].position, rank[u.stage],
                                                     u.index)):
                if not free:
                    break
                cook = free.pop(0)
                running[start(unit, cook)] = (unit, cook)
                pending.remove(unit)
            ready_refs, _ = ray.wait(list(running), num_returns=1, timeout=period)
            if not ready_refs:  # still cooking: how far along
                try:
                    progress(sum(ray.get([c.evaluations.remote() for c in cooks], timeout=period)))
                except ray.exceptions.RayError:  # an actor restarting after its node was lost: next time
                    pass
                continue
            unit, cook = running.pop(ready_refs[0])
            free.append(cook)
            finished(unit, ray.get(ready_refs[0]), cook)
    finally:
        for cook in cooks:
            ray.kill(cook)
    return [dish for name in order for dish in made[name]]
