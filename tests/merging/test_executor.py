"""The executor: one tensor name at a time from files or state dicts, float32 accumulation
cast once, one-line errors for ingredients that do not match, output to a file that is
published whole, and every method on the meta device (a tensor made on another device, or a
host read inside the math, raises there)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchestrator.common.errors import MergeError
from orchestrator.merging import executor
from orchestrator.merging.methods import METHODS
from orchestrator.merging.sources import FileSource, StateSource


def make_state(seed: int, steps: int | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(3, 4, generator=g).to(dtype),
        "layer.bias": torch.randn(3, generator=g).to(dtype),
        "head.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(seed if steps is None else steps, dtype=torch.int64),
    }


def exact_mean(states, key):
    return torch.stack([s[key].double() for s in states]).mean(0)


def uniform(states, **kw):
    return executor.merge("linear", [StateSource(s, f"s{i}") for i, s in enumerate(states)], **kw).state


def interpolate(zero, fine, alpha):
    return executor.merge("linear", [StateSource(zero), StateSource(fine)],
                          params={"weights": [1 - alpha, alpha], "normalize": False}).state


@pytest.mark.parametrize("n", [1, 2, 5])
def test_uniform_soup_is_the_elementwise_mean(n):
    states = [make_state(100 + i) for i in range(n)]
    soup = uniform(states)
    assert list(soup) == list(states[0])
    for key in ("layer.weight", "layer.bias", "head.weight"):
        assert soup[key].dtype == states[0][key].dtype and soup[key].shape == states[0][key].shape
        torch.testing.assert_close(soup[key].double(), exact_mean(states, key), rtol=1e-6, atol=1e-6)
    assert soup["bn.num_batches_tracked"].item() == 100  # integer buffers: the first ingredient's


def test_uniform_soup_of_one_is_a_copy_not_an_alias():
    state = make_state(1)
    soup = uniform([state])
    for key in state:
        assert torch.equal(soup[key], state[key]) and soup[key].data_ptr() != state[key].data_ptr()


def test_uniform_soup_of_exact_values_and_of_nothing():
    states = [{"w": torch.full((2, 2), float(v))} for v in (1, 2, 3, 4, 5)]
    assert torch.equal(uniform(states)["w"], torch.full((2, 2), 3.0))
    with pytest.raises(MergeError, match="at least 1"):
        uniform([])


def test_a_bf16_soup_is_the_float32_mean_cast_once():
    """Mixing in bf16 at every step rounds N times; the engine sums in float32 and casts once."""
    g = torch.Generator().manual_seed(0)
    states = [{"w": (torch.randn(4096, generator=g) * 0.02 + 1).bfloat16()} for _ in range(8)]
    mean = (sum(s["w"].float() for s in states) / 8).bfloat16()
    assert torch.equal(uniform(states)["w"], mean)
    running = states[0]["w"]
    for n, s in enumerate(states[1:], start=1):  # the old running mean, cast back every step
        running = (running.float() * (n / (n + 1)) + s["w"].float() / (n + 1)).bfloat16()
    assert not torch.equal(running, mean)  # so the difference is real


def test_interpolation_end_points_are_exact_in_every_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        zero, fine = {"w": torch.randn(16, generator=g).to(dtype)}, {"w": torch.randn(16, generator=g).to(dtype)}
        assert torch.equal(interpolate(zero, fine, 0.0)["w"], zero["w"])
        assert torch.equal(interpolate(zero, fine, 1.0)["w"], fine["w"])
        assert interpolate(zero, fine, 0.5)["w"].dtype == dtype
    zero, fine = {"w": torch.zeros(5)}, {"w": torch.full((5,), 10.0)}
    for alpha in (0.1, 0.3, 0.7):
        torch.testing.assert_close(interpolate(zero, fine, alpha)["w"], torch.full((5,), 10.0 * alpha))


def test_float64_is_not_rounded_through_float32():
    g = torch.Generator().manual_seed(0)
    zero = {"w": torch.randn(16, generator=g, dtype=torch.float64)}
    assert torch.equal(uniform([zero, zero])["w"], zero["w"])
    third = {"w": zero["w"] / 3}
    assert torch.equal(uniform([third, third, third])["w"], third["w"])


@pytest.mark.parametrize("change, message", [
    ("shape", r"s1: tensor 'layer.bias' has shape \[4\], the first ingredient \(s0\) has \[3\]"),
    ("missing", r"s1: lacks tensor 'layer.bias', which the first ingredient \(s0\) has"),
    ("extra", r"s1: has tensor 'other.weight', which the first ingredient \(s0\) does not have"),
    ("dtype", r"s1: tensor 'layer.bias' is bfloat16, the first ingredient \(s0\) is float32"),
])
def test_ingredients_that_do_not_match_are_one_line_errors(change, message):
    a, b = make_state(1), make_state(2)
    if change == "shape":
        b["layer.bias"] = torch.zeros(4)
    elif change == "missing":
        del b["layer.bias"]
    elif change == "extra":
        b["other.weight"] = torch.zeros(1)
    else:
        b["layer.bias"] = b["layer.bias"].bfloat16()
    with pytest.raises(MergeError, match=message) as err:
        uniform([a, b])
    assert "\n" not in str(err.value)


class Counting(StateSource):
    """A source that counts its reads and how many of its tensors are alive at once."""

    def __init__(self, state, log):
        super().__init__(state)
        self.log = log

    def get(self, name, device):
        self.log.append(name)
        return super().get(name, device).clone()


def test_each_ingredient_tensor_is_read_once_per_name_in_one_pass():
    log: list[str] = []
    states = [make_state(i) for i in range(4)]
    executor.merge("ties", [Counting(s, log) for s in states], base=StateSource(make_state(9)), params={"k": 0.5})
    floating = ["layer.weight", "layer.bias", "head.weight"]
    assert log == [name for name in floating for _ in range(4)]  # name by name, each ingredient once


def write(folder, name, state):
    path = os.path.join(folder, f"{name}.safetensors")
    save_file(state, path)
    return FileSource(path)


def bf16_files(tmp_path, n=3):
    g = torch.Generator().manual_seed(0)
    base = {"embed.weight": torch.randn(64, 16, generator=g).bfloat16(), "norm.weight": torch.ones(16).bfloat16(),
            "layer.0.q.weight": torch.randn(16, 16, generator=g).bfloat16(), "steps": torch.tensor(3)}
    fines = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
              for k, v in base.items()} for _ in range(n)]
    return write(tmp_path, "base", base), [write(tmp_path, f"ft{i}", f) for i, f in enumerate(fines)], fines


# every registered method with settings that exercise its code paths
ON_META = [("linear", {}), ("linear", {"weights": [0.2, 0.3, 0.5], "normalize": False}),
           ("task_arithmetic", {"lambda": 0.5}), ("ties", {"k": 0.2}), ("ties", {"k": 0.2, "scope": "global"}),
           ("dare_ties", {"p": 0.5}), ("dare_linear", {"p": 0.3, "rescale": "l1"}), ("model_stock", {}),
           ("fisher", {}), ("fisher", {"normalize": True})]


def test_the_meta_cases_cover_every_registered_method():
    assert {name for name, _ in ON_META} == set(METHODS)


@pytest.mark.parametrize("method, params", ON_META)
def test_every_method_runs_on_the_meta_device(tmp_path, method, params):
    """The math never makes a tensor on another device and never asks the host for a value."""
    base, fines, _ = bf16_files(tmp_path)
    side = {"fisher": [write(tmp_path, f"f{i}", {"embed.weight": torch.rand(64, 16), "layer.0.q.weight": torch.rand(16, 16)})
                       for i in range(3)]} if method == "fisher" else None
    merged = executor.merge(method, fines, base=base, params=params, side=side, device="meta")
    assert {v.device.type for v in merged.state.values()} == {"meta"}
    assert {k: v.dtype for k, v in merged.state.items()} == {k: base.spec(k)[0] for k in base.names()}
    if METHODS[method].needs_base and method != "model_stock":
        executor.apply_delta(base, executor.merge_delta(method, fines, base=base, params=params, device="meta"), 0.5, "meta")


def test_a_merge_written_to_a_file_equals_the_one_in_memory_and_safetensors_reads_it(tmp_path):
    base, fines, _ = bf16_files(tmp_path)
    in_memory = executor.merge("ties", fines, base=base, params={"k": 0.3}).state
    seen = []
    out = executor.merge("ties", fines, base=base, params={"k": 0.3}, out=str(tmp_path / "out" / "merged.safetensors"),
                         metadata={"method": "ties"}, progress=lambda done, total: seen.append((done, total)))
    assert out.state is None and seen[-1] == (4, 4)
    on_disk = load_file(out.path)
    assert list(on_disk) == list(in_memory) and all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)
    assert FileSource(out.path).metadata == {"method": "ties"}


def test_a_merge_that_fails_midway_leaves_no_file(tmp_path):
    base, fines, _ = bf16_files(tmp_path)

    def boom(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        executor.merge("linear", fines, out=str(tmp_path / "out.safetensors"), progress=boom)
    assert sorted(os.listdir(tmp_path)) == sorted(f"{n}.safetensors" for n in ["base", "ft0", "ft1", "ft2"])
