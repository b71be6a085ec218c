"""The merge engine: per-tensor merge methods behind a registry (`methods/`, one file each),
fed one tensor at a time by a streaming executor (`executor.py`) from safetensors files or
in-memory state dicts, on any device.

Memory is the output plus O(N x the largest tensor): the executor reads each tensor of each
ingredient when the method asks for it (plain reads, no memory map of whole files) and
methods reduce over ingredients as they arrive, in float32 (float64 kept), cast once.
Nothing here knows about tasks, Ray or MLflow, so it runs anywhere torch does; the soup
side's recipes cook on it, `python -m orchestrator.pool merge` runs it on imported
checkpoints, and bench/bench_merge_scale.py measures it against mergekit.
"""
