"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022): per parameter entry,
sum_i F_i theta_i / sum_i F_i, each F_i (the side input `fisher`, one per ingredient) floored
at `floor`, so an entry no model's Fisher covers falls back to the plain mean, and with
`normalize` first divided by its L2 norm over the whole model (models with larger Fisher
values do not dominate). A tensor without a Fisher (BatchNorm statistics) is plainly averaged."""

import torch

from orchestrator.merging.methods import Method, Param, in_range, register


@register
class Fisher(Method):
    name = "fisher"
    reference = "https://arxiv.org/abs/2111.09832"
    side = ("fisher",)
    params = (
        Param("floor", float, 1e-6, "lower bound of every Fisher entry", in_range(0, float("inf"), low_open=True)),
        Param("normalize", bool, False, "divide each model's Fisher by its L2 norm over all tensors first"),
    )

    def prepare(self, inputs, base, p, device, side):
        if not p["normalize"]:
            return {"scales": [None] * len(inputs)}
        scales = []
        for fisher in side["fisher"]:  # one streamed pass over each Fisher: its squared L2 norm
            square = torch.zeros((), dtype=torch.float64, device=device)
            for name in fisher.names():
                square += fisher.get(name, device).double().pow(2).sum()
            scales.append(1.0 / square.sqrt().clamp(min=1e-30))
        return {"scales": scales}

    def merge(self, t, p):
        num = den = None
        for x, f, scale in zip(t.tensors, t.side["fisher"], t.prepared["scales"]):
            if f is None:
                w = torch.ones((), dtype=t.dtype, device=t.device)
            else:
                w = (f if scale is None else f * scale).clamp(min=p["floor"])
            num = w * x if num is None else num.add_(w * x)
            den = w if den is None else den + w
        return num / den
