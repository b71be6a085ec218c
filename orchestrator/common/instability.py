"""Training-instability signals (Wortsman et al., 2023), pure: no Ray, no MLflow.

RMS_t of one parameter tensor after an Adam-style step t:

    v_hat = exp_avg_sq / (1 - beta2**t)            (exp_avg_sq after step t's update)
    RMS_t = sqrt(mean(g_t**2 / max(v_hat, eps**2)))

It is 1 at the first step (v_hat = g_1**2) and at most sqrt(1/(1 - beta2)) (per element
g**2 / v_hat <= (1 - beta2**t) / (1 - beta2)); it is large when the gradient is suddenly much
larger than the second moment remembers, the moment AdamW's update is too big and a loss
spike follows. StableAdamW divides each tensor's step by max(1, RMS_t).

Here: RMS_t from an optimizer's own state (torch's Adam/AdamW, or torch-optimi's StableAdamW,
whose exp_avg_sq is already bias-corrected), a rolling-median spike detector, and a loss
z-score against the loss's moving average. The soup trials (soup/train.py) and the LR proxies
(proxy/run.py) both use it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Iterable

import torch


def rms_t(grad: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float, beta2: float | None = None,
          step: float | None = None) -> torch.Tensor:
    """RMS_t of one tensor (a 0-dim tensor). `exp_avg_sq` is the optimizer's second moment after
    the step that used `grad`; with `beta2` and `step` it is bias-corrected by 1 - beta2**step,
    without them it is taken as corrected already (torch-optimi keeps it so)."""
    v_hat = exp_avg_sq if step is None else exp_avg_sq / (1 - beta2 ** step)
    return (grad.square() / v_hat.clamp_min(eps ** 2)).mean().sqrt()


def rms_t_bound(beta2: float) -> float:
    """The largest RMS_t an Adam-style second moment allows: sqrt(1 / (1 - beta2))."""
    return math.sqrt(1 / (1 - beta2))


def optimizer_rms_t(opt: torch.optim.Optimizer, param: torch.nn.Parameter,
                    group: dict[str, Any] | None = None) -> torch.Tensor | None:
    """RMS_t of `param` from `opt`'s state right after `opt.step()` (before the gradient is
    zeroed); None when the tensor has no gradient or no state yet. Knows torch's Adam/AdamW
    (per-tensor `step`, `betas`) and torch-optimi's optimizers (bias-corrected `exp_avg_sq`,
    the step count on the group). `group`: the param group holding `param` (found if not given)."""
    state = opt.state.get(param)
    if param.grad is None or not state or "exp_avg_sq" not in state:
        return None
    if group is None:
        group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    if type(opt).__module__.startswith("optimi"):  # debiased betas: exp_avg_sq is v_hat already
        return rms_t(param.grad, state["exp_avg_sq"], group["eps"])
    if "betas" not in group or "step" not in state:
        raise TypeError(f"RMS_t: {type(opt).__name__} keeps no Adam-style second moment this code knows")
    return rms_t(param.grad, state["exp_avg_sq"], group["eps"], group["betas"][1], float(state["step"]))


def tensor_rms_t(opt: torch.optim.Optimizer, params: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[str, float]:
    """RMS_t of every named tensor that has one, read back from the device in one transfer."""
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = [(name, r) for name, p in params if id(p) in groups
             and (r := optimizer_rms_t(opt, p, groups[id(p)])) is not None]
    if not named:
        return {}
    values = torch.stack([r.float() for _, r in named]).tolist()
    return {name: v for (name, _), v in zip(named, values)}


class SpikeDetector:
    """Marks a value above `threshold` x the median of the last `window` values (and above
    `floor`), once at least `min_history` values were seen. `update` adds the value to the
    history (a spike too: the median shrugs it off); `check` only tests it."""

    def __init__(self, threshold: float, window: int = 20, min_history: int = 3, floor: float = 1.0):
        self.threshold, self.floor, self.min_history = threshold, floor, min_history
        self.history: deque[float] = deque(maxlen=window)

    def median(self) -> float:
        return statistics.median(self.history) if self.history else float("nan")

    def check(self, value: float) -> bool:
        return (len(self.history) >= self.min_history and value > self.floor
                and value > self.threshold * statistics.median(self.history))

    def update(self, value: float) -> bool:
        spike = self.check(value)
        if math.isfinite(value):
            self.history.append(value)
        return spike

    def state(self) -> list[float]:
        return list(self.history)

    def restore(self, history: list[float]) -> None:
        self.history.clear()
        self.history.extend(float(v) for v in history)


class LossZ:
    """Z-score of each loss against the exponentially weighted mean and variance of the losses
    before it (`beta` 0.95: about the last 20 steps; the variance bias-corrected for its start
    at 0, as Adam's moments); 0 until `min_history` losses were seen."""

    def __init__(self, beta: float = 0.95, min_history: int = 10):
        self.beta, self.min_history = beta, min_history
        self.mean, self.var, self.count = 0.0, 0.0, 0

    def update(self, loss: float) -> float:
        if not math.isfinite(loss):
            return float("nan")
        var = self.var / (1 - self.beta ** (self.count - 1)) if self.count > 1 else 0.0
        z = (loss - self.mean) / math.sqrt(var) if self.count >= self.min_history and var > 0 else 0.0
        if self.count == 0:
            self.mean = loss
        else:  # exponentially weighted mean and variance (West, 1979)
            d = loss - self.mean
            self.mean += (1 - self.beta) * d
            self.var = self.beta * (self.var + (1 - self.beta) * d * d)
        self.count += 1
        return z

    def state(self) -> list[float]:
        return [self.mean, self.var, float(self.count)]

    def restore(self, state: list[float]) -> None:
        self.mean, self.var, self.count = float(state[0]), float(state[1]), int(state[2])

