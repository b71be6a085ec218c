"""Sweep configs: the default YAML, `key=value` overrides, and one-line ConfigErrors."""

from __future__ import annotations

import os
import shlex

import re

import pytest

from orchestrator.common.config import SHIPPED, search_space
from orchestrator.soup.config import DEFAULT_CONFIG, load_config
from orchestrator.common.errors import ConfigError, UserError
from orchestrator.soup.train import HPARAMS

DEFAULT = os.path.join(SHIPPED, DEFAULT_CONFIG)


def test_default_config_loads():
    cfg = load_config()
    assert cfg["num_samples"] >= 16
    assert cfg["task"]["name"] == "glyphs"
    hp = cfg["hyperparameters"]
    assert set(hp) <= set(HPARAMS)
    assert set(hp["lr"]) == {"loguniform"}
    assert set(hp["weight_decay"]) == {"loguniform"}
    assert set(hp["epochs"]) == {"randint"}
    for name in ("label_smoothing", "augment", "mixup"):
        assert set(hp[name]) == {"choice"}, name
    assert "seed" in hp
    lo, hi = hp["lr"]["loguniform"]
    assert 0 < lo < hi and isinstance(lo, float)
    lo, hi = hp["epochs"]["randint"]
    assert isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi
    assert cfg["soup"]["greedy_accept"] in (">=", ">")
    assert all(0 <= a <= 1 for a in cfg["soup"]["wise_ft_alphas"])
    # task settings are the task's defaults overlaid with the file's
    assert cfg["task"]["pretrain_epochs"] == 6 and "val_fraction" in cfg["task"]


@pytest.mark.parametrize("name, task", [("minilm_text_example.yaml", "hf_text"),
                                        ("clip_vitb32_imagenet.yaml", "timm_image")])
def test_real_model_example_configs_validate(name, task):
    """Validation reads no data and needs no network: the ImageNet config checks here too."""
    cfg = load_config(os.path.join(SHIPPED, name))
    assert cfg["task"]["name"] == task and cfg["task"]["data"]["evals"]
    assert set(cfg["hyperparameters"]) <= set(HPARAMS)


def test_explicit_path_and_shipped_name_equal_default():
    assert load_config(DEFAULT) == load_config() == load_config("glyphs_soup")


def test_overrides():
    cfg = load_config(None, [
        "num_samples=32",
        "task.width=48",
        "soup.greedy_accept='>'",
        "hyperparameters.lr=1e-3",
        "hyperparameters.weight_decay={loguniform: [1e-5, 1e-2]}",
        "hyperparameters.epochs={randint: [1, 3]}",
        "soup.wise_ft_alphas=[0, 0.5, 1]",
        "sweep=my_sweep",
    ])
    assert cfg["num_samples"] == 32
    assert cfg["task"]["width"] == 48
    assert cfg["task"]["name"] == "glyphs"  # sibling keys survive a dotted override
    assert cfg["soup"]["greedy_accept"] == ">"
    assert cfg["hyperparameters"]["lr"] == 1e-3 and isinstance(cfg["hyperparameters"]["lr"], float)
    assert cfg["hyperparameters"]["weight_decay"] == {"loguniform": [1e-5, 1e-2]}
    assert cfg["hyperparameters"]["epochs"] == {"randint": [1, 3]}
    assert cfg["hyperparameters"]["mixup"] == {"choice": [0.0, 0.2, 0.4]}  # untouched
    assert cfg["soup"]["wise_ft_alphas"] == [0, 0.5, 1]
    assert cfg["sweep"] == "my_sweep"


@pytest.mark.parametrize("text, expected", [("1e-3", 1e-3), ("1E3", 1e3), ("-2e-4", -2e-4), ("2e0", 2.0),
                                           ("5.0e-3", 5e-3)])
def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path, text, expected):
    path = write(tmp_path, f"hyperparameters:\n  weight_decay: {text}\n")
    from_file = load_config(path)["hyperparameters"]["weight_decay"]
    from_override = load_config(None, [f"hyperparameters.weight_decay={text}"])["hyperparameters"]["weight_decay"]
    for value in (from_file, from_override):
        assert type(value) is float
        assert value == expected


def test_1e_minus_3_override_is_a_float_not_a_string():
    cfg = load_config(None, ["hyperparameters.lr=1e-3"])
    assert cfg["hyperparameters"]["lr"] == 0.001
    assert type(cfg["hyperparameters"]["lr"]) is float


def test_documented_greedy_accept_override_works_from_a_shell():
    """The docs say `soup_sweep ... soup.greedy_accept='>'`; a shell strips the quotes.

    The program then receives `soup.greedy_accept=>` (and `soup.greedy_accept=>=` for the
    other rule), which YAML reads as a block-scalar indicator.
    """
    argv = shlex.split("--num-samples 32 soup.greedy_accept='>'")
    assert argv[-1] == "soup.greedy_accept=>"
    assert load_config(None, [argv[-1]])["soup"]["greedy_accept"] == ">"
    assert load_config(None, shlex.split("soup.greedy_accept='>='"))["soup"]["greedy_accept"] == ">="


def write(tmp_path, text: str) -> str:
    path = tmp_path / "bad_config.yaml"
    path.write_text(text)
    return str(path)


# (case id, YAML text, substrings the message must contain besides the file name)
BAD_CONFIGS = [
    ("invalid_yaml", "num_samples: [1, 2\nsweep: x\n", ["invalid YAML", "line"]),
    ("invalid_yaml_tab", "task:\n\tname: glyphs\n", ["invalid YAML"]),
    ("top_level_not_mapping", "- 1\n- 2\n", ["mapping"]),
    ("unknown_top_level_key", "num_sample: 16\n", ["num_sample", "unknown key"]),
    ("unknown_nested_key", "soup: {greedy: '>'}\n", ["soup.greedy", "unknown key"]),
    ("unknown_task_key", "task: {name: glyphs, widht: 8}\n", ["task.widht", "unknown key"]),
    ("wrong_type_int", "num_samples: many\n", ["num_samples", "int"]),
    ("wrong_type_bool_for_int", "num_samples: true\n", ["num_samples"]),
    ("wrong_type_float_for_int", "max_failures: 1.5\n", ["max_failures"]),
    ("wrong_type_task_setting", "task: {name: glyphs, width: wide}\n", ["task.width"]),
    ("wrong_type_section", "soup: 3\n", ["soup"]),
    ("wrong_type_list", "soup: {wise_ft_alphas: 0.5}\n", ["soup.wise_ft_alphas"]),
    ("wrong_type_hparam_constant", "hyperparameters: {epochs: 2.5}\n", ["hyperparameters.epochs"]),
    ("wrong_type_choice", "hyperparameters: {epochs: {choice: [2, three]}}\n", ["hyperparameters.epochs"]),
    ("wrong_type_resources", "resources: {cpu: two}\n", ["resources.cpu"]),
    ("negative_num_samples", "num_samples: 0\n", ["num_samples"]),
    ("empty_range_loguniform", "hyperparameters: {lr: {loguniform: [0.001, 0.001]}}\n", ["hyperparameters.lr"]),
    ("empty_range_uniform", "hyperparameters: {augment: {uniform: [0.5, 0.5]}}\n", ["hyperparameters.augment"]),
    ("inverted_range_loguniform", "hyperparameters: {lr: {loguniform: [1e-2, 1e-4]}}\n", ["hyperparameters.lr"]),
    ("inverted_range_randint", "hyperparameters: {epochs: {randint: [8, 2]}}\n", ["hyperparameters.epochs"]),
    ("loguniform_zero", "hyperparameters: {weight_decay: {loguniform: [0, 0.1]}}\n",
     ["hyperparameters.weight_decay", "> 0"]),
    ("loguniform_negative", "hyperparameters: {lr: {loguniform: [-1e-3, 1e-3]}}\n", ["hyperparameters.lr", "> 0"]),
    ("range_not_a_pair", "hyperparameters: {lr: {uniform: [0.1, 0.2, 0.3]}}\n", ["hyperparameters.lr"]),
    ("unknown_distribution", "hyperparameters: {lr: {normal: [0.1, 0.2]}}\n", ["hyperparameters.lr"]),
    ("empty_choice", "hyperparameters: {mixup: {choice: []}}\n", ["hyperparameters.mixup"]),
    ("unknown_task_name", "task: {name: mnist}\n", ["task.name", "mnist"]),
    ("task_name_not_a_string", "task: {name: [glyphs]}\n", ["task.name"]),
    ("unknown_font", "task: {name: glyphs, held_out_fonts: [Comic]}\n", ["task.held_out_fonts", "Comic"]),
    ("unknown_hyperparameter", "hyperparameters: {learning_rate: 0.1}\n", ["hyperparameters.learning_rate"]),
    ("float_distribution_on_int_uniform", "hyperparameters: {epochs: {uniform: [2, 8]}}\n",
     ["hyperparameters.epochs"]),
    ("float_distribution_on_int_loguniform", "hyperparameters: {batch_size: {loguniform: [16.0, 64.0]}}\n",
     ["hyperparameters.batch_size"]),
    ("randint_float_bounds", "hyperparameters: {epochs: {randint: [2.0, 8.5]}}\n", ["hyperparameters.epochs"]),
    ("bad_greedy_accept", "soup: {greedy_accept: '=>'}\n", ["soup.greedy_accept"]),
    ("bad_greedy_accept_word", "soup: {greedy_accept: greater}\n", ["soup.greedy_accept"]),
    ("alpha_above_1", "soup: {wise_ft_alphas: [0.0, 0.5, 1.5]}\n", ["soup.wise_ft_alphas", "1.5"]),
    ("alpha_below_0", "soup: {wise_ft_alphas: [-0.1, 0.5]}\n", ["soup.wise_ft_alphas", "-0.1"]),
    ("alpha_not_a_number", "soup: {wise_ft_alphas: [half]}\n", ["soup.wise_ft_alphas"]),
    ("bad_precision", "precision: fp8\n", ["precision", "fp8"]),
    ("zero_workers", "resources: {workers: 0}\n", ["resources.workers"]),
    ("gpu_fraction_with_workers", "resources: {gpu: 0.5, workers: 2}\n", ["resources.gpu", "whole"]),
    ("unknown_resource", "resources: {tpu: 1}\n", ["resources.tpu", "unknown key"]),
    ("several_gpus_one_process", "resources: {gpu: 4}\n", ["resources.gpu", "resources.workers: 4"]),
    ("text_without_train_file", "task: {name: hf_text, data: {evals: {id_test: t.csv}}}\n", ["task.data.train"]),
    ("text_without_evals", "task: {name: hf_text, data: {train: t.csv}}\n", ["task.data.evals"]),
    ("text_id_test_not_an_eval", "task: {name: hf_text, data: {train: t.csv, evals: {test: t.csv}}}\n",
     ["task.data.id_test", "test"]),
    ("text_unknown_data_key", "task: {name: hf_text, data: {train: t.csv, text_col: x}}\n",
     ["task.data.text_col", "unknown key"]),
    ("text_mixup", "task: {name: hf_text, data: {train: t.csv, evals: {id_test: t.csv}}}\n"
                   "hyperparameters: {mixup: {choice: [0.0, 0.2]}}\n", ["hyperparameters.mixup", "hf_text"]),
    ("timm_unknown_model", "task: {name: timm_image, model: resnet_9000, data: {train: d, evals: {id_test: d}}}\n",
     ["task.model", "resnet_9000"]),
]


@pytest.mark.parametrize("text, needles", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_a_config_error_naming_file_and_key(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert path in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert "\n" not in msg  # one line
    assert isinstance(info.value, UserError)


def test_missing_file_is_a_config_error(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(path)


def test_a_folder_is_a_config_error_like_a_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: is a folder, not a YAML file"


def test_a_preset_overlays_the_file_and_overrides_win(tmp_path):
    path = write(tmp_path, "num_samples: 4\npresets:\n  big: {num_samples: 32, search_seed: 7}\n")
    assert load_config(path)["num_samples"] == 4
    big = load_config(path, preset="big")
    assert (big["num_samples"], big["search_seed"]) == (32, 7)
    assert load_config(path, ["num_samples=8"], preset="big")["num_samples"] == 8
    with pytest.raises(ConfigError, match="presets: no preset 'huge' \\(known: big, default\\)"):
        load_config(path, preset="huge")


@pytest.mark.parametrize("override, key", [
    ("hyperparameters.lr={loguniform: [1e-3, 1e-3]}", "hyperparameters.lr"),
    ("soup.greedy_accept=maybe", "soup.greedy_accept"),
    ("soup.wise_ft_alphas=[2]", "soup.wise_ft_alphas"),
    ("num_samples=lots", "num_samples"),
    ("nonsense.key=1", "nonsense"),
])
def test_bad_value_from_an_override_names_the_override_and_the_key_not_the_file(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(f"override {override!r}: {key}")
    assert DEFAULT not in str(info.value)  # the shipped file is not what is wrong


def test_a_mistake_in_the_file_still_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("sweep: mine\nnum_samples: lots\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: num_samples: "):
        load_config(str(path), ["soup.greedy_accept=>"])


def test_each_command_offers_and_takes_its_own_shipped_configs():
    from orchestrator.common.config import shipped_configs
    from orchestrator.proxy.config import load_config as load_study

    assert "glyphs_soup" in shipped_configs("sweep") and "proxy_lr" not in shipped_configs("sweep")
    assert shipped_configs("study") == ["proxy_lr"]
    with pytest.raises(ConfigError, match="--config glyphs_soup: a shipped config of another command; this one "
                                          "takes proxy_lr or a path"):
        load_study("glyphs_soup")
    with pytest.raises(ConfigError, match="--config proxy_lr: a shipped config of another command"):
        load_config("proxy_lr")


@pytest.mark.parametrize("override", ["num_samples", "soup.greedy_accept", "=5", ""])
def test_override_without_key_value_is_a_config_error(override):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert "key=value" in msg
    assert repr(override) in msg  # names the offending argument (and so its key)


def test_override_into_a_scalar_is_a_config_error():
    with pytest.raises(ConfigError, match="num_samples"):
        load_config(None, ["num_samples.x=1"])


def test_override_value_must_be_yaml():
    with pytest.raises(ConfigError, match="task.width"):
        load_config(None, ["task.width=[1, 2"])


# -- Ray Tune search space -------------------------------------------------------------------


def test_search_space_builds_ray_tune_domains():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = load_config(None, ["hyperparameters.warmup_frac={uniform: [0.0, 0.2]}",
                             "hyperparameters.batch_size={grid: [16, 32]}"])
    space = search_space(cfg["hyperparameters"])
    assert set(space) == set(cfg["hyperparameters"])

    lr = space["lr"]
    assert isinstance(lr, Float) and type(lr.sampler).__name__ == "_LogUniform"
    assert (lr.lower, lr.upper) == tuple(cfg["hyperparameters"]["lr"]["loguniform"])
    assert isinstance(space["weight_decay"], Float)
    assert isinstance(space["warmup_frac"], Float) and type(space["warmup_frac"].sampler).__name__ == "_Uniform"

    for name in ("label_smoothing", "augment", "mixup"):
        assert isinstance(space[name], Categorical)
        assert space[name].categories == cfg["hyperparameters"][name]["choice"]
    assert space["batch_size"] == tune.grid_search([16, 32])

    # randint bounds are inclusive in the config; Ray's upper bound is exclusive
    lo, hi = cfg["hyperparameters"]["epochs"]["randint"]
    epochs = space["epochs"]
    assert isinstance(epochs, Integer)
    assert (epochs.lower, epochs.upper) == (lo, hi + 1)
    draws = [int(v) for v in epochs.sample(size=2000, random_state=0)]
    assert min(draws) == lo and max(draws) == hi

    lrs = lr.sample(size=500, random_state=0)
    assert all(lr.lower <= v <= lr.upper for v in lrs)


def test_search_space_constants_pass_through():
    space = search_space({"batch_size": 64, "lr": 3e-4, "epochs": {"randint": [5, 5]}})
    assert space["batch_size"] == 64 and space["lr"] == 3e-4
    assert {int(v) for v in space["epochs"].sample(size=50, random_state=1)} == {5}


@pytest.mark.parametrize("name", ["a/b", "../up", "x..y", "", "-flag"])
def test_a_sweep_or_study_name_that_is_not_a_plain_name_is_an_error(name):
    from orchestrator.proxy.config import load_config as load_study

    with pytest.raises(ConfigError, match="sweep: must be a plain name"):
        load_config(None, [f"sweep={name!r}"])
    with pytest.raises(ConfigError, match="study: must be a plain name"):
        load_study(None, overrides=[f"study={name!r}"])


def test_two_launches_in_the_same_second_get_different_run_names():
    import re

    from orchestrator.common.tune import run_name

    names = {run_name("glyphs_soup") for _ in range(50)}
    assert len(names) == 50
    assert all(re.fullmatch(r"glyphs_soup-\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names)
