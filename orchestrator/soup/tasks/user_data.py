"""The user's own data for real-model tasks: Parquet or CSV files read with pyarrow, or an
image folder, named in the YAML under `task.data`.

    data:
      train: data/train.parquet        # Parquet, CSV, an image folder (one subfolder per label),
                                       # or a URI (s3://..., hf://datasets/<repo>/<file>.parquet)
      val: ""                          # held out for greedy soup selection; "" = a seeded split of train
      evals: {id_test: data/test.parquet, ood_forum: data/forum.csv}
      id_test: id_test                 # the in-distribution eval set; every other eval set is OOD
      input_column: text               # text, or for images a path (relative to the file) or bytes
      label_column: label

Labels are the training file's (or `labels:` in that order); a file with a label the
training file does not have is a one-line error naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.common.errors import UserError
from orchestrator.common.storage import filesystem
from orchestrator.common.weights import digest
from orchestrator.soup.tasks.base import Examples, StateDict, Task, TaskData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

DATA_DEFAULTS: dict[str, Any] = {
    "train": "",
    "val": "",
    "evals": {},
    "id_test": "id_test",
    "val_fraction": 0.1,
    "split_seed": 0,
    "input_column": "input",
    "label_column": "label",
    "labels": [],
}


class DataError(UserError):
    pass


def read_columns(path: str, columns: list[str], key: str) -> dict[str, list]:
    """Named columns of a Parquet or CSV file, or of an image folder (image paths, labels)."""
    import pyarrow.csv as pacsv
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        fs, where = filesystem(path, f"task.data.{key}", DataError)
        info = fs.get_file_info(where)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any filesystem trouble is the user's path
        raise DataError(f"task.data.{key}: cannot open {path}: {str(e).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"task.data.{key}: no such file or folder: {path}")
    if info.type == pafs.FileType.Directory:
        return _image_folder(fs, where, path, key, columns)
    suffix = os.path.splitext(where)[1].lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pq.read_table(where, filesystem=fs)
        elif suffix == ".csv":
            with fs.open_input_stream(where) as f:
                table = pacsv.read_csv(f)
        else:
            raise DataError(f"task.data.{key}: {path}: expected a .parquet or .csv file or an image folder")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's errors say what is wrong with the file
        raise DataError(f"task.data.{key}: {path}: cannot read: {str(e).splitlines()[0]}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"task.data.{key}: {path} has no column {missing[0]!r} "
                        f"(columns: {', '.join(table.column_names)}; set task.data.input_column / label_column)")
    return {c: table.column(c).to_pylist() for c in columns}


def _image_folder(fs, where: str, path: str, key: str, columns: list[str]) -> dict[str, list]:
    """An image folder as the two columns asked for: image paths, and labels from subfolder names."""
    import pyarrow.fs as pafs

    found = fs.get_file_info(pafs.FileSelector(where, recursive=True))
    rows = sorted((f.path, os.path.basename(os.path.dirname(f.path))) for f in found
                  if f.type == pafs.FileType.File and f.path.lower().endswith(IMAGE_SUFFIXES)
                  and os.path.dirname(f.path) != where.rstrip("/"))
    if not rows:
        raise DataError(f"task.data.{key}: {path}: no images in label subfolders (expected <label>/<image>.png)")
    return {columns[0]: [r[0] for r in rows], columns[1]: [r[1] for r in rows]}


def _absolute(path: str) -> str:
    return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))


def data_fingerprint(data: dict[str, Any]) -> str:
    """What identifies the training data cheaply: path, size and modification time of each file."""
    import pyarrow.fs as pafs

    stats = []
    for path in [data["train"], data["val"]]:
        if not path:
            continue
        try:
            fs, where = filesystem(path, "task.data", DataError)
            info = fs.get_file_info(where)
            stats.append([path, info.size, info.mtime_ns if info.type == pafs.FileType.File else None])
        except Exception:  # noqa: BLE001 - unreadable paths are reported by data()
            stats.append([path, None, None])
    return hashlib.sha256(json.dumps(stats, default=str).encode()).hexdigest()[:16]


class FileTask(Task):
    """A pretrained network with a new classification head, fine-tuned on the user's files.

    Subclasses say how to build the network, read features and the head off it, and turn raw
    inputs (texts, images) into Examples. The head is fitted once, here, and stored with the
    pretrained weights in the pool: every trial of the sweep starts from exactly those weights.
    """

    def __init__(self, settings=None):
        super().__init__(settings)
        d = self.settings["data"] = {**DATA_DEFAULTS, **self.defaults["data"], **self.settings.get("data", {})}
        if not d["train"]:
            raise ValueError("data.train: a training file or image folder is required")
        if not d["evals"]:
            raise ValueError("data.evals: name at least one eval set (e.g. {id_test: test.parquet})")
        if d["id_test"] not in d["evals"]:
            raise ValueError(f"data.id_test: {d['id_test']!r} is not one of data.evals ({', '.join(d['evals'])})")
        if not 0 < d["val_fraction"] < 1:
            raise ValueError(f"data.val_fraction: must be in (0, 1), got {d['val_fraction']}")
        if self.settings["head_init"] not in ("probe", "zero"):
            raise ValueError(f"head_init: must be probe or zero, got {self.settings['head_init']!r}")
        for key in ("train", "val"):  # trials run in their own working directory
            d[key] = _absolute(d[key])
        d["evals"] = {name: _absolute(path) for name, path in d["evals"].items()}
        self._loaded: tuple[list, dict[str, tuple[list, torch.Tensor]]] | None = None

    # --- what a model family provides -----------------------------------------------------
    @abstractmethod
    def pretrained_model(self) -> nn.Module:
        """The pretrained network with a fresh head of len(self.classes()) outputs."""

    @abstractmethod
    def features(self, model: nn.Module, x) -> torch.Tensor:
        """What the head sees (pooled, pre-logits)."""

    @abstractmethod
    def head(self, model: nn.Module) -> nn.Linear:
        """The classification head."""

    @abstractmethod
    def examples(self, inputs: list, labels: torch.Tensor) -> Examples:
        """Raw inputs of one file (texts, image paths or bytes) -> Examples."""

    # --- shared --------------------------------------------------------------------------
    def classes(self) -> list:
        return list(self.settings["data"]["labels"]) or self._load()[0]

    def model_settings(self) -> dict[str, Any]:
        """With the label list filled in: the model can be rebuilt without reading any file."""
        return {**self.settings, "data": {**self.settings["data"], "labels": self.classes()}}

    def _load(self):
        if self._loaded is None:
            d = self.settings["data"]
            cols = [d["input_column"], d["label_column"]]
            files = {"train": d["train"], **({"val": d["val"]} if d["val"] else {}),
                     **{f"evals.{name}": path for name, path in d["evals"].items()}}
            raw = {key: self._rows(path, cols, key) for key, path in files.items()}
            classes = list(d["labels"]) or sorted(set(raw["train"][1]), key=lambda v: (str(type(v)), v))
            index = {str(c): i for i, c in enumerate(classes)}
            sets = {}
            for key, (inputs, labels) in raw.items():
                unknown = sorted({str(v) for v in labels} - set(index))
                if unknown:
                    raise DataError(f"task.data.{key}: {files[key]}: label(s) {', '.join(unknown[:5])} not among the "
                                    f"training labels ({', '.join(map(str, classes[:10]))}): label sets must agree")
                sets[key] = (inputs, torch.tensor([index[str(v)] for v in labels], dtype=torch.long))
            self._loaded = (classes, sets)
        return self._loaded

    def _rows(self, path: str, cols: list[str], key: str) -> tuple[list, list]:
        table = read_columns(path, cols, key)
        inputs, labels = table[cols[0]], table[cols[1]]
        if any(v is None for v in labels) or any(v is None for v in inputs):
            raise DataError(f"task.data.{key}: {path}: empty values in column {cols[0]!r} or {cols[1]!r}")
        if not inputs:
            raise DataError(f"task.data.{key}: {path}: no rows")
        return self._resolve_inputs(inputs, path), labels

    def _resolve_inputs(self, inputs: list, path: str) -> list:
        return inputs

    def data(self) -> TaskData:
        d = self.settings["data"]
        _, sets = self._load()
        train_inputs, train_labels = sets["train"]
        if "val" in sets:
            val, train = sets["val"], (train_inputs, train_labels)
        else:  # a seeded split of the training file, used only for greedy soup selection
            order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(d["split_seed"]))
            n_val = max(1, round(d["val_fraction"] * len(order)))
            if n_val >= len(order):
                raise DataError(f"task.data.train: {d['train']}: too few rows ({len(order)}) to hold out a val split")
            pick = lambda idx: ([train_inputs[i] for i in idx.tolist()], train_labels[idx])  # noqa: E731
            val, train = pick(order[:n_val]), pick(order[n_val:])
        evals = {"val": self.examples(*val)}
        for name in d["evals"]:
            evals[name] = self.examples(*sets[f"evals.{name}"])
        ood = [n for n in d["evals"] if n != d["id_test"]]
        return TaskData(train=self.examples(*train), evals=evals, val="val", id_test=d["id_test"], ood=ood)

    def split_key(self) -> str:
        """The data settings (files, columns, labels, val_fraction, split_seed) and each file's
        size and modification time."""
        return digest(self.name, self.settings["data"], data_fingerprint(self.settings["data"]))

    def pretrain_key(self) -> str:
        keyed = {k: self.settings[k] for k in self.pretrain_settings}
        blob = json.dumps({"task": self.name, **keyed, "data_files": data_fingerprint(self.settings["data"])},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def pretrain(self, data: TaskData) -> StateDict:
        """The pretrained network and its new head: a linear probe on frozen features of the
        training set (logistic regression), or zeros (the fine-tuned runs then start at the
        pretrained features with uniform predictions)."""
        model = self.pretrained_model()
        head = self.head(model)
        with torch.no_grad():
            if self.settings["head_init"] == "zero":
                head.weight.zero_()
                head.bias.zero_()
            else:
                w, b = self.linear_probe(model, data.train)
                head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
                head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    def linear_probe(self, model: nn.Module, train: Examples) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.linear_model import LogisticRegression

        from orchestrator.soup.train import loader

        model.eval()
        order = torch.arange(len(train))
        n = self.settings["probe_examples"]
        if 0 < n < len(train):  # a seeded subset, for very large training sets
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
        with torch.no_grad():
            feats = torch.cat([self.features(model, x).float() for x, _ in
                               loader(train, list(order.split(64)), self.num_workers)]).numpy()
        y = train.labels[order].numpy()
        n = len(self.classes())
        probe = LogisticRegression(C=self.settings["probe_C"], max_iter=2000).fit(feats, y)
        w, b = np.zeros((n, feats.shape[1])), np.full(n, -10.0)  # labels absent from train: never predicted
        if len(probe.classes_) == 2:  # sklearn keeps one row for two classes: split it symmetrically
            coef = np.concatenate([-probe.coef_ / 2, probe.coef_ / 2])
            bias = np.concatenate([-probe.intercept_ / 2, probe.intercept_ / 2])
        else:
            coef, bias = probe.coef_, probe.intercept_
        w[probe.classes_], b[probe.classes_] = coef, bias
        return w, b
