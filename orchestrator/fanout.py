"""The Ray Tune fan-out: connect to Ray, run the trials, report what happened."""

from __future__ import annotations

import os
import re
from typing import Any

import pyarrow.fs as pafs

from orchestrator.config import search_space
from orchestrator.errors import UserError
from orchestrator.tasks.base import TaskData
from orchestrator.trial import SweepContext, run_trial


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a Ray address nobody answers at (ray.init itself would wait for minutes)."""
    import socket

    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"Ray address {address!r}: nothing answers at {host}:{port} ({e.strerror or e})") from None


def connect(address: str | None) -> dict[str, Any]:
    """Start a local Ray, or attach to a cluster; returns its size."""
    import ray

    if not ray.is_initialized():
        try:
            # "local": a fresh Ray on this machine, as documented, never a stale `ray start` cluster
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=True,
                     configure_logging=True, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"Ray address {address!r}: cannot connect ({first[:200]})") from None
    res = ray.cluster_resources()
    return {"ray_nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "ray_cpus": res.get("CPU", 0), "ray_gpus": res.get("GPU", 0)}


def storage_fs(storage: str) -> tuple[pafs.FileSystem, str]:
    """Tune storage as (filesystem, path): a folder, or any pyarrow URI, query options included
    (s3://bucket/tune?endpoint_override=host:port&scheme=http)."""
    if "://" not in storage:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(storage))
    try:
        return pafs.FileSystem.from_uri(storage)
    except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
        raise UserError(f"storage {storage}: cannot open: {e}") from None


def run_name(sweep: str, started: str) -> str:
    return f"{sweep}-{started}"


def latest_run(storage: str, sweep: str) -> str | None:
    """Path (within the storage filesystem) of this sweep's newest restorable Tune run, if any."""
    from ray import tune

    fs, root = storage_fs(storage)
    pattern = re.compile(re.escape(run_name(sweep, "")) + r"\d{8}-\d{6}")
    try:
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        raise UserError(f"storage {storage}: cannot list: {e}") from None
    names = sorted(i.base_name for i in found if i.type == pafs.FileType.Directory and pattern.fullmatch(i.base_name))
    for name in reversed(names):  # timestamps sort by time
        if tune.Tuner.can_restore(f"{root}/{name}", storage_filesystem=fs):
            return f"{root}/{name}"
    return None


def run(cfg: dict[str, Any], ctx: SweepContext, data: TaskData, storage: str, name: str,
        resume: str | None = None):
    """Fan the trials out with Ray Tune, or continue the interrupted run at `resume`
    (finished trials stay finished; unfinished and errored ones resume from their last
    checkpoint); returns the ResultGrid."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    res = cfg["resources"]
    # a data-parallel trial only waits on its Ray Train workers, which ask for the resources
    resources = {"cpu": res["cpu"], "gpu": res["gpu"]} if res["workers"] == 1 else {"cpu": 0.01}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx, data=data), resources)
    fs, root = storage_fs(storage)
    if resume:
        return tune.Tuner.restore(resume, trainable, resume_errored=True, storage_filesystem=fs).fit()
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg["hyperparameters"]),
        tune_config=tune.TuneConfig(
            metric="val_acc", mode="max",
            num_samples=cfg["num_samples"],
            # the cap goes on the generator: Tune ignores max_concurrent_trials with an explicit one
            search_alg=BasicVariantGenerator(random_state=cfg["search_seed"],
                                             max_concurrent=cfg["max_concurrent_trials"]),
            reuse_actors=True,  # ~0.5 s instead of ~2 s to start each trial
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=cfg["max_failures"]),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )
    return tuner.fit()


def errored_trial_ids(results) -> list[tuple[str, str]]:
    """(trial id, error) for every trial that failed after its retries."""
    out = []
    for r in results:
        if r.error is not None:
            out.append((os.path.basename(r.path.rstrip("/")), str(r.error).strip().splitlines()[-1][:300]))
    return out
