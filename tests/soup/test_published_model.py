"""Soups as complete MLflow models: logged with a signature, an input example, pinned
requirements and the files the task builds the model from, they load and predict in a fresh
process after the original model and data files are gone; the best dish is registered and
served by alias."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow import MlflowClient

from orchestrator.common.pool import Pool
from orchestrator.soup.kitchen import Dish
from orchestrator.soup.publish import Publisher, champion, log_model, register_best
from orchestrator.soup.tasks.glyphs import GlyphsTask

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "dog", "rain", "snow", "my", "and", "today"]
TEXTS = ["my cat and dog", "rain and snow today", "dog"]

# Loads each model URI with mlflow.pyfunc.load_model and predicts its inputs; in a new
# interpreter, so nothing of the logging process (imported tasks, cached files) helps.
LOAD_AND_PREDICT = textwrap.dedent("""
    import pickle, sys
    import mlflow
    mlflow.set_tracking_uri(sys.argv[1])
    jobs = pickle.load(open(sys.argv[2], "rb"))
    out = {uri: mlflow.pyfunc.load_model(uri).predict(inputs) for uri, inputs in jobs.items()}
    pickle.dump(out, open(sys.argv[3], "wb"))
""")


def predict_in_fresh_process(tmp_path, uri: str, jobs: dict) -> dict:
    (tmp_path / "jobs.pkl").write_bytes(pickle.dumps(jobs))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, uri, str(tmp_path / "jobs.pkl"),
                           str(tmp_path / "out.pkl")], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pickle.loads((tmp_path / "out.pkl").read_bytes())


def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("published", artifact_location=str(tmp_path / "artifacts"))


def logits(task, weights, inputs) -> np.ndarray:
    """What the task's own model says, in this process: what the loaded model must say too."""
    model = task.build_model()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        return task.logits(model, task.serve_inputs(inputs)).numpy()


def tiny_bert(folder) -> str:
    """A random 1-layer BERT and a word-level tokenizer, saved as a local model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)).save_pretrained(folder)
    return str(folder)


def text_task(tmp_path):
    from orchestrator.soup.tasks.hf_text import HFTextTask

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": TEXTS, "label": ["pets", "weather", "pets"]}), data / "train.parquet")
    train = str(data / "train.parquet")
    return HFTextTask({"model": tiny_bert(tmp_path / "bert"), "max_length": 16,
                       "data": {"train": train, "evals": {"id_test": train}}})


def image_task(tmp_path):
    """test_resnet from a local pretrained file (which the logged model must not need)."""
    import timm
    from safetensors.torch import save_file

    from orchestrator.soup.tasks.timm_image import TimmImageTask

    pretrained = str(tmp_path / "resnet.safetensors")
    save_file(timm.create_model("test_resnet").state_dict(), pretrained)
    return TimmImageTask({"model": "test_resnet", "image_size": 32, "pretrained_file": pretrained,
                          "data": {"train": "nowhere/train", "evals": {"id_test": "nowhere/test"},
                                   "labels": ["blue", "red"]}})


def test_logged_soups_load_and_predict_without_their_original_files(tmp_path):
    import mlflow

    uri, client, exp = store(tmp_path)
    tasks = {"glyphs": GlyphsTask({"width": 8}), "hf_text": text_task(tmp_path), "timm_image": image_task(tmp_path)}
    inputs = {"glyphs": tasks["glyphs"].serve_example()[::-1].copy(), "hf_text": TEXTS,
              "timm_image": tasks["timm_image"].serve_example()}
    expected, jobs = {}, {}
    for name, task in tasks.items():
        torch.manual_seed(1)
        weights = task.build_model().state_dict()  # stands in for a soup: any weights of the architecture
        run_id = client.create_run(exp).info.run_id
        log_model(uri, run_id, weights, task)
        model_uri = f"runs:/{run_id}/model"
        jobs[model_uri], expected[model_uri] = inputs[name], logits(task, weights, inputs[name])

        info = mlflow.models.get_model_info(model_uri)
        assert info.signature is not None and info.saved_input_example_info is not None
        example = mlflow.models.Model.load(model_uri).load_input_example(
            mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "downloaded" / name)))
        assert example is not None
        reqs = open(mlflow.pyfunc.get_model_dependencies(model_uri)).read().split()
        needs = {"glyphs": [], "hf_text": ["transformers", "tokenizers"],
                 "timm_image": ["timm", "torchvision", "pillow"]}
        for dist in ["torch", "safetensors", "numpy", "pyarrow", "mlflow", *needs[name]]:
            assert any(r.startswith(f"{dist}==") for r in reqs), (dist, reqs)
    # the model folder, the data files and the pretrained file are gone: the models bring their own
    for gone in ("bert", "data", "resnet.safetensors"):
        shutil.rmtree(tmp_path / gone) if (tmp_path / gone).is_dir() else (tmp_path / gone).unlink()

    out = predict_in_fresh_process(tmp_path, uri, jobs)
    for model_uri, want in expected.items():
        got = np.asarray(out[model_uri])
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def dish(recipe, val, weights=None, parents=("t0",), id_acc=0.5):
    return Dish(recipe, recipe.replace("_", " "), {"val_acc": val, "id_acc": id_acc, "ood_acc": 0.4}, list(parents),
                weights)


def test_champion_is_the_best_val_dish_with_weights_ties_to_the_first_cooked():
    w = {"x": torch.zeros(1)}
    dishes = [dish("zero_shot", 0.99), dish("best_individual", 0.9, w, id_acc=0.1), dish("uniform_soup", 0.8, w),
              dish("greedy_soup", 0.9, w, id_acc=0.9), dish("ensemble", 0.95)]
    assert champion(dishes).recipe == "best_individual"  # no weights: not servable; a tie: the first cooked
    assert champion([dish("ensemble", 0.95)]) is None


def test_register_best_versions_and_moves_the_alias_served_in_a_fresh_process(tmp_path, capsys):
    uri, client, exp = store(tmp_path)
    task = GlyphsTask({"width": 8})
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        weights.append(task.build_model().state_dict())
    pool = Pool(str(tmp_path / "pool"), create=True)
    parent = client.create_run(exp).info.run_id
    publisher = Publisher(pool, uri, exp, parent)
    # the first sweep: the best individual wins (its weights are a trial's: logged as a model only now)
    first = [dish("zero_shot", 0.5), dish("best_individual", 0.9, weights[0], parents=["trial-a"]),
             dish("uniform_soup", 0.8, weights[1], parents=["trial-a", "trial-b"])]
    assert publisher.serve(first, "glyphs_soup", task, {"name": "", "alias": ""}).version == "1"  # sweep, champion
    assert "registered model glyphs_soup version 1 (alias champion): best individual [best_individual], " \
           "val 0.9000, ID 0.5000, OOD 0.4000" in capsys.readouterr().out
    v1 = client.get_model_version_by_alias("glyphs_soup", "champion")
    assert v1.tags["orchestrator.recipe"] == "best_individual" and v1.tags["orchestrator.ingredient_id"] == "trial-a"
    assert "held-out" in v1.description and "val 0.9000" in v1.description
    # a later sweep's soup: version 2 under a configured name and alias, which moves to it
    second = [dish("greedy_soup", 0.95, weights[1], parents=["trial-a", "trial-b"])]
    assert publisher.serve(second, "glyphs_soup", task, {"name": "digits", "alias": "prod"}).version == "1"
    run_id = client.get_model_version_by_alias("digits", "prod").run_id
    assert register_best(uri, run_id, "glyphs_soup", "champion", "by hand",
                         {"orchestrator.recipe": "greedy_soup"}) == "2"
    v2 = client.get_model_version_by_alias("glyphs_soup", "champion")
    assert str(v2.version) == "2" and v2.description == "by hand"
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'glyphs_soup'")) == ["1", "2"]
    assert publisher.serve(first, "glyphs_soup", task, None).version is None  # no registration asked for
    assert publisher.serve([dish("ensemble", 0.99)], "glyphs_soup", task, {"name": "x"}).version is None  # none servable
    assert "registered nothing" in capsys.readouterr().out
    # the first champion again: the alias's version 2 (registered by hand, without our sha256 tag) is
    # not known to hold its weights, so version 3; then a rerun: version 3 holds them, no new version
    assert publisher.serve(first, "glyphs_soup", task, {"name": "", "alias": ""}).version == "3"
    assert "registered nothing new" not in capsys.readouterr().out
    assert publisher.serve(first, "glyphs_soup", task, {"name": "", "alias": ""}).version == "3"
    assert "registered nothing new: glyphs_soup version 3 (alias champion) holds these weights already" in \
        capsys.readouterr().out

    x = task.serve_example()
    out = predict_in_fresh_process(tmp_path, uri, {"models:/glyphs_soup@champion": x, "models:/glyphs_soup/1": x})
    np.testing.assert_allclose(out["models:/glyphs_soup@champion"], logits(task, weights[0], x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["models:/glyphs_soup/1"], logits(task, weights[0], x), rtol=1e-5, atol=1e-5)
