"""The small proxy: a decoder-only byte-level Transformer LM, in the style of nanoGPT.

Pre-LayerNorm, no biases, GELU MLP of width 4d, causal attention scaled 1/sqrt(d_head),
learned positions, untied readout. Heads grow with width (fixed head dimension), as in
Wortsman et al. (2023). Settings that the LR-sensitivity study switches:

- qk_layernorm: LayerNorm on queries and keys before the dot product.
- parametrization "mup" (muP-simple): each linear layer's LR is multiplied by
  base_fan_in / fan_in (see param_groups), and the readout starts at zero or scaled down.
- z-loss: lm_loss adds coef * (log Z)^2, log Z = logsumexp of the output logits.

The head dimension is fixed, so muP's 1/d attention scale would only change a constant
factor: attention stays at 1/sqrt(d_head) in both parametrizations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256  # bytes


@dataclass
class ModelConfig:
    width: int = 64
    depth: int = 2
    head_dim: int = 16
    seq_len: int = 128
    qk_layernorm: bool = False
    parametrization: str = "standard"  # or "mup"
    base_width: int = 64  # muP: the width at which LRs and inits equal the standard ones
    readout_init: str = "zero"  # muP readout: "zero" or "scaled" (std * sqrt(base_fan_in / fan_in))

    @property
    def n_head(self) -> int:
        return self.width // self.head_dim


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.q_norm = nn.LayerNorm(cfg.head_dim, bias=False) if cfg.qk_layernorm else None
        self.k_norm = nn.LayerNorm(cfg.head_dim, bias=False) if cfg.qk_layernorm else None
        self.max_logit = None  # set by a probe forward: max |<q,k>| / sqrt(d_head) over unmasked pairs

    def forward(self, x: torch.Tensor, probe: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        scale = 1.0 / math.sqrt(self.head_dim)
        if probe:  # the slow explicit path, only on the probe batch, to read the logits
            logits = (q @ k.transpose(-2, -1)) * scale
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            self.max_logit = logits.abs().masked_fill(~causal, 0).max().item()
            y = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.width, 4 * cfg.width, bias=False)
        self.proj = nn.Linear(4 * cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, bias=False)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, probe: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), probe)
        return x + self.mlp(self.ln2(x))


class ProxyLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.width % cfg.head_dim:
            raise ValueError(f"width {cfg.width} is not a multiple of head_dim {cfg.head_dim}")
        self.cfg = cfg
        self.wte = nn.Embedding(VOCAB, cfg.width)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width, bias=False)
        self.lm_head = nn.Linear(cfg.width, VOCAB, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Embeddings N(0, 1) and linear layers N(0, 1/fan_in): the fan-in init that muP
        # keeps for inputs and hidden layers. LayerNorm gains start at 1 (PyTorch's default).
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, std=1.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
        if self.cfg.parametrization == "mup":
            if self.cfg.readout_init == "zero":
                nn.init.zeros_(self.lm_head.weight)
            else:  # std proportional to 1/width, equal to the standard init at the base width
                self.lm_head.weight.mul_(math.sqrt(self.cfg.base_width / self.cfg.width))

    def forward(self, idx: torch.Tensor, probe: bool = False) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x, probe)
        return self.lm_head(self.ln_f(x))

    def max_attn_logits(self) -> list[float]:
        """Per-layer max attention logit from the last probe forward."""
        return [b.attn.max_logit for b in self.blocks]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0):
    """(loss to minimise, cross-entropy, mean log Z). z-loss = coef * mean((log Z)^2)."""
    logits = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(logits, targets.reshape(-1))
    log_z = torch.logsumexp(logits, dim=-1)
    loss = ce + z_loss * log_z.square().mean() if z_loss else ce
    return loss, ce, log_z.mean()


def lr_multipliers(model: ProxyLM) -> dict[str, float]:
    """Per-parameter LR multiplier. muP-simple: linear weights get base_fan_in / fan_in,
    where base_fan_in is the same layer's fan-in at the base width; embeddings and
    LayerNorm gains keep the base LR. Standard: 1 everywhere."""
    cfg = model.cfg
    linear = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for name, _ in model.named_parameters():
        if cfg.parametrization == "mup" and name in linear:
            fan_in = linear[name].in_features
            base_fan_in = fan_in * cfg.base_width / cfg.width  # every fan-in here scales with width
            out[name] = base_fan_in / fan_in
        else:
            out[name] = 1.0
    return out


def param_groups(model: ProxyLM, lr: float, weight_decay: float, mode: str) -> list[dict]:
    """AdamW parameter groups: LR multipliers, and decay on matrices only.

    mode "coupled" is PyTorch's AdamW (decay lr_t * lambda); "independent" decays by
    s_t * lambda, not multiplied by the peak LR (Wortsman et al.): the group's
    weight_decay is lambda / group_lr, since AdamW applies lr_t * weight_decay and
    lr_t = s_t * group_lr under the LR scheduler."""
    groups: dict[tuple[float, bool], list] = {}
    mults = lr_multipliers(model)
    for name, p in model.named_parameters():
        groups.setdefault((mults[name], p.ndim >= 2), []).append(p)
    out = []
    for (mult, decay), params in sorted(groups.items()):
        group_lr = lr * mult
        wd = (weight_decay if mode == "coupled" else weight_decay / group_lr) if decay else 0.0
        out.append({"params": params, "lr": group_lr, "weight_decay": wd, "lr_mult": mult})
    return out


def lr_schedule(step: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    """Multiplier of the peak LR: linear warmup, then cosine decay to `floor`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def count_params(cfg: ModelConfig) -> int:
    """Parameter count at any width, without allocating the weights."""
    with torch.device("meta"):
        return sum(p.numel() for p in ProxyLM(cfg).parameters())
