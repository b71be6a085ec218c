"""Two-node Ray clusters on this machine (ray.cluster_utils.Cluster).

A node lost mid-sweep: a real two-node Ray cluster on this machine
(ray.cluster_utils.Cluster: a head and a worker with one CPU each); once a trial runs on
the worker, the worker is killed without grace. The sweep completes on the head, with
every trial exactly once in the pool.

The cluster lives in its own process (it cannot share the session's local Ray), and the
sweep is a driver attached to it with --address, as on a real cluster."""

import os
import sys
import time

import pytest
from mlflow import MlflowClient

from orchestrator.common.pool import Pool
from tests.helpers import finish, free_port, kill_group, mlflow_server, start, sweep_cmd, trial_rows

pytestmark = pytest.mark.slow

CLUSTER = r'''
import glob, subprocess, sys, time
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
worker = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
sweep = subprocess.Popen(sys.argv[1:] + ["--address", cluster.address])
storage, pool = sys.argv[sys.argv.index("--storage") + 1], sys.argv[sys.argv.index("--pool") + 1]
deadline = time.time() + 240
while time.time() < deadline and sweep.poll() is None:
    # two trials with an epoch checkpoint, none finished, both CPUs busy: one runs on the worker
    checkpointed = {c.rsplit("/", 1)[0] for c in glob.glob(f"{storage}/*/*/checkpoint_*")}
    finished = len(glob.glob(f"{pool}/manifest/*.parquet")) - 1  # minus the pretrained row
    if len(checkpointed) >= 2 and finished == 0 and ray.available_resources().get("CPU", 0) == 0:
        cluster.remove_node(worker, allow_graceful=False)
        print("killed the worker node while both nodes ran a trial", flush=True)
        break
    time.sleep(0.2)
code = sweep.wait(timeout=300)
ray.shutdown()
cluster.shutdown()
sys.exit(code)
'''


def test_sweep_survives_losing_a_worker_node(tmp_path):
    (tmp_path / "cluster.py").write_text(CLUSTER)
    cmd = [sys.executable, str(tmp_path / "cluster.py"),
           *sweep_cmd(tmp_path, "nodeloss", 3, "hyperparameters.epochs=6",
                         "hyperparameters.batch_size=8")]  # trials long enough to be hit mid-training
    code, log = finish(start(cmd, tmp_path), tmp_path, timeout=420)
    assert code == 0, log[-4000:]
    assert "killed the worker node while both nodes ran a trial" in log, log[-4000:]
    assert "Trial task failed for trial" in log  # the trial on the lost node failed ...
    assert "from its checkpoint" in log  # ... and its retry resumed from its last epoch on the head
    df = Pool(str(tmp_path / "pool")).manifest()
    trials = df[df["kind"] == "trial"]
    assert len(trials) == 3 and trials["id"].is_unique and set(trials["status"]) == {"ok"}
    assert "Ray: 2 node(s), 2 CPUs" in log


BLOCKED_WORKER = r'''
import os, subprocess, sys
import ray
from ray.cluster_utils import Cluster

uri, sweep = sys.argv[1], sys.argv[2:]
# the head takes no trials (0 CPUs); the worker node's processes reach the MLflow server only
# through a proxy that is not there: out of their reach, as a server on a real head's 127.0.0.1
cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0})
saved = dict(os.environ)
os.environ.update(http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", no_grpc_proxy="*")
for key in ("no_proxy", "NO_PROXY"):
    os.environ.pop(key, None)
cluster.add_node(num_cpus=1)
os.environ.clear()
os.environ.update(saved)
cluster.wait_for_nodes()


@ray.remote(num_cpus=1)
def probe(uri):
    from orchestrator.common.tracking import unreachable
    return unreachable(uri, timeout=3)


print(f"from the worker node: {ray.get(probe.remote(uri))}", flush=True)
code = subprocess.call(sweep + ["--address", cluster.address])
ray.shutdown()
cluster.shutdown()
sys.exit(code)
'''


def test_trials_where_mlflow_is_out_of_reach_log_live_through_the_driver(tmp_path):
    """Trials on a worker node that cannot reach the tracking server: each epoch's metrics
    still reach MLflow while the trial runs (the driver logs what trials report), every trial
    gets one run, and nothing needs replaying from the pool."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    try:
        (tmp_path / "cluster.py").write_text(BLOCKED_WORKER)
        cmd = [sys.executable, str(tmp_path / "cluster.py"), uri,
               *sweep_cmd(tmp_path, "live", 2, "hyperparameters.epochs=3", "hyperparameters.batch_size=8", uri=uri)]
        proc = start(cmd, tmp_path)
        client, live = MlflowClient(uri), set()
        deadline = time.time() + 420
        while proc.poll() is None and time.time() < deadline:
            live |= running_trials_with_metrics(client, str(tmp_path / "pool"))
            time.sleep(0.5)
        code, log = finish(proc, tmp_path, timeout=60)
        runs = client.search_runs([client.get_experiment_by_name("live").experiment_id],
                                  "tags.`orchestrator.role` = 'trial'")
        epochs = {r.data.tags["orchestrator.ingredient_id"]: sorted(m.step for m in client.get_metric_history(
            r.info.run_id, "val_acc")) for r in runs}
    finally:
        kill_group(server)
    assert code == 0, log[-4000:]
    assert "from the worker node: cannot reach the MLflow server" in log, log[:3000]
    assert "Ray: 2 node(s), 1 CPUs" in log
    assert live, "no trial's metrics reached MLflow while it was running"
    trials = trial_rows(str(tmp_path / "pool"))
    assert epochs == {t: [1, 2, 3] for t in trials["id"]}  # one run each, every epoch once
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "MLflow: logged" not in log  # nothing had to be replayed from the pool


def running_trials_with_metrics(client, pool_uri) -> set[str]:
    """Trials whose run already has a val_acc point while the trial is not finished (no pool row)."""
    try:
        exp = client.get_experiment_by_name("live")
        runs = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'trial'") if exp else []
        finished = set(trial_rows(pool_uri)["id"]) if os.path.isdir(f"{pool_uri}/manifest") else set()
    except Exception:  # noqa: BLE001 - the experiment or the pool are being made
        return set()
    return {r.data.tags["orchestrator.trial_id"] for r in runs if r.info.status == "RUNNING"
            and "val_acc" in r.data.metrics and r.data.tags["orchestrator.trial_id"] not in finished}
