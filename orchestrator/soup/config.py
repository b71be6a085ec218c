"""The soup sweep's config schema: its defaults and rules (read by common/config.py).

The `soup:` section is built from the recipes' own declarations: `soup.recipes` picks
which recipes run, and each recipe's params are keys beside it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from orchestrator.common import config
from orchestrator.common.config import check, check_hparam, check_name, is_number, merge
from orchestrator.common.errors import ConfigError
from orchestrator.soup.recipes import RECIPES, all_params, default_recipes
from orchestrator.soup.tasks import TASKS
from orchestrator.soup.train import HPARAMS, PRECISIONS, hparam_problem

DEFAULT_CONFIG = "glyphs_soup.yaml"  # in orchestrator/configs/

BASE: dict[str, Any] = {
    "sweep": "glyphs_soup",
    "task": {"name": "glyphs"},  # other keys are the task's settings (see the task's `defaults`)
    "num_samples": 16,
    "search_seed": 0,  # seeds the random search, so a sweep samples the same trials again
    "max_concurrent_trials": 0,  # 0 = as many as the cluster's resources allow
    "max_failures": 2,  # retries per crashed trial (each resumes from its last epoch checkpoint)
    "resources": {"cpu": 1.0, "gpu": 0.0, "workers": 1},  # per worker; workers > 1: data-parallel Ray Train
    "precision": "auto",  # auto: bf16 autocast on GPUs that support it, fp32 elsewhere; or fp32, bf16
    "hyperparameters": {},  # name -> constant or distribution; see config.DISTRIBUTIONS
    # Tune's search algorithm (random, grid; optuna, hyperopt with their extras) and trial scheduler
    # (fifo: every trial runs all its epochs; asha: stops the worse trials at rungs of epochs)
    "search": {"algorithm": "random", "scheduler": "fifo", "grace_period": 1, "reduction_factor": 2},
    # register: the best dish (highest held-out accuracy) becomes a new version of this registered
    # model ("" = the sweep's name), and the alias moves to it; partial: register it even when
    # fewer trials finished than num_samples asked for (failed ones; a scheduler's stops count)
    "publish": {"register": True, "registered_model": "", "alias": "champion", "partial": False},
    # cooking: each recipe a unit of Ray work on `workers` actors (0: in the driver process),
    # each asking for `resources`; `selection: held_out` measures candidates (WiSE-FT and
    # lambda grids) on the held-out split only and every eval set only for the final dishes
    "cook": {"workers": 2, "resources": {"cpu": 1.0, "gpu": 0.0}, "selection": "all"},
    # every trial records p(gold) and correctness of every training example per epoch (data maps)
    "record_dynamics": True,
    # FTFT: train on the examples another sweep's dynamics chose (from_sweep "" = all examples);
    # region: ambiguous | hard_to_learn | easy | random (the control), `fraction` of the training set
    "data_selection": {"from_sweep": "", "region": "ambiguous", "fraction": 0.33, "seed": 0},
}
SELECTIONS = ("all", "held_out")
ALGORITHMS = ("random", "grid", "optuna", "hyperopt")
SCHEDULERS = ("fifo", "asha")
FREE_FORM = ("task", "hyperparameters", "evals")  # mappings of user-chosen names


def defaults() -> dict[str, Any]:
    """Every key with its default; the `soup:` section comes from the registered recipes."""
    return {**BASE, "soup": {
        "recipes": default_recipes(),  # which recipes to cook (and what they need)
        "bn_batches": 8,  # training batches that re-estimate BatchNorm statistics of a soup
        "stopped_ingredients": False,  # also cook from trials a scheduler (ASHA) stopped early
        **{name: p.default for name, p in all_params().items()},  # each recipe's params
    }}


def load_config(path: str | None = None, overrides: list[str] = (), preset: str = "default") -> dict[str, Any]:
    """Read, overlay and validate a soup-sweep config (a path or a shipped config's name)."""
    return config.load(config.config_path(path, DEFAULT_CONFIG, "sweep"), validate, preset, overrides)


def validate(raw: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    cfg = merge(defaults(), raw, source, free_form=FREE_FORM)
    check_name(cfg["sweep"], source, "sweep")
    _check_task(cfg, source)
    for key, low in (("num_samples", 1), ("max_failures", 0), ("max_concurrent_trials", 0)):
        check(cfg[key] >= low, source, key, f"must be >= {low}, got {cfg[key]}")
    _check_resources(cfg["resources"], source)
    check(cfg["precision"] in PRECISIONS, source, "precision",
          f"must be one of {', '.join(PRECISIONS)}, got {cfg['precision']!r}")
    _check_soup(cfg["soup"], source)
    _check_cook(cfg["cook"], source)
    _check_search(cfg, source)
    for key in ("register", "partial"):
        check(isinstance(cfg["publish"][key], bool), source, f"publish.{key}",
              f"must be true or false, got {cfg['publish'][key]!r}")
    check(isinstance(cfg["publish"]["alias"], str) and cfg["publish"]["alias"].strip() != "", source, "publish.alias",
          f"must be a non-empty name, got {cfg['publish']['alias']!r}")
    check(isinstance(cfg["record_dynamics"], bool), source, "record_dynamics",
          f"must be true or false, got {cfg['record_dynamics']!r}")
    _check_selection(cfg["data_selection"], source)
    check(cfg["data_selection"]["from_sweep"] != cfg["sweep"], source, "data_selection.from_sweep",
          f"must name another sweep than this one ({cfg['sweep']!r})")
    for name, spec in cfg["hyperparameters"].items():
        check_hparam(name, spec, HPARAMS, source)
        # a constant, each choice/grid value, or a range's bounds: rules beyond the type (train.py)
        for value in (next(iter(spec.values())) if isinstance(spec, dict) else [spec]):
            problem = hparam_problem(name, value)
            check(problem is None, source, f"hyperparameters.{name}", problem or "")
    mixup = cfg["hyperparameters"].get("mixup", 0)
    check(TASKS[cfg["task"]["name"]].supports_mixup or mixup == 0, source, "hyperparameters.mixup",
          f"task {cfg['task']['name']} has discrete inputs, so mixup must be 0 (got {mixup!r})")
    return cfg


def _check_search(cfg: dict[str, Any], source: str) -> None:
    search = cfg["search"]
    check(search["algorithm"] in ALGORITHMS, source, "search.algorithm",
          f"must be one of {', '.join(ALGORITHMS)}, got {search['algorithm']!r}")
    check(search["scheduler"] in SCHEDULERS, source, "search.scheduler",
          f"must be one of {', '.join(SCHEDULERS)}, got {search['scheduler']!r}")
    check(search["grace_period"] >= 1, source, "search.grace_period",
          f"must be >= 1 (epochs), got {search['grace_period']}")
    check(search["reduction_factor"] >= 2, source, "search.reduction_factor",
          f"must be >= 2, got {search['reduction_factor']}")
    extra = search["algorithm"] if search["algorithm"] in ("optuna", "hyperopt") else None  # optional packages
    check(not extra or importlib.util.find_spec(extra) is not None, source, "search.algorithm",
          f"{search['algorithm']} needs the {extra} package: pip install 'orchestrator[{extra}]'")
    kinds = {name: next(iter(spec)) for name, spec in cfg["hyperparameters"].items() if isinstance(spec, dict)}
    if search["algorithm"] == "grid":
        sampled = [name for name, kind in kinds.items() if kind != "grid"]
        check(not sampled, source, "search.algorithm",
              f"grid needs every hyperparameter a constant or a grid, not {', '.join(sampled)}")
    elif search["algorithm"] != "random":
        grids = [name for name, kind in kinds.items() if kind == "grid"]
        check(not grids, source, "search.algorithm",
              f"{search['algorithm']} samples its own points: hyperparameters {', '.join(grids)} need choice, not grid")


def _check_task(cfg: dict[str, Any], source: str) -> None:
    task = cfg["task"]
    check(isinstance(task.get("name"), str) and task["name"] in TASKS, source, "task.name",
          f"unknown task {task.get('name')!r} (known: {', '.join(sorted(TASKS))})")
    cfg["task"] = {"name": task["name"], **merge(TASKS[task["name"]].all_defaults(),
                                                  {k: v for k, v in task.items() if k != "name"}, source, "task.",
                                                  FREE_FORM)}
    noise = cfg["task"]["label_noise"]
    check(is_number(noise) and 0 <= noise < 1, source, "task.label_noise", f"must be a number in [0, 1), got {noise!r}")
    check(isinstance(cfg["task"]["label_noise_seed"], int), source, "task.label_noise_seed",
          f"must be an integer, got {cfg['task']['label_noise_seed']!r}")
    try:
        make_task(cfg)
    except ValueError as e:
        raise ConfigError(f"{source}: task.{e}") from None


def _check_resources(res: dict[str, Any], source: str) -> None:
    for key, value in res.items():
        check(is_number(value) and value >= 0, source, f"resources.{key}", f"must be a number >= 0, got {value!r}")
    check(isinstance(res["workers"], int) and res["workers"] >= 1, source, "resources.workers",
          f"must be an integer >= 1, got {res['workers']!r}")
    check(not (res["workers"] == 1 and res["gpu"] > 1), source, "resources.gpu",  # one process uses one GPU
          f"{res['gpu']:g} GPUs for one training process; for data-parallel trials set resources.gpu: 1 "
          f"and resources.workers: {int(res['gpu'])}")
    check(not (res["workers"] > 1 and 0 < res["gpu"] < 1), source, "resources.gpu",
          f"data-parallel workers need whole GPUs, got {res['gpu']}")


def _check_soup(soup: dict[str, Any], source: str) -> None:
    unknown = [r for r in soup["recipes"] if not isinstance(r, str) or r not in RECIPES]
    check(not unknown and soup["recipes"], source, "soup.recipes",
          f"unknown recipe {unknown[0]!r} (known: {', '.join(default_recipes())})" if unknown
          else "must name at least one recipe")
    check(isinstance(soup["bn_batches"], int) and soup["bn_batches"] >= 1, source, "soup.bn_batches",
          f"must be an integer >= 1, got {soup['bn_batches']!r}")
    for name, param in all_params().items():
        problem = param.check(soup[name])
        check(problem is None, source, f"soup.{name}", problem or "")


def _check_cook(cook: dict[str, Any], source: str) -> None:
    check(isinstance(cook["workers"], int) and cook["workers"] >= 0, source, "cook.workers",
          f"must be an integer >= 0 (0: cook in the driver), got {cook['workers']!r}")
    for key, value in cook["resources"].items():
        check(is_number(value) and value >= 0, source, f"cook.resources.{key}", f"must be a number >= 0, got {value!r}")
    check(cook["selection"] in SELECTIONS, source, "cook.selection",
          f"must be one of {', '.join(SELECTIONS)}, got {cook['selection']!r}")


def _check_selection(sel: dict[str, Any], source: str) -> None:
    from orchestrator.soup.dynamics.cartography import REGIONS

    check(isinstance(sel["from_sweep"], str), source, "data_selection.from_sweep",
          f"must be a sweep name, got {sel['from_sweep']!r}")
    check(sel["region"] in REGIONS, source, "data_selection.region",
          f"must be one of {', '.join(REGIONS)}, got {sel['region']!r}")
    check(is_number(sel["fraction"]) and 0 < sel["fraction"] <= 1, source, "data_selection.fraction",
          f"must be a number in (0, 1], got {sel['fraction']!r}")
    check(isinstance(sel["seed"], int), source, "data_selection.seed", f"must be an integer, got {sel['seed']!r}")


def task_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg["task"].items() if k != "name"}


def make_task(cfg: dict[str, Any]):
    return TASKS[cfg["task"]["name"]](task_settings(cfg))
