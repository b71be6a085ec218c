"""cluster.yaml passes Ray's own schema and validator, offline."""

import os

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        cfg = yaml.safe_load(f)
    prepared = prepare_config(cfg)
    validate_config(prepared)  # raises on unknown keys, bad node types, bad min/max workers
    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] in nodes
    gpu = [n for n in nodes.values() if "g5" in n["node_config"]["InstanceType"]]
    assert gpu and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1


def test_cluster_services_bind_to_localhost_and_install_this_project():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        cfg = yaml.safe_load(f)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "mlflow server --host 127.0.0.1" in head
    assert "0.0.0.0" not in yaml.safe_dump(cfg)
    assert any("pip install -e ~/orchestrator" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/orchestrator"] == "."
