"""The shared starting weights of a sweep, made once and cached in the pool."""

from __future__ import annotations

import time
from typing import Any

from orchestrator.common.pool import Pool, Row
from orchestrator.common.weights import arch_fingerprint
from orchestrator.soup.tasks.base import Task, TaskData


def ensure_pretrained(pool: Pool, task: Task, data: TaskData, sweep: str) -> dict[str, Any]:
    """The pretrained model with its fitted head, made once per pretraining settings and
    cached in the pool: every trial of every sweep on them starts from exactly these."""
    pid = task.pretrained_id()
    if pool.has(pid):
        print(f"pretrained weights: cached in the pool ({pid})")
        return pool.get(pid)
    print(f"pretrained weights: not in the pool, preparing {task.name} once (cached as {pid}) ...", flush=True)
    t0 = time.time()
    state = task.pretrain(data)
    print(f"prepared in {time.time() - t0:.0f} s")
    return pool.add(Row(id=pid, kind="pretrained", sweep=sweep, task=task.name, status="ok",
                        arch=arch_fingerprint(state), hparams={k: task.settings[k] for k in task.pretrain_settings}),
                    state)
