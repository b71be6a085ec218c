"""One config mechanism for every command: defaults, a YAML file, presets, dotted
`key=value` overrides, and a typed schema.

A config is a YAML file (a path, or the name of one shipped in orchestrator/configs/),
overlaid with one of its own `presets:` if one is asked for, then with `key=value`
overrides from the command line (dotted keys, YAML values: `soup.greedy_accept='>'`,
`hyperparameters.lr={loguniform: [1e-4, 1e-3]}`). A command's schema is its defaults
mapping (`merge` checks every key and type against it) plus the rules of its `validate`.
Every mistake is a one-line ConfigError naming the file and the key.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Callable

import yaml

from orchestrator.common.errors import ConfigError

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# How a hyperparameter may be drawn: {kind: [args]}. randint bounds are inclusive.
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 (no dot) as a float, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

def config_path(given: str | None, default: str, kind: str | None = None) -> str:
    """A config file: a path as given, else the shipped config of that name (with or
    without .yaml); none given means the command's shipped default. `kind`: the top-level
    key of this command's configs (`sweep`, `study`): a shipped config of another command
    is a one-line error naming the ones this command takes."""
    if given is None:
        return os.path.join(SHIPPED, default)
    shipped = os.path.join(SHIPPED, given if given.endswith(".yaml") else f"{given}.yaml")
    if not os.path.exists(given) and os.sep not in given and os.path.isfile(shipped):
        if kind and kind not in _top_keys(shipped):
            raise ConfigError(f"--config {given}: a shipped config of another command; this one takes "
                              f"{', '.join(shipped_configs(kind))} or a path")
        return shipped
    return given


def shipped_configs(kind: str | None = None) -> list[str]:
    """Names of the configs that ship with the package (for --help): with `kind`, those whose
    top level has that key (a soup sweep's `sweep`, a study's `study`)."""
    names = sorted(n[:-len(".yaml")] for n in os.listdir(SHIPPED) if n.endswith(".yaml"))
    return [n for n in names if kind is None or kind in _top_keys(os.path.join(SHIPPED, f"{n}.yaml"))]


def _top_keys(path: str) -> set[str]:
    with open(path) as f:
        raw = yaml.load(f, Loader=_Loader)
    return set(raw) if isinstance(raw, dict) else set()


def load(path: str, validate: Callable[[dict[str, Any], str], dict[str, Any]], preset: str = "default",
         overrides: list[str] = ()) -> dict[str, Any]:
    """Read `path`, overlay the preset and the overrides, and check it with the command's `validate`.
    A mistake in a key an override set names that override, not the file."""
    raw = read(path, preset, overrides)
    try:
        return validate(raw, path)
    except ConfigError as e:
        raise _blame_override(e, path, overrides) from None


def _blame_override(error: ConfigError, path: str, overrides: list[str]) -> ConfigError:
    """`path: key: why` as `override 'key=value': key: why` when an override set that key (or
    a key above or below it)."""
    text, prefix = str(error), f"{path}: "
    if not text.startswith(prefix):
        return error
    where = text[len(prefix):].split(":", 1)[0]
    for item in reversed(overrides):  # the last override of a key is the one that stands
        key = item.partition("=")[0]
        if where == key or where.startswith(f"{key}.") or key.startswith(f"{where}."):
            return ConfigError(f"override {item!r}: {text[len(prefix):]}")
    return error


def read(path: str, preset: str = "default", overrides: list[str] = ()) -> dict[str, Any]:
    """A YAML mapping with a preset and `key=value` overrides applied (not yet validated).
    `presets:` maps a name to the keys it changes; "default" is the file as it is."""
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    presets = raw.pop("presets", None) or {}
    if not isinstance(presets, dict) or (preset != "default" and preset not in presets):
        known = ", ".join(sorted({"default", *presets})) if isinstance(presets, dict) else "default"
        raise ConfigError(f"{path}: presets: no preset {preset!r} (known: {known})")
    raw = _overlay(raw, copy.deepcopy(presets.get(preset) or {}), f"{path}: presets.{preset}")
    for item in overrides:  # the command line wins over the file and the preset
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


def _overlay(base: dict, top: dict, where: str) -> dict:
    if not isinstance(top, dict):
        raise ConfigError(f"{where}: expected a mapping, got {top!r}")
    out = dict(base)
    for k, v in top.items():
        out[k] = _overlay(out[k], v, f"{where}.{k}") if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, keys: list[str], value: Any, item: str) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {item!r}: {k} is not a mapping")
    tree[keys[-1]] = value


def check(ok: bool, source: str, where: str, message: str) -> None:
    """One schema rule: a ConfigError `source: where: message` unless ok."""
    if not ok:
        raise ConfigError(f"{source}: {where}: {message}")


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")


def check_name(value: Any, source: str, key: str) -> None:
    """A sweep or study name: it names folders under --storage, MLflow experiments and pool ids."""
    check(isinstance(value, str) and NAME.fullmatch(value) is not None and ".." not in value, source, key,
          f"must be a plain name (letters, digits, '.', '_', '=', '-'; no '/' or '..'), got {value!r}")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def merge(defaults: dict, given: dict, source: str, prefix: str = "", free_form: tuple[str, ...] = ()) -> dict:
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
            out[key] = check_type(value, default, source, where)
    return out


def check_type(value: Any, default: Any, source: str, where: str) -> Any:
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
        check_type(spec, default, source, f"hyperparameters.{name}")
        return
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected a value or one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        for v in args:
            check_type(v, default, source, f"hyperparameters.{name}.{kind}")
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


