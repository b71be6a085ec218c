"""Task registry: config `task.name` -> Task class."""

from orchestrator.soup.tasks.base import Task, TaskData
from orchestrator.soup.tasks.glyphs import GlyphsTask
from orchestrator.soup.tasks.hf_text import HFTextTask
from orchestrator.soup.tasks.timm_image import TimmImageTask

# transformers and timm are imported only when their task is used
TASKS: dict[str, type[Task]] = {t.name: t for t in (GlyphsTask, HFTextTask, TimmImageTask)}

__all__ = ["TASKS", "Task", "TaskData"]
