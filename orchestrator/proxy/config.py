"""The LR study's config schema: its defaults and rules (read by common/config.py)."""

from __future__ import annotations

from typing import Any

from orchestrator.common import config
from orchestrator.common.config import check, check_name, merge
from orchestrator.common.weights import digest
from orchestrator.proxy.run import CHOICES, SETTINGS

DEFAULT_CONFIG = "proxy_lr.yaml"  # in orchestrator/configs/
DEFAULTS: dict[str, Any] = {
    "study": "proxy_lr",  # MLflow experiment and the pool's `sweep` column
    "data": {"source": "stdlib", "column": "text", "val_fraction": 0.1, "max_mb": 0.0},
    "settings": SETTINGS,
    "interventions": {"baseline": {}},  # name -> settings it changes
    "grid": {"widths": [32, 64, 128], "lrs": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
             "interventions": ["baseline"], "seeds": [0]},
    "analysis": {"target_width": 1024, "logit_threshold": 1e4},
    "resources": {"cpu": 1},
    "max_concurrent_trials": 0,
    "max_failures": 1,
    "checkpoint_every": 0,
}
FREE_FORM = ("resources",)  # plus `interventions`, checked on its own (grid.interventions is a list)


def load_config(path: str | None = None, preset: str = "default", overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML file (a path or a shipped config's name), overlaid with a preset, then with
    key=value overrides; validated."""
    return config.load(config.config_path(path, DEFAULT_CONFIG, "study"), validate, preset, overrides)


def check_settings(s: dict[str, Any], source: str, prefix: str) -> None:
    for key, choices in CHOICES.items():
        check(s[key] in choices, source, prefix + key, f"must be one of {', '.join(choices)}, got {s[key]!r}")
    for key in ("depth", "head_dim", "batch_size", "steps", "log_every", "eval_batches", "base_width"):
        check(s[key] >= 1, source, prefix + key, f"must be >= 1, got {s[key]}")
    check(s["seq_len"] >= 2, source, prefix + "seq_len", f"must be >= 2, got {s['seq_len']}")
    for key in ("warmup_steps", "grad_clip", "weight_decay", "z_loss"):
        check(s[key] >= 0, source, prefix + key, f"must be >= 0, got {s[key]}")
    check(0 <= s["probe_step"] < s["steps"], source, prefix + "probe_step",
           f"must be in [0, steps={s['steps']}), got {s['probe_step']}")
    check(0 <= s["lr_floor"] <= 1, source, prefix + "lr_floor", f"must be in [0, 1], got {s['lr_floor']}")
    for key in ("beta1", "beta2"):
        check(0 <= s[key] < 1, source, prefix + key, f"must be in [0, 1), got {s[key]}")
    check(s["eps"] > 0, source, prefix + "eps", f"must be > 0, got {s['eps']}")
    check(s["diverge_factor"] > 1, source, prefix + "diverge_factor", f"must be > 1, got {s['diverge_factor']}")


def validate(raw: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    raw = dict(raw)
    interventions = raw.pop("interventions", DEFAULTS["interventions"])
    cfg = merge(DEFAULTS, raw, source, free_form=FREE_FORM)
    check_name(cfg["study"], source, "study")
    check_settings(cfg["settings"], source, "settings.")
    check(isinstance(interventions, dict) and interventions, source, "interventions",
           "expected a mapping of intervention name -> settings it changes")
    cfg["interventions"] = {}
    for name, change in interventions.items():
        merged = merge(cfg["settings"], change or {}, source, f"interventions.{name}.")
        check_settings(merged, source, f"interventions.{name}.")
        cfg["interventions"][str(name)] = change or {}
    grid = cfg["grid"]
    for key in ("widths", "lrs", "interventions", "seeds"):
        check(len(grid[key]) > 0, source, f"grid.{key}", "must list at least one value")
    for w in grid["widths"]:
        check(isinstance(w, int) and not isinstance(w, bool) and w > 0, source, "grid.widths",
               f"each width must be a positive integer, got {w!r}")
    for lr in grid["lrs"]:
        check(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, source, "grid.lrs",
               f"each LR must be a number > 0, got {lr!r}")
    grid["lrs"] = [float(lr) for lr in grid["lrs"]]
    for seed in grid["seeds"]:
        check(isinstance(seed, int) and not isinstance(seed, bool), source, "grid.seeds",
               f"each seed must be an integer, got {seed!r}")
    for name in grid["interventions"]:
        check(name in cfg["interventions"], source, "grid.interventions",
               f"unknown intervention {name!r} (defined: {', '.join(cfg['interventions'])})")
        head_dim = {**cfg["settings"], **cfg["interventions"][name]}["head_dim"]
        for w in grid["widths"]:
            check(w % head_dim == 0, source, "grid.widths",
                   f"width {w} is not a multiple of head_dim {head_dim} ({name})")
    target, head_dim = cfg["analysis"]["target_width"], cfg["settings"]["head_dim"]
    check(target >= 1 and target % head_dim == 0, source, "analysis.target_width",
           f"must be a positive multiple of settings.head_dim={head_dim}, got {target}")
    check(0 < cfg["data"]["val_fraction"] < 1, source, "data.val_fraction", "must be in (0, 1)")
    check(cfg["max_failures"] >= 0, source, "max_failures", "must be >= 0")
    check(cfg["checkpoint_every"] >= 0, source, "checkpoint_every", "must be >= 0")
    for key, value in cfg["resources"].items():
        check(isinstance(value, (int, float)) and value >= 0, source, f"resources.{key}",
               f"must be >= 0, got {value!r}")
    return cfg


def run_settings(cfg: dict[str, Any], intervention: str) -> dict[str, Any]:
    return {**cfg["settings"], **cfg["interventions"][intervention]}


def run_key(cfg: dict[str, Any], intervention: str) -> str:
    """What a run's result depends on besides its grid point: the analysis mixes only equal keys."""
    return digest(run_settings(cfg, intervention), cfg["data"])
