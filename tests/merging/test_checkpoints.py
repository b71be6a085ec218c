"""Bring your own checkpoints: `python -m orchestrator.pool import` on Hugging Face folders made
here (a tiny random BERT saved with save_pretrained, fine-tunes of it) and on bare safetensors,
then `pool merge`; bad inputs are one line and write nothing."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from orchestrator import pool as pool_cli
from orchestrator.common.pool import Pool
from orchestrator.merging import executor
from orchestrator.merging.sources import FileSource


def bert(seed: int, hidden: int = 32):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def fine_tune_of(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.001 * torch.randn(p.shape, generator=g))  # 5% of the init scale: a fine-tune
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    bert(0).save_pretrained(root / "base")
    for i in (1, 2):
        fine_tune_of(transformers.BertModel.from_pretrained(root / "base"), i).save_pretrained(root / f"ft{i}")
    bert(7).save_pretrained(root / "other-base")  # same shapes, another initialisation
    bert(0, hidden=48).save_pretrained(root / "wider")
    transformers.BertModel.from_pretrained(root / "base").half().save_pretrained(root / "half")
    pickled = root / "pickled"  # an older checkpoint: a config and a pickled state dict
    pickled.mkdir()
    (pickled / "config.json").write_text((root / "base" / "config.json").read_text())
    torch.save(bert(0).state_dict(), pickled / "pytorch_model.bin")
    for name in ("base", "ft1", "ft2", "other-base", "wider", "half", "pickled"):
        out[name] = str(root / name)
    return out


def cli(capsys, *args):
    code = pool_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_hugging_face_folders_then_merge(tmp_path, folders, capsys):
    pool_dir = str(tmp_path / "pool")
    code, out, err = cli(capsys, "import", "--pool", pool_dir, "--sweep", "mine", "--base", folders["base"],
                         folders["ft1"], folders["ft2"])
    assert code == 0, err
    assert "3 of 3 checkpoints added" in out and "mine-ft1" in out and "mine-ft2" in out
    pool = Pool(pool_dir)
    df = pool.manifest()
    assert sorted(zip(df["kind"], df["id"])) == sorted([("pretrained", df[df["kind"] == "pretrained"]["id"].iloc[0]),
                                                        ("trial", "mine-ft1"), ("trial", "mine-ft2")])
    base_id = df[df["kind"] == "pretrained"]["id"].iloc[0]
    assert all(list(p) == [base_id] for p in df[df["kind"] == "trial"]["parents"])
    for row_id, folder in (("mine-ft1", "ft1"), ("mine-ft2", "ft2")):  # the weights, bit for bit
        stored, original = FileSource(pool.local_weights(pool.get(row_id))), FileSource(folders[folder])
        assert stored.names() == original.names()
        assert all(torch.equal(stored.get(n, "cpu"), original.get(n, "cpu")) for n in original.names())
    code, out, _ = cli(capsys, "import", "--pool", pool_dir, "--sweep", "mine", "--base", folders["base"],
                       folders["ft1"], folders["ft2"])
    assert code == 0 and "0 of 3 checkpoints added (3 were there already)" in out  # exactly once

    target = str(tmp_path / "out" / "linear.safetensors")
    code, out, err = cli(capsys, "merge", "--pool", pool_dir, "--sweep", "mine", "--method", "linear", "--out", target)
    assert code == 0, err
    assert "merged 2 fine-tunes of sweep 'mine' with linear" in out and f"written to {target}" in out
    expected = executor.merge("linear", [FileSource(folders["ft1"]), FileSource(folders["ft2"])]).state
    merged = FileSource(target)
    assert all(torch.equal(merged.get(n, "cpu"), v) for n, v in expected.items())
    soup = Pool(pool_dir).manifest().query("kind == 'soup'")
    assert len(soup) == 1 and list(soup["parents"].iloc[0]) == [base_id, "mine-ft1", "mine-ft2"]
    code, out, _ = cli(capsys, "merge", "--pool", pool_dir, "--sweep", "mine", "--method", "linear")
    assert code == 0 and "in the pool already" in out and len(Pool(pool_dir).manifest().query("kind == 'soup'")) == 1
    code, out, err = cli(capsys, "merge", "--pool", pool_dir, "--sweep", "mine", "--method", "ties", "k=0.3", "lambda=1.5")
    assert code == 0 and "k=0.3" in out and "lambda=1.5" in out, err


def test_import_bare_safetensors_and_merge_with_ties(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 8, generator=g).bfloat16(), "b": torch.randn(8, generator=g).bfloat16()}
    paths = []
    for i in range(3):
        path = str(tmp_path / f"run{i}.safetensors")
        save_file({k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}, path)
        paths.append(path)
    save_file(base, tmp_path / "base.safetensors")
    pool_dir = str(tmp_path / "pool")
    assert cli(capsys, "import", "--pool", pool_dir, "--sweep", "runs", "--base", str(tmp_path / "base.safetensors"),
               *paths)[0] == 0
    code, out, err = cli(capsys, "merge", "--pool", pool_dir, "--sweep", "runs", "--method", "ties", "k=0.5")
    assert code == 0, err
    pool = Pool(pool_dir)
    row = pool.manifest().query("kind == 'soup'").iloc[0].to_dict()
    assert row["hparams"] == {"method": "ties", "k": 0.5, "scope": "tensor", "lambda": 1.0}
    expected = executor.merge("ties", [FileSource(p) for p in paths], base=FileSource(str(tmp_path / "base.safetensors")),
                              params={"k": 0.5}).state
    got = FileSource(pool.local_weights(row))
    assert all(torch.equal(got.get(n, "cpu"), v) for n, v in expected.items())


@pytest.mark.parametrize("bad, message", [
    ("other-base", "of their norm away from the base's"),
    ("wider", "has shape [48], the base"),
    ("half", "is float16, the base"),
    ("pickled", "only pytorch_model.bin (a pickle"),
    ("missing", "no such file or folder"),
])
def test_bad_checkpoints_are_one_line_errors_and_write_nothing(tmp_path, folders, capsys, bad, message):
    path = folders.get(bad, str(tmp_path / "nowhere"))
    pool_dir = tmp_path / "pool"
    code, out, err = cli(capsys, "import", "--pool", str(pool_dir), "--sweep", "s", "--base", folders["base"],
                         folders["ft1"], path)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not pool_dir.exists()  # checked before the pool is created


def test_merge_bad_input_is_one_line(tmp_path, folders, capsys):
    pool_dir = str(tmp_path / "pool")
    assert cli(capsys, "import", "--pool", pool_dir, "--sweep", "s", "--base", folders["base"], folders["ft1"])[0] == 0
    for args, message in ((("--sweep", "nope", "--method", "linear"), "no finished ingredients of sweep 'nope'"),
                          (("--sweep", "s", "--method", "ties", "k=2"), r"ties: k must be in (0, 1]"),
                          (("--sweep", "s", "--method", "ties", "q=1"), "unknown setting 'q'"),
                          (("--sweep", "s", "--method", "ties", "k"), "expected key=value"),
                          (("--sweep", "s", "--method", "model_stock"), "needs at least 2 ingredients")):
        code, _, err = cli(capsys, "merge", "--pool", pool_dir, *args)
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert len(os.listdir(os.path.join(pool_dir, "weights"))) == 2  # nothing new, no temp file left
