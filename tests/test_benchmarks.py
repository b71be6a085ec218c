"""The benchmarks (bench/) in tiny mode: each runs as a process of its own, exactly as
documented (`python bench/bench_x.py --tiny`), and must print the numbers it measures.

Each runs in an empty folder with its own TMPDIR and pretrained-weights cache, so nothing is
left behind; a benchmark that starts Ray gets a private Ray temp folder and a Ray bound to
127.0.0.1, and its process group is killed at the end (Ray processes included, if any are left).
"""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
NUMBER = r"([-+]?\d+(?:\.\d+)?)"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One pretrained-weights cache for the module: the tiny glyph task is pretrained once."""
    return tmp_path_factory.mktemp("bench-cache")


def run_bench(script: str, workdir: Path, *args: str, timeout: int = 300) -> str:
    """`python bench/<script> --tiny ...` with cwd `workdir`; returns its output (exit code 0)."""
    tmpdir = workdir.parent / f"{workdir.name}-tmpdir"
    tmpdir.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rayb", dir="/tmp")  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=str(tmpdir), RAY_TMPDIR=ray_tmp,
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # Ray's node IP = 127.0.0.1: nothing listens outside
    proc = subprocess.Popen([sys.executable, str(BENCH / script), "--tiny", *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only the group this test started
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{out[-6000:]}"
    left = sorted(p.name for p in [*workdir.iterdir(), *tmpdir.glob("bench_*")])
    assert left == [], f"{script} left files behind: {left}"
    return out


def number(pattern: str, text: str) -> float:
    """The number the pattern's first group captures, which must be finite."""
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no match for {pattern!r} in:\n{text[-4000:]}"
    value = float(m.group(1))
    assert math.isfinite(value), f"{pattern!r}: {value}"
    return value


def test_bench_fanout_tiny(tmp_path, cache_dir):
    out = run_bench("bench_fanout.py", tmp_path, "--cache-dir", str(cache_dir))
    assert "K=2 configs" in out
    assert "configs Tune ran == configs the loop ran: yes" in out
    assert "trials errored: 0; pool rows with status ok: 2/2; MLflow trial runs: 2/2" in out
    loop = number(rf"^plain loop, 2 threads, faster run \(used below\)\s+{NUMBER} s", out)
    ref = number(rf"^reference: plain loop, 1 thread\(s\), last\s+{NUMBER} s", out)
    ray_init = number(rf"^orchestrator: ray\.init \(tune\.connect\)\s+{NUMBER} s", out)
    train = number(rf"^orchestrator: train \(SoupSweep\.train\)\s+{NUMBER} s", out)
    assert loop > 0 and ref > 0 and ray_init > 0 and train > 0
    ratio = number(rf"^ratio orchestrator/loop, train only\s+{NUMBER}x", out)
    assert (train - 0.05) / (loop + 0.05) - 0.01 <= ratio <= (train + 0.05) / (loop - 0.05) + 0.01  # printed rounded
    overhead = number(rf"^per-trial overhead = .* = {NUMBER} core-s per trial", out)
    assert overhead == pytest.approx((train - loop) * 2 / 2, abs=0.2)
    inside = number(rf"^inside the trial functions \(Tune time_total_s, summed\) {NUMBER} slot-s", out)
    assert 0 < inside <= train * 2 + 0.1  # two slots
    assert number(rf"^training seconds per epoch in the trials .*: median {NUMBER};", out) > 0
    assert number(rf"^training seconds per epoch in the loop .*: median {NUMBER} ", out) > 0
    assert re.search(r"^target: orchestrator not slower than the loop .*: (MET|NOT MET) ", out, re.MULTILINE)


def test_bench_greedy_tiny(tmp_path, cache_dir):
    out = run_bench("bench_greedy.py", tmp_path, "--cache-dir", str(cache_dir))
    sd_kib = number(rf"^one state dict = {NUMBER} KiB", out)
    assert sd_kib > 0
    rows = {}
    for line in out.splitlines():  # N verify greedy s/ingr held-out load outside% recipe | MB x-sd -eval final kept
        m = re.fullmatch(r"\s*(\d+)((?:\s+[-\d.]+){7}) \|((?:\s+[-\d.]+){4})\s+(\d+)", line)
        if m:
            rows[int(m.group(1))] = ([float(x) for x in m.group(2).split()], [float(x) for x in m.group(3).split()],
                                     int(m.group(4)))
    assert sorted(rows) == [2, 3], out[-4000:]
    for n, (times, memory, kept) in rows.items():
        verify, greedy, per_ingredient, heldout, load, outside, recipe = times
        assert all(math.isfinite(x) for x in times + memory)
        assert greedy > 0 and 0 < heldout <= greedy and recipe >= greedy and verify >= 0 and load >= 0
        assert per_ingredient == pytest.approx(greedy / n, abs=1e-3)
        assert 0 <= outside < 100
        assert memory[0] >= 0 and memory[3] >= 0  # peak MB above the RSS before the recipe
        assert 1 <= kept <= n
    worst = number(rf"^target: time outside held-out evaluations < 10% of greedy soup time: .*\(worst {NUMBER}%\)", out)
    assert worst == pytest.approx(max(t[5] for t, _, _ in rows.values()), abs=0.1)
    assert re.search(r"^target: greedy peak flat in N and < 4x a state dict: (MET|NOT MET)", out, re.MULTILINE)


def test_bench_cook_tiny(tmp_path, cache_dir):
    out = run_bench("bench_cook.py", tmp_path, "--cache-dir", str(cache_dir))
    one = number(rf"^\s+1\s+{NUMBER}\s+1\.00$", out)
    two, ratio = number(rf"^\s+2\s+{NUMBER}\s+", out), number(rf"^\s+2\s+[\d.]+\s+{NUMBER}$", out)
    assert one > 0 and two > 0
    assert (two - 0.05) / (one + 0.05) - 0.005 <= ratio <= (two + 0.05) / (one - 0.05) + 0.005  # times printed rounded
    assert re.search(r"; 2 workers vs 1: [\d.]+x \(target <= 0.60x\); dishes bit for bit equal: True$", out, re.MULTILINE)
    rows = {}
    for line in out.splitlines():  # recipe | N=2: s x-sd | N=3: s x-sd
        m = re.fullmatch(r"\s*(\w+) \|\s+([-\d.]+)\s+([-\d.]+) \|\s+([-\d.]+)\s+([-\d.]+)", line)
        if m:
            rows[m.group(1)] = [float(x) for x in m.groups()[1:]]
    assert sorted(rows) == sorted(["uniform_soup", "task_arithmetic", "ties", "dare", "model_stock", "fisher"]), out
    assert all(r[0] > 0 and r[2] > 0 and all(math.isfinite(x) for x in r) for r in rows.values())
    pool_s = number(rf"^reading 3 ingredients in a worker: from the pool {NUMBER} s", out)
    store_s = number(rf"from the object store {NUMBER} s", out)
    assert pool_s > 0 and store_s > 0
    ratio = number(rf"object store / pool = {NUMBER}x$", out)  # of the unrounded times; those printed to 1 ms
    assert (store_s - 5e-4) / (pool_s + 5e-4) - 0.005 <= ratio <= (store_s + 5e-4) / (pool_s - 5e-4) + 0.005


def test_bench_pool_reads_tiny(tmp_path, cache_dir):
    out = run_bench("bench_pool_reads.py", tmp_path, "--cache-dir", str(cache_dir))
    assert "reads per cook: 4 weights files" in out, out[-3000:]  # 3 ingredients + the pretrained weights
    cook = {m.group(1): [float(x) for x in m.group(2).split()] for m in
            re.finditer(r"^(before|after)((?:\s+[\d.]+){4})$", out, re.MULTILINE)}
    assert sorted(cook) == ["after", "before"], out[-3000:]
    assert cook["after"][0] == 1.0  # each file's bytes read through storage exactly once
    assert cook["before"][0] > 2.0  # the check, then every recipe's load, read it again
    assert cook["before"][2] == cook["after"][2] > 1  # the same loads
    peak = {m.group(1): float(m.group(2)) for m in
            re.finditer(rf"^(before|after)\s+{NUMBER}\s+[\d.]+$", out, re.MULTILINE)}
    assert sorted(peak) == ["after", "before"] and 0 < peak["after"] < peak["before"], out[-3000:]


def test_bench_proxy_tiny(tmp_path):
    out = run_bench("bench_proxy.py", tmp_path)
    assert "20 steps x 16 x 128 tokens" in out
    for mode in ("bare", "diag off", "diag on"):
        best = number(rf"^{mode}\s+{NUMBER}\s+\d+\s+[-+]\d", out)
        assert best > 1000, mode  # tokens per CPU second: thousands even on a loaded CPU
    number(rf"^diagnostics cost \(on vs off, best of 1\): {NUMBER}%", out)
    m = re.search(r"^(\d+)/(\d+) runs analysed", out, re.MULTILINE)
    assert m and m.group(1) == m.group(2) == "2", out[-4000:]
    assert number(rf"^quick preset study .* wall time: {NUMBER} s", out) > 0


def test_soup_seeds_tiny(tmp_path):
    out = run_bench("soup_seeds.py", tmp_path)
    assert "over 2 search seeds (0, 1): min / median / max" in out
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.splitlines()
            if line.split() and line.split()[0] in ("zero_shot", "best_individual", "greedy_soup", "wise_ft_greedy_soup")}
    assert sorted(rows) == ["best_individual", "greedy_soup", "wise_ft_greedy_soup", "zero_shot"], out[-3000:]
    for name, cells in rows.items():
        assert len(cells) == 12 and all(0 <= c <= 1 for c in cells), name  # 4 metrics x min/median/max
        assert all(cells[i] <= cells[i + 1] <= cells[i + 2] for i in range(0, 12, 3)), name
    assert rows["greedy_soup"][0] >= rows["best_individual"][0]  # never below on val in any seed, so nor its min
    diffs = number(rf"^greedy soup - best individual, id_acc: {NUMBER}", out)
    assert -1 <= diffs <= 1


def test_bench_dynamics_tiny(tmp_path, cache_dir):
    out = run_bench("bench_dynamics.py", tmp_path, "--cache-dir", str(cache_dir))
    assert "899 training examples, 1 epoch(s) per run, 1 pair(s) per setting" in out
    for mixup in ("0", "0.2"):
        off, on, ratio = (float(x) for x in re.search(
            rf"^\s+{re.escape(mixup)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x", out, re.MULTILINE).groups())
        assert off > 0 and on > 0, mixup
        low, high = (on - 5e-4) / (off + 5e-4), (on + 5e-4) / (off - 5e-4)  # times printed to 3 decimals
        assert low - 5e-4 <= ratio <= high + 5e-4, mixup
    number(rf"^recording overhead without mixup: {NUMBER}x", out)
    assert number(rf"^writing one trial's dynamics \(899 rows\) into a pool: {NUMBER} ms", out) > 0


def test_bench_ftft_tiny(tmp_path):
    out = run_bench("bench_ftft.py", tmp_path, timeout=600)
    rows = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in
            re.finditer(r"^(reference|all|ambiguous|random)(?: \+ ref)?\s+(\d+)\s+(\d+)\s", out, re.MULTILINE)}
    assert sorted(rows) == ["all", "ambiguous", "random", "reference"], out[-3000:]
    assert all(trials == 2 for trials, _ in rows.values())  # --tiny: 2 trials per arm
    examples = {name: n for name, (_, n) in rows.items()}
    assert examples["all"] == examples["reference"] == 899
    assert examples["ambiguous"] == examples["random"] == round(0.33 * 899)  # the third each trained on
    number(rf"^ambiguous - random third: best individual ID {NUMBER}", out)
    assert number(rf"at {NUMBER}x the example-steps", out) > 0


def test_bench_merge_scale_tiny(tmp_path):
    """Ours and mergekit on the same LLM-shaped files: the outputs agree as the bench states."""
    out = run_bench("bench_merge_scale.py", tmp_path)
    rows = {}
    for line in out.splitlines():  # merge | ours s +start mergekit s +start ratio | RSS ... | outputs
        m = re.fullmatch(r"(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x \|\s+(\d+)\s+(\d+)\s+(-?\d+)"
                         r"\s+(-?\d+) \| (.*)", line)
        if m:
            rows[m.group(1)] = ([float(x) for x in m.groups()[1:10]], m.group(11))
    assert sorted(rows) == ["dare_ties", "linear", "model_stock", "task_arithmetic", "ties"], out[-3000:]
    for name, (numbers, outputs) in rows.items():
        ours, ours_total, theirs, theirs_total, ratio = numbers[:5]
        assert 0 < ours <= ours_total and 0 < theirs <= theirs_total, name
        assert ratio == pytest.approx(ours_total / theirs_total, abs=0.01), name
        assert numbers[5] > 0 and numbers[6] > 0, name  # peak RSS of each process
        if name == "ties":  # exactly k kept on both sides; they differ only among magnitudes tied at the cut
            assert re.fullmatch(r"[\d.]+% of entries differ, all of them at a tied cut", outputs), outputs
        elif name == "dare_ties":
            assert outputs == "random masks differ by design: not compared"
        else:  # ours within 1 bf16 ulp of the float64 merge everywhere
            assert re.fullmatch(r"> 1 bf16 ulp from the float64 merge: ours 0, mergekit \d+ of [\d,]+; apart: \d+",
                                outputs), outputs
    assert re.search(r"^target: every merge's .*: (MET|NOT MET)$", out, re.MULTILINE)
