"""Task registry: config `task.name` -> Task class."""

from orchestrator.tasks.base import Task, TaskData, arch_fingerprint
from orchestrator.tasks.glyphs import GlyphsTask
from orchestrator.tasks.hf_text import HFTextTask
from orchestrator.tasks.timm_image import TimmImageTask

# transformers and timm are imported only when their task is used
TASKS: dict[str, type[Task]] = {t.name: t for t in (GlyphsTask, HFTextTask, TimmImageTask)}

__all__ = ["TASKS", "Task", "TaskData", "arch_fingerprint"]
