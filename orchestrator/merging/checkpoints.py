"""Bring your own checkpoints: fine-tunes made elsewhere (safetensors files, or Hugging Face
model folders) become ingredients of a named sweep in a pool, and a pool's sweep is merged
without a task (what `mergekit-pytorch` does, on the streaming engine).

Imported rows: the base as kind `pretrained` (id from its content, so sweeps that share a
base share its row), each fine-tune as kind `trial` of the sweep with the base as its
parent, task `imported` (no soup sweep's kitchen takes them for its own task's trials).
Every input is checked before anything is written: each one opens, has the base's tensors
with the base's shapes and dtypes, has the base's `model_type` where both are Hugging Face
folders, and lies near the base: the median over weight matrices of |theta_i - theta_0| /
|theta_0| is near 1.4 for two independent models of one shape (random, or trained apart),
a few percent for a fine-tune (a new head is one matrix: the median does not see it).
Weights are streamed into the pool one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch

from orchestrator.common.errors import MergeError
from orchestrator.common.pool import Pool, Row, file_sha256, safe_id
from orchestrator.common.weights import digest, spec_fingerprint
from orchestrator.merging import executor
from orchestrator.merging import methods as registry
from orchestrator.merging.safetensors_io import SafetensorsWriter
from orchestrator.merging.sources import FileSource, check_compatible, specs

TASK = "imported"
MAX_DISTANCE = 0.5  # median relative distance of the weight matrices above which an input is not a fine-tune


@dataclass
class Imported:
    base: dict[str, Any]
    rows: list[dict[str, Any]]
    new: int  # rows this import added (the others were there already)


def checkpoint_name(path: str) -> str:
    """How an input is named in the pool: its folder's or file's name, without .safetensors."""
    name = os.path.basename(os.path.normpath(path))
    return safe_id(name[:-len(".safetensors")] if name.endswith(".safetensors") else name)


def model_type(path: str) -> str | None:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    try:
        return json.load(open(config)).get("model_type")
    except (OSError, json.JSONDecodeError):
        raise MergeError(f"{config}: not readable JSON") from None


def relative_distance(base: FileSource, other: FileSource) -> float:
    """The median over floating tensors of two or more dimensions (the weight matrices; norms and
    biases may start equal in unrelated models) of |theta - theta_0| / |theta_0|, a tensor at a time."""
    ratios = []
    for name, dtype, shape in specs(base):
        if dtype.is_floating_point and len(shape) >= 2:
            zero = base.get(name, "cpu").double()
            scale = float(zero.norm())
            change = float((other.get(name, "cpu").double() - zero).norm())
            ratios.append(change / scale if scale else (0.0 if change == 0 else math.inf))
    return statistics.median(ratios) if ratios else 0.0


def check_inputs(base_path: str, paths: list[str], max_distance: float = MAX_DISTANCE) -> tuple[FileSource, list[FileSource]]:
    """Open and check every input against the base; one line naming the first problem."""
    if not paths:
        raise MergeError("nothing to import: give at least one fine-tuned checkpoint after the base")
    base = FileSource(base_path)
    fines = [FileSource(p) for p in paths]
    if not any(dtype.is_floating_point for _, dtype, _ in specs(base)):
        raise MergeError(f"{base_path}: has no floating-point tensors to merge")
    check_compatible(base, fines, "the base")
    base_type = model_type(base_path)
    for path, fine in zip(paths, fines):
        kind = model_type(path)
        if base_type and kind and kind != base_type:
            raise MergeError(f"{path}: config.json says model_type {kind!r}, the base ({base_path}) is {base_type!r}")
        distance = relative_distance(base, fine)
        if distance > max_distance:
            raise MergeError(f"{path}: its weight matrices are {distance:.0%} of their norm away from the base's "
                             f"({base_path}, the median); fine-tunes of one base are a few percent away, so this is "
                             f"likely a fine-tune of another base (--max-distance {distance:.2f} imports it anyway)")
    return base, fines


def import_checkpoints(pool: Pool, sweep: str, base_path: str, paths: list[str],
                       max_distance: float = MAX_DISTANCE) -> Imported:
    """Add the base and the fine-tunes to `pool` as the ingredients of `sweep` (checked first)."""
    base, fines = check_inputs(base_path, paths, max_distance)
    names = [checkpoint_name(p) for p in paths]
    for i, name in enumerate(names):  # two inputs of one name: the later ones numbered
        if names[:i].count(name):
            names[i] = f"{name}-{names[:i].count(name) + 1}"
    ids = [f"{sweep}-{name}" for name in names]
    for row_id, path in zip(ids, paths):
        if pool.has(row_id) and pool.get(row_id)["hparams"].get("source") != os.path.abspath(path):
            raise MergeError(f"{pool.uri}: already holds {row_id} from {pool.get(row_id)['hparams'].get('source')}; "
                             f"import {path} under another --sweep")
    arch = spec_fingerprint(specs(base))
    base_row, new = _add(pool, base, lambda sha: Row(id=f"pretrained-import-{sha[:16]}", kind="pretrained",
                                                    sweep=sweep, task=TASK, status="ok", arch=arch,
                                                    hparams={"source": os.path.abspath(base_path)}))
    rows = []
    for row_id, path, fine in zip(ids, paths, fines):
        row, added = _add(pool, fine, lambda sha, row_id=row_id, path=path: Row(
            id=row_id, kind="trial", sweep=sweep, task=TASK, status="ok", arch=arch, parents=[base_row["id"]],
            hparams={"source": os.path.abspath(path)}, metrics={}))
        rows.append(row)
        new += added
    return Imported(base_row, rows, new)


def _add(pool: Pool, source: FileSource, make_row: Callable[[str], Row]) -> tuple[dict[str, Any], int]:
    """The source rewritten as one safetensors file (shards joined, a tensor at a time), added."""
    tmp = _temp_path(pool)
    try:
        with SafetensorsWriter(tmp, specs(source)) as writer:
            for name in source.names():
                writer.write(name, source.get(name, "cpu"))
        sha = file_sha256(tmp)
        row = make_row(sha)
        existed = pool.has(row.id)
        stored = pool.add(row, weights_file=tmp, move=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if existed and stored["sha256"] != sha:
        raise MergeError(f"{row.id}: the pool holds other weights under this id (was {source.label} changed since "
                         "it was imported?); import it under another --sweep")
    return stored, int(not existed)


def _temp_path(pool: Pool) -> str:
    """Where a file bound for the pool is written first: beside the pool's weights on a local
    disk (hidden, so readers skip it and `pool gc` removes one a crash left), else a temp folder."""
    import tempfile

    folder = f"{pool.root}/weights" if "://" not in pool.uri else tempfile.gettempdir()
    return os.path.join(folder, f".incoming-{uuid.uuid4().hex}.tmp")


def sweep_rows(pool: Pool, sweep: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An imported sweep's base row and fine-tune rows (by id)."""
    df = pool.manifest()
    mine = df[(df["kind"] == "trial") & (df["sweep"] == sweep) & (df["status"] == "ok")] if len(df) else df
    if mine.empty:
        sweeps = sorted(set(df[df["kind"] == "trial"]["sweep"])) if len(df) else []
        raise MergeError(f"{pool.uri}: no finished ingredients of sweep {sweep!r} "
                         f"(sweeps with trials: {', '.join(sweeps) or 'none'})")
    rows = sorted(mine.to_dict("records"), key=lambda r: r["id"])
    bases = sorted({r["parents"][0] for r in rows if len(r["parents"])})
    if len(bases) != 1:
        raise MergeError(f"{pool.uri}: sweep {sweep!r} has ingredients of {len(bases)} start points "
                         f"({', '.join(bases) or 'none'}); a merge takes fine-tunes of one base")
    return pool.get(bases[0]), rows


def merge_sweep(pool: Pool, sweep: str, method: str, params: dict[str, Any] | None = None,
                device: str = "cpu", progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Any], bool]:
    """Merge every finished ingredient of `sweep` with `method` into a new pool row (kind soup).
    Returns the row and whether it was new (the same merge of the same ingredients is kept once)."""
    m = registry.get(method)
    settings = m.settings(params)
    base_row, rows = sweep_rows(pool, sweep)
    row_id = f"{sweep}-{m.name}-{digest(m.name, settings, [r['id'] for r in rows])}"
    if pool.has(row_id):
        return pool.get(row_id), False
    base = FileSource(pool.local_weights(base_row), label=base_row["id"])
    inputs = [FileSource(pool.local_weights(r), label=r["id"]) for r in rows]
    tmp = _temp_path(pool)
    try:
        merged = executor.merge(m, inputs, base=base, params=settings, device=torch.device(device), out=tmp,
                                metadata={"method": m.name, "settings": json.dumps(settings, sort_keys=True)},
                                progress=progress)
        row = pool.add(Row(id=row_id, kind="soup", sweep=sweep, task=base_row["task"], status="ok",
                           arch=base_row["arch"], parents=[base_row["id"], *[r["id"] for r in rows]],
                           hparams={"method": m.name, **settings}), weights_file=merged.path, move=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return row, True
