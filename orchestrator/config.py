"""Sweep configs: YAML files under search_spaces/, validated before Ray starts.

A config is the defaults below overlaid with the YAML file, then with `key=value`
overrides from the command line (dotted keys, YAML values: `soup.greedy_accept='>'`,
`hyperparameters.lr={loguniform: [1e-4, 1e-3]}`). Every mistake is a one-line
ConfigError naming the file and the key.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml

from orchestrator.errors import ConfigError
from orchestrator.tasks import TASKS
from orchestrator.train import HPARAMS, PRECISIONS

DEFAULTS: dict[str, Any] = {
    "sweep": "glyphs_soup",
    "task": {"name": "glyphs"},  # other keys are the task's settings (see the task's `defaults`)
    "num_samples": 16,
    "search_seed": 0,  # seeds the random search, so a sweep samples the same trials again
    "max_concurrent_trials": 0,  # 0 = as many as the cluster's resources allow
    "max_failures": 2,  # retries per crashed trial (each resumes from its last epoch checkpoint)
    "resources": {"cpu": 1.0, "gpu": 0.0, "workers": 1},  # per worker; workers > 1: data-parallel Ray Train
    "precision": "auto",  # auto: bf16 autocast on GPUs that support it, fp32 elsewhere; or fp32, bf16
    "hyperparameters": {},  # name -> constant or distribution; see DISTRIBUTIONS
    "soup": {
        "greedy_accept": ">=",  # the paper's rule; ">" is the reference code's
        "wise_ft_alphas": [round(0.1 * i, 1) for i in range(11)],
        "bn_batches": 8,  # training batches that re-estimate BatchNorm statistics of a soup
    },
}

# How a hyperparameter may be drawn: {kind: [args]}. randint bounds are inclusive.
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 (no dot) as a float, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "search_spaces", "glyphs_soup.yaml")


def load_config(path: str | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Read, overlay and validate a soup-sweep config; returns a plain dict."""
    path = path or DEFAULT_CONFIG
    return validate(read_yaml(path, overrides), path)


def read_yaml(path: str, overrides: list[str] = ()) -> dict[str, Any]:
    """A YAML mapping with `key=value` overrides applied (not yet validated)."""
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        if value.startswith((">", "|")):  # soup.greedy_accept=> after the shell ate the quotes
            parsed = value
        else:
            try:
                parsed = yaml.load(value, Loader=_Loader)
            except yaml.YAMLError:
                raise ConfigError(f"override {item!r}: value is not valid YAML") from None
        _set_dotted(raw, key.split("."), parsed, item)
    return raw


def _set_dotted(tree: dict, keys: list[str], value: Any, item: str) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {item!r}: {k} is not a mapping")
    tree[keys[-1]] = value


def validate(raw: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    cfg = merge(DEFAULTS, raw, source)
    task = cfg["task"]
    if not isinstance(task.get("name"), str) or task["name"] not in TASKS:
        raise ConfigError(f"{source}: task.name: unknown task {task.get('name')!r} (known: {', '.join(sorted(TASKS))})")
    cfg["task"] = {"name": task["name"], **merge(TASKS[task["name"]].defaults,
                                                  {k: v for k, v in task.items() if k != "name"}, source, "task.")}
    try:
        TASKS[task["name"]]({k: v for k, v in cfg["task"].items() if k != "name"})
    except ValueError as e:
        raise ConfigError(f"{source}: task.{e}") from None
    for key, low in (("num_samples", 1), ("max_failures", 0), ("max_concurrent_trials", 0)):
        if cfg[key] < low:
            raise ConfigError(f"{source}: {key}: must be >= {low}, got {cfg[key]}")
    for key, value in cfg["resources"].items():
        if not _is_number(value) or value < 0:
            raise ConfigError(f"{source}: resources.{key}: must be a number >= 0, got {value!r}")
    if not isinstance(cfg["resources"]["workers"], int) or cfg["resources"]["workers"] < 1:
        raise ConfigError(f"{source}: resources.workers: must be an integer >= 1, got {cfg['resources']['workers']!r}")
    if cfg["resources"]["workers"] == 1 and cfg["resources"]["gpu"] > 1:  # one process would use only one of them
        raise ConfigError(f"{source}: resources.gpu: {cfg['resources']['gpu']:g} GPUs for one training process; "
                          f"for data-parallel trials set resources.gpu: 1 and resources.workers: "
                          f"{int(cfg['resources']['gpu'])}")
    if cfg["resources"]["workers"] > 1 and 0 < cfg["resources"]["gpu"] < 1:
        raise ConfigError(f"{source}: resources.gpu: data-parallel workers need whole GPUs, "
                          f"got {cfg['resources']['gpu']}")
    if cfg["precision"] not in PRECISIONS:
        raise ConfigError(f"{source}: precision: must be one of {', '.join(PRECISIONS)}, got {cfg['precision']!r}")
    if cfg["soup"]["greedy_accept"] not in (">=", ">"):
        raise ConfigError(f"{source}: soup.greedy_accept: must be '>=' or '>', got {cfg['soup']['greedy_accept']!r}")
    for a in cfg["soup"]["wise_ft_alphas"]:
        if not _is_number(a) or not 0 <= a <= 1:
            raise ConfigError(f"{source}: soup.wise_ft_alphas: each alpha must be a number in [0, 1], got {a!r}")
    for name, spec in cfg["hyperparameters"].items():
        check_hparam(name, spec, HPARAMS, source)
    mixup = cfg["hyperparameters"].get("mixup", 0)
    if not TASKS[task["name"]].supports_mixup and mixup != 0:
        raise ConfigError(f"{source}: hyperparameters.mixup: task {task['name']} has discrete inputs, "
                          f"so mixup must be 0 (got {mixup!r})")
    return cfg


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


FREE_FORM = ("task", "hyperparameters", "evals")  # mappings of user-chosen names


def merge(defaults: dict, given: dict, source: str, prefix: str = "", free_form=FREE_FORM) -> dict:
    """Overlay `given` on `defaults`, checking that every key exists and types agree.

    Keys in `free_form` take any mapping (their contents are checked by the caller)."""
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {given!r}")
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        where = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"{source}: {where}: unknown key (expected one of: {', '.join(defaults)})")
        default = defaults[key]
        if key in free_form:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {where}: expected a mapping, got {value!r}")
            out[key] = {**default, **value}
        elif isinstance(default, dict):
            out[key] = merge(default, value, source, where + ".", free_form)
        else:
            out[key] = _check_type(value, default, source, where)
    return out


def _check_type(value: Any, default: Any, source: str, where: str) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{source}: {where}: expected {type(default).__name__}, got {value!r}")
    return value


def check_hparam(name: str, spec: Any, known: dict[str, Any], source: str) -> None:
    """A constant or a distribution for hyperparameter `name`; `known` maps names to defaults."""
    where = f"{source}: hyperparameters.{name}"
    if name not in known:
        raise ConfigError(f"{where}: unknown hyperparameter (known: {', '.join(known)})")
    default = known[name]
    if not isinstance(spec, dict):
        _check_type(spec, default, source, f"hyperparameters.{name}")
        return
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected a value or one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        for v in args:
            _check_type(v, default, source, f"hyperparameters.{name}.{kind}")
        return
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}.{kind}: expected [low, high], got {args!r}")
    low, high = args
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}.randint: bounds must be integers, got {args!r}")
    if isinstance(default, int) and kind != "randint":
        raise ConfigError(f"{where}: an integer hyperparameter needs randint, choice or grid, got {kind}")
    if low > high or (low == high and kind != "randint"):
        raise ConfigError(f"{where}.{kind}: empty or inverted range [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {args!r}")


def search_space(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """Validated hyperparameter specs as a Ray Tune param_space."""
    from ray import tune

    space = {}
    for name, spec in hyperparameters.items():
        if not isinstance(spec, dict):
            space[name] = spec
            continue
        kind, args = next(iter(spec.items()))
        space[name] = {
            "loguniform": lambda a: tune.loguniform(*a),
            "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(a[0], a[1] + 1),
            "choice": tune.choice,
            "grid": tune.grid_search,
        }[kind](args)
    return space


def task_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg["task"].items() if k != "name"}


def make_task(cfg: dict[str, Any]):
    return TASKS[cfg["task"]["name"]](task_settings(cfg))
