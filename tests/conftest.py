"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

import os

import pytest

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard/CSV/JSON per trial

# A tiny glyph task: seconds to pretrain, same code paths as the default.
TINY_TASK = [
    "task.width=8", "task.pretrain_per_glyph=2", "task.pretrain_epochs=1", "task.ood_font_per_digit=3",
    "hyperparameters.epochs={randint: [1, 2]}", "hyperparameters.lr={loguniform: [1.0e-3, 3.0e-3]}",
]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()
