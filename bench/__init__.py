"""Benchmarks of the orchestrator: run as `python bench/bench_<name>.py` (or
`python -m bench.bench_<name>` from the repository root); what they share is in bench/common.py."""
