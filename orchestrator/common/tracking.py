"""MLflow conventions, in one place.

One experiment per sweep (or study) name; a parent run per invocation; nested runs (tag
`mlflow.parentRunId`) per trial and per recipe result. Tags users can search on are the
constants below (`orchestrator.role`, `orchestrator.recipe`, ...). The soup side's metric
names: val_acc, id_acc, ood_acc (mean over OOD sets) and acc_<eval set>.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, NamedTuple

from orchestrator.common.errors import UserError

log = logging.getLogger(__name__)

# Tag names: every run and every search uses these constants, never the strings.
ROLE = "orchestrator.role"  # sweep / study / trial / recipe
RECIPE = "orchestrator.recipe"  # the recipe's registry name
TRIAL_ID = "orchestrator.trial_id"  # the Tune trial id (a retried trial continues its run)
SWEEP = "orchestrator.sweep"
INGREDIENT = "orchestrator.ingredient_id"  # the pool row it made
STATUS = "orchestrator.status"  # the pool row's status
POOL = "orchestrator.pool"
LAST_STEP = "orchestrator.last_step"  # the last step a trial's run has metrics of (driver-side logging)
REPLAYED = "orchestrator.replayed"  # logged afterwards from the pool (pool sync-mlflow)
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"  # a run's description (markdown), shown on its run page
# MLflow 3's UI opens an experiment without this tag on its GenAI trace overview, empty for us
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

# While trials run, the driver gives up on an unreachable server in seconds, not MLflow's
# default minutes of retries: the trials' results are in the pool either way (and replayed).
QUICK_FAIL_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@contextlib.contextmanager
def quick_fail():
    """QUICK_FAIL_HTTP, where the environment sets nothing else, for the calls made inside
    (MLflow reads these at each request)."""
    saved = {k: os.environ.get(k) for k in QUICK_FAIL_HTTP}
    os.environ.update({k: v for k, v in QUICK_FAIL_HTTP.items() if saved[k] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to hand to trials: always absolute, since each trial runs in its own folder."""
    if not uri:
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(uri[len('sqlite:///'):])}"
    if "://" not in uri:  # a bare path: a file store
        return f"file://{os.path.abspath(uri)}"
    return uri


def unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why the tracking store cannot be reached, or None if it can (as far as a quick look tells)."""
    if uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.path.isdir(folder):
            return f"folder {folder} does not exist"
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
        except (urllib.error.URLError, OSError) as e:
            return f"cannot reach the MLflow server ({getattr(e, 'reason', e)})"
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before anything is written, if the tracking store cannot be reached."""
    problem = unreachable(uri, timeout)
    if problem:
        raise UserError(f"tracking URI {uri}: {problem}")


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Get or create the experiment of a sweep; an unreachable store is a user error."""
    c = client(uri)
    try:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            return c.create_experiment(name, tags=EXPERIMENT_KIND)
        for key, value in EXPERIMENT_KIND.items():  # an experiment made by an older version
            if exp.tags.get(key) != value:
                c.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    except Exception as e:  # noqa: BLE001 - MLflow raises many types for an unreachable store
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tracking URI {uri}: cannot reach the MLflow tracking store ({first[:200]})") from None


class Destination(NamedTuple):
    """Where a nested run goes: the store, the experiment and the parent run."""

    uri: str
    experiment_id: str
    parent_run_id: str


def run_tags(role: str, parent: str | None = None, more: dict[str, str] | None = None) -> dict[str, str]:
    """The tags of a run: its role, its parent run (nested runs), and `more`."""
    return {ROLE: role, **({PARENT: parent} if parent else {}), **(more or {})}


def start_run(uri: str, exp_id: str, name: str, tags: dict[str, str], params: dict[str, Any] | None = None) -> str:
    """A new run (tags from run_tags, plus the source, user and git commit MLflow's fluent API
    would add, which the UI shows) with its params; returns its id."""
    run = client(uri).create_run(exp_id, run_name=name, tags={**context_tags(), **tags})
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def context_tags() -> dict[str, str]:
    """mlflow.user, mlflow.source.name / .type and, from a git checkout, mlflow.source.git.commit."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return dict(resolve_tags())
    except Exception:  # noqa: BLE001 - an internal MLflow API: without it runs only lack these tags
        return {}


def find_run(uri: str, exp_id: str, tag: str, value: str, full: bool = False):
    """The id of the run whose `tag` is `value` (with `full`, the run itself), or None."""
    runs = client(uri).search_runs([exp_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
    return (runs[0] if full else runs[0].info.run_id) if runs else None


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in params.items()}
    client(uri).log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """All metrics in one call (one batch is ~25x cheaper than a call per metric)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_points(uri: str, run_id: str, points: list[tuple[dict[str, float], int]], tags: dict[str, str]) -> None:
    """Metrics at several steps, [(metrics, step), ...], and tags, in one call."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for metrics, step in points
                                           for k, v in metrics.items()],
                          tags=[RunTag(k, v) for k, v in tags.items()])


def log_datasets(uri: str, run_id: str, datasets: list[dict[str, Any]]) -> None:
    """Datasets as MLflow run inputs (the run page's and runs table's "Datasets"): each a dict of
    name, digest (the data fingerprint), context (training / evaluation), source and profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client(uri).log_inputs(run_id, datasets=[DatasetInput(
        Dataset(name=d["name"], digest=d["digest"][:36], source_type="code", source=json.dumps(d["source"]),
                profile=json.dumps(d["profile"])),
        tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets])


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status)


def log_dict(uri: str, run_id: str, obj: Any, name: str) -> None:
    client(uri).log_dict(run_id, obj, name)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    client(uri).log_text(run_id, text, name)


def log_file(uri: str, run_id: str, path: str, folder: str | None = None) -> None:
    client(uri).log_artifact(run_id, path, folder)


def replay_pool(pool, uri: str, sweep: str | None = None, parent: str | None = None) -> tuple[int, int]:
    """Log into MLflow the pool's trials and soups (of one sweep, or all) that MLflow lacks:
    those the driver could not log (the server was down). Idempotent: a row whose ingredient
    id already tags a run is skipped. A trial's run cut short by the outage is completed (the
    epochs it lacks, its tags, its end); other replayed runs nest under `parent`, else under a
    new `<sweep>-replayed` run. Returns (added, present)."""
    df = pool.manifest()
    df = df[df["kind"].isin(["trial", "soup"]) & ((df["sweep"] == sweep) if sweep else True)]
    added, present, parents, known, partial = 0, 0, {}, {}, {}
    for row in df.to_dict("records"):
        exp = experiment_id(uri, row["sweep"] or "orchestrator")
        if exp not in known:  # one search per experiment, not one per row
            runs = client(uri).search_runs([exp], max_results=50000)
            known[exp] = {r.data.tags.get(INGREDIENT) for r in runs}
            partial[exp] = {r.data.tags[TRIAL_ID]: r for r in runs
                            if TRIAL_ID in r.data.tags and INGREDIENT not in r.data.tags}
        if row["id"] in known[exp]:
            present += 1
            continue
        cut_short = partial[exp].get(row["id"])
        if cut_short is None and exp not in parents:
            parents[exp] = parent or start_run(uri, exp, f"{row['sweep']}-replayed",
                                               run_tags("sweep", more={SWEEP: row["sweep"], POOL: pool.uri}))
        _replay_row(uri, exp, parents.get(exp, ""), row, cut_short)
        added += 1
    for run_id in parents.values():
        if run_id != parent:
            end_run(uri, run_id)
    return added, present


def _replay_row(uri: str, exp: str, parent: str, row: dict[str, Any], cut_short=None) -> None:
    role = "trial" if row["kind"] == "trial" else "recipe"
    tags = {INGREDIENT: row["id"], SWEEP: row["sweep"], STATUS: row["status"], REPLAYED: "true"}
    if role == "recipe":
        tags[RECIPE] = row["hparams"].get("recipe", "")
    if cut_short is None:
        run_id, logged = start_run(uri, exp, f"{role}-{row['id']}", run_tags(role, parent, tags), row["hparams"]), -1
    else:
        run_id, logged = cut_short.info.run_id, int(cut_short.data.tags.get(LAST_STEP, -1))
        set_tags(uri, run_id, tags)
    points = [({k: v for k, v in point.items() if k != "epoch"}, int(point["epoch"])) for point in row["history"]
              if int(point["epoch"]) > logged]  # per-epoch metrics, as the trial would have logged them
    if not row["history"] and row["metrics"] and cut_short is None:
        points = [(row["metrics"], 0)]
    log_points(uri, run_id, points, {})
    end_run(uri, run_id, "FINISHED" if row["status"] in ("ok", "stopped") else "FAILED")
