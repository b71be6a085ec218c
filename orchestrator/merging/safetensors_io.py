"""Reading one tensor of a safetensors file at a time, and writing a file as its tensors come.

The `safetensors` package reads through a memory map of the whole file: every page a merge
touches stays in the process's resident memory until the file is closed, so merging N
models that way costs N models of RSS. Here a tensor is read with a plain positioned read
into a buffer of its own size, and the written file is streamed: its header is known before
any tensor is (names, dtypes and shapes come from the inputs), so each tensor goes to disk
as soon as it is merged. The format is the safetensors one (an 8-byte little-endian header
length, a JSON header, the raw bytes); the tests read our files back with `safetensors`.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from dataclasses import dataclass
from typing import Sequence

import torch

from orchestrator.common.errors import MergeError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    # unsigned 16-64 bit tensors came with torch 2.3
    **{name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 << 20  # the safetensors limit: a larger "header" is not a safetensors file


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int


class SafetensorsFile:
    """One safetensors file, read one tensor at a time (the file stays open until `close`)."""

    def __init__(self, path: str):
        self.path, self._fd = path, -1
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise MergeError(f"{path}: {e.strerror}") from None
        try:
            self.entries, self.metadata = self._header()
        except Exception:
            self.close()
            raise

    def _header(self) -> tuple[dict[str, Entry], dict[str, str]]:
        head = os.pread(self._fd, 8, 0)
        size = os.fstat(self._fd).st_size
        if len(head) < 8:
            raise MergeError(f"{self.path}: not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise MergeError(f"{self.path}: not a safetensors file (header length {length} of a {size}-byte file)")
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MergeError(f"{self.path}: not a safetensors file (its header is not JSON)") from None
        metadata = header.pop("__metadata__", None) or {}
        entries = {}
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise MergeError(f"{self.path}: tensor {name} has dtype {info.get('dtype')!r}, which torch cannot hold")
            dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
            start, end = (8 + length + offset for offset in info["data_offsets"])
            if end - start != _nbytes(dtype, shape) or end > size:
                raise MergeError(f"{self.path}: tensor {name}'s bytes do not match its shape (truncated file?)")
            entries[name] = Entry(dtype, shape, start, end)
        return entries, metadata

    def read(self, name: str) -> torch.Tensor:
        """The tensor, in a CPU buffer of its own (not a view of the file)."""
        e = self.entries[name]
        buf = torch.empty(e.end - e.start, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], e.start + done)
            if got == 0:
                raise MergeError(f"{self.path}: ends inside tensor {name} (truncated file?)")
            done += got
        return buf.view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """A safetensors file written tensor by tensor, in the order of `specs` (name, dtype,
    shape), to a hidden temp file beside `path` that is renamed into place by `close()`:
    a reader sees the whole file or none. Used as a context manager, an exception leaves
    nothing behind."""

    def __init__(self, path: str, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None):
        self.path = os.path.abspath(path)
        header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
        offset, self._order = 0, []
        for name, dtype, shape in specs:
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, tuple(shape)))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensors start 8-byte aligned, as safetensors writes them
        folder, base = os.path.split(self.path)
        os.makedirs(folder, exist_ok=True)
        self._tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
        self._file = open(self._tmp, "wb")
        self._next = 0
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._order[self._next] if self._next < len(self._order) else None
        if want is None or (name, tensor.dtype, tuple(tensor.shape)) != want:
            raise ValueError(f"writer expected {want}, got {(name, tensor.dtype, tuple(tensor.shape))}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> str:
        """Publish the file; returns its path."""
        if self._next != len(self._order):
            self.abort()
            raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        folder = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
