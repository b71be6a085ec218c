"""Task registry: config `task.name` -> Task class."""

from orchestrator.tasks.base import Task, TaskData, arch_fingerprint
from orchestrator.tasks.glyphs import GlyphsTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (GlyphsTask,)}

__all__ = ["TASKS", "Task", "TaskData", "arch_fingerprint"]
