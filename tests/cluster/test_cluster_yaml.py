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
    assert '--artifacts-destination "s3://$ORCH_BUCKET/' in head
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


def test_what_gitignore_ignores_is_not_copied_to_the_nodes(cfg):
    assert cfg["rsync_filter"] == [".gitignore"]  # the launcher reads the patterns from this file
    with open(os.path.join(ROOT, ".gitignore")) as f:
        ignored = f.read().split()
    assert {"/pool/", "/ray_results/", "/.venv/", "/cluster.env"} <= set(ignored)


def head_mlflow_command(cfg) -> str:
    (command,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    return command


@pytest.mark.parametrize("store", ["postgresql://u:p@db.example:5432/mlflow", None])
def test_the_head_runs_mlflow_on_the_store_cluster_env_names_and_restarts_it(cfg, tmp_path, store):
    """The head's MLflow command, run here with a stand-in `mlflow` that records its arguments and
    exits at once: it is started again and again, on cluster.env's backend store, or on sqlite in
    the head's home with a warning when cluster.env names none."""
    import signal
    import subprocess
    import time

    (tmp_path / "cluster.env").write_text("ORCH_BUCKET=bkt\n" + (f"MLFLOW_BACKEND_STORE_URI={store}\n" if store else ""))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/started\nexit 3\n")
    (bin_dir / "mlflow").chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin", "MLFLOW_RESTART_DELAY": "0.2"}
    proc = subprocess.Popen(["bash", "-c", head_mlflow_command(cfg)], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.communicate(timeout=30)[0]  # the command returns at once, the loop runs on under nohup
    try:
        deadline = time.time() + 20
        while time.time() < deadline and len((tmp_path / "started").read_text().splitlines()
                                             if (tmp_path / "started").exists() else []) < 3:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the loop this test started (it kept the group)
    starts = (tmp_path / "started").read_text().splitlines()
    assert len(starts) >= 3  # restarted after each exit
    expected = store or f"sqlite:///{tmp_path}/mlflow.db"
    assert all(f"--host 127.0.0.1 --port 5000 --backend-store-uri {expected} --artifacts-destination s3://bkt/mlflow"
               in line for line in starts)
    assert "mlflow server exited (3); restarting" in (tmp_path / "mlflow.log").read_text()
    assert ("warning: cluster.env has no MLFLOW_BACKEND_STORE_URI" in out) == (store is None)


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
