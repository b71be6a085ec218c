"""Benchmark: the merge engine against mergekit on LLM-shaped checkpoints, side by side.

The files (made here, in a temp folder): a base model and N fine-tunes shaped like a
Llama-style decoder (token embedding, per layer q/k/v/o and gate/up/down projections and
two norms, a final norm and an LM head), bf16 safetensors written by the safetensors
package. Fine-tune i = base + a shared direction + noise of its own (each fine-tune also
scales the direction differently), so the task vectors agree in part and TIES's sign
election has something to elect.

Each merge runs in a fresh process for each side (ours: orchestrator.merging.executor.merge
on the files, output streamed to a safetensors file; mergekit: mergekit-pytorch's own
command, `merge_raw_pytorch.main`, with `dtype: float32` and `out_dtype: bfloat16`), both
with the same torch threads and, with --device cuda, on the GPU (mergekit's --cuda). The
input files are read once before (both sides find them in the page cache). Measured:
  start s    the process's imports (torch; mergekit also imports transformers and more)
  merge s    the merge itself: reading the inputs, the math, writing the output file
  peak RSS   the process's high-water resident memory (VmHWM), imports included; and
             above the RSS just before the merge
  GPU peak   torch.cuda.max_memory_allocated in the merge (--device cuda), in models
The outputs are compared tensor by tensor in float32:
  linear (uniform soup), task arithmetic (lambda 0.5), Model Stock: each side's entries more
    than 1 bf16 ulp from the float64 merge (target for ours: none), and the two sides' entries
    more than 1 ulp apart; a difference within float32's own rounding of terms of theta_0's size
    counts as none (a result near 0 is the difference of such terms);
  TIES (k 0.2): both keep exactly max(1, int(k n)) entries per task-vector tensor, but pick
    different ones among magnitudes tied with the cut (ours lowest index first, mergekit's
    argsort: unspecified); every entry that differs must sit where some ingredient's |tau|
    equals its cut (target: all of them);
  DARE-TIES (p 0.5): random masks (ours a hash of seed, ingredient, tensor and index, the
    same on every device; mergekit torch.bernoulli): not compared, timed only.

Targets (ratios measured in this one run): every merge's start + merge time and peak RSS at
most mergekit's; on a GPU, peak GPU memory at most 3x one model whatever N.

  python bench/bench_merge_scale.py                      # 100M-parameter shape, N = 4, CPU
  python bench/bench_merge_scale.py --shape 0.75b --n 4 8 --device cuda
  python bench/bench_merge_scale.py --tiny               # seconds; what the tests run

Needs mergekit (`pip install -e ".[test]"` brings it; LGPL, a test dependency only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`
from bench import common  # noqa: E402

# vocabulary, hidden size, MLP size, layers
SHAPES = {"tiny": (512, 64, 160, 2), "100m": (32000, 768, 2048, 7), "0.75b": (32000, 2048, 5504, 12)}
# method -> (our method and settings, mergekit's merge_method, its per-model and its shared parameters, base?)
MERGES = {
    "linear": (("linear", {}), ("linear", {"weight": 1.0}, {}, False)),
    "task_arithmetic": (("task_arithmetic", {"lambda": 0.5}), ("task_arithmetic", {"weight": 1.0}, {"lambda": 0.5}, True)),
    "ties": (("ties", {"k": 0.2}), ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}, True)),
    "dare_ties": (("dare_ties", {"p": 0.5, "rescale": "l1"}),
                  ("dare_ties", {"weight": 1.0, "density": 0.5}, {"normalize": True, "rescale": True}, True)),
    "model_stock": (("model_stock", {}), ("model_stock", {}, {}, True)),
}
SIDES = ("ours", "mergekit")


def parse_args(argv=None):
    p = common.parser("python bench/bench_merge_scale.py", __doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape (default: 100m; tiny with --tiny)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="numbers of fine-tunes (default: 4; 3 with --tiny)")
    p.add_argument("--methods", nargs="+", choices=list(MERGES), default=list(MERGES), help="merges to run")
    p.add_argument("--device", default="cpu", help="where both sides compute: cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on both sides (default: torch's own)")
    p.add_argument("--repeats", type=int, default=1, help="runs per side and merge, median shown (default: 1)")
    common.add_keep_flag(p, "the checkpoints and outputs")
    common.add_tiny_flag(p, "the tiny shape, N = 3, each side's merges in one process")
    p.add_argument("--child", nargs=3, metavar=("SIDE", "FOLDER", "N"), help=argparse.SUPPRESS)
    p.add_argument("--child-methods", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.tiny else "100m")
    args.n = args.n or ([3] if args.tiny else [4])
    if any(n < 2 for n in args.n) or args.repeats < 1:
        p.error("--n values must be >= 2 (Model Stock needs two fine-tunes) and --repeats >= 1")
    return args


# -- the checkpoints ---------------------------------------------------------------------------


def tensor_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    vocab, hidden, mlp, layers = SHAPES[shape]
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}"
        out += [(f"{pre}.input_layernorm.weight", (hidden,))]
        out += [(f"{pre}.self_attn.{p}_proj.weight", (hidden, hidden)) for p in "qkvo"]
        out += [(f"{pre}.post_attention_layernorm.weight", (hidden,))]
        out += [(f"{pre}.mlp.gate_proj.weight", (mlp, hidden)), (f"{pre}.mlp.up_proj.weight", (mlp, hidden)),
                (f"{pre}.mlp.down_proj.weight", (hidden, mlp))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def make_checkpoints(folder: str, shape: str, n: int, device: str) -> tuple[int, int]:
    """base.safetensors and ft0..ft{n-1}.safetensors; returns (parameters, bytes of one model)."""
    import torch
    from safetensors.torch import save_file

    gen_device = device if device.startswith("cuda") else "cpu"
    specs = tensor_shapes(shape)

    def draw(seed: int, shp, scale: float):
        g = torch.Generator(device=gen_device).manual_seed(seed)
        return torch.randn(shp, generator=g, device=gen_device) * scale

    base = {}
    for j, (name, shp) in enumerate(specs):
        base[name] = (1 + draw(j, shp, 0.02)) if len(shp) == 1 else draw(j, shp, 0.02)
    save_file({k: v.bfloat16().cpu() for k, v in base.items()}, os.path.join(folder, "base.safetensors"))
    for i in range(n):
        fine = {}
        for j, (name, shp) in enumerate(specs):
            direction = draw(10_000 + j, shp, 0.002)  # shared by every fine-tune
            fine[name] = (base[name] + (0.5 + 0.25 * i) * direction + draw(1_000_000 * (i + 1) + j, shp, 0.002)
                          ).bfloat16().cpu()
        save_file(fine, os.path.join(folder, f"ft{i}.safetensors"))
        del fine
    params = sum(v.numel() for v in base.values())
    return params, params * 2


def read_all(folder: str) -> None:
    """Read every input file once, so both sides find them in the page cache."""
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            while f.read(64 << 20):
                pass


# -- one side's merges, in a fresh process --------------------------------------------------------


def child(args) -> int:
    t0 = time.perf_counter()
    side, folder, n = args.child[0], args.child[1], int(args.child[2])
    import torch

    if side == "mergekit":
        import yaml
        from mergekit.scripts.merge_raw_pytorch import main as mergekit_main
    else:
        from orchestrator.merging import executor
        from orchestrator.merging.sources import FileSource
    start = time.perf_counter() - t0
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    inputs = [os.path.join(folder, f"ft{i}.safetensors") for i in range(n)]
    base = os.path.join(folder, "base.safetensors")
    results = []
    for method in args.child_methods:
        (ours, ours_params), (theirs, per_model, shared, with_base) = MERGES[method]
        out = os.path.join(folder, "out", f"{side}-{method}-{n}")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with common.PeakRSS() as mem:
            t = time.perf_counter()
            if side == "ours":
                executor.merge(ours, [FileSource(p) for p in inputs], base=FileSource(base), params=ours_params,
                               device=args.device, out=os.path.join(out, "model.safetensors"))
            else:
                config = {"merge_method": theirs, "dtype": "float32", "out_dtype": "bfloat16", "parameters": shared,
                          "models": [{"model": p, "parameters": per_model} for p in inputs]}
                if with_base:
                    config["base_model"] = base
                config_path = out + ".yaml"
                os.makedirs(os.path.dirname(config_path), exist_ok=True)
                with open(config_path, "w") as f:
                    yaml.safe_dump(config, f)
                cli = [config_path, out, *(["--cuda"] if cuda else [])]
                with common.captured(out + ".log"):  # its progress bars
                    mergekit_main.main(cli, standalone_mode=False)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        results.append({"method": method, "seconds": seconds, "rss_above": mem.above, "rss_peak": mem.base + mem.above,
                        "gpu_peak": torch.cuda.max_memory_allocated() if cuda else 0, "out": out})
    common.print_result({"side": side, "start": start, "threads": torch.get_num_threads(), "merges": results})
    return 0


def run_side(side: str, folder: str, n: int, methods: list[str], args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, folder, str(n), "--child-methods", *methods,
           "--device", args.device, "--threads", str(args.threads)]
    t = time.perf_counter()
    result = common.run_child(cmd, common.child_env(), f"bench_merge_scale: {side} {' '.join(methods)}")
    result["wall"] = time.perf_counter() - t
    return result


# -- comparing outputs --------------------------------------------------------------------------------


def bf16_ulps(out, ref, zero):
    """|out - ref| in bf16 spacings at |ref| (float32 / float64 tensors), a difference within
    float32's own rounding of terms of theta_0's size (2^-21 |theta_0|) counted as 0: a result near
    0 is the difference of such terms, which no float32 computation gets closer than that."""
    import torch

    _, exponent = torch.frexp(ref.abs().float())
    spacing = torch.ldexp(torch.ones_like(ref, dtype=torch.float64), (exponent - 8).clamp(min=-133))
    diff = (out.double() - ref.double()).abs()
    return torch.where(diff <= zero.abs().double() * 2.0 ** -21, 0.0, diff / spacing)


def reference(method: str, zero, fines):
    """The exact merge of one tensor, in float64 (what a correctly rounded result would round)."""
    import torch

    taus = [f - zero for f in fines]
    if method == "linear":
        return sum(fines) / len(fines)
    if method == "task_arithmetic":
        return zero + 0.5 * sum(taus)
    n = len(taus)  # model_stock: the mean pairwise cosine, t = n cos / (1 + (n - 1) cos) clamped to [0, 1]
    flat = [t.reshape(-1) for t in taus]
    cos = torch.stack([torch.dot(a, b) / (a.norm() * b.norm()) for i, a in enumerate(flat) for b in flat[i + 1:]])
    c = cos.mean()
    weight = (n * c / (1 + (n - 1) * c)).clamp(0, 1) if c > 0 else torch.zeros(())
    return zero + weight * sum(taus) / n


def compare(method: str, ours: str, theirs: str, folder: str, n: int, device: str) -> dict:
    """Both outputs against the float64 merge (linear, task arithmetic, Model Stock) and against
    each other; TIES's differences located at the trim's cut."""
    import torch

    from orchestrator.merging import sparsify
    from orchestrator.merging.sources import FileSource

    mine, other = FileSource(ours), FileSource(theirs)
    base = FileSource(os.path.join(folder, "base.safetensors"))
    fines = [FileSource(os.path.join(folder, f"ft{i}.safetensors")) for i in range(n)]
    dev = device if device.startswith("cuda") else "cpu"
    c = {"names_match": sorted(mine.names()) == sorted(other.names()), "entries": 0, "ours_off": 0, "theirs_off": 0,
         "apart": 0, "max_apart": 0.0, "differ": 0, "at_cut": 0}
    for name in mine.names():
        a, b, zero = (src.get(name, dev).float() for src in (mine, other, base))
        c["entries"] += a.numel()
        apart = bf16_ulps(a, b, zero)
        c["apart"] += int((apart > 1).sum())
        c["max_apart"] = max(c["max_apart"], float(apart.max()))
        if method in ("linear", "task_arithmetic", "model_stock"):
            ref = reference(method, zero.double(), [f.get(name, dev).double() for f in fines])
            c["ours_off"] += int((bf16_ulps(a, ref, zero) > 1).sum())
            c["theirs_off"] += int((bf16_ulps(b, ref, zero) > 1).sum())
        if method == "ties":
            diff = a != b
            c["differ"] += int(diff.sum())
            at_cut = torch.zeros_like(diff)
            for fine in fines:
                magnitude = (fine.get(name, dev).float() - zero).abs()
                flat = magnitude.reshape(-1)
                cut = sparsify.kth_largest(flat, sparsify.keep_count(flat.numel(), 0.2))
                at_cut |= magnitude == cut
            c["at_cut"] += int((diff & at_cut).sum())
    return c


def verdict(method: str, c: dict) -> str:
    if method == "dare_ties":
        return "random masks differ by design: not compared"
    if not c["names_match"]:
        return "DIFFERENT tensor names"
    if method == "ties":
        where = "all" if c["differ"] == c["at_cut"] else f"only {c['at_cut']}"
        return f"{c['differ'] / c['entries']:.3%} of entries differ, {where} of them at a tied cut"
    return (f"> 1 bf16 ulp from the float64 merge: ours {c['ours_off']}, mergekit {c['theirs_off']} "
            f"of {c['entries']:,}; apart: {c['apart']}")


def agrees(method: str, c: dict) -> bool:
    if method == "dare_ties":
        return True
    if method == "ties":
        return c["names_match"] and c["differ"] == c["at_cut"]
    return c["names_match"] and c["ours_off"] == 0


# -- the run --------------------------------------------------------------------------------------------


def environment(args) -> str:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f", GPU {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    try:
        import mergekit  # noqa: F401
        from importlib.metadata import version
        mk = version("mergekit")
    except Exception:  # noqa: BLE001
        mk = "?"
    return (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; python bench/bench_merge_scale.py "
            f"{' '.join(sys.argv[1:])}; torch {torch.__version__}, mergekit {mk}, Python {platform.python_version()}; "
            f"{os.cpu_count()} CPUs ({cpu}){gpu}; load average {common.load():.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    t_start = time.perf_counter()
    print(f"bench_merge_scale: {environment(args)}", flush=True)
    mib = 1 << 20
    ok = True
    with common.temp_dir("bench_merge_scale-", args.keep) as tmp:
        for n in args.n:
            folder = os.path.join(tmp, f"n{n}")
            os.makedirs(folder)
            t = time.perf_counter()
            params, model_bytes = make_checkpoints(folder, args.shape, n, args.device)
            read_all(folder)
            print(f"\n{args.shape} shape: {params / 1e6:.1f}M parameters, {model_bytes / mib:.0f} MiB per model in "
                  f"bf16; a base and {n} fine-tunes made in {time.perf_counter() - t:.0f} s", flush=True)
            runs: dict[tuple[str, str], list[dict]] = {}
            starts: dict[str, list[float]] = {side: [] for side in SIDES}
            for r in range(args.repeats):
                groups = [[m] for m in args.methods] if not args.tiny else [args.methods]
                for group in groups:
                    for side in (SIDES if (r + len(group)) % 2 == 0 else SIDES[::-1]):  # alternate who goes first
                        res = run_side(side, folder, n, group, args)
                        starts[side].append(res["start"])
                        for m in res["merges"]:
                            runs.setdefault((side, m["method"]), []).append(m)
            rows, gpu = [], args.device.startswith("cuda")
            for method in args.methods:
                o, k = (statistics.median(x["seconds"] for x in runs[s, method]) for s in SIDES)
                so, sk = (statistics.median(starts[s]) for s in SIDES)
                ro, rk = (max(x["rss_peak"] for x in runs[s, method]) for s in SIDES)
                ao, ak = (max(x["rss_above"] for x in runs[s, method]) for s in SIDES)
                go, gk = (max(x["gpu_peak"] for x in runs[s, method]) for s in SIDES)
                c = compare(method, os.path.join(runs["ours", method][0]["out"], "model.safetensors"),
                            runs["mergekit", method][0]["out"], folder, n, args.device)
                faster = so + o <= sk + k
                lighter = ro <= rk and (not gpu or go <= 3 * model_bytes)
                ok &= faster and lighter and agrees(method, c)
                rows.append((method, o, so + o, k, sk + k, (so + o) / (sk + k), ro / mib, rk / mib, ao / mib, ak / mib,
                             go / model_bytes, gk / model_bytes, verdict(method, c)))
            print(f"N = {n}: seconds (merge only; start + merge), peak RSS MiB (process; above the RSS before the "
                  f"merge){'; GPU peak in models' if gpu else ''}; median of {args.repeats}")
            head = (f"{'merge':<16} {'ours s':>7} {'+start':>7} {'mergekit s':>10} {'+start':>7} {'ratio':>6} | "
                    f"{'RSS ours':>8} {'mergekit':>8} {'above':>6} {'above':>6}"
                    + (f" | {'GPU ours':>8} {'mergekit':>8}" if gpu else "") + " | outputs")
            common.print_table(head, [
                f"{m:<16} {o:>7.2f} {so_:>7.2f} {k:>10.2f} {sk_:>7.2f} {ratio:>5.2f}x | {ro:>8.0f} {rk:>8.0f} "
                f"{ao:>6.0f} {ak:>6.0f}" + (f" | {go:>7.2f}x {gk:>7.2f}x" if gpu else "") + f" | {v}"
                for m, o, so_, k, sk_, ratio, ro, rk, ao, ak, go, gk, v in rows])
            print(f"process start: ours {statistics.median(starts['ours']):.2f} s, mergekit "
                  f"{statistics.median(starts['mergekit']):.2f} s (imports); torch threads: both sides "
                  f"{args.threads or 'torch default'}")
    targets = "every merge's start + merge time and peak RSS at most mergekit's, outputs as stated" + \
        (", GPU peak <= 3x one model" if args.device.startswith("cuda") else "")
    print(f"\ntarget: {targets}: {'MET' if ok else 'NOT MET'}")
    print(f"bench_merge_scale finished in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
