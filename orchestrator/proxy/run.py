"""One proxy run: train the small LM at one (width, LR, intervention, seed), with the
instability diagnostics of Wortsman et al. (2023). No Ray and no MLflow in here.

Every `log_every` steps (and at the last step) the run records: training loss (mean
since the last record), max attention logit per layer on a fixed probe batch, mean
log Z of the output logits on that batch, the global gradient norm before clipping,
and for the token embedding ("embed") and block 0's first MLP layer ("mlp0") the
gradient RMS (after clipping: what AdamW sees), the update RMS and the StableAdamW
RMS_t = sqrt(mean(g^2 / max(u, eps^2))), u the bias-corrected second moment
(common/instability.py).

A run whose loss turns NaN/inf, or whose logged training loss is above
diverge_factor * loss_0 after warmup, stops and is recorded as diverged.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import torch

from orchestrator.common.instability import optimizer_rms_t
from orchestrator.proxy.data import ByteCorpus
from orchestrator.proxy.model import ModelConfig, ProxyLM, lm_loss, lr_schedule, param_groups

# Every setting of a proxy run, with its default; an intervention overrides some of them.
SETTINGS: dict[str, Any] = {
    "depth": 2,
    "head_dim": 16,
    "seq_len": 128,
    "batch_size": 16,
    "steps": 400,
    "warmup_steps": 40,
    "lr_floor": 0.1,  # cosine decays to lr_floor * peak LR
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1.0e-8,
    "grad_clip": 1.0,  # 0 = off
    "weight_decay": 1.0e-4,
    "weight_decay_mode": "independent",  # or "coupled" (PyTorch AdamW)
    "qk_layernorm": False,
    "z_loss": 0.0,  # coefficient; the paper uses 1e-4
    "parametrization": "standard",  # or "mup"
    "base_width": 64,
    "readout_init": "zero",  # muP readout: "zero" or "scaled"
    "log_every": 10,
    "eval_batches": 8,
    "probe_step": 100,  # the fixed early step whose max attention logit feeds the forecast
    "diverge_factor": 1.5,
}
CHOICES = {"weight_decay_mode": ("independent", "coupled"), "parametrization": ("standard", "mup"),
           "readout_init": ("zero", "scaled")}
WATCHED = {"embed": "wte.weight", "mlp0": "blocks.0.mlp.fc.weight"}  # layers with update diagnostics


def model_config(settings: dict[str, Any], width: int) -> ModelConfig:
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(width=width, **{k: v for k, v in settings.items() if k in names})


def rms(t: torch.Tensor) -> float:
    return t.float().square().mean().sqrt().item()


class ProxyRun:
    """Model, AdamW, schedule, and the step loop with (optional) diagnostics."""

    def __init__(self, settings: dict[str, Any], width: int, lr: float, seed: int, data: ByteCorpus,
                 diagnostics: bool = True):
        self.s, self.width, self.lr, self.data, self.diagnostics = settings, width, lr, data, diagnostics
        torch.manual_seed(seed)
        self.model = ProxyLM(model_config(settings, width))
        groups = param_groups(self.model, lr, settings["weight_decay"], settings["weight_decay_mode"])
        self.opt = torch.optim.AdamW(groups, betas=(settings["beta1"], settings["beta2"]), eps=settings["eps"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda t: lr_schedule(t, settings["warmup_steps"], settings["steps"], settings["lr_floor"]))
        self.gen = torch.Generator().manual_seed(seed)
        self.val = data.fixed_batches("val", settings["eval_batches"], settings["batch_size"], settings["seq_len"])
        self.probe = self.val[0][0][:8]  # the same 8 sequences for every run of a study
        self.params = dict(self.model.named_parameters())
        self.step, self.history, self.losses = 0, [], []
        self.loss_0 = self.evaluate()
        self.diverged = False

    @property
    def done(self) -> bool:
        return self.diverged or self.step >= self.s["steps"]

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [lm_loss(self.model(x), y)[1].item() for x, y in self.val]
        self.model.train()
        return sum(losses) / len(losses)

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; returns the record when this step is a logging step."""
        s = self.s
        is_record = self.step % s["log_every"] == 0 or self.step == s["steps"] - 1
        log = self.diagnostics and is_record  # the diagnostics cost a probe forward: only on record steps
        x, y = self.data.batch("train", s["batch_size"], s["seq_len"], self.gen)
        loss, _, _ = lm_loss(self.model(x), y, s["z_loss"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()
        self.losses.append(value)
        if not math.isfinite(value):
            self.diverged = True
            return {"step": self.step, "train_loss": value}
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), s["grad_clip"]) if s["grad_clip"]
                     else None)
        record = {}
        if log:
            before = {k: self.params[n].detach().clone() for k, n in WATCHED.items()}
            record["grad_norm"] = (grad_norm if grad_norm is not None else torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])).item()
            for k, n in WATCHED.items():
                record[f"grad_rms_{k}"] = rms(self.params[n].grad)
        record["lr"] = self.opt.param_groups[0]["lr"] / self.opt.param_groups[0]["lr_mult"]
        self.opt.step()
        self.sched.step()
        if log:
            for k, n in WATCHED.items():
                p = self.params[n]
                record[f"update_rms_{k}"] = rms(p.detach() - before[k])
                record[f"rms_t_{k}"] = optimizer_rms_t(self.opt, p).item()
            record.update(self.probe_diagnostics())
        self.step += 1
        if not is_record:
            return None
        window = self.losses[-s["log_every"]:]
        record = {"step": self.step - 1, "train_loss": sum(window) / len(window), **record}
        if self.step > s["warmup_steps"] and record["train_loss"] > s["diverge_factor"] * self.loss_0:
            self.diverged = True  # "stays far above loss_0": the mean over the last log_every steps
        return record

    @torch.no_grad()
    def probe_diagnostics(self) -> dict[str, float]:
        logits = self.model(self.probe, probe=True)
        per_layer = self.model.max_attn_logits()
        out = {f"attn_logit_max_l{i}": v for i, v in enumerate(per_layer)}
        out["attn_logit_max"] = max(per_layer)
        out["log_z_mean"] = torch.logsumexp(logits.float(), dim=-1).mean().item()
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}

    def state(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "step": self.step,
                "gen": self.gen.get_state(), "loss_0": self.loss_0, "history": self.history, "losses": self.losses,
                "diverged": self.diverged}

    def restore(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.model.load_state_dict(weights)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.gen.set_state(state["gen"])
        self.step, self.loss_0, self.history = state["step"], state["loss_0"], state["history"]
        self.losses, self.diverged = state["losses"], state["diverged"]

    def summary(self) -> dict[str, float]:
        """The run's metrics for the pool: losses, divergence and the forecast inputs."""
        final = float("nan") if self.diverged else self.evaluate()
        logged = [h for h in self.history if "attn_logit_max" in h]
        at_probe = [h for h in logged if h["step"] <= self.s["probe_step"]]
        out = {"init_loss": self.loss_0, "final_loss": final, "diverged": float(self.diverged),
               "steps_done": float(self.step), "params": float(sum(p.numel() for p in self.model.parameters()))}
        if logged:
            out["attn_logit_probe"] = (at_probe or logged)[-1]["attn_logit_max"]  # last record at or before probe_step
            out["attn_logit_peak"] = max(h["attn_logit_max"] for h in logged)
            out["attn_logit_final"] = logged[-1]["attn_logit_max"]
            out["log_z_final"] = logged[-1]["log_z_mean"]
        return out
