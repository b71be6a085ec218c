"""Training dynamics: what each trial learns about each training example (dataset cartography).

record.py      the recorder a fine-tuning loop feeds from its own training forward pass
cartography.py the math: per-example confidence / variability / correctness, regions, selection
report.py      a sweep's data map from the pool: plot, tables, hard examples, label-error triage
"""
