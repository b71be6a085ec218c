"""The checkpoint pool: every ingredient's weights and metrics, on any pyarrow filesystem.

Layout under the pool root (a local folder or a URI such as s3://bucket/pool):

    pool.json                      marker: this folder is a pool
    weights/<sha256>.safetensors   weights, named by their content (never pickle)
    tables/<sha256>.parquet        a row's table (a trial's training dynamics), named by its content
    manifest/<id>.parquet          one manifest row per ingredient, each file read on its own

The manifest is keyed by ingredient id: each row is its own Parquet file named after
its id. Weights are content-addressed, so two writers of one id can never leave a row
whose hash describes the other writer's file: same bytes, same name. A row is created
exclusively: on a local disk it is written to a hidden temp file, flushed and fsynced,
then hard-linked into place (which fails if the row exists: the first writer wins) and
the folder fsynced; on object stores it is one PUT (atomic, but pyarrow offers no
conditional create, so the last of two simultaneous writers wins there). A row is
written after its weights, so every row's file exists unless something outside the
pool removed it. Rows written before weights were content-addressed keep their
weights/<id>.safetensors path: each row names its own file.

Rows are `Row` objects: the one place a row's fields and their defaults are spelled out.
The command line over a pool is `python -m orchestrator.pool` (orchestrator/pool.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from orchestrator.common.errors import PoolError
from orchestrator.common.storage import filesystem
from orchestrator.common.weights import StateDict

log = logging.getLogger(__name__)

# fisher: a trial's diagonal Fisher (weights-shaped); dynamics: a trial's per-example training
# dynamics (a table); both name the trial as their parent. selection: the training examples an
# FTFT sweep chose from another sweep's dynamics (ids in hparams, no file). cooked: a recipe's
# dishes kept for reuse (a table; soup/cooked.py)
KINDS = ("pretrained", "trial", "soup", "proxy", "fisher", "dynamics", "selection", "cooked")
STATUSES = ("ok", "diverged", "failed", "stopped")  # stopped: by a scheduler (ASHA), before its last epoch

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("kind", pa.string()),
    ("sweep", pa.string()),
    ("task", pa.string()),
    ("arch", pa.string()),  # architecture fingerprint: names, shapes, dtypes
    ("status", pa.string()),
    ("hparams", pa.string()),  # JSON
    ("metrics", pa.string()),  # JSON: accuracy on every eval set, val_acc, id_acc, ood_acc
    ("history", pa.string()),  # JSON: per-epoch metrics (lets MLflow be replayed from the pool)
    ("parents", pa.list_(pa.string())),  # ingredient ids it was made from (a trial: its start point)
    ("data_key", pa.string()),  # what defined its training data and held-out split (null in older pools)
    ("weights", pa.string()),  # the row's file, relative to the pool root (weights, or a table); "" if none
    ("sha256", pa.string()),
    ("mlflow_run_id", pa.string()),
    ("created", pa.timestamp("us", tz="UTC")),
])
JSON_COLUMNS = ("hparams", "metrics", "history")
READ_CHUNK = 8 << 20  # bytes per read while hashing or downloading weights


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-.")


@dataclass
class Row:
    """One ingredient as it is written: every writer builds one of these (the reader gets
    plain dicts back, JSON columns decoded)."""

    id: str
    kind: str  # one of KINDS
    sweep: str  # the sweep or study that made it
    task: str
    status: str  # one of STATUSES
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)  # ingredient ids it was made from; a trial: [start point]
    data_key: str = ""  # a trial: Task.data_key(), what defined its training data and held-out split
    arch: str = ""  # weights.arch_fingerprint of its weights
    mlflow_run_id: str = ""

    def __post_init__(self):
        if self.kind not in KINDS or self.status not in STATUSES:
            raise ValueError(f"bad kind/status {self.kind!r}/{self.status!r}")


class Pool:
    def __init__(self, uri: str, create: bool = False):
        self.unreadable: dict[str, str] = {}  # row files the last table() could not read -> why, one line
        self._warned: set[str] = set()
        self.bytes_read = 0  # weights bytes read from storage (hashing, downloading)
        self._verified: dict[str, tuple[str, tuple[int, int]]] = {}  # local file -> (sha256, (size, mtime))
        self._cache: str | None = None  # downloads from an object store
        self.fs, self.root = filesystem(uri, "pool", PoolError)
        self.uri = uri if "://" in uri else self.root  # absolute: trials run in their own folders
        marker = f"{self.root}/pool.json"
        try:
            info = self.fs.get_file_info(marker)
            if info.type == pafs.FileType.File:
                return
            root = self.fs.get_file_info(self.root)
            if root.type == pafs.FileType.File:
                raise PoolError(f"{uri}: is a file, not a pool folder")
            if not create:
                raise PoolError(f"{uri}: not a pool (no pool.json); run a sweep with --pool {uri} to create one")
            if root.type == pafs.FileType.Directory and self.fs.get_file_info(pafs.FileSelector(self.root)):
                raise PoolError(f"{uri}: folder exists, is not empty and is not a pool (no pool.json)")
            self.fs.create_dir(self.root, recursive=True)
            self._write(marker, json.dumps({"format": 1}).encode())
        except OSError as e:
            raise PoolError(f"pool {uri}: {e}") from None

    # -- writing ---------------------------------------------------------------------

    def _write(self, path: str, data: bytes, exclusive: bool = False) -> bool:
        """Publish a whole file: readers see all of it or nothing. `exclusive`: only if no
        file is there yet (local disks); returns False when another writer was first."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with self.fs.open_output_stream(path) as f:  # one PUT: atomic on object stores
                f.write(data)
            return True
        parent, name = path.rsplit("/", 1)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"  # hidden: readers skip it
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        try:
            if exclusive:
                os.link(tmp, path)  # fails if the file exists
            else:
                os.replace(tmp, path)
        except FileExistsError:
            return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        folder = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # ... and the new name survives a crash too
        finally:
            os.close(folder)
        return True

    def has(self, ingredient_id: str) -> bool:
        return self.fs.get_file_info(self._row_path(ingredient_id)).type == pafs.FileType.File

    def _row_path(self, ingredient_id: str) -> str:
        return f"{self.root}/manifest/{safe_id(ingredient_id)}.parquet"

    def add(self, row: Row, weights: StateDict | None = None, table: pa.Table | None = None,
            weights_file: str | None = None, move: bool = False) -> dict[str, Any]:
        """Add one ingredient with its weights, its table or a safetensors file of weights already
        written (`weights_file`, a local path: copied in a chunk at a time, so a model larger
        than memory can be added; with `move`, renamed into place when it is on the pool's own
        disk); one of them at most. Returns its row. An id that
        exists keeps its row, except that a finished row supersedes a `failed` one (a trial that
        failed, then finished after --resume) and an unreadable one (a crash mid-write); an `ok`
        row is never replaced."""
        if sum(x is not None for x in (weights, table, weights_file)) > 1:
            raise ValueError("a pool row has one file: weights or a table, not both")
        ingredient_id = safe_id(row.id)
        existing = self._readable_row(ingredient_id)
        if existing is not None and not (existing["status"] == "failed" and row.status != "failed"):
            return existing
        full = asdict(row)
        full.update(id=ingredient_id, weights="", sha256="", created=dt.datetime.now(dt.timezone.utc))
        for col in JSON_COLUMNS:
            full[col] = json.dumps(full[col], sort_keys=True)
        if weights_file is not None:
            full["sha256"] = self._store_file(weights_file, move)
            full["weights"] = f"weights/{full['sha256']}.safetensors"
        elif weights is not None or table is not None:
            if table is not None:
                out = io.BytesIO()
                pq.write_table(table, out)
                blob, folder, suffix = out.getvalue(), "tables", "parquet"
            else:
                blob, folder, suffix = st_save(weights), "weights", "safetensors"
            full["sha256"] = hashlib.sha256(blob).hexdigest()
            full["weights"] = f"{folder}/{full['sha256']}.{suffix}"
            path = f"{self.root}/{full['weights']}"
            if self.fs.get_file_info(path).type != pafs.FileType.File:  # the same name holds the same bytes
                self._write(path, blob)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([full], schema=SCHEMA), buf)
        # a new id is created exclusively; only a failed or unreadable row is replaced
        replace = self.has(ingredient_id)
        if not self._write(self._row_path(ingredient_id), buf.getvalue(), exclusive=not replace):
            return self.get(ingredient_id)  # another writer of this id was first: its row stands
        return self._decode(full)

    def _store_file(self, local: str, move: bool = False) -> str:
        """Copy (or `move`) a local weights file to weights/<sha256>.safetensors (unless that name is
        there: the same name holds the same bytes), whole or not at all; returns its sha256."""
        sha = file_sha256(local)
        path = f"{self.root}/weights/{sha}.safetensors"
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            return sha
        if isinstance(self.fs, pafs.LocalFileSystem):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{sha}.{uuid.uuid4().hex}.tmp"
            try:
                if move:
                    try:
                        os.replace(local, path)  # its bytes are on disk already (the writer fsynced them)
                        _fsync_dir(parent)
                        return sha
                    except OSError:  # another filesystem: copy
                        pass
                shutil.copyfile(local, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                _fsync_dir(parent)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:  # an object store publishes an upload when it completes
            with open(local, "rb") as src, self.fs.open_output_stream(path) as out:
                while chunk := src.read(READ_CHUNK):
                    out.write(chunk)
        return sha

    # -- reading ---------------------------------------------------------------------

    def table(self) -> pa.Table:
        """Every readable row. A row file that cannot be read (0 bytes or truncated: what a
        crash or a full disk leaves) is skipped with a warning naming it, and listed in
        `self.unreadable` (path -> why): one bad file never makes the pool unreadable."""
        self.unreadable = {}
        manifest = f"{self.root}/manifest"
        if self.fs.get_file_info(manifest).type != pafs.FileType.Directory:
            return SCHEMA.empty_table()
        paths = sorted(i.path for i in self.fs.get_file_info(pafs.FileSelector(manifest))
                       if i.type == pafs.FileType.File and not i.base_name.startswith("."))  # hidden: being written
        with ThreadPoolExecutor(8) as pool:  # object stores answer many small reads at once
            tables = list(pool.map(self._read_row_file, paths))
        for path, table in zip(paths, tables):
            if isinstance(table, str):
                if path not in self._warned:  # once per Pool: a command may read the table twice
                    log.warning("skipping unreadable pool row %s (%s)", path, table)
                    self._warned.add(path)
                self.unreadable[path] = f"{self.uri}: row {path} is unreadable ({table})"
        return pa.concat_tables([t for t in tables if not isinstance(t, str)] or [SCHEMA.empty_table()])

    def _read_row_file(self, path: str) -> pa.Table | str:
        """The row file's table, or why it cannot be read."""
        try:
            with self.fs.open_input_file(path) as f:
                return pq.read_table(f, schema=SCHEMA)
        except (OSError, ValueError, pa.ArrowException) as e:
            return _first_line(e)

    def manifest(self) -> pd.DataFrame:
        """One row per ingredient, oldest first; JSON columns decoded, metrics also as columns."""
        df = self.table().to_pandas().sort_values(["created", "id"], ignore_index=True)
        for col in JSON_COLUMNS:
            df[col] = df[col].map(json.loads)
        metric_cols = pd.DataFrame(list(df["metrics"]), index=df.index) if len(df) else pd.DataFrame(index=df.index)
        return pd.concat([df, metric_cols.drop(columns=[c for c in metric_cols if c in df], errors="ignore")], axis=1)

    def get(self, ingredient_id: str) -> dict[str, Any]:
        path = self._row_path(ingredient_id)
        try:
            with self.fs.open_input_file(path) as f:
                row = pq.read_table(f, schema=SCHEMA).to_pylist()[0]
        except FileNotFoundError:
            raise PoolError(f"{self.uri}: no ingredient {ingredient_id!r}") from None
        except (OSError, ValueError, pa.ArrowException) as e:  # 0 bytes, truncated: a crash mid-write
            raise PoolError(f"{self.uri}: row {path} is unreadable ({_first_line(e)})") from None
        return self._decode(row)

    def _readable_row(self, ingredient_id: str) -> dict[str, Any] | None:
        """The row of this id, or None when there is none or it cannot be read."""
        if not self.has(ingredient_id):
            return None
        try:
            return self.get(ingredient_id)
        except PoolError as e:
            log.warning("%s; it will be rewritten", e)
            return None

    @staticmethod
    def _decode(row: dict[str, Any]) -> dict[str, Any]:
        return {k: json.loads(v) if k in JSON_COLUMNS and isinstance(v, str) else v for k, v in row.items()}

    def load(self, ingredient: str | dict[str, Any]) -> StateDict:
        """An ingredient's weights, memory-mapped from a verified local file: a load peaks
        near one copy of the weights, and the file is read from storage once per Pool."""
        try:
            return st_load_file(self.local_weights(ingredient))
        except SafetensorError as e:
            row = self.get(ingredient) if isinstance(ingredient, str) else ingredient
            raise PoolError(f"{self.uri}: weights of {row['id']} are unreadable ({row['weights']}: {e})") from None

    def load_table(self, ingredient: str | dict[str, Any]) -> pa.Table:
        """A row's table (e.g. a trial's training dynamics), checked against its sha256."""
        try:
            return pq.read_table(self.local_weights(ingredient))
        except (OSError, pa.ArrowException) as e:
            row = self.get(ingredient) if isinstance(ingredient, str) else ingredient
            raise PoolError(f"{self.uri}: table of {row['id']} is unreadable ({row['weights']}: {_first_line(e)})") from None

    def local_weights(self, ingredient: str | dict[str, Any]) -> str:
        """A local file holding the ingredient's weights, checked against the sha256 its row
        records: the pool's own file on a local disk, a download into this Pool's cache from
        an object store. The hash is computed while the bytes stream by, once: a file verified
        before (and unchanged since, on a local disk) is not read again."""
        row = self.get(ingredient) if isinstance(ingredient, str) else ingredient
        if not row["weights"]:
            raise PoolError(f"{self.uri}: ingredient {row['id']} has no weights (status {row['status']})")
        source = f"{self.root}/{row['weights']}"
        local = isinstance(self.fs, pafs.LocalFileSystem)
        target = source if local else os.path.join(self._download_dir(), f"{row['sha256']}.safetensors")
        try:
            stamp = _stamp(target)
            if self._verified.get(target) == (row["sha256"], stamp):
                return target
            with self.fs.open_input_stream(source) as f:
                if local:
                    sha = self._hash_stream(f)
                else:  # download beside the target, then rename: the cache never holds a partial file
                    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
                    with open(tmp, "wb") as out:
                        sha = self._hash_stream(f, out)
                    os.replace(tmp, target)
                    stamp = _stamp(target)
        except FileNotFoundError:
            raise PoolError(f"{self.uri}: weights of {row['id']} are missing ({row['weights']})") from None
        if sha != row["sha256"]:
            raise PoolError(f"{self.uri}: weights of {row['id']} are corrupt (sha256 mismatch, {row['weights']})")
        self._verified[target] = (sha, stamp)
        return target

    def _hash_stream(self, f, out=None) -> str:
        """sha256 of a stream read in chunks (copied to `out` if given): memory stays one chunk."""
        h = hashlib.sha256()
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            self.bytes_read += len(chunk)
            if out is not None:
                out.write(chunk)
        return h.hexdigest()

    def _download_dir(self) -> str:
        """This Pool's cache of weights downloaded from an object store, removed with it."""
        if self._cache is None:
            self._cache = tempfile.mkdtemp(prefix="orchestrator-weights-")
            weakref.finalize(self, shutil.rmtree, self._cache, True)
        return self._cache

    def verify(self) -> list[str]:
        """Re-hash every weights file; returns one line per unreadable row, missing or corrupt file."""
        rows = self.table().to_pylist()
        problems = list(self.unreadable.values())
        self._verified.clear()  # verify reads everything again
        for row in rows:
            if not row["weights"]:
                continue
            try:
                self.local_weights(row)
            except PoolError as e:
                problems.append(str(e))
        return problems

    def garbage(self, min_age_s: float = 3600.0) -> list[str]:
        """Files no reader will ever use: temp files a crashed writer left, unreadable row
        files (rows are published whole, so one that cannot be read was damaged after it was
        written), and weights no readable row references. Only files older than `min_age_s`:
        a running sweep writes a trial's weights just before its row, and its temp files are
        in use."""
        referenced = {f"{self.root}/{w}" for w in self.table().column("weights").to_pylist() if w}
        unreadable = set(self.unreadable)
        now_ns = time.time_ns()
        out = []
        for folder in ("manifest", "weights", "tables"):
            for info in self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{folder}", allow_not_found=True)):
                if info.type != pafs.FileType.File or (now_ns - (info.mtime_ns or now_ns)) / 1e9 < min_age_s:
                    continue
                temp = info.base_name.startswith(".") and info.base_name.endswith(".tmp")
                if temp or info.path in unreadable or (folder != "manifest" and info.path not in referenced):
                    out.append(info.path)
        return sorted(out)

    def remove(self, paths: list[str]) -> None:
        for path in paths:
            self.fs.delete_file(path)


def file_sha256(path: str) -> str:
    """A local file's sha256, read a chunk at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    folder = os.open(path, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _stamp(path: str) -> tuple[int, int]:
    """Size and modification time: a file that changed since it was verified is hashed again."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
