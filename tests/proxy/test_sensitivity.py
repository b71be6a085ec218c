"""The LR-sensitivity math, the proxy model's settings and divergence detection (no Ray)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator.proxy import analysis as sens
from orchestrator.common.errors import ConfigError
from orchestrator.proxy.config import load_config
from orchestrator.proxy.data import ByteCorpus, load_corpus
from orchestrator.proxy.model import ModelConfig, ProxyLM, lm_loss, lr_multipliers, lr_schedule, param_groups
from orchestrator.proxy.run import SETTINGS, ProxyRun

NAN = float("nan")

# -- the sensitivity formula ---------------------------------------------------------------


def test_lr_sensitivity_by_hand():
    # loss_0 = 5; best 2.0; a diverged run counts as loss_0: mean([1, .5, 0, 3]) = 1.125
    assert sens.lr_sensitivity([3.0, 2.5, 2.0, NAN], 5.0) == pytest.approx(1.125)
    assert sens.lr_sensitivity([3.0, 2.5, 2.0, float("inf")], 5.0) == pytest.approx(1.125)


def test_lr_sensitivity_clips_at_loss_0():
    assert sens.lr_sensitivity([6.0, 2.0], 5.0) == pytest.approx(1.5)  # min(6, 5) - 2 = 3, 0


def test_lr_sensitivity_flat_all_diverged_and_empty():
    assert sens.lr_sensitivity([2.0, 2.0, 2.0], 5.0) == 0.0
    assert sens.lr_sensitivity([NAN, NAN], 5.0) == 0.0  # nothing trains: read with diverged_runs
    assert math.isnan(sens.lr_sensitivity([], 5.0))


def test_optimal_lr_ties_go_to_smaller_lr_and_skip_diverged():
    assert sens.optimal_lr([1e-1, 1e-3, 1e-2], [2.0, 2.0, 3.0]) == (1e-3, 2.0)
    assert sens.optimal_lr([1e-3, 1e-2, 1e-1], [3.0, 2.5, NAN]) == (1e-2, 2.5)
    assert all(math.isnan(v) for v in sens.optimal_lr([1e-3], [NAN]))


def test_refined_optimal_lr_is_the_parabola_vertex():
    lrs = [math.exp(-1), 1.0, math.exp(1)]
    losses = [(x - 0.3) ** 2 + 2 for x in (-1, 0, 1)]
    assert sens.refined_optimal_lr(lrs, losses) == pytest.approx(math.exp(0.3))
    assert sens.refined_optimal_lr(lrs, [1.0, 2.0, 3.0]) == lrs[0]  # optimum at the grid's edge
    assert sens.refined_optimal_lr(lrs, [3.0, 2.0, NAN]) == 1.0  # next to a diverged run


def test_transfer_fit_recovers_a_power_law():
    widths = [32, 64, 128]
    fit = sens.transfer_fit(widths, [0.1 * (w / 32) ** -1 for w in widths], target_width=1024)
    assert fit["slope"] == pytest.approx(-1)
    assert fit["predicted_lr"] == pytest.approx(0.1 / 32)
    flat = sens.transfer_fit(widths, [0.01] * 3, target_width=1024)
    assert flat["slope"] == pytest.approx(0, abs=1e-12) and flat["log10_lr_std"] == pytest.approx(0, abs=1e-12)


def test_logit_forecast_quadratic_in_log_log():
    params = [1e4, 1e5, 1e6, 1e7]
    f = lambda n: 10 ** (1 + 0.5 * math.log10(n) + 0.1 * math.log10(n) ** 2)  # noqa: E731
    out = sens.logit_forecast(params, [f(n) for n in params], 1e9)
    assert out["degree"] == 2 and out["forecast"] == pytest.approx(f(1e9), rel=1e-6)
    assert sens.logit_forecast(params[:2], [10, 100], 1e6)["forecast"] == pytest.approx(1e3)  # linear with 2 sizes
    assert math.isnan(sens.logit_forecast([1e4], [10], 1e6)["forecast"])


def _manifest(rows):
    out = []
    for i, (intervention, width, lr, final, status, key) in enumerate(rows):
        out.append({"id": f"r{i}", "kind": "proxy", "sweep": "s", "status": status,
                    "created": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(seconds=i),
                    "hparams": {"intervention": intervention, "width": width, "lr": lr, "seed": 0, "study_key": key},
                    "metrics": {"init_loss": 5.0, "final_loss": final, "params": width * 100.0,
                                "attn_logit_probe": lr * width, "attn_logit_peak": lr * width * 2}})
    return pd.DataFrame(out)


def test_table_from_manifest_counts_diverged_and_keeps_newest():
    m = _manifest([
        ("base", 32, 1e-3, 3.0, "ok", "k"), ("base", 32, 1e-2, 9.9, "ok", "k"),  # replaced by the newer row below
        ("base", 32, 1e-1, NAN, "diverged", "k"), ("base", 32, 1e-2, 2.0, "ok", "k"),
        ("base", 32, 1e-3, 1.0, "ok", "other-settings"),  # other settings: left out
    ])
    m.loc[2, "metrics"].pop("final_loss")  # diverged rows carry no final loss (NaN is dropped)
    runs = sens.runs_from_manifest(m, "s", {"base": "k"})
    assert len(runs) == 3
    table = sens.sensitivity_table(runs)
    row = table.iloc[0]
    assert row["diverged_runs"] == 1 and row["runs"] == 3
    assert row["optimal_lr"] == 1e-2 and row["best_loss"] == 2.0 and row["init_loss"] == 5.0
    assert row["lr_sensitivity"] == pytest.approx(np.mean([1.0, 0.0, 3.0]))
    assert set(["intervention", "width", "params", "lr_sensitivity", "optimal_lr", "best_loss", "init_loss",
                "diverged_runs"]) <= set(table.columns)


def test_interval_over_seeds_is_t_over_each_seeds_own_sensitivity():
    """Three seeds of a 2-LR grid, loss_0 = 5: seed 0 losses (2, 3) -> sensitivity 0.5,
    seed 1 (2, 4) -> 1.0, seed 2 (2, diverged = 5) -> 1.5; mean 1.0, sd 0.5, t(0.975, 2) =
    4.303: the interval is 1.0 +- 4.303 * 0.5 / sqrt(3) = 1.0 +- 1.242."""
    rows = []
    for seed, (a, b) in enumerate([(2.0, 3.0), (2.0, 4.0), (2.0, NAN)]):
        for lr, loss in ((1e-3, a), (1e-2, b)):
            rows.append({"intervention": "base", "width": 32, "lr": lr, "seed": seed, "params": 1000,
                         "init_loss": 5.0, "final_loss": loss, "diverged": math.isnan(loss),
                         "attn_logit_probe": 1.0, "attn_logit_peak": 1.0})
    runs = pd.DataFrame(rows)
    per_seed = sens.per_seed_sensitivity(runs)
    assert list(per_seed["lr_sensitivity"]) == pytest.approx([0.5, 1.0, 1.5])
    row = sens.sensitivity_table(runs).iloc[0]
    assert row["seeds"] == 3
    assert row["lr_sensitivity_low"] == pytest.approx(1.0 - 1.2421, abs=1e-3)
    assert row["lr_sensitivity_high"] == pytest.approx(1.0 + 1.2421, abs=1e-3)
    # the point value stays the sensitivity of the seed-mean losses: (2, 4) -> 1.0
    assert row["lr_sensitivity"] == pytest.approx(1.0)
    one = sens.sensitivity_table(runs[runs["seed"] == 0]).iloc[0]
    assert one["seeds"] == 1 and math.isnan(one["lr_sensitivity_low"]) and one["lr_sensitivity"] == 0.5


# -- the model's settings --------------------------------------------------------------------


def test_qk_layernorm_normalises_queries_and_keys():
    torch.manual_seed(0)
    model = ProxyLM(ModelConfig(width=32, depth=1, head_dim=8, seq_len=16, qk_layernorm=True))
    seen = {}
    attn = model.blocks[0].attn
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    attn.k_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    model(torch.randint(0, 256, (2, 16)))
    for t in (seen["q"], seen["k"]):  # (batch, heads, time, head_dim): each head's vector normalised
        assert t.shape == (2, 4, 16, 8)
        assert torch.allclose(t.mean(-1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(t.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    plain = ProxyLM(ModelConfig(width=32, depth=1, head_dim=8, seq_len=16))
    assert plain.blocks[0].attn.q_norm is None


def test_probe_forward_reports_max_attention_logit():
    torch.manual_seed(0)
    model = ProxyLM(ModelConfig(width=32, depth=2, head_dim=8, seq_len=16))
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        fast, slow = model(x), model(x, probe=True)
    assert torch.allclose(fast, slow, atol=1e-4)  # the explicit path computes the same function
    logits = model.max_attn_logits()
    assert len(logits) == 2 and all(v > 0 for v in logits)


def test_z_loss_term_is_coef_times_logsumexp_squared():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 256) * 3, torch.randint(0, 256, (2, 5))
    plain, ce, log_z = lm_loss(logits, targets, 0.0)
    with_z, ce2, _ = lm_loss(logits, targets, 1e-4)
    expected = 1e-4 * torch.logsumexp(logits, -1).square().mean()
    assert torch.allclose(with_z - plain, expected)
    assert torch.equal(ce, ce2) and torch.allclose(log_z, torch.logsumexp(logits, -1).mean())


def test_mup_lr_groups_and_readout():
    mup = ProxyLM(ModelConfig(width=128, depth=1, head_dim=16, parametrization="mup", base_width=32))
    mults = lr_multipliers(mup)
    for name, m in mults.items():
        expected = 32 / 128 if name.endswith(".weight") and ("qkv" in name or "proj" in name or "fc" in name
                                                             or name == "lm_head.weight") else 1.0
        assert m == expected, name
    assert mults["wte.weight"] == 1.0 and mults["blocks.0.ln1.weight"] == 1.0
    assert torch.count_nonzero(mup.lm_head.weight) == 0  # zero readout
    groups = param_groups(mup, lr=1e-2, weight_decay=1e-4, mode="independent")
    for g in groups:
        assert g["lr"] == pytest.approx(1e-2 * g["lr_mult"])
        decays = g["params"][0].ndim >= 2
        # independent: AdamW applies lr_t * weight_decay = s_t * lambda, whatever the group's LR
        assert g["lr"] * g["weight_decay"] == pytest.approx(1e-4 if decays else 0.0)
    coupled = param_groups(mup, lr=1e-2, weight_decay=0.1, mode="coupled")
    assert {g["weight_decay"] for g in coupled} == {0.0, 0.1}
    standard = ProxyLM(ModelConfig(width=128, depth=1, head_dim=16, base_width=32))
    assert set(lr_multipliers(standard).values()) == {1.0}
    scaled = ProxyLM(ModelConfig(width=128, depth=1, head_dim=16, parametrization="mup", base_width=32,
                                 readout_init="scaled"))
    assert scaled.lm_head.weight.std().item() == pytest.approx(128 ** -0.5 * 0.5, rel=0.1)


def test_lr_schedule_warmup_then_cosine_to_floor():
    assert lr_schedule(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_schedule(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_schedule(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_schedule(100, 10, 100, 0.1) == pytest.approx(0.1)


# -- divergence detection ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(97, 123, (20000,), generator=gen, dtype=torch.uint8)  # lowercase letters
    return ByteCorpus(train=text[:16000], val=text[16000:], source="synthetic", documents=1)


TINY = {**SETTINGS, "depth": 1, "head_dim": 8, "seq_len": 16, "batch_size": 4, "steps": 12, "warmup_steps": 2,
        "log_every": 2, "eval_batches": 2, "probe_step": 4}


def _train(run):
    while not run.done:
        record = run.train_step()
        if record:
            run.history.append(record)
    return run


def test_healthy_run_trains_and_records_diagnostics(corpus):
    run = _train(ProxyRun(TINY, 16, 1e-2, 0, corpus))
    assert not run.diverged and run.step == TINY["steps"]
    s = run.summary()
    assert s["final_loss"] < s["init_loss"] and s["diverged"] == 0.0
    keys = set(run.history[0])
    for k in ("train_loss", "grad_norm", "attn_logit_max_l0", "log_z_mean", "grad_rms_embed", "update_rms_embed",
              "rms_t_embed", "grad_rms_mlp0", "update_rms_mlp0", "rms_t_mlp0"):
        assert k in keys, k
    assert [h["step"] for h in run.history] == [0, 2, 4, 6, 8, 10, 11]  # every log_every steps and the last


def test_non_finite_loss_stops_the_run_as_diverged(corpus):
    run = _train(ProxyRun({**TINY, "grad_clip": 0.0}, 16, float("inf"), 0, corpus))
    assert run.diverged and run.step < TINY["steps"]
    s = run.summary()
    assert s["diverged"] == 1.0 and math.isnan(s["final_loss"])


def test_loss_far_above_loss_0_after_warmup_is_divergence(corpus):
    run = ProxyRun(TINY, 16, 1e-2, 0, corpus)
    run.loss_0 = 0.5  # any real training loss is now "far above" loss_0 (factor 1.5)
    _train(run)
    assert run.diverged and run.history[-1]["step"] == 2  # the first record after warmup (2 steps)
    ok = ProxyRun(TINY, 16, 1e-2, 0, corpus, diagnostics=False)
    assert not _train(ok).diverged and "grad_norm" not in ok.history[0]


# -- config and data -----------------------------------------------------------------------------


def test_presets_and_overrides():
    quick = load_config(None, "quick")
    assert quick["study"] == "proxy_lr-quick" and quick["settings"]["steps"] == 60
    assert quick["grid"]["widths"] == [32, 64] and quick["settings"]["seq_len"] == 128  # the rest from the file
    over = load_config(None, "quick", ["settings.steps=7", "settings.probe_step=3"])
    assert over["settings"]["steps"] == 7  # the command line wins over the preset
    assert load_config(None)["settings"]["steps"] > 60


@pytest.mark.parametrize("override, message", [
    (["settings.stepz=3"], "settings.stepz: unknown key"),
    (["grid.interventions=[nope]"], "unknown intervention 'nope'"),
    (["interventions.x={qk_layernorm: 3}", "grid.interventions=[x]"], "interventions.x.qk_layernorm: expected bool"),
    (["settings.parametrization=mop"], "settings.parametrization: must be one of"),
    (["grid.widths=[20]"], "width 20 is not a multiple of head_dim 16"),
    (["grid.lrs=[0]"], "grid.lrs: each LR must be a number > 0"),
])
def test_bad_config_is_one_line_error(override, message):
    with pytest.raises(ConfigError, match="^override '") as e:  # the override is what is wrong, not the file
        load_config(None, "default", override)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no preset 'slow'"):
        load_config(None, "slow")


def test_text_and_parquet_corpora(tmp_path):
    text = tmp_path / "a.txt"
    text.write_bytes(b"hello world\n" * 1000)
    c = load_corpus(str(text), val_fraction=0.1)
    assert len(c.train) + len(c.val) == 12000 and len(c.val) == 1200
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"document {i} " * 50 for i in range(200)]}), tmp_path / "d.parquet")
    assert len(load_corpus(str(tmp_path / "d.parquet"), column="body").val) > 0
    with pytest.raises(ConfigError, match="no column 'text'"):
        load_corpus(str(tmp_path / "d.parquet"))
    with pytest.raises(ConfigError, match="no such file"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_sensitivity_ratios_line():
    from orchestrator.proxy.study import sensitivity_ratios

    table = pd.DataFrame({"intervention": ["baseline", "baseline", "qk_layernorm", "qk_layernorm"],
                          "width": [32, 64, 32, 64], "lr_sensitivity": [0.2, 0.25, 0.1, 0.05]})
    assert sensitivity_ratios(table) == ["qk_layernorm / baseline LR sensitivity: w32 0.50x, w64 0.20x"]
    assert sensitivity_ratios(table[table["intervention"] == "qk_layernorm"]) == []  # no baseline: no ratio
