"""A node lost mid-sweep: a real two-node Ray cluster on this machine
(ray.cluster_utils.Cluster: a head and a worker with one CPU each); once a trial runs on
the worker, the worker is killed without grace. The sweep completes on the head, with
every trial exactly once in the pool.

The cluster lives in its own process (it cannot share the session's local Ray), and the
sweep is a driver attached to it with --address, as on a real cluster."""

import sys

import pytest

from orchestrator.common.pool import Pool
from tests.helpers import finish, start, sweep_cmd

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
