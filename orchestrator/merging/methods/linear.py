"""Linear: the weighted mean of the ingredients (Wortsman et al., ICML 2022: the uniform soup;
WiSE-FT's interpolation is the weighted sum (1 - alpha) theta_0 + alpha theta_ft).
Summed in float32 in the ingredients' order, divided once: a bf16 soup is the float32 mean
cast to bf16, and the soup of N equal-weight ingredients is the same bits as mergekit's."""

from orchestrator.common.errors import MergeError
from orchestrator.merging.methods import Method, Param, register


def _weights_rule(v):
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(w, (int, float)) for w in v):
        return f"must be a non-empty list of numbers, got {v!r}"
    return None


@register
class Linear(Method):
    name = "linear"
    reference = "https://arxiv.org/abs/2203.05482"
    params = (
        Param("weights", list, None, "one weight per ingredient (default: all 1)", _weights_rule),
        Param("normalize", bool, True, "divide by the sum of the weights (a weighted mean); false: the weighted sum"),
    )

    def prepare(self, inputs, base, p, device, side):
        if p["weights"] is not None and len(p["weights"]) != len(inputs):
            raise MergeError(f"merge method linear: {len(p['weights'])} weights for {len(inputs)} ingredients")
        if p["normalize"] and sum(p["weights"] or [1.0] * len(inputs)) == 0:
            raise MergeError("merge method linear: the weights sum to 0, so they cannot be normalized")
        return {}

    def merge(self, t, p):
        weights = p["weights"] or [1.0] * len(t.tensors)
        total = None
        for w, x in zip(weights, t.tensors):
            total = x * w if total is None else total.add_(x, alpha=w)
        return total.div_(sum(weights)) if p["normalize"] else total
