"""cluster.yaml passes Ray's own schema and validator, offline, and what it runs exists."""

import importlib.util
import os
import re

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.helpers import REPO as ROOT


@pytest.fixture(scope="module")
def cfg():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def commands(cfg) -> str:
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
            "worker_start_ray_commands", "initialization_commands")
    return "\n".join(c for k in keys for c in cfg.get(k) or [])


def test_cluster_yaml_is_valid_for_the_ray_launcher(cfg):
    prepared = prepare_config(cfg)
    validate_config(prepared)  # raises on unknown keys, bad node types, bad min/max workers
    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] in nodes
    assert prepared["provider"]["type"] == "aws"
    gpu = [n for n in nodes.values() if "g5" in n["node_config"]["InstanceType"]]
    assert gpu and gpu[0]["min_workers"] == 0 and 1 <= gpu[0]["max_workers"] <= prepared["max_workers"]


def test_cluster_services_bind_to_localhost_and_install_this_project(cfg):
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "mlflow server --host 127.0.0.1" in head
    assert "--artifacts-destination s3://$ORCH_BUCKET/" in head
    assert "0.0.0.0" not in yaml.safe_dump(cfg)
    assert any("pip install -e ~/orchestrator" in c for c in cfg["setup_commands"])
    assert any("ray[default" in c for c in cfg["setup_commands"])  # the launcher needs ray[default] on nodes
    assert cfg["file_mounts"]["~/orchestrator"] == "."


def test_ray_auth_token_is_shared_and_enabled_on_every_node(cfg):
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("export RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"])  # drivers run with it too


def test_no_secrets_in_the_cluster_config(cfg):
    text = yaml.safe_dump(cfg)
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET|password", text, re.I)
    assert "cluster.env" in cfg["rsync_exclude"]  # mounted on its own, never copied with the checkout


def test_commands_the_cluster_and_readme_run_exist_in_this_project(cfg):
    """`python -m X` modules named in cluster.yaml or the README's Cluster section exist,
    and the command-line flags used there are accepted."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Cluster", 1)[1].split("\n## ", 1)[0]
    text = commands(cfg) + "\n" + section
    modules = set(re.findall(r"python -m (orchestrator\.\w+)", text))
    assert "orchestrator.soup_sweep" in modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    from orchestrator import pool
    from orchestrator.soup import sweep as soup_sweep

    text = re.sub(r"\\\n\s*", " ", text)  # join shell line continuations
    used = re.findall(r"orchestrator\.soup_sweep([^'`\n]*)", text)
    assert any("--address auto" in u for u in used)
    for args in used:  # argparse exits on an unknown flag
        soup_sweep.parse_args(re.sub(r"\$\{?\w+\}?", "x", args).split())
    for command in set(re.findall(r"orchestrator\.pool ([\w-]+)", text)):
        with pytest.raises(SystemExit) as done:
            pool.main([command, "--help"])
        assert done.value.code == 0, command
