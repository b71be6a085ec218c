"""Our safetensors reads and streamed writes agree with the safetensors package, and bad
files are one-line errors."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from orchestrator.common.errors import MergeError
from orchestrator.merging.safetensors_io import SafetensorsFile, SafetensorsWriter
from orchestrator.merging.sources import FileSource

STATE = {
    "a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int64), "c": torch.tensor(2.5),
    "d": torch.zeros(0, 4), "e": torch.tensor([True, False]), "f": torch.randn(2, 2, dtype=torch.float64),
    "g": torch.randn(4).half(),
}


def test_reads_what_safetensors_wrote(tmp_path):
    save_file(STATE, tmp_path / "x.safetensors", metadata={"k": "v"})
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    assert f.metadata == {"k": "v"}
    for name, value in STATE.items():
        got = f.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value)


def test_writes_what_safetensors_reads(tmp_path):
    path = tmp_path / "sub" / "y.safetensors"
    with SafetensorsWriter(str(path), [(k, v.dtype, v.shape) for k, v in STATE.items()], {"m": 1}) as w:
        for k, v in STATE.items():
            w.write(k, v)
    back = load_file(path)
    assert list(back) == sorted(STATE) and all(torch.equal(back[k], STATE[k]) for k in STATE)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"m": "1"}
    assert os.listdir(path.parent) == ["y.safetensors"]


def test_an_interrupted_or_out_of_order_write_leaves_nothing(tmp_path):
    specs = [(k, v.dtype, v.shape) for k, v in STATE.items()]
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(str(tmp_path / "z.safetensors"), specs) as w:
            w.write("a", STATE["a"])
            raise RuntimeError("disk full")
    with pytest.raises(ValueError, match="expected"):
        with SafetensorsWriter(str(tmp_path / "z.safetensors"), specs) as w:
            w.write("b", STATE["b"])
    with pytest.raises(ValueError, match="never written"):
        SafetensorsWriter(str(tmp_path / "z.safetensors"), specs).close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) - 10], "truncated"),
    (lambda b: b"hello", "shorter than its header"),
    (lambda b: (10 ** 12).to_bytes(8, "little") + b[8:], "header length"),
    (lambda b: b[:8] + b"\xff" * 20 + b[28:], "not JSON"),
])
def test_a_damaged_file_is_a_one_line_error(tmp_path, damage, message):
    save_file(STATE, tmp_path / "x.safetensors")
    blob = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(damage(blob))
    with pytest.raises(MergeError, match=message) as err:
        SafetensorsFile(str(tmp_path / "x.safetensors"))
    assert "\n" not in str(err.value) and "x.safetensors" in str(err.value)


def test_a_model_folder_one_file_or_sharded(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    save_file(STATE, single / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({k: STATE[k] for k in "abc"}, sharded / "model-00001-of-00002.safetensors")
    save_file({k: STATE[k] for k in "defg"}, sharded / "model-00002-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {' + ", ".join(f'"{k}": "model-0000{1 if k in "abc" else 2}-of-00002.safetensors"'
                                       for k in STATE) + "}}")
    for folder in (single, sharded):
        src = FileSource(str(folder))
        assert sorted(src.names()) == sorted(STATE) and all(torch.equal(src.get(k, "cpu"), STATE[k]) for k in STATE)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(MergeError, match="only pytorch_model.bin"):
        FileSource(str(pickled))
    with pytest.raises(MergeError, match="no such file"):
        FileSource(str(tmp_path / "nothing"))
