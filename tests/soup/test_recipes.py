"""The recipe registry: a recipe's declarations drive config validation, the cooking
order, publishing to the pool and MLflow, the summary table and the plot."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from orchestrator.common.errors import ConfigError
from orchestrator.common.pool import Pool
from orchestrator.merging import executor
from orchestrator.merging.sources import StateSource
from orchestrator.soup import recipes
from orchestrator.soup.config import load_config
from orchestrator.soup.kitchen import Dish, Verdict
from orchestrator.soup.plots import soup_scatter
from orchestrator.soup.publish import Publisher, parent_metrics
from orchestrator.soup.summary import summary_table
from orchestrator.soup.recipes import RECIPES, Marker, Param, Recipe, cook, default_recipes, ordered
from orchestrator.soup.tasks.glyphs import GlyphsTask

METRICS = {"val_acc": 0.5, "id_acc": 0.6, "ood_acc": 0.4}


class Halfway(Recipe):
    """A recipe made up for these tests: the first ingredient scaled by `soup.halfway_scale`."""

    name, label, position = "halfway", "halfway soup", 35
    params = (Param("halfway_scale", float, 0.5, "scale", lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}"),)
    needs = ("uniform_soup",)
    produces_weights = True
    marker = Marker("v", "tab:brown", 80)

    @staticmethod
    def cook(k, params, cooked):
        state = {n: t * params["halfway_scale"] for n, t in k.load(k.loadable()[0]).items()}
        return [Dish("halfway", Halfway.label, dict(METRICS), [cooked["uniform_soup"].parents[0]], state,
                     params={"scale": params["halfway_scale"]})]


@pytest.fixture
def halfway(monkeypatch):
    monkeypatch.setitem(RECIPES, "halfway", Halfway)
    return Halfway


def test_the_first_recipes_keep_their_table_order():
    first = ["zero_shot", "best_individual", "uniform_soup", "greedy_soup", "ensemble", "wise_ft"]
    assert [r for r in default_recipes() if r in first] == first  # a new recipe may sit anywhere between
    assert load_config()["soup"]["recipes"] == default_recipes()


def test_every_declaration_is_complete_and_consistent():
    positions = [r.position for r in RECIPES.values()]
    assert len(set(positions)) == len(positions)
    for name, r in RECIPES.items():
        assert r.name == name and r.label
        assert all(need in RECIPES for need in r.needs)
        assert (r.marker is None) != (r.curve_x is None), name  # drawn as a point or as a curve
        for p in r.params:
            assert isinstance(p.default, p.type) and p.check(p.default) is None, p.name


def test_needs_are_pulled_in_before_the_recipe_that_needs_them():
    assert ordered(["wise_ft"]) == ["best_individual", "greedy_soup", "wise_ft"]
    assert ordered(["wise_ft", "zero_shot", "greedy_soup"]) == ["zero_shot", "best_individual", "greedy_soup", "wise_ft"]


@pytest.mark.parametrize("override, message", [
    ("soup.recipes=[uniform_soup, bogus]", "soup.recipes: unknown recipe 'bogus' (known: zero_shot, "),
    ("soup.recipes=[]", "soup.recipes: must name at least one recipe"),
    ("soup.greedy_accept=maybe", "soup.greedy_accept: must be '>=' or '>', got 'maybe'"),
    ("soup.wise_ft_alphas=[0.5, 2]", "soup.wise_ft_alphas: each alpha must be a number in [0, 1], got 2"),
    ("soup.wise_ft_alphas=[]", "soup.wise_ft_alphas: must list at least one alpha"),
    ("soup.task_arithmetic_lambdas=[0.1, -0.2]", "soup.task_arithmetic_lambdas: each lambda must be a number >= 0, got -0.2"),
    ("soup.ties_lambdas=[one]", "soup.ties_lambdas: each lambda must be a number >= 0, got 'one'"),
    ("soup.ties_k=0", "soup.ties_k: must be in (0, 1], got 0"),
    ("soup.ties_k=1.5", "soup.ties_k: must be in (0, 1], got 1.5"),
    ("soup.ties_k=lots", "soup.ties_k: expected float"),
    ("soup.ties_trim=layer", "soup.ties_trim: must be 'tensor' or 'global', got 'layer'"),
    ("soup.dare_p=1", "soup.dare_p: must be in [0, 1), got 1"),
    ("soup.dare_p=-0.1", "soup.dare_p: must be in [0, 1), got -0.1"),
    ("soup.dare_merge=sum", "soup.dare_merge: must be 'ties' or 'task_arithmetic', got 'sum'"),
    ("soup.dare_rescale=l2", "soup.dare_rescale: must be 'exact' or 'l1', got 'l2'"),
    ("soup.dare_seed=0.5", "soup.dare_seed: expected int"),
    ("soup.fisher_examples=-1", "soup.fisher_examples: must be >= 0, got -1"),
    ("cook.workers=-1", "cook.workers: must be an integer >= 0 (0: cook in the driver), got -1"),
    ("cook.resources.gpu=-1", "cook.resources.gpu: must be a number >= 0, got -1"),
    ("cook.resources.tpu=1", "cook.resources.tpu"),
    ("cook.selection=val", "cook.selection: must be one of all, held_out, got 'val'"),
])
def test_recipe_settings_are_validated_from_declarations(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_a_new_recipe_gets_config_keys_from_its_params(halfway):
    cfg = load_config()
    assert cfg["soup"]["halfway_scale"] == 0.5 and "halfway" in cfg["soup"]["recipes"]
    assert load_config(None, ["soup.halfway_scale=0.25"])["soup"]["halfway_scale"] == 0.25
    with pytest.raises(ConfigError, match=r"soup.halfway_scale: must be in \(0, 1\], got 2"):
        load_config(None, ["soup.halfway_scale=2.0"])
    with pytest.raises(ConfigError, match="soup.halfway_scale: expected float"):
        load_config(None, ["soup.halfway_scale=lots"])


class FakeKitchen:
    """What a recipe sees of the Kitchen, with two made-up ingredients."""

    def __init__(self, task):
        self.task = task
        self.rows = [{"id": f"t{i}", "metrics": dict(METRICS)} for i in range(2)]
        self.states = {r["id"]: {k: v + i for k, v in task.build_model().state_dict().items()}
                       for i, r in enumerate(self.rows)}
        self.pool = None

    def loadable(self):
        return self.rows

    def load(self, row):
        return {k: v.clone() for k, v in self.states[row["id"]].items()}

    def merge(self, method, rows, params=None, side=None):  # the merge engine on the made-up states
        return executor.merge(method, [StateSource(self.states[r["id"]], r["id"]) for r in rows], params=params)

    def evaluate(self, state, sets=None, soup=True):
        return dict(METRICS)

    def judge(self, state, soup=True):
        return Verdict(dict(METRICS), {})  # no per-example results: the table shows no intervals


def test_a_new_recipe_is_cooked_published_tabled_and_plotted(halfway, tmp_path):
    task = GlyphsTask({"width": 8})
    kitchen = FakeKitchen(task)
    dishes = cook(kitchen, ["halfway"], {"halfway_scale": 0.5})
    assert [d.recipe for d in dishes] == ["uniform_soup", "halfway"]  # its need cooked first
    half = dishes[1]
    first = kitchen.load({"id": "t0"})
    assert all(torch.equal(half.weights[k], first[k] * 0.5) for k in first if first[k].is_floating_point())

    pool = Pool(str(tmp_path / "pool"), create=True)
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp).info.run_id
    Publisher(pool, uri, exp, parent).serve_one(half, "s", task)
    (row,) = pool.manifest().to_dict("records")
    assert row["kind"] == "soup" and row["hparams"] == {"recipe": "halfway", "scale": 0.5}
    assert pool.verify() == []
    (run,) = [r for r in client.search_runs([exp]) if r.info.run_id != parent]
    assert run.data.tags["orchestrator.recipe"] == "halfway" and run.data.tags["orchestrator.ingredient_id"] == row["id"]

    assert "halfway soup" in summary_table(dishes, {"val_acc": ["val"], "id_acc": ["id_test"]})
    assert parent_metrics(dishes)["halfway_val_acc"] == 0.5
    path = soup_scatter([{"metrics": dict(METRICS)}], dishes, str(tmp_path / "plot.png"), "t")
    assert (tmp_path / "plot.png").stat().st_size > 1000 and path.endswith("plot.png")


def test_a_recipe_without_new_weights_adds_no_pool_row(tmp_path):
    pool = Pool(str(tmp_path / "pool"), create=True)
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp).info.run_id
    task = GlyphsTask({"width": 8})
    best = Dish("best_individual", "best individual", dict(METRICS), ["t0"], task.build_model().state_dict())
    Publisher(pool, uri, exp, parent).serve_one(best, "s", task)
    assert pool.manifest().empty  # its weights are an ingredient's own, already in the pool
    assert len(client.search_runs([exp])) == 2


def test_every_shipped_recipe_module_registers_itself():
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(recipes.__path__)}
    assert modules == set(RECIPES) - {"halfway"}
