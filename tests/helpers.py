"""Helpers the tests share (fixtures are in conftest.py): the tiny task, and running a
sweep as a process of its own whose Ray the test can kill."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from orchestrator.common.pool import Pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

# A tiny glyph task: seconds to pretrain, same code paths as the default.
TINY_TASK = [
    "task.width=8", "task.pretrain_per_glyph=2", "task.pretrain_epochs=1", "task.ood_font_per_digit=3",
    "hyperparameters.epochs={randint: [1, 2]}", "hyperparameters.lr={loguniform: [1.0e-3, 3.0e-3]}",
]


TWO_EPOCHS = [*TINY_TASK, "hyperparameters.epochs=2", "soup.wise_ft_alphas=[0.5]",  # one point per grid
              "soup.task_arithmetic_lambdas=[0.1]", "soup.ties_lambdas=[1.0]", "soup.fisher_examples=32"]


def sweep_cmd(root, sweep, n, *more, pool=None, storage=None, uri=None, recipes="[greedy_soup]"):
    """A soup_sweep command line of `n` two-epoch trials of the tiny task. `recipes`: the
    soup.recipes it cooks (None: every default one); tests of training and faults cook only
    the greedy soup (and the best individual it needs): publishing a dish costs seconds."""
    return [sys.executable, "-m", "orchestrator.soup_sweep", "--pool", pool or str(root / "pool"),
            "--tracking-uri", uri or f"sqlite:///{root}/mlflow.db", "--storage", storage or str(root / "ray_results"),
            "--num-samples", str(n), "--verbose",  # the trials' own output too: what the fault tests read
            f"sweep={sweep}", *TWO_EPOCHS, *([f"soup.recipes={recipes}"] if recipes else []), *more]


def start(cmd, root, log="sweep.log", **env):
    """A process in its own group (its local Ray with it), output to a file under root. Its
    Ray gets its own temp folder (short: socket paths are limited), so it never finds or
    announces a cluster to other Ray users on this machine."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0", RAY_TMPDIR=ray_tmp, **env)
    with open(root / log, "a") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.ray_tmp = ray_tmp
    return proc


def kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # only the group this test started
    except ProcessLookupError:
        pass
    proc.wait()
    shutil.rmtree(proc.ray_tmp, ignore_errors=True)


def finish(proc, root, log="sweep.log", timeout=300) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        kill_group(proc)  # Ray processes the sweep left behind, if any
    return code, (root / log).read_text()


def trial_rows(pool_uri):
    df = Pool(pool_uri).manifest()
    return df[df["kind"] == "trial"]


def weights_file(pool_root, ingredient_id: str) -> str:
    """The path of an ingredient's weights file (named by its content)."""
    return os.path.join(str(pool_root), Pool(str(pool_root)).get(ingredient_id)["weights"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(root, port):
    proc = start([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{root}/server.db", "--default-artifact-root",
                  str(root / "artifacts"), "--workers", "1"], root, log="mlflow.log")
    from orchestrator.common.tracking import unreachable

    deadline = time.time() + 90
    while unreachable(f"http://127.0.0.1:{port}", timeout=1):
        assert proc.poll() is None and time.time() < deadline, (root / "mlflow.log").read_text()[-2000:]
        time.sleep(0.5)
    return proc


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """This process as `rank` of a `world`-process gloo group on 127.0.0.1:`port` (one torch
    thread), for data-parallel tests spawned with torch.multiprocessing."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
