"""Byte-level text for the proxy LM, offline by default.

Sources (YAML key data.source):
- "stdlib": the Python standard library's own .py files (sorted, site-packages excluded);
- a folder: every regular file under it, sorted;
- a .parquet file: the text column data.column, one document per row;
- any other file: its bytes.

Documents (files, Parquet rows) go to validation by a hash of their name, so the split
is deterministic and does not move when a document is added. A single text file is
split by position instead (the last val_fraction of it).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass

import torch

from orchestrator.common.errors import ConfigError


@dataclass
class ByteCorpus:
    train: torch.Tensor  # uint8, all training documents concatenated
    val: torch.Tensor
    source: str
    documents: int

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        """Random windows (x, y) with y = x shifted by one byte."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()
        return window[:, :-1], window[:, 1:]

    def fixed_batches(self, split: str, n: int, batch_size: int, seq_len: int, seed: int = 1234):
        """The same n batches for every run of a study (validation loss, probe batch)."""
        gen = torch.Generator().manual_seed(seed)
        return [self.batch(split, batch_size, seq_len, gen) for _ in range(n)]


def stdlib_files() -> tuple[str, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return root, sorted(files)


def _is_val(name: str, val_fraction: float) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction


def _split_documents(docs: list[tuple[str, bytes]], val_fraction: float, max_mb: float):
    train, val = [], []
    for name, text in docs:
        (val if _is_val(name, val_fraction) else train).append(text)
    if max_mb:  # keep the first documents (in sorted order) up to the cap
        cap, kept, size = int(max_mb * 1e6), [], 0
        for t in train:
            if size >= cap:
                break
            kept.append(t)
            size += len(t)
        train = kept
        val = val[: max(1, int(len(val) * len(kept) / max(1, len(docs))))] if val else val
    return b"\n".join(train), b"\n".join(val)


def load_corpus(source: str = "stdlib", column: str = "text", val_fraction: float = 0.1,
                max_mb: float = 0.0, min_bytes: int = 1024) -> ByteCorpus:
    """Read and split a corpus; a missing path or column is a one-line ConfigError."""
    if source == "stdlib":
        root, files = stdlib_files()
        docs = [(os.path.relpath(f, root), open(f, "rb").read()) for f in files]
        train, val = _split_documents(docs, val_fraction, max_mb)
    elif os.path.isdir(source):
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(source) for n in names)
        docs = [(os.path.relpath(f, source), open(f, "rb").read()) for f in files]
        train, val = _split_documents(docs, val_fraction, max_mb)
    elif not os.path.isfile(source):
        raise ConfigError(f"data.source: {source}: no such file or folder (or use 'stdlib')")
    elif source.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            texts = pq.read_table(source, columns=[column]).column(column).to_pylist()
        except (KeyError, ValueError) as e:
            first = str(e).splitlines()[0][:120]
            raise ConfigError(f"data.column: {source} has no column {column!r} ({first})") from None
        docs = [(f"row-{i}", (t if isinstance(t, str) else str(t)).encode()) for i, t in enumerate(texts) if t]
        train, val = _split_documents(docs, val_fraction, max_mb)
        files = texts
    else:
        data = open(source, "rb").read()
        if max_mb:
            data = data[: int(max_mb * 1e6 / (1 - val_fraction))]
        cut = int(len(data) * (1 - val_fraction))
        train, val, files = data[:cut], data[cut:], [source]
    for split, blob in (("train", train), ("validation", val)):
        if len(blob) < min_bytes:
            raise ConfigError(f"data.source: {source}: the {split} split has {len(blob)} bytes, "
                              f"need at least {min_bytes} (more text, or another data.val_fraction)")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return ByteCorpus(as_tensor(train), as_tensor(val), source, len(files))
